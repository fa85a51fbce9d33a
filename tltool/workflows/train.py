"""pretrain and freeze-finetune: load and check everything, then create the run and train."""

from __future__ import annotations

from typing import Any

import numpy as np

from tltool import plots
from tltool.adapt import Adaptation
from tltool.config import ExperimentConfig
from tltool.engine import Phase, Task, fit, predict_proba, seed_everything
from tltool.errors import CheckpointError, ConfigError
from tltool.freeze import check_frozen_layers
from tltool.inputs import load_inputs, pool_of, split_digest
from tltool.metrics import (
    choose_threshold,
    classification_report,
    multilabel_report,
    regression_report,
)
from tltool.models import build_model, model_spec
from tltool.models.backbones import get_spec, resolve_args
from tltool.runs import write_json, write_text
from tltool.runtime import make_runtime
from tltool.workflows.common import (
    check_input_fits,
    check_output_root,
    checkpoint_payload,
    load_backbone_weights,
    log,
    new_run,
    pin_config,
    resolve_weights,
)


def pretrain(cfg: ExperimentConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Train backbone + head on the source data (optionally starting from weights)."""
    if cfg.source is None:
        raise ConfigError("source: pretrain needs a `source` data section")
    return _train(cfg, cfg.source, "pretrain", argv)


def freeze_finetune(cfg: ExperimentConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Transfer: source backbone + new head, freeze per the config, train on the target."""
    if cfg.target is None:
        raise ConfigError("target: freeze-finetune needs a `target` data section")
    return _train(cfg, cfg.target, "freeze-finetune", argv)


def phases_of(cfg: ExperimentConfig, command: str, n_blocks: int,
              block_names: list[str]) -> list[Phase]:
    m, t = cfg.model, cfg.train
    if not t.rounds:
        phases = [Phase(m.frozen_layers, m.strategy, t.epochs, t.lr, t.backbone_lr_mult)]
    else:
        phases = [Phase(r.frozen_layers if r.frozen_layers is not None else m.frozen_layers,
                        r.strategy or m.strategy, r.epochs, r.lr or t.lr,
                        t.backbone_lr_mult if r.backbone_lr_mult is None else r.backbone_lr_mult)
                  for r in t.rounds]
    for i, p in enumerate(phases):
        where = f"train.rounds.{i}.frozen_layers" if t.rounds else "model.frozen_layers"
        check_frozen_layers(p.frozen_layers, p.strategy, n_blocks, block_names, where)
    return phases


def _train(cfg: ExperimentConfig, data_cfg, command: str, argv) -> dict[str, Any]:
    m = cfg.model
    check_output_root(cfg.output.root)
    spec = get_spec(m.backbone)  # unknown backbone: fail before reading data
    section = "source" if command == "pretrain" else "target"
    weights = resolve_weights(m.weights, spec)
    if command == "freeze-finetune" and weights.path is None and weights.name is None:
        log.warning("model.weights is none: freeze-finetune trains from random weights (no "
                    "transfer; a target-only baseline). Name the source run, e.g. "
                    "model.weights: runs/NAME/latest")
    args = (_inherit_args(cfg, weights.ckpt, weights.path) if weights.ckpt
            else resolve_args(m.backbone, m.backbone_args))
    inputs = load_inputs(data_cfg, section, cfg.seed, spec, weights)
    data, classes, multilabel = inputs.data, inputs.classes, inputs.multilabel
    label = getattr(data, "label", None) or data_cfg.label or "label"
    regression = inputs.regression
    if regression:
        _check_regression(cfg, section, label)
    elif m.head == "multilabel" and not multilabel:
        raise ConfigError(f"model.head: 'multilabel' needs multi-label data; {section} has one "
                          f"label per row (set {section}.label_sep, or use head linear)")
    if cfg.decision.rule == "threshold" and not multilabel and len(classes) != 2 \
            and not regression:
        raise ConfigError(f"decision.rule: 'threshold' needs a binary or multi-label target; "
                          f"{label!r} has {len(classes)} classes (use 'argmax')")
    seed_everything(cfg.seed)
    model = build_model(model_spec(m.backbone, args, inputs.n_inputs, m.head, m.head_hidden,
                                   m.dropout, 1 if regression else len(classes),
                                   inputs.target_scale))
    load_backbone_weights(model, spec, weights)
    check_input_fits(model, inputs, section)
    phases = phases_of(cfg, command, len(model.backbone.blocks), model.backbone.block_names)
    if sum(p.epochs for p in phases) == 0:
        log.warning("train.epochs is 0: the saved model is the untrained starting point "
                    "(pretrained backbone, random head)")
    task = Task.of(model, multilabel)
    rt = make_runtime(cfg.train, spec.input == "image")
    adaptation, adapt_info = _adaptation(cfg, command, inputs, spec, weights)

    if weights.path is not None:
        log.info("weights: %s", weights.path)
    with new_run(cfg.output.root, cfg.name, command, argv, cfg.seed,
                 pin_config(cfg, weights)) as run:
        def save(name: str, epoch: int) -> None:
            run.save_checkpoint(name, checkpoint_payload(model, inputs.state, classes, label,
                                                         multilabel, command, epoch))

        write_json(run.file("runtime.json"), rt.describe())
        summary = fit(model, inputs.train, inputs.val, phases, cfg.train, classes, cfg.seed,
                      save, run.file("metrics.csv"), log.info, task=task,
                      bn_policy=m.bn_policy, rt=rt, adapt=adaptation)
        write_json(run.file("runtime.json"), rt.describe())  # with what `auto` chose
        write_text(run.file("freeze_plan.txt"), summary.pop("plan_text") + "\n")
        write_json(run.file("timing.json"), summary.pop("timing"))
        write_json(run.file("freeze_plan.json"), summary["plans"])
        batch = max(2 * cfg.train.batch_size, 256)
        proba_val = predict_proba(model, inputs.val, multilabel, batch, rt)
        proba_test = predict_proba(model, inputs.test, multilabel, batch, rt)
        thresholds = decision_rule(cfg, classes, multilabel, proba_val, inputs.val.y.numpy(),
                                   regression)
        write_json(run.file("thresholds.json"), thresholds)
        metrics = {
            "command": command, "name": cfg.name, "seed": cfg.seed,
            "weights": m.weights,
            "weights_file": None if weights.path is None else str(weights.path.resolve()),
            "data": data.summary() | {"splits": split_digest(data)},
            "classes": classes,
            "multilabel": multilabel, "decision": thresholds,
            "val": report(inputs.val.y.numpy(), proba_val, classes, thresholds),
            "test": report(inputs.test.y.numpy(), proba_test, classes, thresholds),
            **{k: summary[k] for k in ("best_epoch", "best_round", "epochs_run", "monitor", "cache",
                                       "freeze_check")},
            "trainable_params": summary["plans"][-1]["trainable_params"],
            "total_params": summary["plans"][-1]["total_params"],
            "adapt": adapt_info,
        }
        write_json(run.file("metrics.json"), metrics)
        plots.learning_curves(run.file("metrics.csv"), run.file("plots", "learning_curves.png"),
                              summary["best_epoch"])
        if regression:
            plots.predicted_vs_true(inputs.test.y.numpy(), proba_test[:, 0],
                                    run.file("plots", "predicted_vs_true_test.png"),
                                    f"{label} (test split)")
        elif not multilabel:
            plots.confusion_matrix(metrics["test"]["confusion_matrix"], classes,
                                   run.file("plots", "confusion_matrix_test.png"), "test split")
    return {"run": str(run.path), "metrics": metrics}


def _check_regression(cfg: ExperimentConfig, section: str, label: str) -> None:
    """What a regression run cannot use (the options that only mean something for classes)."""
    if cfg.model.head == "multilabel":
        raise ConfigError(f"model.head: 'multilabel' predicts labels; {section} has task "
                          f"regression (use head linear or mlp)")
    if cfg.decision.rule == "threshold":
        raise ConfigError(f"decision.rule: 'threshold' turns probabilities into classes; "
                          f"{section} has task regression, which predicts {label!r} itself "
                          f"(remove the decision section)")
    if cfg.train.early_stopping.monitor != "val_loss":
        raise ConfigError(f"train.early_stopping.monitor: "
                          f"{cfg.train.early_stopping.monitor!r} is a classification score; "
                          f"a regression run monitors val_loss (standardised MSE)")
    if cfg.train.class_weights == "balanced":
        raise ConfigError("train.class_weights: 'balanced' weighs classes; a regression run "
                          "has none (set it to none)")


def _adaptation(cfg: ExperimentConfig, command: str, inputs, spec,
                weights) -> tuple[Adaptation | None, dict[str, Any] | None]:
    """The other domain's rows for `adapt`, encoded exactly like the training rows.

    pretrain: labelled source batches + unlabelled target rows. freeze-finetune: labelled
    target batches + labelled source rows (cross-entropy at adapt.source_weight) + unlabelled
    target rows."""
    a = cfg.adapt
    if a.method == "none":
        return None, None
    other = "target" if command == "pretrain" else "source"
    other_cfg = getattr(cfg, other)
    if other_cfg is None:
        raise ConfigError(f"adapt.method: '{a.method}' aligns source and target features; "
                          f"{command} trains on the {'source' if other == 'target' else 'target'}"
                          f" and needs a `{other}` data section for the other domain")
    state = inputs.state
    if state.get("kind") == "image" and other_cfg.image_size not in (None, state["size"]):
        log.warning("adapt: %s.image_size %s differs from the model's %s px; the %s images "
                    "are resized to %s px (one network sees both domains)", other,
                    other_cfg.image_size, state["size"], other, state["size"])
    if state.get("kind") == "image":
        other_cfg = other_cfg.model_copy(update={"image_size": state["size"]})
    if command == "pretrain":
        target = load_inputs(other_cfg, other, cfg.seed, spec, weights, like=state,
                             pool=a.unlabeled == "pool")
        rows = target.pool if a.unlabeled == "pool" else target.train
        source_rows = None
        n_source = len(inputs.train.y)
    else:
        source = load_inputs(other_cfg, other, cfg.seed, spec, weights, like=state)
        if a.source_weight > 0 and (source.classes != inputs.classes
                                    or source.multilabel != inputs.multilabel
                                    or source.regression != inputs.regression):
            raise ConfigError(f"adapt.source_weight: {a.source_weight} trains the target head "
                              f"on source labels too, but the source classes "
                              f"({', '.join(source.classes)}) differ from the target's "
                              f"({', '.join(inputs.classes)}); set adapt.source_weight: 0 to "
                              f"use the source rows only for the alignment")
        rows = pool_of(inputs) if a.unlabeled == "pool" else inputs.train
        source_rows = source.train
        n_source = len(source.train.y)
    info = {"method": a.method, "weight": a.weight, "unlabeled": a.unlabeled,
            "source_rows": n_source, "target_rows_aligned": int(len(rows.y)),
            "source_weight": a.source_weight if command == "freeze-finetune" else None}
    log.info("adapt: %s (weight %s) on %d source rows and %d unlabelled target rows",
             a.method, a.weight, n_source, len(rows.y))
    return Adaptation(a.method, a.weight, rows, source_rows, a.source_weight), info


def report(y: np.ndarray, proba: np.ndarray, classes: list[str],
           decision: dict[str, Any]) -> dict[str, Any]:
    """The metrics of one split under a saved decision rule."""
    if decision.get("rule") == "regression":
        return regression_report(y, proba[:, 0])
    if "per_label" in decision:
        return multilabel_report(y, proba, classes, decision["per_label"])
    return classification_report(y, proba, classes, decision["threshold"])


def _inherit_args(cfg: ExperimentConfig, ckpt: dict[str, Any], ckpt_path) -> dict[str, Any]:
    src = ckpt["spec"]
    if src["backbone"] != cfg.model.backbone:
        raise CheckpointError(f"model.weights {cfg.model.weights}: the source model is a "
                              f"{src['backbone']!r} backbone ({ckpt_path}); this config asks "
                              f"for {cfg.model.backbone!r}. Use the same backbone or other "
                              f"weights")
    if not cfg.model.backbone_args:
        return src["backbone_args"]
    args = resolve_args(cfg.model.backbone, cfg.model.backbone_args)
    differ = {k: (src["backbone_args"].get(k), v) for k, v in args.items()
              if src["backbone_args"].get(k) != v}
    # Regularisation may differ from the source; anything that shapes the network may not.
    if differ.keys() - {"dropout"}:
        detail = ", ".join(f"{k}: source {a!r} vs config {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(f"model.backbone_args differ from the source model's ({detail}); "
                              f"leave backbone_args empty to inherit them")
    return args


def decision_rule(cfg: ExperimentConfig, classes: list[str], multilabel: bool,
                  proba_val: np.ndarray, y_val: np.ndarray,
                  regression: bool = False) -> dict[str, Any]:
    """Thresholds are chosen on the validation split only, never on test.

    Multi-label: one threshold per label (0.5 each under rule argmax). Regression: the
    predicted value is the answer (no threshold).
    """
    if regression:
        return {"rule": "regression", "threshold": None, "chosen_on": None}
    rule, optimize = cfg.decision.rule, cfg.decision.optimize
    if multilabel:
        if rule == "argmax":
            return {"rule": "argmax", "threshold": None, "per_label": [0.5] * len(classes),
                    "chosen_on": None}
        chosen = [choose_threshold(y_val[:, j].astype(np.int64), proba_val[:, j], optimize)
                  for j in range(len(classes))]
        return {"rule": "threshold", "threshold": None, "optimize": optimize,
                "per_label": [c["threshold"] for c in chosen],
                "validation_score": [c["validation_score"] for c in chosen],
                "chosen_on": "validation"}
    if rule == "argmax":
        return {"rule": "argmax", "threshold": None, "chosen_on": None}
    chosen = choose_threshold(y_val, proba_val[:, 1], optimize)
    return {"rule": "threshold", "positive": classes[1], **chosen, "chosen_on": "validation"}
