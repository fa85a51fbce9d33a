"""pretrain and freeze-finetune: load and check everything, then create the run and train."""

from __future__ import annotations

from typing import Any

import numpy as np

from tltool.config import ExperimentConfig
from tltool.data.preprocess import TabularPreprocessor
from tltool.data.tabular import TabularData, load_tabular
from tltool.engine import Phase, Tensors, fit, predict_proba, seed_everything
from tltool.errors import CheckpointError, ConfigError
from tltool.freeze import check_frozen_layers
from tltool.metrics import choose_threshold, classification_report
from tltool.models import build_model, model_spec
from tltool.models.backbones import get_spec, resolve_args
from tltool.runs import write_json, write_text
from tltool.workflows.common import (
    checkpoint_payload,
    load_state,
    log,
    new_run,
    resolve_weights,
    to_tensors,
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
    get_spec(m.backbone)  # unknown backbone: fail before reading data
    weights = resolve_weights(m.weights)
    data = load_tabular(data_cfg, cfg.seed)
    if weights is None:
        args = resolve_args(m.backbone, m.backbone_args)
        pre = TabularPreprocessor().fit(data.train.frame, data.feature_columns,
                                        data.categorical, data.origin)
        source_state = None
    else:
        ckpt_path, ckpt = weights
        args = _inherit_args(cfg, ckpt, ckpt_path)
        # The pretrained first block expects the source's columns, scaling and categories.
        pre = TabularPreprocessor.from_state(ckpt["preprocessor"])
        source_state = {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items()
                        if k.startswith("backbone.")}
    x_train, y_train = to_tensors(pre, data.train, data.origin)
    x_val, y_val = to_tensors(pre, data.val, data.origin)
    x_test, y_test = to_tensors(pre, data.test, data.origin)
    seed_everything(cfg.seed)
    spec = model_spec(m.backbone, args, x_train.shape[1], m.head, m.head_hidden, m.dropout,
                      len(data.classes))
    model = build_model(spec)
    if source_state is not None:
        load_state(model.backbone, source_state, f"model.weights {m.weights}")
    phases = phases_of(cfg, command, len(model.backbone.blocks), model.backbone.block_names)
    if weights is not None:
        unseen = pre.unseen_counts(data.train.frame)
        if unseen:
            data.notes.append(f"training rows with categories the source never saw: {unseen}")
    if cfg.decision.rule == "threshold" and len(data.classes) != 2:
        raise ConfigError(f"decision.rule: 'threshold' needs a binary label; "
                          f"{data.label!r} has {len(data.classes)} classes (use 'argmax')")

    with new_run(cfg.output.root, cfg.name, command, argv, cfg.seed, cfg) as run:
        def save(name: str, epoch: int) -> None:
            run.save_checkpoint(name, checkpoint_payload(model, pre, data.classes, data.label,
                                                         command, epoch))

        summary = fit(model, Tensors(x_train, y_train), Tensors(x_val, y_val), phases, cfg.train,
                      data.classes, cfg.seed, save, run.file("metrics.csv"), log.info)
        write_text(run.file("freeze_plan.txt"), summary.pop("plan_text") + "\n")
        write_json(run.file("freeze_plan.json"), summary["plans"])
        thresholds = _decision(cfg, data, predict_proba(model, x_val), y_val.numpy())
        write_json(run.file("thresholds.json"), thresholds)
        t = thresholds["threshold"]
        metrics = {
            "command": command, "name": cfg.name, "seed": cfg.seed,
            "weights": m.weights, "data": data.summary(), "classes": data.classes,
            "decision": thresholds,
            "val": classification_report(y_val.numpy(), predict_proba(model, x_val),
                                         data.classes, t),
            "test": classification_report(y_test.numpy(), predict_proba(model, x_test),
                                          data.classes, t),
            **{k: summary[k] for k in ("best_epoch", "best_round", "epochs_run", "monitor",
                                       "freeze_check")},
            "trainable_params": summary["plans"][-1]["trainable_params"],
            "total_params": summary["plans"][-1]["total_params"],
        }
        write_json(run.file("metrics.json"), metrics)
    return {"run": str(run.path), "metrics": metrics}


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
    shape_keys = {"hidden"}
    if differ.keys() & shape_keys:
        detail = ", ".join(f"{k}: source {a!r} vs config {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(f"model.backbone_args differ from the source model's ({detail}); "
                              f"leave backbone_args empty to inherit them")
    return args


def _decision(cfg: ExperimentConfig, data: TabularData, proba_val: np.ndarray,
              y_val: np.ndarray) -> dict[str, Any]:
    """The threshold is chosen on the validation split only, never on test."""
    rule = cfg.decision.rule
    if rule == "argmax":
        return {"rule": "argmax", "threshold": None, "chosen_on": None}
    chosen = choose_threshold(y_val, proba_val[:, 1], cfg.decision.optimize)
    return {"rule": "threshold", "positive": data.classes[1], **chosen,
            "chosen_on": "validation"}
