"""Routes: the ways of building the target model from a config.

A *route* (`Route`) says which weights and prior, which rows (target only, or pooled with the
source's), which head (trained by gradient steps, or a classic head fitted by scikit-learn).
`prepare` loads and checks it before any run folder exists (checks in
tltool.workflows.route_checks), `build` makes its network and `train_route` trains it on given
rows; the commands (tltool.workflows.train) and `tltool select` (which trains each route on
cross-validation folds) share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tltool.adapt import Adaptation
from tltool.cache import PrefixStore
from tltool.config import DataConfig, ExperimentConfig
from tltool.engine import Phase, Pooled, fit, seed_everything
from tltool.errors import ConfigError
from tltool.freeze import check_frozen_layers
from tltool.inputs import Inputs, Weights, is_image_data, load_inputs
from tltool.models import HeadSettings, TransferModel, build_model, model_spec
from tltool.models.backbones import get_spec, resolve_args
from tltool.models.base import BackboneSpec
from tltool.models.classic import CLASSIC_HEADS
from tltool.runtime import Runtime
from tltool.task import Task
from tltool.tensors import Tensors
from tltool.workflows.common import (
    check_input_fits,
    check_output_root,
    load_backbone_weights,
    load_state,
    log,
    resolve_weights,
)
from tltool.workflows.route_checks import (
    adaptation,
    check_combinations,
    check_keep_head,
    check_kept_classes,
    check_prior,
    check_task,
    inherit_args,
    pooled_rows,
    prior_checkpoints,
    warn_ignored,
)


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
                raise ConfigError(f"model.{key}: {ref!r} names a source model that `tltool "
                                  f"select` pretrains; it works only in select.candidates of a "
                                  f"select with target labels (elsewhere give a run folder or "
                                  f"a checkpoint file)")
    spec = get_spec(m.backbone)  # unknown backbone: fail before reading data
    check_combinations(cfg, command)
    weights = resolve_weights(m.weights, spec)
    if command == "freeze-finetune" and weights.path is None and weights.name is None \
            and m.prior == "none" and cfg.train.source_weight == 0 and m.head not in CLASSIC_HEADS:
        log.info("model.weights is none: a target-only network from random weights (no "
                 "transfer; to transfer, name the source run, e.g. model.weights: "
                 "runs/NAME/latest)")
    prior, prior_path = prior_checkpoints(cfg) if m.prior != "none" else (None, None)
    like = prior[0]["preprocessor"] if prior is not None else None
    if like is not None and (like.get("kind") == "image") != is_image_data(data_cfg):
        kinds = ("images", "table rows") if like.get("kind") == "image" else ("table rows",
                                                                             "images")
        raise ConfigError(f"model.prior_weights: the prior model takes {kinds[0]} but "
                          f"{section} holds {kinds[1]}; a prior must read the same kind of "
                          f"data as the model")
    warn_ignored(cfg, weights)
    if prior is not None and weights.ckpt is not None and \
            weights.ckpt["preprocessor"] != like:
        raise ConfigError("model.prior_weights: the prior encodes its inputs differently from "
                          "model.weights (other columns, scaling or image size); use a prior "
                          "trained on the same source section, or model.weights none")
    if m.keep_head:
        check_keep_head(cfg, weights)
    args = (inherit_args(cfg, weights.ckpt, weights.path) if weights.ckpt
            else resolve_args(m.backbone, m.backbone_args))
    if m.head in CLASSIC_HEADS:
        from tltool.models.classic_args import classic_args

        classic_args(m.head, m.head_args)
    pooled_table = (cfg.train.source_weight > 0 and cfg.source is not None
                    and not is_image_data(cfg.source) and not is_image_data(data_cfg))
    inputs = cache.load(data_cfg, section, cfg.seed, spec, weights, like=like,
                        also=cfg.source if pooled_table else None)
    label = getattr(inputs.data, "label", None) or data_cfg.label or "label"
    check_task(cfg, section, label, inputs)
    if prior is not None:
        check_prior(cfg, prior, inputs)
    if m.keep_head:
        check_kept_classes(weights.ckpt, inputs)
    pooled = pooled_rows(cfg, command, inputs, spec, weights, cache)
    adapted, adapt_info = adaptation(cfg, command, inputs, spec, weights)
    return Route(cfg, command, section, spec, weights, args, inputs, label, prior, pooled,
                 adapted, adapt_info, prior_path)


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
    spec = model_spec(m.backbone, route.args, inputs.n_inputs,
                      HeadSettings(m.head, m.head_hidden, m.dropout), n_out, inputs.target_scale)
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
                pooled: Tensors | None = None, seed: int | None = None,
                resume: dict[str, Any] | None = None) -> dict[str, Any]:
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
                  adapt=route.adaptation, pooled=pool, store=store, resume=resume)
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
        model.backbone.pool(z.x).float().cpu()


def fit_classic(route: Route, model: TransferModel, train: Tensors, pooled: Tensors | None,
                seed: int, rt: Runtime, store: PrefixStore | None) -> dict[str, Any]:
    """Fit the classic head on the frozen backbone's features (+ the prior's signal)."""
    from tltool.models import prior_columns
    from tltool.models.classic import classic_shape
    from tltool.models.classic_fit import ClassicRows, ClassicSettings, fit_classic_head

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
            x = torch.cat([x, prior_columns(signal, model.binary_prior)], dim=1)
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
    head = fit_classic_head(
        ClassicRows(x.numpy(), y, sample_weight=weight, offset=offset, domain=domain),
        ClassicSettings(cfg.model.head, task,
                        n_classes=1 if route.regression else len(route.classes),
                        args=cfg.model.head_args, seed=seed,
                        class_weight="balanced" if cfg.train.class_weights == "balanced"
                        else None))
    model.head = head
    model.spec["head_shape"] = classic_shape(head)
    return {"best_epoch": 0, "best_round": 0, "epochs_run": 0, "monitor": None,
            "plans": [], "cache": [], "timing": {},
            "plan_text": (f"{cfg.model.head} fitted by scikit-learn on {len(x)} rows of "
                          f"{x.shape[1]} features (the frozen backbone's"
                          f"{', with the prior' if model.prior is not None else ''})"),
            "freeze_check": {"frozen_tensors": 0, "unchanged": True}}


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
