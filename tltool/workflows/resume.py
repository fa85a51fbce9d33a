"""resume: continue an interrupted pretrain or freeze-finetune (killed, stopped, failed) from its
last epoch checkpoint, into a new run folder that names its parent.

Every epoch's last.pt holds the training state: round and epoch, the optimiser's moments, the
random number generators (data order, dropout, augmentation), early stopping's count, the best
score so far, the memory layouts chosen, the metrics of earlier rounds. The resumed run copies
the parent's metrics.csv rows and best.pt, rebuilds the round exactly as it was (frozen blocks,
prefix caches) and goes on: on the CPU its metrics.json is the one an uninterrupted run writes,
byte for byte.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from tltool.errors import RunError
from tltool.runs import load_checkpoint, run_status
from tltool.workflows.common import log, run_config

RESUMABLE = ("pretrain", "freeze-finetune")


def resume(ref: str | Path, argv: list[str] | None = None) -> dict[str, Any]:
    """Continue the run folder `ref` into a new run; returns the new run's result."""
    from tltool.workflows.train import _train

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
    cfg = run_config(run)
    # the new run goes beside its parent, whatever the current folder
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(
        update={"root": str(run.resolve().parent.parent)}), "name": run.resolve().parent.name})
    last_path = run / "checkpoints" / "last.pt"
    if not last_path.is_file():
        log.warning("%s: no epoch finished before the interruption; training starts again "
                    "from the beginning (in a new run folder)", run)
        return _train(cfg, command, argv)
    last = load_checkpoint(last_path)
    if "resume" not in last:
        raise RunError(f"{last_path}: holds no training state (written by an older tltool?); "
                       f"train again instead")
    _check_state(last["resume"], last_path)
    rounds = len(cfg.train.rounds) if cfg.train.rounds else 1
    if last["resume"]["round"] > rounds:
        raise RunError(f"{last_path}: damaged training state (round {last['resume']['round']} "
                       f"of a config with {rounds} round(s)); train again instead")
    rows = _rows(run / "metrics.csv", last["resume"]["epoch_total"])
    log.info("resuming %s at round %d, epoch %d", run, last["resume"]["round"],
             last["resume"]["epoch_total"])
    return _train(cfg, command, argv, resume_from={"run": run.resolve(), "last": last,
                                                   "rows": rows})


STATE_KEYS = {"round": int, "round_epoch": int, "epoch_total": int, "stale": int,
              "round_done": bool, "best": dict, "optimizer": dict, "layouts": list,
              "precision": str, "plans": list, "checks": list, "caches": list, "timing": dict,
              "watched": dict, "numpy_rng": dict, "best_state": (dict, type(None))}


def _check_state(state: Any, path: Path) -> None:
    """The training state comes from a file: its fields' types are checked before use."""
    import torch

    problems = [k for k, kind in STATE_KEYS.items()
                if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if not problems:
        problems = [k for k in ("generator", "torch_rng", "round_rng")
                    if not isinstance(state.get(k), torch.Tensor)]
    if not problems and not (1 <= state["round"] and 0 <= state["round_epoch"] <=
                             state["epoch_total"] <= 1_000_000):
        problems = ["round / epoch counts"]
    if problems:
        raise RunError(f"{path}: damaged training state ({', '.join(problems)}); train again "
                       f"instead")


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
