"""Opening run folders: the one place workflows (evaluate, predict, ensemble, export) read a
trained run's config, checkpoint, model and decision rule, each checked before use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tltool.decision import DamagedDecision, Decision
from tltool.errors import RunError
from tltool.runs import load_checkpoint, resolve_run, run_status
from tltool.workflows.common import TRAINING_COMMANDS, load_trained, run_config


def open_run(ref: str | Path):
    """A trained run: (folder, config, checkpoint, model, decision rule), each checked."""
    run = resolve_run(ref, commands=TRAINING_COMMANDS)
    if (run / "ensemble.json").exists():
        members = member_runs(run)
        raise RunError(f"{ref}: an ensemble of {len(members)} routes (select.rule ensemble), "
                       f"not one model; evaluate and predict take it as it is, this command "
                       f"takes one model: one of its members, e.g. {run / members[0]}")
    cfg = run_config(run)
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    model = load_trained(ckpt)
    decision = read_decision(run)
    try:
        Decision.of(decision).check_fits(ckpt["classes"], bool(ckpt.get("multilabel")),
                                         bool(ckpt["spec"].get("target_scale")))
    except DamagedDecision as exc:
        raise RunError(f"{run / 'thresholds.json'}: damaged ({exc})") from None
    return run, cfg, ckpt, model, decision


def read_decision(run: Path) -> dict[str, Any]:
    """The run's saved decision rule (thresholds.json), checked before it is applied."""
    path = run / "thresholds.json"
    try:
        decision = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunError(f"{path}: missing or unreadable") from None

    try:
        Decision.of(decision)
    except DamagedDecision as exc:
        raise RunError(f"{path}: damaged ({exc})") from None
    return decision


def open_members(ref: str | Path):
    """A trained run, or an ensemble run's members, and the decision rule to apply."""
    run = resolve_run(ref, commands=(*TRAINING_COMMANDS, "ensemble"))
    if (run_status(run) or {}).get("command") != "ensemble" and \
            not (run / "ensemble.json").exists():
        member = open_run(run)
        return run, [member], member[4]
    members = [open_run(m) for m in member_runs(run)]
    return run, members, read_decision(run)


def state_only(ckpt: dict[str, Any]):
    """A Weights-like record that carries only the run's input state (no new weights)."""
    from tltool.inputs import Weights

    return Weights("run", ckpt={"preprocessor": ckpt["preprocessor"]})


def member_runs(run: Path) -> list[str]:
    """The member run folders of an ensemble run."""
    try:
        members = json.loads((run / "ensemble.json").read_text())["members"]
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise RunError(f"{run}: ensemble.json missing or unreadable") from None
    # relative paths (a select ensemble's members/NAME) are inside the run folder
    return [m if Path(m).is_absolute() else str(run / m) for m in members]
