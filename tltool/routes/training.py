"""Building a route's network and training it: by gradient steps through the engine, or, for
a classic head, fitted by scikit-learn on the frozen backbone's features (+ the prior's
signal), or not at all (the source model as it is)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from tltool.cache import Budget, PrefixStore, build_prefix_cache
from tltool.checkpoint import BEST, LAST, Checkpoint
from tltool.engine.drive import Resume, fit
from tltool.engine.plan import PooledRows, Sink, TrainingData, TrainingPlan, rounds_of
from tltool.engine.state import TrainingReport
from tltool.errors import ConfigError
from tltool.models import HeadSettings, TransferModel, build_model, model_spec, prior_columns
from tltool.models.loading import load_state
from tltool.routes.checks import check_input_fits
from tltool.routes.route import Route
from tltool.runtime import Runtime, seed_everything
from tltool.task import CLASSIFICATION, Task
from tltool.tensors import Tensors, concat_tensors
from tltool.weights import load_backbone_weights

log = logging.getLogger("tltool")


def pooled_rows_of(route: Route) -> PooledRows | None:
    """Every labelled source row (train, val and test of the source section) as one set, at
    train.source_weight (pooled training), or None."""
    if route.pooled is None:
        return None
    rows = concat_tensors([route.pooled.train, route.pooled.val, route.pooled.test])
    return PooledRows(rows, route.cfg.train.source_weight)


def _prior_spec(route: Route) -> dict:
    """The prior's part of the model spec: its models' specs, what they predict, and whether
    their signal is a two-class log-odds (one head input in `input` mode)."""
    p = route.prior[0]
    return {"mode": route.cfg.model.prior, "specs": [c.spec for c in route.prior],
            "classes": list(p.classes), "multilabel": p.multilabel,
            "binary": len(p.classes) == 2 and p.kind == CLASSIFICATION}


def _kept(route: Route) -> TransferModel:
    """The source model with its own head (keep_head), plus a domain offset when pooled."""
    ckpt: Checkpoint = route.weights.ckpt
    spec = dict(ckpt.spec)
    if route.pooled is not None and route.cfg.train.domain_offset:
        spec["domain_offset"] = True
    model = build_model(spec)
    state = dict(ckpt.state_dict)
    if model.domain_bias is not None:
        state.setdefault("domain_bias", torch.zeros_like(model.domain_bias))
    load_state(model, state, f"model.weights {route.weights.ref}")
    return model


def build(route: Route, seed: int) -> TransferModel:
    """The route's network: weights loaded, the prior attached, the head new (or kept)."""
    m, inputs = route.cfg.model, route.inputs
    seed_everything(seed)
    if m.keep_head:
        return _kept(route)
    n_out = 1 if route.regression else len(route.classes)
    spec = model_spec(m.backbone, route.args, inputs.n_inputs,
                      HeadSettings(m.head, m.head_hidden, m.dropout), n_out, inputs.target_scale)
    if route.prior is not None:
        spec["prior"] = _prior_spec(route)
    if route.pooled is not None and route.cfg.train.domain_offset and not route.classic:
        spec["domain_offset"] = True
    model = build_model(spec)
    load_backbone_weights(model, route.spec, route.weights)
    if model.prior is not None:
        for sub, ckpt in zip(model.prior.models, route.prior, strict=True):
            load_state(sub, ckpt.state_dict, "model.prior_weights")
    return model


def check_built(route: Route, model: TransferModel) -> None:
    """What needs the built network: the round plans against its blocks, one image through it."""
    if not (route.source_only or route.classic):
        rounds_of(route.cfg, len(model.backbone.blocks), model.backbone.block_names)
    check_input_fits(model, route.inputs, route.section)


def training_plan(route: Route, model: TransferModel, rt: Runtime) -> TrainingPlan:
    """How the route's network trains: its rounds and train.* settings, on its task."""
    cfg = route.cfg
    rounds = rounds_of(cfg, len(model.backbone.blocks), model.backbone.block_names)
    return TrainingPlan(rounds, cfg.train, cfg.seed, Task.of(model, route.multilabel),
                        route.classes, cfg.model.bn_policy, rt)


def train_route(route: Route, model: TransferModel, data: TrainingData, sink: Sink,
                rt: Runtime, resume: Resume | None = None) -> TrainingReport:
    """Train `model` on `data.train` (and the route's pooled source rows and adaptation),
    validating on `data.val` (None: no validation rows, as in a refit on every labelled row),
    sharing `data.store`'s caches. Returns what training did."""
    store = data.store
    pooled = pooled_rows_of(route)
    data = TrainingData(
        store.with_prior(model, data.train, rt),
        None if data.val is None else store.with_prior(model, data.val, rt),
        None if pooled is None else PooledRows(store.with_prior(model, pooled.rows, rt),
                                               pooled.weight),
        route.adaptation, store)
    if route.source_only or route.classic:
        report = TrainingReport.untrained(
            "source model used as it is (keep_head, nothing trained)") if route.source_only \
            else fit_classic(route, model, data, rt)
        sink.save(BEST, 0)
        sink.save(LAST, 0)
        return report
    plan = training_plan(route, model, rt)
    if plan.epochs == 0:
        log.warning("train.epochs is 0: the saved model is the untrained starting point "
                    "(pretrained backbone, %s head)", "kept" if route.cfg.model.keep_head
                    else "random")
    report = fit(model, data, plan, sink, resume)
    w = report.target_watch or {}
    if w.get("warned"):
        log.warning("adapt: the target's labelled validation rows score %.3f at the kept epoch "
                    "%d (chosen on source rows, which cannot show how the alignment changes the "
                    "target) but %.3f at epoch %d (first epoch: %.3f); compare the adapt "
                    "methods and none with `tltool select` before trusting this model",
                    w["kept"], w["kept_epoch"], w["best"], w["best_epoch"], w["first_epoch"])
    return report


@torch.no_grad()
def backbone_features(model: TransferModel, data: Tensors, rt: Runtime,
                      store: PrefixStore | None = None, max_gb: float = 4.0) -> torch.Tensor:
    """The frozen backbone's pooled features of every row (float32, CPU); through `store`,
    rows of one parent share one pass."""
    n = len(model.backbone.blocks)
    model.eval()
    if store is not None:
        z = store.get(model, data, n, Budget(256, max_gb * 2**30), rt)
    else:
        z = build_prefix_cache(model, data, n, Budget(256, max_gb * 2**30), rt)
    if z is None:
        raise ConfigError(f"train.cache_max_gb: the features of {len(data)} rows exceed "
                          f"{max_gb} GB")
    return model.backbone.forward_from(z.x, n).float().cpu()


def _classic_rows(route: Route, model: TransferModel, data: TrainingData, rt: Runtime):
    """The rows a classic head is fitted on: features (+ the prior's columns), labels, the
    prior's offset, and for pooled rows their weights and domain column."""
    cfg = route.cfg
    rows = [data.train] if data.pooled is None else [data.train, data.pooled.rows]
    feats = [backbone_features(model, part, rt, data.store, cfg.train.cache_max_gb)
             for part in rows]
    x = torch.cat(feats)
    y = torch.cat([p.y for p in rows]).numpy()
    offset = None
    if model.prior is not None:
        signal = torch.cat([part.prior for part in rows])
        if model.prior_mode == "input":
            x = torch.cat([x, prior_columns(signal, model.binary_prior)], dim=1)
        else:
            offset = signal.double().numpy()
    if route.regression:
        mean, std = model.target_scale
        y = (y.astype(np.float64) - mean) / std
        if offset is not None:
            offset = offset.reshape(-1)
    weight = domain = None
    if data.pooled is not None:
        n_t, n_s = len(data.train), len(data.pooled.rows)
        weight = np.concatenate([np.ones(n_t), np.full(n_s, cfg.train.source_weight)])
        if cfg.train.domain_offset:
            domain = np.concatenate([np.ones(n_t), np.zeros(n_s)])
    return x, y, offset, weight, domain


def fit_classic(route: Route, model: TransferModel, data: TrainingData,
                rt: Runtime) -> TrainingReport:
    """Fit the classic head on the frozen backbone's features (+ the prior's signal) of
    `data.train` (and `data.pooled`'s rows)."""
    from tltool.models.classic import classic_shape
    from tltool.models.classic_fit import ClassicRows, ClassicSettings, fit_classic_head

    cfg = route.cfg
    x, y, offset, weight, domain = _classic_rows(route, model, data, rt)
    head = fit_classic_head(
        ClassicRows(x.numpy(), y, sample_weight=weight, offset=offset, domain=domain),
        ClassicSettings(cfg.model.head, "regression" if route.regression else "classification",
                        n_classes=1 if route.regression else len(route.classes),
                        args=cfg.model.head_args, seed=cfg.seed,
                        class_weight="balanced" if cfg.train.class_weights == "balanced"
                        else None))
    model.head = head
    model.spec["head_shape"] = classic_shape(head)
    return TrainingReport.untrained(
        f"{cfg.model.head} fitted by scikit-learn on {len(x)} rows of {x.shape[1]} features "
        f"(the frozen backbone's{', with the prior' if model.prior is not None else ''})")
