"""What a route may combine, checked before any data is trained on: each problem is one
ConfigError naming the key, what is wrong and what is allowed."""

from __future__ import annotations

from typing import Any

from tltool.adapt import Adaptation
from tltool.config import ExperimentConfig
from tltool.errors import CheckpointError, ConfigError, DataError
from tltool.inputs import Inputs, Weights, load_inputs, pool_of
from tltool.models.backbones import resolve_args
from tltool.models.base import BackboneSpec
from tltool.models.classic import CLASSIC_HEADS
from tltool.workflows.common import log, resolve_checkpoint


def check_combinations(cfg: ExperimentConfig, command: str) -> None:
    m, t = cfg.model, cfg.train
    classic = m.head in CLASSIC_HEADS
    if t.source_weight > 0 and command == "pretrain":
        raise ConfigError("train.source_weight: pooled training adds the source rows to a "
                          "freeze-finetune on the target; pretrain trains on the source already")
    if t.source_weight > 0 and cfg.adapt.method != "none":
        raise ConfigError("train.source_weight: with adapt, labelled source rows are weighed "
                          "by adapt.source_weight; set train.source_weight 0")
    if m.prior != "none" and cfg.adapt.method != "none":
        raise ConfigError("model.prior: a prior and adapt cannot be combined (adapt trains the "
                          "backbone's features; the prior fixes the answer's starting point)")
    if m.keep_head and m.prior != "none":
        raise ConfigError("model.keep_head: the kept source head already starts at the source "
                          "model's answer; use keep_head or model.prior, not both")
    if classic:
        if cfg.adapt.method != "none":
            raise ConfigError(f"model.head: {m.head!r} is fitted on fixed features; adapt "
                              f"trains features (use a network head, or adapt first and use "
                              f"that run as model.weights)")
        if t.l2sp.alpha or t.l2sp.beta:
            raise ConfigError(f"train.l2sp: applies to heads trained by gradient steps; "
                              f"{m.head!r} is fitted by scikit-learn (use model.head_args)")
        if t.rounds:
            raise ConfigError(f"train.rounds: {m.head!r} is fitted once on the frozen "
                              f"backbone's features; rounds need a network head")
    if (t.l2sp.alpha or t.l2sp.beta) and cfg.adapt.method != "none":
        raise ConfigError("train.l2sp: not combined with adapt")
    if t.l2sp.alpha and m.weights.strip().lower() in ("none", ""):
        raise ConfigError("train.l2sp.alpha: pulls the backbone towards its pretrained "
                          "weights, but model.weights is none (set l2sp.alpha 0 or name the "
                          "source run)")


def warn_ignored(cfg: ExperimentConfig, weights: Weights) -> None:
    """Settings that have no effect on this route: said, not silently dropped."""
    m = cfg.model
    if m.head_args and m.head not in CLASSIC_HEADS:
        raise ConfigError(f"model.head_args: options of a classic head ({', '.join(CLASSIC_HEADS)}"
                          f"); head {m.head!r} has none (remove head_args)")
    if m.prior == "none" and m.prior_weights:
        log.warning("model.prior_weights is set but model.prior is none: no prior is used")
    classic_kept = m.keep_head and weights.ckpt is not None and \
        weights.ckpt["spec"]["head"] in CLASSIC_HEADS
    if m.head in CLASSIC_HEADS and not m.keep_head and (
            m.strategy in ("full", "bias_only") or m.frozen_layers):
        log.warning("model.strategy %r / frozen_layers %d have no effect: a classic head is "
                    "fitted on the features of the whole backbone, kept frozen", m.strategy,
                    m.frozen_layers)
    epochs = sum(r.epochs for r in cfg.train.rounds) if cfg.train.rounds else cfg.train.epochs
    if classic_kept and epochs:
        log.warning("model.keep_head with a classic source head: the source model is used as "
                    "it is (a fitted head is not trained further; train.epochs has no effect)")
    if weights.ckpt is not None and weights.ckpt.get("command") == "select" and \
            saw_this_target(weights.path, cfg):
        log.warning("model.weights names a select run, which trained on every labelled row of "
                    "this target, the validation rows included: early stopping, the threshold "
                    "and the validation scores of this run are optimistic (the test split "
                    "stays clean)")


def saw_this_target(path, cfg: ExperimentConfig) -> bool:
    """Whether the select run behind a checkpoint trained on this config's target rows."""
    from pathlib import Path

    from tltool.workflows.common import run_config

    run = Path(path)
    if run.name == "best.pt":
        run = run.parent.parent
    try:
        theirs = run_config(run).target
    except Exception:  # noqa: BLE001 - no readable config: assume the worst
        return True
    if theirs is None or cfg.target is None:
        return False
    keys = ("kind", "name", "path", "where", "label", "split", "options")
    return all(getattr(theirs, k) == getattr(cfg.target, k) for k in keys)


def check_keep_head(cfg: ExperimentConfig, weights: Weights) -> None:
    if weights.ckpt is None:
        raise ConfigError("model.keep_head: keeps the source model's head, so model.weights "
                          "must name a tltool run or checkpoint")
    if cfg.model.backbone != weights.ckpt["spec"]["backbone"]:
        return  # inherit_args says what differs
    if weights.ckpt["spec"]["head"] in CLASSIC_HEADS and (cfg.train.source_weight > 0):
        raise ConfigError("model.keep_head: a kept classic head is used as it is; pooled "
                          "training would need a new fit (use model.head instead)")


def check_task(cfg: ExperimentConfig, section: str, label: str, inputs: Inputs) -> None:
    m = cfg.model
    classes, multilabel, regression = inputs.classes, inputs.multilabel, inputs.regression
    if regression:
        check_regression(cfg, section, label)
    elif m.head == "multilabel" and not multilabel:
        raise ConfigError(f"model.head: 'multilabel' needs multi-label data; {section} has one "
                          f"label per row (set {section}.label_sep, or use head linear)")
    if cfg.decision.rule == "threshold" and not multilabel and len(classes) != 2 \
            and not regression:
        raise ConfigError(f"decision.rule: 'threshold' needs a binary or multi-label target; "
                          f"{label!r} has {len(classes)} classes (use 'argmax')")
    if m.head in CLASSIC_HEADS:
        if multilabel:
            raise ConfigError(f"model.head: {m.head!r} takes one label per row; {section} is "
                              f"multi-label (use head multilabel)")
        if m.head == "ridge" and not regression:
            raise ConfigError(f"model.head: 'ridge' predicts numbers; {section} holds classes "
                              f"(use logistic_regression or gradient_boosting)")
        if m.head == "logistic_regression" and regression:
            raise ConfigError(f"model.head: 'logistic_regression' predicts classes; {section} "
                              f"has task regression (use ridge or gradient_boosting)")


def check_regression(cfg: ExperimentConfig, section: str, label: str) -> None:
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


def check_kept_classes(ckpt: dict[str, Any], inputs: Inputs) -> None:
    src_reg = bool(ckpt["spec"].get("target_scale"))
    same = (src_reg == inputs.regression and bool(ckpt.get("multilabel")) == inputs.multilabel
            and (inputs.regression or list(ckpt["classes"]) == list(inputs.classes)))
    if not same:
        what = "a number" if src_reg else f"classes {', '.join(map(str, ckpt['classes']))}"
        mine = "a number" if inputs.regression else f"classes {', '.join(inputs.classes)}"
        raise ConfigError(f"model.keep_head: the source head predicts {what}, the target "
                          f"{mine}; a kept head needs the same ones (use a new head)")


def prior_checkpoints(cfg: ExperimentConfig) -> tuple[list[dict[str, Any]], list[Any]]:
    refs = cfg.model.prior_weights or cfg.model.weights
    refs = refs if isinstance(refs, list) else [refs]
    key = "model.prior_weights" if cfg.model.prior_weights else "model.weights"
    if not refs or any(r.strip().lower() in ("none", "") for r in refs):
        raise ConfigError(f"model.prior: {cfg.model.prior!r} needs a source model: set "
                          f"model.prior_weights (or model.weights) to a tltool run")
    ckpts, paths = [], []
    for ref in refs:
        ckpt, path = resolve_checkpoint(ref, key)
        if ckpt.get("command") == "select" and saw_this_target(path, cfg):
            log.warning("%s %s is a select run, which trained on every labelled row of this "
                        "target, the validation rows included: early stopping, the threshold "
                        "and the validation scores of this run are optimistic (the test split "
                        "stays clean)", key, ref)
        if ckpt["spec"].get("prior"):
            raise ConfigError(f"{key} {ref}: that model has a prior of its own; a prior must "
                              f"be a plain source model")
        if ckpts and (ckpt["preprocessor"] != ckpts[0]["preprocessor"]
                      or ckpt["classes"] != ckpts[0]["classes"]
                      or bool(ckpt["spec"].get("target_scale")) !=
                      bool(ckpts[0]["spec"].get("target_scale"))):
            raise ConfigError(f"{key}: {ref} and {refs[0]} differ in their input encoding, "
                              f"classes or task; the models of one prior must be trained on "
                              f"the same source section")
        ckpts.append(ckpt)
        paths.append(path)
    return ckpts, paths


def check_prior(cfg: ExperimentConfig, priors: list[dict[str, Any]], inputs: Inputs) -> None:
    prior = priors[0]
    p_reg = bool(prior["spec"].get("target_scale"))
    if cfg.model.prior != "offset":
        return
    same = (p_reg == inputs.regression and bool(prior.get("multilabel")) == inputs.multilabel
            and (inputs.regression or list(prior["classes"]) == list(inputs.classes)))
    if not same:
        what = "a number" if p_reg else f"classes {', '.join(map(str, prior['classes']))}"
        mine = "a number" if inputs.regression else f"classes {', '.join(inputs.classes)}"
        raise ConfigError(f"model.prior: 'offset' adds the prior's answer to this model's, but "
                          f"the prior predicts {what} and the target {mine}; use prior: input "
                          f"(its output as an extra input of the head)")
    if cfg.model.head == "gradient_boosting":
        raise ConfigError("model.prior: 'offset' cannot start gradient boosting from the "
                          "prior's answer here; use prior: input for gradient_boosting")


def pooled_rows(cfg: ExperimentConfig, command: str, inputs: Inputs, spec: BackboneSpec,
                weights: Weights, cache) -> Inputs | None:
    """Pooled training: every labelled source row, encoded exactly like the target rows."""
    if cfg.train.source_weight == 0:
        return None
    if cfg.source is None:
        raise ConfigError("train.source_weight: pooled training needs a `source` data section")
    other = cfg.source
    if inputs.state.get("kind") == "image":
        other = other.model_copy(update={"image_size": inputs.state["size"]})
    try:
        source = cache.load(other, "source", cfg.seed, spec, weights, like=inputs.state)
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
        target = load_inputs(other_cfg, other, cfg.seed, spec, weights, like=state,
                             pool=a.unlabeled == "pool")
        rows = target.pool if a.unlabeled == "pool" else target.train
        source_rows = None
        n_source = len(inputs.train.y)
        if target.classes == inputs.classes and not target.multilabel and \
                not target.regression and len(target.val.y):
            watch = target.val
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
    return Adaptation(a.method, a.weight, rows, source_rows, a.source_weight,
                      watch=watch), info


def inherit_args(cfg: ExperimentConfig, ckpt: dict[str, Any], ckpt_path) -> dict[str, Any]:
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
