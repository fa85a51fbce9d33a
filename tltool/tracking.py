"""TensorBoard event files in a run folder (`RUN/tensorboard/`), written with
torch.utils.tensorboard: each epoch's numbers as it ends (losses, validation scores, learning
rates), then the hyper-parameters with the final metrics and the PR curves of the validation
and test splits. `tensorboard --logdir runs/` shows every run side by side.

The training loop knows nothing of TensorBoard: a `Tracker` receives the epochs through
tltool.progress, next to whatever the CLI shows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tltool import progress

log = logging.getLogger("tltool")

# metrics.csv column -> TensorBoard tag
SCALARS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "align_loss": "loss/align",
    "val_accuracy": "val/accuracy", "val_auroc": "val/auroc", "val_f1": "val/f1",
    "val_rmse": "val/rmse", "val_r2": "val/r2", "target_val_score": "val/target_watch",
    "lr_head": "lr/head", "lr_backbone": "lr/backbone",
}
HPARAMS = ("model.backbone", "model.weights", "model.strategy", "model.frozen_layers",
           "model.head", "model.prior", "train.lr", "train.backbone_lr_mult", "train.epochs",
           "train.batch_size", "train.weight_decay", "train.source_weight", "adapt.method",
           "target.n_train", "seed")
FINAL = ("accuracy", "auroc", "f1", "average_precision", "log_loss", "ece", "map", "rmse", "r2")


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a trimmed install may lack it
        return None
    return SummaryWriter


class Tracker(progress.Reporter):
    """Forwards every report to `inner` (what the CLI shows) and writes epochs as scalars."""

    def __init__(self, folder: Path, inner: progress.Reporter):
        self.inner, self.folder = inner, folder
        writer = _writer_class()
        if writer is None:
            log.warning("tensorboard is not installed: no event files in %s "
                        "(pip install tensorboard)", folder)
        self.writer = None if writer is None else writer(log_dir=str(folder))

    def scalars(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            v = row.get(key)
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                self.writer.add_scalar(tag, v, step)

    def epoch(self, e: progress.Epoch) -> None:
        self.scalars(e.metrics, e.epoch)
        if self.writer is not None:
            self.writer.add_scalar("time/epoch_seconds", e.seconds, e.epoch)
            self.writer.flush()
        self.inner.epoch(e)

    @contextmanager
    def steps(self, what: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        with self.inner.steps(what, total) as advance:
            yield advance

    def training_done(self) -> None:
        self.inner.training_done()

    def final(self, config: dict[str, Any], summary,
              curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Hyper-parameters with the final metrics of a trained run's summary
        (tltool.runs.summary.TrainedSummary), and PR curves per split (`curves`: split ->
        (labels, probabilities))."""
        if self.writer is None:
            return
        hparams = {}
        for key in HPARAMS:
            v: Any = config
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            hparams[key] = v if isinstance(v, int | float | str | bool) else str(v)
        final = {}
        for split, m in (("val", summary.val or {}), ("test", summary.test or {})):
            for k in FINAL:
                v = m.get(k)
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    final[f"hparam/{split}_{k}"] = float(v)
        self.writer.add_hparams(hparams, final, run_name=".")
        for split, (y, proba) in curves.items():
            for name, truth, score in _pr_sets(y, proba, summary.classes, summary.multilabel):
                self.writer.add_pr_curve(f"pr/{split}/{name}", truth, score, global_step=0)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _pr_sets(y, proba, classes: list[str], multilabel: bool):
    y = np.asarray(y)
    if multilabel:
        return [(c, y[:, j].astype(int), proba[:, j]) for j, c in enumerate(classes)]
    if len(classes) == 2:
        return [(classes[1], (y == 1).astype(int), proba[:, 1])]
    return [(c, (y == j).astype(int), proba[:, j]) for j, c in enumerate(classes)]


@contextmanager
def tracking(folder: Path, enabled: bool, replay: list[dict[str, Any]] | None = None
             ) -> Iterator[Tracker | None]:
    """A Tracker installed as the current reporter for a run (None when disabled); `replay`:
    metrics.csv rows of an interrupted run being resumed, written first."""
    if not enabled:
        yield None
        return
    tracker = Tracker(folder, progress.current())
    for row in replay or []:
        try:
            tracker.scalars(row, int(row["epoch"]))
        except (KeyError, TypeError, ValueError):
            continue
    with progress.use(tracker):
        yield tracker
