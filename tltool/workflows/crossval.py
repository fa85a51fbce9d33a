"""Cross-validation of one route on the labelled target rows (tltool select), and the refit of
a route on all of them. Fold scoring and the choice rule live in tltool.cv."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from tltool.cache import PrefixStore
from tltool.cv import LOWER_IS_BETTER, Folds, Scored, fold_scores
from tltool.decision import decision_rule
from tltool.engine import Phase, Pooled, Trainer, predict_proba, score_of
from tltool.errors import ConfigError
from tltool.inputs import unlabelled_rows
from tltool.metrics import epoch_scores
from tltool.runtime import make_runtime
from tltool.task import Task
from tltool.tensors import Tensors
from tltool.workflows.candidates import Candidate, complexity_of
from tltool.workflows.routes import (
    Route,
    backbone_features,
    build,
    concat_tensors,
    fit_classic,
    phases_of,
    pooled_tensors,
    train_route,
)


@dataclass
class Labelled:
    """The labelled target rows (training + validation split), per input encoding."""

    y: np.ndarray
    ids: np.ndarray
    by_inputs: dict[int, Tensors]
    routes: dict[int, Route]

    def of(self, route: Route) -> Tensors:
        return self.by_inputs[id(route.inputs)]


def labelled_rows(routes: list[tuple[Candidate, Route]]) -> Labelled:
    """Every route reads the same target rows (maybe encoded differently): one row order."""
    by_inputs: dict[int, Tensors] = {}
    y = ids = None
    for cand, route in routes:
        inputs = route.inputs
        if id(inputs) in by_inputs:
            continue
        these = np.concatenate([np.asarray(inputs.data.train.ids).astype(str),
                                np.asarray(inputs.data.val.ids).astype(str)])
        if ids is None:
            ids = these
            y = np.concatenate([inputs.train.y.numpy(), inputs.val.y.numpy()])
        elif not np.array_equal(ids, these):
            raise ConfigError(f"select.candidates ({cand.name}): reads other target rows than "
                              f"the other candidates; candidates may change the model and "
                              f"training, not the target data's rows (split, n_train, n_val)")
        by_inputs[id(inputs)] = concat_tensors([inputs.train, inputs.val])
    return Labelled(y, ids, by_inputs, {id(r.inputs): r for _, r in routes})


def cross_validate(route: Route, cand: Candidate, rows: Tensors, folds: Folds,
                   store: PrefixStore | None, metric: str,
                   seed: int) -> tuple[Scored, np.ndarray]:
    """Out-of-fold predictions of one route (repeats x rows x outputs) and its fold scores.
    `store` None: nothing shared between folds (each computes its own caches)."""
    cfg = route.cfg
    pooled = pooled_tensors(route)
    if route.source_only:
        oof, epochs = _cv_fixed(route, rows, folds, store), None
    elif route.classic:
        oof, epochs = _cv_classic(route, rows, folds, store, pooled), None
    else:
        oof, epochs = _cv_network(route, rows, folds, store, pooled)
    y = rows.y.numpy()
    decision = None if route.regression else {"rule": cfg.decision.rule,
                                              "optimize": cfg.decision.optimize}
    scores = fold_scores(metric, y, oof, folds, decision)
    complexity = cand.complexity if cand.complexity is not None else complexity_of(route)
    sign = -1 if metric in LOWER_IS_BETTER else 1
    return Scored(cand.name, complexity, scores, sign, epochs), oof


def _outputs(route: Route) -> int:
    return 1 if route.regression else len(route.classes)


def _cv_fixed(route: Route, rows: Tensors, folds: Folds,
              store: PrefixStore | None) -> np.ndarray:
    """The source model as it is: one prediction of every labelled row, the same in each fold
    (only the decision threshold, chosen on the other folds, depends on the labels)."""
    model = build(route, route.cfg.seed)
    rt = make_runtime(route.cfg.train, route.spec.input == "image")
    proba = predict_proba(model, rows, route.multilabel, rt=rt)
    return np.repeat(proba[None], folds.repeats, axis=0)


def _cv_classic(route: Route, rows: Tensors, folds: Folds, shared: PrefixStore | None,
                pooled: Tensors | None) -> np.ndarray:
    oof = np.zeros((folds.repeats, len(rows), _outputs(route)))
    rt = make_runtime(route.cfg.train, route.spec.input == "image")
    for j, (train_idx, held_idx) in enumerate(folds.splits):
        store = shared or PrefixStore()
        model = build(route, route.cfg.seed)
        train = store.with_prior(model, rows.subset(train_idx), rt)
        src = None if pooled is None else store.with_prior(model, pooled, rt)
        fit_classic(route, model, train, src, route.cfg.seed, rt, store)
        held = store.with_prior(model, rows.subset(held_idx), rt)
        feats = backbone_features(model, held, rt, store, route.cfg.train.cache_max_gb)
        with torch.no_grad():
            logits = model.from_features(feats, held.prior)
        oof[folds.repeat_of(j)][held_idx] = Task.of(model, route.multilabel).proba(
            logits.float()).double().numpy()
    return oof


def fold_adaptation(route: Route, train: Tensors, rest: Tensors | None):
    """A fold's own domain adaptation: the rows aligned are the fold's training rows (labels
    unused) and the unlabelled pool, never its held-out rows."""
    from tltool.adapt import Adaptation

    a = route.adaptation
    if a is None:
        return None
    target = train if rest is None else concat_tensors([train, rest])
    return Adaptation(a.method, a.weight, target, a.source, a.source_weight)


def _cv_network(route: Route, rows: Tensors, folds: Folds, shared: PrefixStore | None,
                pooled: Tensors | None) -> tuple[np.ndarray, list[int]]:
    """Every fold model in lockstep; early stopping on the mean held-out score."""
    cfg = route.cfg
    image = route.spec.input == "image"
    rest = unlabelled_rows(route.inputs) if route.adaptation is not None else None
    trainers, held_rows = [], []
    phases: list[Phase] = []
    for train_idx, held_idx in folds.splits:
        store = shared or PrefixStore()
        model = build(route, cfg.seed)
        rt = make_runtime(cfg.train, image)
        phases = phases_of(cfg, route.command, len(model.backbone.blocks),
                           model.backbone.block_names)
        train = store.with_prior(model, rows.subset(train_idx), rt)
        held = store.with_prior(model, rows.subset(held_idx), rt)
        src = None if pooled is None else Pooled(store.with_prior(model, pooled, rt),
                                                 cfg.train.source_weight)
        trainers.append(Trainer(model, train, held, phases, cfg.train, route.classes, cfg.seed,
                                Task.of(model, route.multilabel), cfg.model.bn_policy, rt,
                                fold_adaptation(route, train, rest), src, store))
        held_rows.append(held_idx)
    task = trainers[0].task
    monitor = cfg.train.early_stopping.monitor
    patience = cfg.train.early_stopping.patience
    sizes = np.array([len(h) for h in held_rows], dtype=np.float64)
    best, epochs = -np.inf, []
    oof = np.zeros((folds.repeats, len(rows), _outputs(route)))
    for r, phase in enumerate(phases, start=1):
        for t in trainers:
            t.start_round(r)
        stale, best_here = 0, 0
        for e in range(phase.epochs):
            results = [t.run_epoch() for t in trainers]
            fold_values, probas = [], []
            for t, res in zip(trainers, results, strict=True):
                proba = task.proba(res.logits).double().numpy()
                val_loss = task.val_loss(res.logits, t.val.y)
                scores = epoch_scores(t.val.y.numpy(), proba, task.multilabel, task.regression)
                fold_values.append(score_of(scores, val_loss, monitor))
                probas.append(proba)
            values = np.asarray(fold_values, dtype=np.float64)
            finite = np.isfinite(values)
            mean = float((values[finite] * sizes[finite]).sum() / sizes[finite].sum()) \
                if finite.any() else -np.inf
            if mean > best:
                best, best_here, stale = mean, e + 1, 0
                for j, (t, proba) in enumerate(zip(trainers, probas, strict=True)):
                    t.mark_best()
                    oof[folds.repeat_of(j)][held_rows[j]] = proba
            else:
                stale += 1
                if patience is not None and stale >= patience:
                    break
        epochs.append(best_here)
        for t in trainers:
            t.end_round()
    return oof, epochs


def _refit_config(route: Route, epochs: list[int] | None) -> Route:
    """The route with the epoch counts the cross-validation chose (no early stopping: the
    refit has no validation rows)."""
    if epochs is None:
        return route
    cfg = route.cfg
    if cfg.train.rounds:
        rounds = [r.model_copy(update={"epochs": max(e, 0)})
                  for r, e in zip(cfg.train.rounds, epochs, strict=True)]
        train = cfg.train.model_copy(update={"rounds": rounds})
    else:
        train = cfg.train.model_copy(update={"epochs": epochs[0]})
    return replace(route, cfg=cfg.model_copy(update={"train": train}))


def refit(route: Route, scored: Scored, rows: Tensors, store: PrefixStore, make_save=None,
          metrics_csv="/dev/null") -> tuple[Any, dict[str, Any], Any, Route]:
    """The route trained on every labelled row, for the epochs its cross-validation chose
    (`make_save(model)` gives the checkpoint writer). Returns model, summary, runtime and the
    route as refit."""
    route = _refit_config(route, scored.epochs)
    model = build(route, route.cfg.seed)
    rt = make_runtime(route.cfg.train, route.spec.input == "image")
    if route.adaptation is not None:
        route = replace(route, adaptation=fold_adaptation(route, rows,
                                                            unlabelled_rows(route.inputs)))
    save = make_save(model) if make_save else (lambda *_: None)
    summary = train_route(route, model, rows, None, save, metrics_csv, rt, store,
                          pooled_tensors(route))
    return model, summary, rt, route


def oof_decision(route: Route, oof: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The refit model's decision rule, chosen on the out-of-fold predictions of every repeat
    (rows the fold models did not train on)."""
    flat = oof.reshape(-1, oof.shape[-1])
    ys = np.concatenate([y] * oof.shape[0])
    return decision_rule(route.cfg, route.classes, route.multilabel, flat, ys,
                         route.regression, chosen_on="out-of-fold")
