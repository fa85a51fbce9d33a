"""What a route uses besides its training rows: the prior's source models, the labelled
source rows of pooled training, the other domain's rows of an adaptation, and the options of
the source network it starts from. Each is loaded and encoded exactly like the training rows,
and checked, before a run folder exists."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tltool.adapt import Adaptation
from tltool.checkpoint import Checkpoint
from tltool.config import ExperimentConfig
from tltool.errors import CheckpointError, ConfigError, DataError
from tltool.inputs import Encoding, Inputs, load_inputs, pool_of
from tltool.models.backbones import resolve_args
from tltool.models.base import BackboneSpec
from tltool.routes.checks import saw_this_target
from tltool.weights import Weights, trained_checkpoint

log = logging.getLogger("tltool")


def prior_checkpoints(cfg: ExperimentConfig) -> tuple[list[Checkpoint], list[Path]]:
    """The prior's source models (model.prior_weights, else model.weights), checked to be
    plain models trained on one source section, and where each came from."""
    refs = cfg.model.prior_weights or cfg.model.weights
    refs = refs if isinstance(refs, list) else [refs]
    key = "model.prior_weights" if cfg.model.prior_weights else "model.weights"
    if not refs or any(r.strip().lower() in ("none", "") for r in refs):
        raise ConfigError(f"model.prior: {cfg.model.prior!r} needs a source model: set "
                          f"model.prior_weights (or model.weights) to a tltool run")
    ckpts, paths = [], []
    for ref in refs:
        ckpt, path = trained_checkpoint(ref, key)
        if ckpt.command == "select" and saw_this_target(path, cfg):
            log.warning("%s %s is a select run, which trained on every labelled row of this "
                        "target, the validation rows included: early stopping, the threshold "
                        "and the validation scores of this run are optimistic (the test split "
                        "stays clean)", key, ref)
        if ckpt.prior:
            raise ConfigError(f"{key} {ref}: that model has a prior of its own; a prior must "
                              f"be a plain source model")
        if ckpts and (ckpt.preprocessor != ckpts[0].preprocessor
                      or ckpt.classes != ckpts[0].classes
                      or ckpt.regression != ckpts[0].regression):
            raise ConfigError(f"{key}: {ref} and {refs[0]} differ in their input encoding, "
                              f"classes or task; the models of one prior must be trained on "
                              f"the same source section")
        ckpts.append(ckpt)
        paths.append(path)
    return ckpts, paths


def pooled_rows(cfg: ExperimentConfig, inputs: Inputs, spec: BackboneSpec, weights: Weights,
                cache) -> Inputs | None:
    """Pooled training: every labelled source row, encoded exactly like the target rows."""
    if cfg.train.source_weight == 0:
        return None
    if cfg.source is None:
        raise ConfigError("train.source_weight: pooled training needs a `source` data section")
    other = cfg.source
    if inputs.state.get("kind") == "image":
        other = other.model_copy(update={"image_size": inputs.state["size"]})
    try:
        source = cache.load(other, "source", spec, weights, Encoding(like=inputs.state))
    except DataError as exc:
        raise DataError(f"train.source_weight: the source rows cannot be encoded like the "
                        f"target's for pooled training: {exc}") from None
    if source.classes != inputs.classes or source.multilabel != inputs.multilabel or \
            source.regression != inputs.regression:
        raise ConfigError(f"train.source_weight: pooled training learns the target's classes "
                          f"from source rows too, but the source classes "
                          f"({', '.join(source.classes)}) differ from the target's "
                          f"({', '.join(inputs.classes)})")
    return source


def adaptation(cfg: ExperimentConfig, command: str, inputs, spec,
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
    watch = None
    if command == "pretrain":
        target = load_inputs(other_cfg, other, spec, weights,
                             Encoding(like=state, pool=a.unlabeled == "pool"))
        rows = target.pool if a.unlabeled == "pool" else target.train
        source_rows = None
        n_source = len(inputs.train.y)
        if target.classes == inputs.classes and not target.multilabel and \
                not target.regression and len(target.val.y):
            watch = target.val
    else:
        source = load_inputs(other_cfg, other, spec, weights, Encoding(like=state))
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
    return Adaptation(a.method, a.weight, rows, source_rows, a.source_weight,
                      watch=watch), info


def inherit_args(cfg: ExperimentConfig, ckpt: Checkpoint, ckpt_path) -> dict[str, Any]:
    """The backbone options of a source model (the config may change only its dropout)."""
    src = ckpt.spec
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
