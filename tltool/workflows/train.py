"""pretrain and freeze-finetune: prepare the route, create the run folder, train, write the
outputs (freeze plan, thresholds chosen on validation rows, metrics, plots)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tltool import calibration, distributed, features, plots
from tltool.config import ExperimentConfig
from tltool.decision import decision_rule, report
from tltool.errors import ConfigError
from tltool.inputs import split_digest
from tltool.models import TransferModel
from tltool.runs import write_json, write_text
from tltool.runtime import Runtime, make_runtime
from tltool.tensors import Tensors
from tltool.tracking import tracking
from tltool.workflows.common import checkpoint_payload, load_state, log, new_run, pin_config
from tltool.workflows.routes import (
    Route,
    build,
    check_built,
    describe_route,
    pooled_tensors,
    prepare,
    train_route,
)

# Re-exported: the decision rule and reports used to live here.
__all__ = ["decision_rule", "freeze_finetune", "pretrain", "report", "write_outputs"]


def pretrain(cfg: ExperimentConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Train backbone + head on the source data (optionally starting from weights)."""
    if cfg.source is None:
        raise ConfigError("source: pretrain needs a `source` data section")
    return _train(cfg, "pretrain", argv)


def freeze_finetune(cfg: ExperimentConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Transfer: source backbone + new head, freeze per the config, train on the target."""
    if cfg.target is None:
        raise ConfigError("target: freeze-finetune needs a `target` data section")
    return _train(cfg, "freeze-finetune", argv)


def _train(cfg: ExperimentConfig, command: str, argv,
           resume_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """`resume_from`: {"run": the interrupted run folder, "last": its last.pt, "rows": its
    metrics.csv rows} to continue from (tltool resume)."""
    route = prepare(cfg, command)
    model = build(route, cfg.seed)
    check_built(route, model)
    rt = make_runtime(cfg.train, route.spec.input == "image")
    inputs = route.inputs
    resume = None
    if resume_from is not None and not (route.source_only or route.classic):
        load_state(model, resume_from["last"]["state_dict"], f"{resume_from['run']} last.pt")
        state = resume_from["last"]["resume"]
        resume = {"state": state, "rows": resume_from["rows"],
                  "weights": resume_from["last"]["state_dict"]}
    if route.weights.path is not None:
        log.info("weights: %s", route.weights.path)
    note = {"resumed_from": str(resume_from["run"])} if resume_from else None
    root = cfg.output.root
    if not distributed.is_main():  # under torchrun only rank 0 writes the run folder
        import tempfile

        root = tempfile.mkdtemp(prefix=f"tltool-rank{distributed.rank()}-")
    try:
        return _train_into(root, cfg, command, argv, route, model, rt, inputs, resume,
                           resume_from, note)
    finally:
        if root != cfg.output.root:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


def _train_into(root, cfg, command, argv, route, model, rt, inputs, resume, resume_from,
                note) -> dict[str, Any]:
    with new_run(root, cfg.name, command, argv, cfg.seed,
                 pin_config(cfg, route.weights, route.prior_path), note) as run:
        def save(name: str, epoch: int, state: dict[str, Any] | None = None) -> None:
            run.save_checkpoint(name, checkpoint_payload(model, inputs.state, route.classes,
                                                         route.label, route.multilabel,
                                                         command, epoch, state))

        if resume is not None:  # the best weights so far stay the run's best.pt
            best = {k: v for k, v in resume_from["last"].items() if k != "resume"}
            state = resume["state"]
            if state["best_state"] is not None:
                best["state_dict"] = state["best_state"]
            run.save_checkpoint("best.pt", best | {"epoch": state["best"]["epoch"]})
        write_json(run.file("runtime.json"), rt.describe())
        with tracking(run.file("tensorboard"), cfg.output.tensorboard,
                      None if resume is None else resume["rows"]) as tracker:
            summary = train_route(route, model, inputs.train, inputs.val, save,
                                  run.file("metrics.csv"), rt, pooled=pooled_tensors(route),
                                  resume=resume)
            write_json(run.file("runtime.json"), rt.describe())  # with what `auto` chose
            metrics = write_outputs(run, route, model, summary, rt, inputs.val, inputs.test,
                                    tracker=tracker)
    return {"run": str(run.path), "metrics": metrics}


def write_outputs(run, route: Route, model: TransferModel, summary: dict[str, Any], rt: Runtime,
                  val: Tensors | None, test: Tensors, decision: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None, tracker=None) -> dict[str, Any]:
    """Freeze plan, timing, thresholds (chosen on `val` unless `decision` is given), metrics
    and plots of a trained route; returns metrics.json's content."""
    cfg, inputs, m = route.cfg, route.inputs, route.cfg.model
    classes, multilabel, regression = route.classes, route.multilabel, route.regression
    write_text(run.file("freeze_plan.txt"), summary.pop("plan_text") + "\n")
    write_json(run.file("timing.json"), summary.pop("timing"))
    write_json(run.file("freeze_plan.json"), summary["plans"])
    batch = max(2 * cfg.train.batch_size, 256)
    # image models predict through pooled backbone features, kept in the run folder for
    # evaluate (tltool.features)
    proba_val = None if val is None else features.predict(
        model, val, multilabel, rt, batch, store=run, name="val", what="predict: val")[0]
    proba_test = features.predict(model, test, multilabel, rt, batch, store=run, name="test",
                                  what="predict: test")[0]
    if decision is None:
        decision = decision_rule(cfg, classes, multilabel, proba_val, val.y.numpy(), regression)
    write_json(run.file("thresholds.json"), decision)
    plans = summary["plans"]
    n_params = sum(p.numel() for p in model.parameters())
    metrics = {
        "command": route.command, "name": cfg.name, "seed": cfg.seed,
        "weights": m.weights,
        "weights_file": None if route.weights.path is None else str(route.weights.path.resolve()),
        "route": describe_route(route),
        "data": inputs.data.summary() | {"splits": split_digest(inputs.data)},
        "classes": classes,
        "multilabel": multilabel, "decision": decision,
        "val": None if val is None else report(val.y.numpy(), proba_val, classes, decision),
        "test": report(test.y.numpy(), proba_test, classes, decision),
        **{k: summary[k] for k in ("best_epoch", "best_round", "epochs_run", "monitor", "cache",
                                   "freeze_check")},
        **({"target_watch": summary["target_watch"]} if summary.get("target_watch") else {}),
        "trainable_params": plans[-1]["trainable_params"] if plans else 0,
        "total_params": plans[-1]["total_params"] if plans else n_params,
        "adapt": route.adapt_info,
        **(extra or {}),
    }
    write_json(run.file("metrics.json"), metrics)
    if tracker is not None:
        curves = {} if regression else {
            split: (rows.y.numpy(), calibration.apply(p, decision))
            for split, rows, p in (("val", val, proba_val), ("test", test, proba_test))
            if rows is not None and len(rows.y)}
        tracker.final(cfg.model_dump(mode="json"), metrics, classes, multilabel, curves)
    if (run.file("metrics.csv")).exists() and summary["epochs_run"]:
        plots.learning_curves(run.file("metrics.csv"), run.file("plots", "learning_curves.png"),
                              summary["best_epoch"])
    plot_test_split(run, test.y.numpy(), proba_test, metrics["test"], classes, decision,
               f"{route.label} (test split)", regression, multilabel)
    return metrics


def plot_test_split(run, y: np.ndarray, proba: np.ndarray, test_report: dict[str, Any],
               classes: list[str], decision: dict[str, Any], title: str, regression: bool,
               multilabel: bool) -> None:
    """A trained model's test-split plots (the validation split's: `tltool evaluate`)."""
    if regression:
        plots.predicted_vs_true(y, proba[:, 0], run.file("plots", "predicted_vs_true_test.png"),
                                title)
        return
    if not multilabel:
        plots.confusion_matrix(test_report["confusion_matrix"], classes,
                               run.file("plots", "confusion_matrix_test.png"), "test split")
    if len(y):
        plots.decision_plots(y, proba, classes, decision, run.file("plots"), title)
