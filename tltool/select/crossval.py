"""Cross-validation of one route on the labelled target rows: out-of-fold predictions of every
row (each predicted by fold models that never trained on it) and the route's fold scores.

Every fold model of a network route trains in lockstep: after each epoch, every fold's
held-out rows are scored and early stopping watches the size-weighted *mean* held-out score
(the same EarlyStopping as a single run's), so one epoch count (per round), chosen like any
other hyper-parameter by cross-validation, serves every fold and then the refit on all
labelled rows. A classic head is fitted per fold; the source model as it is predicts once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tltool.adapt import Adaptation
from tltool.cache import PrefixStore
from tltool.engine.loop import Trainer, score_of
from tltool.engine.plan import PooledRows, TrainingData, TrainingPlan, rounds_of
from tltool.engine.predict import predict_proba
from tltool.engine.state import EarlyStopping
from tltool.errors import ConfigError
from tltool.inputs import unlabelled_rows
from tltool.metrics import epoch_scores
from tltool.routes.route import Route
from tltool.routes.training import backbone_features, build, fit_classic, pooled_rows_of
from tltool.runtime import make_runtime
from tltool.select.candidates import Candidate, complexity_of
from tltool.select.rules import Scored
from tltool.select.scoring import LOWER_IS_BETTER, Folds, fold_scores
from tltool.task import Task
from tltool.tensors import Tensors, concat_tensors


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


@dataclass
class CrossValidation:
    """What every candidate is scored on: the labelled rows, the folds, the metric, and the
    caches candidates share (None: nothing shared, select.share_work false)."""

    labelled: Labelled
    folds: Folds
    metric: str
    store: PrefixStore | None

    def scores(self, route: Route, oof: np.ndarray) -> list[float]:
        """The route's fold scores from its out-of-fold predictions."""
        return fold_scores(self.metric, self.labelled.y, oof, self.folds,
                           (route.cfg.decision, route.kind))


def cross_validate(route: Route, cand: Candidate, cv: CrossValidation) -> tuple[Scored,
                                                                                np.ndarray]:
    """Out-of-fold predictions of one route (repeats x rows x outputs) and its fold scores."""
    rows = cv.labelled.of(route)
    if route.source_only:
        oof, epochs = _cv_fixed(route, rows, cv.folds), None
    elif route.classic:
        oof, epochs = _cv_classic(route, rows, cv), None
    else:
        oof, epochs = _cv_network(route, rows, cv)
    complexity = cand.complexity if cand.complexity is not None else complexity_of(route)
    sign = -1 if cv.metric in LOWER_IS_BETTER else 1
    return Scored(cand.name, complexity, cv.scores(route, oof), sign, epochs), oof


def _outputs(route: Route) -> int:
    return 1 if route.regression else len(route.classes)


def _cv_fixed(route: Route, rows: Tensors, folds: Folds) -> np.ndarray:
    """The source model as it is: one prediction of every labelled row, the same in each fold
    (only the decision threshold, chosen on the other folds, depends on the labels)."""
    model = build(route, route.cfg.seed)
    rt = make_runtime(route.cfg.train, route.spec.input == "image")
    proba = predict_proba(model, rows, route.multilabel, rt=rt)
    return np.repeat(proba[None], folds.repeats, axis=0)


def _cv_classic(route: Route, rows: Tensors, cv: CrossValidation) -> np.ndarray:
    folds, pooled = cv.folds, pooled_rows_of(route)
    oof = np.zeros((folds.repeats, len(rows), _outputs(route)))
    rt = make_runtime(route.cfg.train, route.spec.input == "image")
    for j, (train_idx, held_idx) in enumerate(folds.splits):
        store = cv.store or PrefixStore()
        model = build(route, route.cfg.seed)
        train = store.with_prior(model, rows.subset(train_idx), rt)
        src = None if pooled is None else PooledRows(store.with_prior(model, pooled.rows, rt),
                                                     pooled.weight)
        fit_classic(route, model, TrainingData(train, None, src, store=store), rt)
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
    a = route.adaptation
    if a is None:
        return None
    target = train if rest is None else concat_tensors([train, rest])
    return Adaptation(a.method, a.weight, target, a.source, a.source_weight)


def _fold_trainers(route: Route, rows: Tensors, cv: CrossValidation) -> list[Trainer]:
    """One trainer per fold: its model, its training and held-out rows, its adaptation."""
    cfg, pooled = route.cfg, pooled_rows_of(route)
    image = route.spec.input == "image"
    rest = unlabelled_rows(route.inputs) if route.adaptation is not None else None
    trainers = []
    for train_idx, held_idx in cv.folds.splits:
        store = cv.store or PrefixStore()
        model = build(route, cfg.seed)
        rt = make_runtime(cfg.train, image)
        rounds = rounds_of(cfg, len(model.backbone.blocks), model.backbone.block_names)
        train = store.with_prior(model, rows.subset(train_idx), rt)
        held = store.with_prior(model, rows.subset(held_idx), rt)
        src = None if pooled is None else PooledRows(store.with_prior(model, pooled.rows, rt),
                                                     pooled.weight)
        data = TrainingData(train, held, src, fold_adaptation(route, train, rest), store)
        plan = TrainingPlan(rounds, cfg.train, cfg.seed, Task.of(model, route.multilabel),
                            route.classes, cfg.model.bn_policy, rt)
        trainers.append(Trainer(model, data, plan))
    return trainers


def _fold_epoch(trainers: list[Trainer], monitor: str) -> tuple[list[float], list]:
    """One epoch of every fold model: each fold's early-stopping score and probabilities."""
    values, probas = [], []
    for t, res in zip(trainers, [t.run_epoch() for t in trainers], strict=True):
        proba = t.task.proba(res.logits).double().numpy()
        val_loss = t.task.val_loss(res.logits, t.val.y)
        scores = epoch_scores(t.val.y.numpy(), proba, t.task.multilabel, t.task.regression)
        values.append(score_of(scores, val_loss, monitor))
        probas.append(proba)
    return values, probas


def _cv_network(route: Route, rows: Tensors, cv: CrossValidation) -> tuple[np.ndarray,
                                                                          list[int]]:
    """Every fold model in lockstep; early stopping on the mean held-out score."""
    folds, cfg = cv.folds, route.cfg
    trainers = _fold_trainers(route, rows, cv)
    held_rows = [held for _, held in folds.splits]
    sizes = np.array([len(h) for h in held_rows], dtype=np.float64)
    stopping = EarlyStopping(cfg.train.early_stopping.patience)
    epochs = []
    oof = np.zeros((folds.repeats, len(rows), _outputs(route)))
    for r, rnd in enumerate(trainers[0].plan.rounds, start=1):
        for t in trainers:
            t.start_round(r)
        stopping.start_round()
        best_here = 0
        for e in range(rnd.epochs):
            fold_values, probas = _fold_epoch(trainers, cfg.train.early_stopping.monitor)
            values = np.asarray(fold_values, dtype=np.float64)
            finite = np.isfinite(values)
            mean = float((values[finite] * sizes[finite]).sum() / sizes[finite].sum()) \
                if finite.any() else -np.inf
            if stopping.improved(mean):
                best_here = e + 1
                for j, (t, proba) in enumerate(zip(trainers, probas, strict=True)):
                    t.mark_best()
                    oof[folds.repeat_of(j)][held_rows[j]] = proba
            elif stopping.should_stop:
                break
        epochs.append(best_here)
        for t in trainers:
            t.end_round()
    return oof, epochs
