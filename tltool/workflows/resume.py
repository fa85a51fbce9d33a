"""resume: continue an interrupted pretrain or freeze-finetune (killed, stopped, failed) from its
last epoch checkpoint, into a new run folder that names its parent.

Every epoch's last.pt holds the training state (tltool.engine.state.TrainState): round and
epoch, the optimiser's moments, the random number generators (data order, dropout,
augmentation), early stopping's count, the best score so far, the memory layouts chosen, the
metrics of earlier rounds. The resumed run copies the parent's metrics.csv rows and best.pt,
rebuilds the round exactly as it was (frozen blocks, prefix caches) and goes on: on the CPU
its metrics.json is the one an uninterrupted run writes, byte for byte.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from tltool.checkpoint import Checkpoint
from tltool.engine.drive import Resume
from tltool.engine.state import TrainState
from tltool.errors import RunError
from tltool.runs.opening import last_checkpoint_path, run_config
from tltool.runs.status import run_status
from tltool.runs.summary import Result
from tltool.workflows.train import ResumeFrom, TrainRequest, train_run

log = logging.getLogger("tltool")
RESUMABLE = ("pretrain", "freeze-finetune")


def _resumable(ref: str | Path) -> tuple[Path, str]:
    """The run folder and its command, when it is an interrupted training run."""
    run = Path(ref)
    status = run_status(run) if run.is_dir() else None
    if status is None:
        raise RunError(f"{ref}: not a tltool run folder (run.json missing or damaged)")
    command, state = status.get("command"), status.get("status")
    if command not in RESUMABLE:
        raise RunError(f"{ref}: a run of `{command}`; resume continues an interrupted "
                       f"{' or '.join(RESUMABLE)} run")
    if state == "complete":
        raise RunError(f"{ref}: the run is complete; nothing to resume")
    if state == "running":
        raise RunError(f"{ref}: the run is still running (process {status.get('pid')} on "
                       f"{status.get('host')}); stop it first, or wait")
    return run, command


def resume(ref: str | Path, argv: list[str] | None = None) -> Result:
    """Continue the run folder `ref` into a new run; returns the new run's result."""
    run, command = _resumable(ref)
    cfg = run_config(run)
    # the new run goes beside its parent, whatever the current folder
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(
        update={"root": str(run.resolve().parent.parent)}), "name": run.resolve().parent.name})
    last_path = last_checkpoint_path(run)
    if not last_path.is_file():
        log.warning("%s: no epoch finished before the interruption; training starts again "
                    "from the beginning (in a new run folder)", run)
        return train_run(TrainRequest(cfg, command, argv))
    last = Checkpoint.load(last_path)
    if last.resume is None:
        raise RunError(f"{last_path}: holds no training state (written by an older tltool?); "
                       f"train again instead")
    state = TrainState.from_dict(last.resume, last_path)
    rounds = len(cfg.train.rounds) if cfg.train.rounds else 1
    if state.round > rounds:
        raise RunError(f"{last_path}: damaged training state (round {state.round} of a config "
                       f"with {rounds} round(s)); train again instead")
    rows = _rows(run / "metrics.csv", state.epoch_total)
    log.info("resuming %s at round %d, epoch %d", run, state.round, state.epoch_total)
    going_on = ResumeFrom(run.resolve(), last, Resume(state, last.state_dict, rows))
    return train_run(TrainRequest(cfg, command, argv, resume=going_on))


def _rows(path: Path, epochs: int) -> list[dict[str, str]]:
    """The parent's metrics.csv rows of the epochs its last.pt had finished."""
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("epoch", "").isdigit()]
    except OSError:
        raise RunError(f"{path}: missing or unreadable; cannot continue its epochs") from None
    kept = [r for r in rows if int(r["epoch"]) <= epochs]
    if len(kept) != epochs:
        raise RunError(f"{path}: holds {len(kept)} epochs of the {epochs} its last.pt finished")
    return [{k: (None if v == "" else v) for k, v in r.items()} for r in kept]
