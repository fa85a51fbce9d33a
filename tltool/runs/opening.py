"""Opening run folders: the one place commands (evaluate, predict, ensemble, export, resume,
and model.weights of a later run) read a trained run's config, checkpoint, model and decision
rule, each checked before use, into a `TrainedRun`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tltool.checkpoint import BEST, LAST, Checkpoint, checkpoint_path
from tltool.config import ExperimentConfig, validate_config
from tltool.decision import DamagedDecision, Decision
from tltool.errors import RunError
from tltool.models.loading import load_trained
from tltool.runs.files import write_json
from tltool.runs.status import resolve_run, run_status

# Commands whose run folder holds a trained model (checkpoints/best.pt) for evaluate / predict /
# ensemble and as weights of a later run.
TRAINING_COMMANDS = ("pretrain", "freeze-finetune", "select")
THRESHOLDS = "thresholds.json"
ENSEMBLE_FILE = "ensemble.json"


@dataclass
class TrainedRun:
    """A trained run folder, opened: its config, checkpoint, model and decision rule."""

    path: Path
    config: ExperimentConfig
    checkpoint: Checkpoint
    model: Any  # tltool.models.TransferModel
    decision: Decision
    _runtime: Any = field(default=None, repr=False)

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes

    @property
    def kind(self) -> str:
        return self.checkpoint.kind

    @property
    def command(self) -> str | None:
        """The command that made the folder (a select run's checkpoint may say otherwise)."""
        return (run_status(self.path) or {}).get("command")

    @property
    def data_section(self):
        """The config's data section the model was trained on."""
        return getattr(self.config, self.checkpoint.trained_on)

    def runtime(self, data):
        """The runtime this run's model predicts with (its own device, precision and memory
        layouts: tltool.runtime.inference_runtime), set up once."""
        if self._runtime is None:
            from tltool.runtime import inference_runtime

            self._runtime = inference_runtime(self.config.train, self.checkpoint.image_input,
                                              self.model, data)
        return self._runtime


def run_config(run: Path) -> ExperimentConfig:
    """A run's config.yaml, checked like any config."""
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run}: config.yaml missing; not a complete tltool run")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise RunError(f"{path}: damaged (not valid YAML); this run cannot be reused") from None
    if not isinstance(raw, dict):
        raise RunError(f"{path}: damaged (not a mapping of keys); this run cannot be reused")
    return validate_config(raw, origin=str(path))


def best_checkpoint(run: Path) -> Checkpoint:
    return Checkpoint.load(checkpoint_path(run, BEST))


def last_checkpoint_path(run: Path) -> Path:
    return checkpoint_path(run, LAST)


def open_run(ref: str | Path) -> TrainedRun:
    """One trained model's run folder, every part checked."""
    run = resolve_run(ref, commands=TRAINING_COMMANDS)
    if is_ensemble(run):
        members = member_runs(run)
        raise RunError(f"{ref}: an ensemble of {len(members)} routes (select.rule ensemble), "
                       f"not one model; evaluate and predict take it as it is, this command "
                       f"takes one model: one of its members, e.g. {run / members[0]}")
    cfg = run_config(run)
    ckpt = best_checkpoint(run)
    model = load_trained(ckpt)
    decision = read_decision(run, ckpt.classes)
    try:
        decision.check_fits(ckpt.kind)
    except DamagedDecision as exc:
        raise RunError(f"{run / THRESHOLDS}: damaged ({exc})") from None
    return TrainedRun(run, cfg, ckpt, model, decision)


def read_decision(run: Path, classes: list[str]) -> Decision:
    """The run's saved decision rule (thresholds.json) of a model of `classes`, checked
    before it is applied."""
    path = run / THRESHOLDS
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunError(f"{path}: missing or unreadable") from None
    try:
        return Decision.from_dict(raw, classes)
    except DamagedDecision as exc:
        raise RunError(f"{path}: damaged ({exc})") from None


@dataclass
class Members:
    """What evaluate and predict apply: one trained run, or an ensemble run's members, with
    the decision rule of the whole (an ensemble's own, chosen on its averaged predictions)."""

    path: Path
    runs: list[TrainedRun]
    decision: Decision

    @property
    def first(self) -> TrainedRun:
        return self.runs[0]


def open_members(ref: str | Path) -> Members:
    """A trained run, or an ensemble run's members, and the decision rule to apply."""
    run = resolve_run(ref, commands=(*TRAINING_COMMANDS, "ensemble"))
    if (run_status(run) or {}).get("command") != "ensemble" and not is_ensemble(run):
        member = open_run(run)
        return Members(run, [member], member.decision)
    members = [open_run(m) for m in member_runs(run)]
    return Members(run, members, read_decision(run, members[0].classes))


def is_ensemble(run: Path) -> bool:
    """An ensemble run (tltool ensemble, or a select run that averages routes)."""
    return (run / ENSEMBLE_FILE).exists()


def member_runs(run: Path) -> list[str]:
    """The member run folders of an ensemble run."""
    try:
        members = json.loads((run / ENSEMBLE_FILE).read_text())["members"]
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise RunError(f"{run}: ensemble.json missing or unreadable") from None
    # relative paths (a select ensemble's members/NAME) are inside the run folder
    return [m if Path(m).is_absolute() else str(run / m) for m in members]


def ensemble_members(ref: str | Path) -> list[str]:
    """A training run, or an ensemble run standing for its members (ensembles of select
    ensembles average every member of each, equally)."""
    run = resolve_run(ref, commands=TRAINING_COMMANDS)
    return member_runs(run) if is_ensemble(run) else [str(run)]


def write_ensemble_file(folder: Path, members: list[str], weights: str | None = None) -> None:
    """ensemble.json in a run folder: the members an ensemble run averages."""
    content: dict[str, Any] = {"members": members}
    if weights is not None:
        content["weights"] = weights
    write_json(Path(folder) / ENSEMBLE_FILE, content)


def write_decision(folder: Path, decision: Decision) -> None:
    """thresholds.json in a run folder: the run's decision rule."""
    write_json(Path(folder) / THRESHOLDS, decision.to_dict())
