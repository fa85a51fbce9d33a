"""What a trained route leaves in its run folder: the freeze plan, timing, the decision rule
chosen on held-out rows, metrics.json (a TrainedSummary) and the plots. Shared by pretrain /
freeze-finetune, select (its chosen route and every member of an average) and select's
source models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tltool import features, plots
from tltool.decision import Decision, choose_decision
from tltool.engine.state import TrainingReport
from tltool.features import Kept, Pass
from tltool.inputs import split_digest
from tltool.routes.route import Route, describe_route
from tltool.runs.files import write_json, write_text
from tltool.runs.folder import RunFolder
from tltool.runs.opening import write_decision
from tltool.runs.summary import TrainedSummary
from tltool.runtime import Runtime
from tltool.tensors import Tensors


@dataclass
class Scoring:
    """The rows a trained model is scored on (`val` None: none held out, as in a refit on
    every labelled row) and, when it was chosen elsewhere (select: on out-of-fold
    predictions), its decision rule; `extra`: what metrics.json adds (select's choice)."""

    val: Tensors | None
    test: Tensors
    decision: Decision | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trained:
    """A route's network after training, what training did, and the runtime it ran with."""

    model: Any  # tltool.models.TransferModel
    report: TrainingReport
    rt: Runtime


def write_outputs(run: RunFolder, route: Route, trained: Trained, scoring: Scoring,
                  tracker=None) -> TrainedSummary:
    """Freeze plan, timing, thresholds (chosen on `scoring.val` unless given), metrics and
    plots of a trained route; returns its summary (metrics.json)."""
    cfg, inputs, m = route.cfg, route.inputs, route.cfg.model
    model, report, rt = trained.model, trained.report, trained.rt
    val, test = scoring.val, scoring.test
    write_text(run.file("freeze_plan.txt"), report.plan_text + "\n")
    write_json(run.file("timing.json"), report.timing)
    write_json(run.file("freeze_plan.json"), report.plans)
    batch = max(2 * cfg.train.batch_size, 256)
    # image models predict through pooled backbone features, kept in the run folder for
    # evaluate (tltool.features)
    def predicted(rows: Tensors, split: str) -> np.ndarray:
        step = Pass(route.multilabel, batch, f"predict: {split}")
        return features.predict(model, rows, rt, step, Kept(write=run, name=split))[0]

    proba_val = None if val is None else predicted(val, "val")
    proba_test = predicted(test, "test")
    decision = scoring.decision or choose_decision(cfg.decision, route.classes, route.kind,
                                                   proba_val, val.y.numpy())
    write_decision(run.path, decision)
    params = report.params or (0, sum(p.numel() for p in model.parameters()))
    summary = TrainedSummary(
        route.command, name=cfg.name, seed=cfg.seed, weights=m.weights,
        weights_file=None if route.weights.path is None else str(route.weights.path.resolve()),
        route=describe_route(route),
        data=inputs.data.summary() | {"splits": split_digest(inputs.data)},
        classes=route.classes, multilabel=route.multilabel, decision=decision,
        scores={"val": None if val is None else decision.report(val.y.numpy(), proba_val),
                "test": decision.report(test.y.numpy(), proba_test)},
        training=report, params=params, adapt=route.adapt_info, extra=scoring.extra)
    summary.write(run.path)
    if tracker is not None:
        curves = {} if route.regression else {
            split: (rows.y.numpy(), decision.calibrated(p))
            for split, rows, p in (("val", val, proba_val), ("test", test, proba_test))
            if rows is not None and len(rows.y)}
        tracker.final(cfg.model_dump(mode="json"), summary, curves)
    if (run.file("metrics.csv")).exists() and report.epochs_run:
        plots.learning_curves(run.file("metrics.csv"), run.file("plots", "learning_curves.png"),
                              report.best_epoch)
    plot_test_split(run, TestSplit(test.y.numpy(), proba_test, summary.test, route.classes,
                                   f"{route.label} (test split)"), decision)
    return summary


@dataclass
class TestSplit:
    """A model's predictions on a test split, with its report and the plots' title."""

    y: np.ndarray
    proba: np.ndarray
    report: dict[str, Any]
    classes: list[str]
    title: str


def plot_test_split(run: RunFolder, split: TestSplit, decision: Decision) -> None:
    """A trained model's test-split plots (the validation split's: `tltool evaluate`)."""
    if decision.regression:
        plots.predicted_vs_true(split.y, split.proba[:, 0],
                                run.file("plots", "predicted_vs_true_test.png"), split.title)
        return
    if not decision.multilabel:
        plots.confusion_matrix(split.report["confusion_matrix"], split.classes,
                               run.file("plots", "confusion_matrix_test.png"), "test split")
    if len(split.y):
        plots.decision_plots(split.y, split.proba, decision, run.file("plots"), split.title)


def checkpoint_saver(run: RunFolder, route: Route, model, command: str):
    """`save(name, epoch, state=None)`: the model's current weights as checkpoints/NAME, with
    the route's classes, label, task and input encoding (`state`: the training state a
    resumed run continues from, tltool.engine.state.TrainState)."""
    from tltool.checkpoint import Checkpoint

    like = Checkpoint(command, 0, model.spec, route.classes, route.label, route.kind,
                      route.inputs.state, {})

    def save(name: str, epoch: int, state=None) -> None:
        run.save_checkpoint(name, Checkpoint.of_model(
            model, like, epoch, None if state is None else state.to_dict()))

    return save
