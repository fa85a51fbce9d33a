"""Driving one model's training: `fit` runs every round's epochs with early stopping on the
model's own validation rows, writes metrics.csv and the checkpoints, and returns what training
did. (select's cross-validation drives several fold models in lockstep instead:
tltool.select.crossval, with the same Trainer and EarlyStopping.)"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from typing import Any

import torch

from tltool import progress
from tltool.checkpoint import BEST, LAST
from tltool.engine.loop import EpochResult, Trainer, score_of
from tltool.engine.plan import Sink, TrainingData, TrainingPlan
from tltool.engine.state import EarlyStopping, TrainingReport, TrainState, watch_verdict
from tltool.metrics import epoch_scores
from tltool.runs.files import writing

FIELDS = ["round", "epoch", "train_loss", "val_loss", "val_accuracy", "val_auroc", "val_f1",
          "lr_head", "lr_backbone", "trainable_params", "align_loss"]


@dataclass
class Resume:
    """Where an interrupted run stopped: its last.pt's training state and weights, and the
    metrics.csv rows written so far."""

    state: TrainState
    weights: dict[str, torch.Tensor]
    rows: list[dict[str, Any]]


def _fields(plan: TrainingPlan, watching: bool) -> list[str]:
    fields = list(FIELDS)
    if plan.task.regression:
        fields[4:7] = ["val_rmse", "val_r2"]
    if watching:
        fields.append("target_val_score")
    return fields


class _Epochs:
    """One fit's bookkeeping per epoch: the metrics.csv row, early stopping, checkpoints."""

    def __init__(self, tr: Trainer, sink: Sink, writer, fh):
        self.tr, self.sink, self.writer, self.fh = tr, sink, writer, fh
        es = tr.cfg.early_stopping
        self.monitor = es.monitor
        self.stopping = EarlyStopping(es.patience)
        self.watched: dict[int, float] = {}

    def row(self, r: int, res: EpochResult) -> dict[str, Any]:
        tr = self.tr
        row = {"round": r, "epoch": tr.epoch_total, "train_loss": round(res.train_loss, 6),
               "lr_head": tr.lrs["head"], "lr_backbone": tr.lr_backbone,
               "trainable_params": tr.freeze.trainable,
               "align_loss": None if res.align_loss is None else round(res.align_loss, 6)}
        if res.watch is not None:
            row["target_val_score"] = round(res.watch, 6)
            self.watched[tr.epoch_total] = res.watch
        return row

    def validate(self, r: int, res: EpochResult, row: dict[str, Any]) -> bool:
        """Score the validation rows; keep the best weights; True when the round should stop
        early."""
        tr, task, val = self.tr, self.tr.task, self.tr.val
        val_loss = task.val_loss(res.logits, val.y)
        report = epoch_scores(val.y.numpy(), task.proba(res.logits).double().numpy(),
                              task.multilabel, task.regression)
        row |= {"val_loss": round(val_loss, 6),
                **{f"val_{k}": None if report.get(k) is None else round(report[k], 6)
                   for k in ("accuracy", "auroc", "f1", "rmse", "r2")}}
        score = score_of(report, val_loss, self.monitor)
        if self.stopping.improved(score):
            tr.remember_best(score)
            self.sink.save(BEST, tr.epoch_total)
            return False
        if self.stopping.should_stop:
            self.sink.log(f"round {r}: early stop at epoch {tr.epoch_total} (no "
                          f"{self.monitor} improvement for {self.stopping.patience} epochs)")
            return True
        return False

    def run_round(self, r: int, left: int, rounds: int) -> None:
        """`left` epochs of round r (fewer when early stopping ends it)."""
        tr = self.tr
        for i in range(left):
            tick = time.perf_counter()
            res = tr.run_epoch()
            row = self.row(r, res)
            done = i == left - 1
            if res.logits is not None and self.validate(r, res, row):
                done = True
            self.writer.writerow(row)
            self.fh.flush()
            self.sink.save(LAST, tr.epoch_total, tr.state(self.stopping.stale, done,
                                                                self.watched))
            progress.current().epoch(progress.Epoch(
                round=r, rounds=rounds, epoch=tr.epoch_total, planned=tr.plan.epochs,
                seconds=time.perf_counter() - tick, metrics=row))
            if done and i < left - 1:
                break


def fit(model, data: TrainingData, plan: TrainingPlan, sink: Sink,
        resume: Resume | None = None) -> TrainingReport:
    """Train through every round; restore the best weights and return what training did.

    `resume`: continue an interrupted run exactly (its state, weights and metrics.csv rows)."""
    tr = Trainer(model, data, plan, sink.log)
    watching = data.adapt is not None and data.adapt.watch is not None
    state = None if resume is None else resume.state
    with writing(sink.metrics_csv), open(sink.metrics_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_fields(plan, watching), extrasaction="ignore")
        writer.writeheader()
        for row in [] if resume is None else resume.rows:
            writer.writerow(row)
        fh.flush()
        epochs = _Epochs(tr, sink, writer, fh)
        if state is not None:
            epochs.watched = {int(k): v for k, v in state.watched.items()}
        for r, rnd in enumerate(plan.rounds, start=1):
            if state is not None and r < state.round:
                continue  # finished before the interruption
            if state is not None and r == state.round:
                tr.resume_round(state, resume.weights)
                epochs.stopping.best = tr.best["score"]
                epochs.stopping.start_round(state.stale)
                left = 0 if state.round_done else rnd.epochs - state.round_epoch
                state = None
            else:
                tr.start_round(r)
                epochs.stopping.start_round()
                left = rnd.epochs
            epochs.run_round(r, left, len(plan.rounds))
            tr.end_round()
    progress.current().training_done()
    if data.val is None or tr.epoch_total == 0:
        sink.save(BEST, tr.epoch_total)
    report = tr.report(epochs.monitor)
    _note_best_epoch(report, tr, data, plan, sink)
    if watching and epochs.watched:
        report.target_watch = watch_verdict(epochs.watched, report.best_epoch)
    return report


def _note_best_epoch(report: TrainingReport, tr: Trainer, data: TrainingData,
                     plan: TrainingPlan, sink: Sink) -> None:
    if data.val is None or tr.epoch_total <= 1:
        return
    if report.best_epoch == tr.epoch_total == plan.epochs:
        sink.log("note: the best epoch is the last one; training may be too short (raise "
                 "train.epochs)")
    elif report.best_epoch == 1:
        sink.log("note: the best epoch is the first; later epochs only made the validation "
                 "score worse (a lower train.lr, or the starting weights were already best)")
