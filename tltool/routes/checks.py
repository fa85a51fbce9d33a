"""What a route may combine and the task it learns, checked before any data is trained on:
each problem is one ConfigError naming the key, what is wrong and what is allowed."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tltool.checkpoint import Checkpoint, is_best_checkpoint
from tltool.config import ExperimentConfig
from tltool.decision import asks_threshold, threshold_applies
from tltool.errors import ConfigError
from tltool.inputs import Inputs
from tltool.models.classic import CLASSIC_HEADS
from tltool.task import REGRESSION
from tltool.weights import Weights

log = logging.getLogger("tltool")


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
        weights.ckpt.head in CLASSIC_HEADS
    if m.head in CLASSIC_HEADS and not m.keep_head and (
            m.strategy in ("full", "bias_only") or m.frozen_layers):
        log.warning("model.strategy %r / frozen_layers %d have no effect: a classic head is "
                    "fitted on the features of the whole backbone, kept frozen", m.strategy,
                    m.frozen_layers)
    epochs = sum(r.epochs for r in cfg.train.rounds) if cfg.train.rounds else cfg.train.epochs
    if classic_kept and epochs:
        log.warning("model.keep_head with a classic source head: the source model is used as "
                    "it is (a fitted head is not trained further; train.epochs has no effect)")
    if weights.ckpt is not None and weights.ckpt.command == "select" and \
            saw_this_target(weights.path, cfg):
        log.warning("model.weights names a select run, which trained on every labelled row of "
                    "this target, the validation rows included: early stopping, the threshold "
                    "and the validation scores of this run are optimistic (the test split "
                    "stays clean)")


def saw_this_target(path, cfg: ExperimentConfig) -> bool:
    """Whether the select run behind a checkpoint trained on this config's target rows."""
    from tltool.runs.opening import run_config

    run = Path(path)
    if is_best_checkpoint(run):
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
    if cfg.model.backbone != weights.ckpt.backbone:
        return  # inherit_args says what differs
    if weights.ckpt.head in CLASSIC_HEADS and (cfg.train.source_weight > 0):
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
    if asks_threshold(cfg.decision) and not regression and \
            not threshold_applies(inputs.kind, len(classes)):
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
    if asks_threshold(cfg.decision):
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


def same_answers(model: Checkpoint, inputs: Inputs) -> bool:
    """Whether a trained model answers the data's question: the same kind of task and, for
    classes or labels, the same ones."""
    return model.kind == inputs.kind and (
        inputs.regression or list(model.classes) == list(inputs.classes))


def _answers(model: Checkpoint) -> str:
    return "a number" if model.kind == REGRESSION else \
        f"classes {', '.join(map(str, model.classes))}"


def _data_answers(inputs: Inputs) -> str:
    return "a number" if inputs.regression else f"classes {', '.join(inputs.classes)}"


def check_kept_classes(ckpt: Checkpoint, inputs: Inputs) -> None:
    if not same_answers(ckpt, inputs):
        what, mine = _answers(ckpt), _data_answers(inputs)
        raise ConfigError(f"model.keep_head: the source head predicts {what}, the target "
                          f"{mine}; a kept head needs the same ones (use a new head)")


def check_prior(cfg: ExperimentConfig, priors: list[Checkpoint], inputs: Inputs) -> None:
    if cfg.model.prior != "offset":
        return
    if not same_answers(priors[0], inputs):
        what, mine = _answers(priors[0]), _data_answers(inputs)
        raise ConfigError(f"model.prior: 'offset' adds the prior's answer to this model's, but "
                          f"the prior predicts {what} and the target {mine}; use prior: input "
                          f"(its output as an extra input of the head)")
    if cfg.model.head == "gradient_boosting":
        raise ConfigError("model.prior: 'offset' cannot start gradient boosting from the "
                          "prior's answer here; use prior: input for gradient_boosting")


def check_input_fits(model, inputs: Inputs, section: str) -> None:
    """One image through the network before any run folder exists: an image size the
    backbone cannot take (too small for its downsampling, or not the size a ViT was built
    for) is a config error, not a traceback epochs later."""
    if inputs.state.get("kind") != "image" or len(inputs.train.x) == 0:
        return
    size = inputs.state["size"]
    try:
        with torch.no_grad():
            model.eval()
            # the backbone alone: a classic head is not fitted yet (its input is the
            # backbone's output by construction)
            model.backbone(inputs.train.batch(slice(0, 1), train=False))
    except (RuntimeError, ValueError, AssertionError) as exc:  # timm asserts sizes
        reason = str(exc).splitlines()[0][:200]
        raise ConfigError(f"{section}.image_size: backbone {model.spec['backbone']!r} cannot "
                          f"take {size}x{size} images ({reason}); use an image_size it can take "
                          f"(the backbone's default is what `tltool backbones` lists) or "
                          f"backbone_args that match it") from None
