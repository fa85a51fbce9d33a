"""pretrain and freeze-finetune: load and check everything, then create the run and train.

A *route* (`Route`) is one way of building the target model from a config: which weights and
prior, which rows (target only, or pooled with the source's), which head (trained by gradient
steps, or a classic head fitted by scikit-learn). `prepare` loads and checks it before any run
folder exists, `build` makes its network and `train_route` trains it on given rows; the
commands below and `tltool select` (which trains each route on cross-validation folds) share
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tltool import plots
from tltool.adapt import Adaptation
from tltool.config import DataConfig, ExperimentConfig
from tltool.engine import (
    Phase,
    Pooled,
    PrefixStore,
    Task,
    Tensors,
    fit,
    predict_proba,
    seed_everything,
)
from tltool.errors import CheckpointError, ConfigError
from tltool.freeze import check_frozen_layers
from tltool.inputs import Inputs, Weights, is_image_data, load_inputs, pool_of, split_digest
from tltool.metrics import (
    choose_threshold,
    classification_report,
    multilabel_report,
    regression_report,
)
from tltool.models import CLASSIC_HEADS, TransferModel, build_model, model_spec
from tltool.models.backbones import BackboneSpec, get_spec, resolve_args
from tltool.runs import write_json, write_text
from tltool.runtime import Runtime, make_runtime
from tltool.workflows.common import (
    check_input_fits,
    check_output_root,
    checkpoint_payload,
    load_backbone_weights,
    load_state,
    log,
    new_run,
    pin_config,
    resolve_checkpoint,
    resolve_weights,
)


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


# ---------------------------------------------------------------- routes


@dataclass
class Route:
    """A config's way to the target model, loaded and checked (no run folder yet)."""

    cfg: ExperimentConfig
    command: str
    section: str  # the data section trained on: source (pretrain) or target
    spec: BackboneSpec
    weights: Weights
    args: dict[str, Any]  # backbone options
    inputs: Inputs
    label: str
    prior: list[dict[str, Any]] | None  # the prior models' checkpoints (model.prior)
    pooled: Inputs | None  # labelled source rows, encoded like the target (train.source_weight)
    adaptation: Adaptation | None
    adapt_info: dict[str, Any] | None
    prior_path: list[Any] | None = None  # where the prior models came from (runs or files)

    @property
    def classes(self) -> list[str]:
        return self.inputs.classes

    @property
    def multilabel(self) -> bool:
        return self.inputs.multilabel

    @property
    def regression(self) -> bool:
        return self.inputs.regression

    @property
    def classic(self) -> bool:
        """The head is fitted by scikit-learn (a kept classic source head counts too)."""
        if self.cfg.model.keep_head and self.weights.ckpt:
            return self.weights.ckpt["spec"]["head"] in CLASSIC_HEADS
        return self.cfg.model.head in CLASSIC_HEADS

    @property
    def source_only(self) -> bool:
        """The source model as it is: kept head, nothing trained on the target."""
        return self.cfg.model.keep_head and (self.classic or self.epochs == 0)

    @property
    def epochs(self) -> int:
        t = self.cfg.train
        return sum(r.epochs for r in t.rounds) if t.rounds else t.epochs


class InputCache:
    """Loaded data sections by what they depend on, so routes that read the same data with the
    same encoding share one load (tltool select prepares many routes on one data set).

    `fit_rows`: the rows a table's own encoding is fitted on when no pretrained model fixes it
    ("train": the training split; "labelled": training + validation rows, as tltool select
    learns from both)."""

    def __init__(self, fit_rows: str = "train") -> None:
        self._loaded: dict[str, Any] = {}
        self.fit_rows = fit_rows

    def load(self, data_cfg: DataConfig, section: str, seed: int, spec: BackboneSpec,
             weights: Weights, like: dict[str, Any] | None = None,
             pool: bool = False, also: DataConfig | None = None) -> Inputs:
        """`also`: a data section whose every row the encoding is fitted on too (pooled
        training: the encoding must suit the source rows as well)."""
        import json

        state = like if like is not None else (weights.ckpt or {}).get("preprocessor")
        key = json.dumps([data_cfg.model_dump(mode="json"), section, spec.name, weights.name,
                          state, pool, spec.input, self.fit_rows,
                          None if also is None else also.model_dump(mode="json")],
                         sort_keys=True, default=str)
        if key not in self._loaded:
            extra = None if also is None or state is not None else self.frame(also, seed)
            self._loaded[key] = load_inputs(data_cfg, section, seed, spec, weights, like=like,
                                            pool=pool, fit_rows=self.fit_rows,
                                            also_fit=extra)
        return self._loaded[key]

    def frame(self, data_cfg: DataConfig, seed: int):
        """Every labelled row of a table section (its three splits), as read."""
        import json

        import pandas as pd

        from tltool.data.tabular import load_tabular

        key = json.dumps(["frame", data_cfg.model_dump(mode="json")], sort_keys=True,
                         default=str)
        if key not in self._loaded:
            data = load_tabular(data_cfg, seed)
            self._loaded[key] = pd.concat([data.train.frame, data.val.frame, data.test.frame])
        return self._loaded[key]


def prepare(cfg: ExperimentConfig, command: str, cache: InputCache | None = None) -> Route:
    """Load and check what a route needs: weights, prior, data (and the other domain's rows
    for pooled training or adaptation). Every user error surfaces here, before a run folder."""
    m = cfg.model
    data_cfg = cfg.source if command == "pretrain" else cfg.target
    section = "source" if command == "pretrain" else "target"
    cache = cache or InputCache()
    check_output_root(cfg.output.root)
    for key in ("weights", "prior_weights"):
        refs = getattr(m, key)
        for ref in refs if isinstance(refs, list) else [refs]:
            if isinstance(ref, str) and ref.startswith("source:"):
                raise ConfigError(f"model.{key}: {ref!r} names a source model of `tltool "
                                  f"select`; outside select give a run folder or a checkpoint "
                                  f"file")
    spec = get_spec(m.backbone)  # unknown backbone: fail before reading data
    _check_combinations(cfg, command)
    weights = resolve_weights(m.weights, spec)
    if command == "freeze-finetune" and weights.path is None and weights.name is None \
            and m.prior == "none" and cfg.train.source_weight == 0 and m.head not in CLASSIC_HEADS:
        log.info("model.weights is none: a target-only network from random weights (no "
                 "transfer; to transfer, name the source run, e.g. model.weights: "
                 "runs/NAME/latest)")
    prior, prior_path = _prior_checkpoints(cfg) if m.prior != "none" else (None, None)
    like = prior[0]["preprocessor"] if prior is not None else None
    if prior is not None and weights.ckpt is not None and \
            weights.ckpt["preprocessor"] != like:
        raise ConfigError("model.prior_weights: the prior encodes its inputs differently from "
                          "model.weights (other columns, scaling or image size); use a prior "
                          "trained on the same source section, or model.weights none")
    if m.keep_head:
        _check_keep_head(cfg, weights)
    args = (_inherit_args(cfg, weights.ckpt, weights.path) if weights.ckpt
            else resolve_args(m.backbone, m.backbone_args))
    if m.head in CLASSIC_HEADS:
        from tltool.models.classic import classic_args

        classic_args(m.head, m.head_args)
    pooled_table = (cfg.train.source_weight > 0 and cfg.source is not None
                    and not is_image_data(cfg.source) and not is_image_data(data_cfg))
    inputs = cache.load(data_cfg, section, cfg.seed, spec, weights, like=like,
                        also=cfg.source if pooled_table else None)
    label = getattr(inputs.data, "label", None) or data_cfg.label or "label"
    _check_task(cfg, section, label, inputs)
    if prior is not None:
        _check_prior(cfg, prior, inputs)
    if m.keep_head:
        _check_kept_classes(weights.ckpt, inputs)
    pooled = _pooled_rows(cfg, command, inputs, spec, weights, cache)
    adaptation, adapt_info = _adaptation(cfg, command, inputs, spec, weights)
    return Route(cfg, command, section, spec, weights, args, inputs, label, prior, pooled,
                 adaptation, adapt_info, prior_path)


def _check_kept_classes(ckpt: dict[str, Any], inputs: Inputs) -> None:
    src_reg = bool(ckpt["spec"].get("target_scale"))
    same = (src_reg == inputs.regression and bool(ckpt.get("multilabel")) == inputs.multilabel
            and (inputs.regression or list(ckpt["classes"]) == list(inputs.classes)))
    if not same:
        what = "a number" if src_reg else f"classes {', '.join(map(str, ckpt['classes']))}"
        mine = "a number" if inputs.regression else f"classes {', '.join(inputs.classes)}"
        raise ConfigError(f"model.keep_head: the source head predicts {what}, the target "
                          f"{mine}; a kept head needs the same ones (use a new head)")


def _check_combinations(cfg: ExperimentConfig, command: str) -> None:
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


def _check_keep_head(cfg: ExperimentConfig, weights: Weights) -> None:
    if weights.ckpt is None:
        raise ConfigError("model.keep_head: keeps the source model's head, so model.weights "
                          "must name a tltool run or checkpoint")
    if cfg.model.backbone != weights.ckpt["spec"]["backbone"]:
        return  # _inherit_args says what differs
    if weights.ckpt["spec"]["head"] in CLASSIC_HEADS and (cfg.train.source_weight > 0):
        raise ConfigError("model.keep_head: a kept classic head is used as it is; pooled "
                          "training would need a new fit (use model.head instead)")


def _check_task(cfg: ExperimentConfig, section: str, label: str, inputs: Inputs) -> None:
    m = cfg.model
    classes, multilabel, regression = inputs.classes, inputs.multilabel, inputs.regression
    if regression:
        _check_regression(cfg, section, label)
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


def _prior_checkpoints(cfg: ExperimentConfig) -> tuple[list[dict[str, Any]], list[Any]]:
    refs = cfg.model.prior_weights or cfg.model.weights
    refs = refs if isinstance(refs, list) else [refs]
    key = "model.prior_weights" if cfg.model.prior_weights else "model.weights"
    if not refs or any(r.strip().lower() in ("none", "") for r in refs):
        raise ConfigError(f"model.prior: {cfg.model.prior!r} needs a source model: set "
                          f"model.prior_weights (or model.weights) to a tltool run")
    ckpts, paths = [], []
    for ref in refs:
        ckpt, path = resolve_checkpoint(ref, key)
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


def _check_prior(cfg: ExperimentConfig, priors: list[dict[str, Any]], inputs: Inputs) -> None:
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


def _pooled_rows(cfg: ExperimentConfig, command: str, inputs: Inputs, spec: BackboneSpec,
                 weights: Weights, cache: InputCache) -> Inputs | None:
    """Pooled training: every labelled source row, encoded exactly like the target rows."""
    if cfg.train.source_weight == 0:
        return None
    if cfg.source is None:
        raise ConfigError("train.source_weight: pooled training needs a `source` data section")
    other = cfg.source
    if inputs.state.get("kind") == "image":
        other = other.model_copy(update={"image_size": inputs.state["size"]})
    source = cache.load(other, "source", cfg.seed, spec, weights, like=inputs.state)
    if source.classes != inputs.classes or source.multilabel != inputs.multilabel or \
            source.regression != inputs.regression:
        raise ConfigError(f"train.source_weight: pooled training learns the target's classes "
                          f"from source rows too, but the source classes "
                          f"({', '.join(source.classes)}) differ from the target's "
                          f"({', '.join(inputs.classes)})")
    return source


def pooled_tensors(route: Route) -> Tensors | None:
    """Every labelled source row (train, val and test of the source section) as one set."""
    if route.pooled is None:
        return None
    parts = [route.pooled.train, route.pooled.val, route.pooled.test]
    return concat_tensors(parts)


def concat_tensors(parts: list[Tensors]) -> Tensors:
    """Rows of several splits of one data set as one Tensors."""
    first = parts[0]
    if hasattr(first.x, "materialize"):
        from tltool.data.images import LazyImages

        x = LazyImages([f for p in parts for f in p.x.files], first.x.size)
    else:
        x = torch.cat([p.x for p in parts])
    return Tensors(x, torch.cat([p.y for p in parts]), first.prepare, first.augments)


def build(route: Route, seed: int) -> TransferModel:
    """The route's network: weights loaded, the prior attached, the head new (or kept)."""
    m, inputs = route.cfg.model, route.inputs
    seed_everything(seed)
    if m.keep_head:
        spec = dict(route.weights.ckpt["spec"])
        if route.pooled is not None and route.cfg.train.domain_offset:
            spec["domain_offset"] = True
        model = build_model(spec)
        state = dict(route.weights.ckpt["state_dict"])
        if model.domain_bias is not None:
            state.setdefault("domain_bias", torch.zeros_like(model.domain_bias))
        load_state(model, state, f"model.weights {route.weights.ref}")
        return model
    n_out = 1 if route.regression else len(route.classes)
    spec = model_spec(m.backbone, route.args, inputs.n_inputs, m.head, m.head_hidden,
                      m.dropout, n_out, inputs.target_scale)
    if route.prior is not None:
        p = route.prior[0]
        binary = len(p["classes"]) == 2 and not p.get("multilabel") and \
            not p["spec"].get("target_scale")
        spec["prior"] = {"mode": m.prior, "specs": [c["spec"] for c in route.prior],
                         "classes": list(p["classes"]), "multilabel": bool(p.get("multilabel")),
                         "binary": binary}
    if route.pooled is not None and route.cfg.train.domain_offset and not route.classic:
        spec["domain_offset"] = True
    model = build_model(spec)
    load_backbone_weights(model, route.spec, route.weights)
    if model.prior is not None:
        for sub, ckpt in zip(model.prior.models, route.prior, strict=True):
            load_state(sub, ckpt["state_dict"], "model.prior_weights")
    return model


def check_built(route: Route, model: TransferModel) -> None:
    """What needs the built network: the round plans against its blocks, one image through it."""
    if not (route.source_only or route.classic):
        phases_of(route.cfg, route.command, len(model.backbone.blocks),
                  model.backbone.block_names)
    check_input_fits(model, route.inputs, route.section)


def train_route(route: Route, model: TransferModel, train: Tensors, val: Tensors | None,
                save, metrics_csv, rt: Runtime, store: PrefixStore | None = None,
                pooled: Tensors | None = None, seed: int | None = None) -> dict[str, Any]:
    """Train `model` on `train` (and, pooled, the source rows), validating on `val` (None:
    no validation rows, as in a refit on every labelled row). Returns the training summary."""
    cfg = route.cfg
    seed = cfg.seed if seed is None else seed
    store = store or PrefixStore()
    train = store.with_prior(model, train, rt)
    val = None if val is None else store.with_prior(model, val, rt)
    pooled = None if pooled is None else store.with_prior(model, pooled, rt)
    if route.source_only or route.classic:
        summary = fit_classic(route, model, train, pooled, seed, rt, store) \
            if not route.source_only else _nothing_trained(model)
        save("best.pt", 0)
        save("last.pt", 0)
        return summary
    phases = phases_of(cfg, route.command, len(model.backbone.blocks),
                       model.backbone.block_names)
    if sum(p.epochs for p in phases) == 0:
        log.warning("train.epochs is 0: the saved model is the untrained starting point "
                    "(pretrained backbone, %s head)", "kept" if cfg.model.keep_head else "random")
    task = Task.of(model, route.multilabel)
    pool = Pooled(pooled, cfg.train.source_weight) if pooled is not None else None
    summary = fit(model, train, val, phases, cfg.train, route.classes, seed, save, metrics_csv,
                  log.info, task=task, bn_policy=cfg.model.bn_policy, rt=rt,
                  adapt=route.adaptation, pooled=pool, store=store)
    w = summary.get("target_watch") or {}
    if w.get("warned"):
        log.warning("adapt: the target's labelled validation rows score %.3f at the kept epoch "
                    "%d (chosen on source rows, which cannot show how the alignment changes the "
                    "target) but %.3f at epoch %d (first epoch: %.3f); compare the adapt "
                    "methods and none with `tltool select` before trusting this model",
                    w["kept"], w["kept_epoch"], w["best"], w["best_epoch"], w["first_epoch"])
    return summary


def _nothing_trained(model: TransferModel) -> dict[str, Any]:
    return {"best_epoch": 0, "best_round": 0, "epochs_run": 0, "monitor": None,
            "plans": [], "cache": [], "timing": {},
            "plan_text": "source model used as it is (keep_head, nothing trained)",
            "freeze_check": {"frozen_tensors": 0, "unchanged": True}}


@torch.no_grad()
def backbone_features(model: TransferModel, data: Tensors, rt: Runtime,
                      store: PrefixStore | None = None, max_gb: float = 4.0) -> torch.Tensor:
    """The frozen backbone's pooled features of every row (float32, CPU); through `store`,
    rows of one parent share one pass."""
    from tltool.engine import build_prefix_cache

    n = len(model.backbone.blocks)
    model.eval()
    if store is not None:
        z = store.get(model, data, n, 256, max_gb * 2**30, rt)
    else:
        z = build_prefix_cache(model, data, n, 256, max_gb * 2**30, rt)
    if z is None:
        raise ConfigError(f"train.cache_max_gb: the features of {len(data)} rows exceed "
                          f"{max_gb} GB")
    return model.backbone.forward_from(z.x, n).float().cpu() if n else \
        model.backbone._pool(z.x).float().cpu()


def fit_classic(route: Route, model: TransferModel, train: Tensors, pooled: Tensors | None,
                seed: int, rt: Runtime, store: PrefixStore | None) -> dict[str, Any]:
    """Fit the classic head on the frozen backbone's features (+ the prior's signal)."""
    from tltool.models import prior_columns
    from tltool.models.classic import classic_shape, fit_classic_head

    cfg = route.cfg
    rows = [train] if pooled is None else [train, pooled]
    feats, priors = [], []
    for part in rows:
        f = backbone_features(model, part, rt, store, cfg.train.cache_max_gb)
        feats.append(f)
        priors.append(part.prior)
    x = torch.cat(feats)
    y = torch.cat([p.y for p in rows]).numpy()
    offset = None
    if model.prior is not None:
        signal = torch.cat(priors)
        if model.prior_mode == "input":
            x = torch.cat([x, prior_columns(signal, model._binary_prior)], dim=1)
        else:
            offset = signal.double().numpy()
    task = "regression" if route.regression else "classification"
    if route.regression:
        mean, std = model.target_scale
        y = (y.astype(np.float64) - mean) / std
        if offset is not None:
            offset = offset.reshape(-1)
    weight = domain = None
    if pooled is not None:
        n_t, n_s = len(train), len(pooled)
        weight = np.concatenate([np.ones(n_t), np.full(n_s, cfg.train.source_weight)])
        if cfg.train.domain_offset:
            domain = np.concatenate([np.ones(n_t), np.zeros(n_s)])
    head = fit_classic_head(cfg.model.head, x.numpy(), y, task=task,
                            n_classes=1 if route.regression else len(route.classes),
                            args=cfg.model.head_args, seed=seed, sample_weight=weight,
                            offset=offset, domain=domain,
                            class_weight="balanced" if cfg.train.class_weights == "balanced"
                            else None)
    model.head = head
    model.spec["head_shape"] = classic_shape(head)
    return {"best_epoch": 0, "best_round": 0, "epochs_run": 0, "monitor": None,
            "plans": [], "cache": [], "timing": {},
            "plan_text": (f"{cfg.model.head} fitted by scikit-learn on {len(x)} rows of "
                          f"{x.shape[1]} features (the frozen backbone's"
                          f"{', with the prior' if model.prior is not None else ''})"),
            "freeze_check": {"frozen_tensors": 0, "unchanged": True}}


# ---------------------------------------------------------------- the commands


def _train(cfg: ExperimentConfig, command: str, argv) -> dict[str, Any]:
    route = prepare(cfg, command)
    model = build(route, cfg.seed)
    check_built(route, model)
    rt = make_runtime(cfg.train, route.spec.input == "image")
    inputs = route.inputs
    if route.weights.path is not None:
        log.info("weights: %s", route.weights.path)
    with new_run(cfg.output.root, cfg.name, command, argv, cfg.seed,
                 pin_config(cfg, route.weights, route.prior_path)) as run:
        def save(name: str, epoch: int) -> None:
            run.save_checkpoint(name, checkpoint_payload(model, inputs.state, route.classes,
                                                         route.label, route.multilabel,
                                                         command, epoch))

        write_json(run.file("runtime.json"), rt.describe())
        summary = train_route(route, model, inputs.train, inputs.val, save,
                              run.file("metrics.csv"), rt, pooled=pooled_tensors(route))
        write_json(run.file("runtime.json"), rt.describe())  # with what `auto` chose
        metrics = write_outputs(run, route, model, summary, rt, inputs.val, inputs.test)
    return {"run": str(run.path), "metrics": metrics}


def write_outputs(run, route: Route, model: TransferModel, summary: dict[str, Any], rt: Runtime,
                  val: Tensors | None, test: Tensors, decision: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Freeze plan, timing, thresholds (chosen on `val` unless `decision` is given), metrics
    and plots of a trained route; returns metrics.json's content."""
    cfg, inputs, m = route.cfg, route.inputs, route.cfg.model
    classes, multilabel, regression = route.classes, route.multilabel, route.regression
    write_text(run.file("freeze_plan.txt"), summary.pop("plan_text") + "\n")
    write_json(run.file("timing.json"), summary.pop("timing"))
    write_json(run.file("freeze_plan.json"), summary["plans"])
    batch = max(2 * cfg.train.batch_size, 256)
    proba_val = None if val is None else predict_proba(model, val, multilabel, batch, rt)
    proba_test = predict_proba(model, test, multilabel, batch, rt)
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
    if (run.file("metrics.csv")).exists() and summary["epochs_run"]:
        plots.learning_curves(run.file("metrics.csv"), run.file("plots", "learning_curves.png"),
                              summary["best_epoch"])
    if regression:
        plots.predicted_vs_true(test.y.numpy(), proba_test[:, 0],
                                run.file("plots", "predicted_vs_true_test.png"),
                                f"{route.label} (test split)")
    elif not multilabel:
        plots.confusion_matrix(metrics["test"]["confusion_matrix"], classes,
                               run.file("plots", "confusion_matrix_test.png"), "test split")
    return metrics


def describe_route(route: Route) -> dict[str, Any]:
    """What this route does, in the config's words (metrics.json `route`)."""
    m, t = route.cfg.model, route.cfg.train
    return {"backbone": m.backbone, "head": (route.weights.ckpt["spec"]["head"]
                                            if m.keep_head and route.weights.ckpt else m.head),
            "strategy": None if route.classic else m.strategy,
            "frozen_layers": None if route.classic else m.frozen_layers,
            "keep_head": m.keep_head, "source_only": route.source_only,
            "prior": None if route.prior is None else {
                "mode": m.prior, "weights": [str(p) for p in route.prior_path]},
            "pooled": None if route.pooled is None else {
                "source_weight": t.source_weight, "domain_offset": t.domain_offset,
                "source_rows": int(sum(len(getattr(route.pooled, s))
                                       for s in ("train", "val", "test")))},
            "l2sp": t.l2sp.model_dump() if (t.l2sp.alpha or t.l2sp.beta) else None,
            "adapt": route.cfg.adapt.method if route.cfg.adapt.method != "none" else None}


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
                  regression: bool = False, chosen_on: str = "validation") -> dict[str, Any]:
    """Thresholds are chosen on held-out rows only (the validation split, or out-of-fold
    predictions in `tltool select`), never on test.

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
                "chosen_on": chosen_on}
    if rule == "argmax":
        return {"rule": "argmax", "threshold": None, "chosen_on": None}
    chosen = choose_threshold(y_val, proba_val[:, 1], optimize)
    return {"rule": "threshold", "positive": classes[1], **chosen, "chosen_on": chosen_on}
