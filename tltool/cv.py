"""Cross-validation of one route on the labelled target rows, and the choice among routes.

Folds: repeated stratified k-fold (classes; quintiles of the label for regression; the first
present label for multi-label), seeded, over the labelled rows only. Every fold model of a
network route trains in lockstep: after each epoch, every fold's held-out rows are scored and
early stopping watches the *mean* held-out score, so one epoch count (per round), chosen like
any other hyper-parameter by cross-validation, serves every fold and then the refit on all
labelled rows. Out-of-fold (OOF) probabilities at that epoch give the route's scores and the
decision threshold of the refit model.

The choice: the best mean score, or (rule one_se) the simplest route whose mean lies within one
standard error of the best (Hastie, Tibshirani & Friedman, The Elements of Statistical
Learning, 7.10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn import metrics as skm

from tltool.decision import Decision
from tltool.errors import DataError
from tltool.metrics import choose_threshold

# Metrics where lower is better: their scores are negated for ranking, shown as they are.
LOWER_IS_BETTER = ("log_loss", "rmse", "mae")


@dataclass
class Folds:
    """(training rows, held-out rows) index pairs into the labelled rows, per repeat."""

    splits: list[tuple[np.ndarray, np.ndarray]]
    k: int
    repeats: int
    notes: list[str] = field(default_factory=list)

    def repeat_of(self, j: int) -> int:
        return j // self.k


def strata_of(y: np.ndarray, task: str) -> np.ndarray:
    """What a stratified fold keeps in proportion."""
    if task == "regression":
        from tltool.data.splits import strata

        return strata(y, True)
    if task == "multilabel":
        on = y > 0
        return np.where(on.any(axis=1), on.argmax(axis=1), y.shape[1])
    return y


def make_folds(y: np.ndarray, task: str, k: int, repeats: int, seed: int,
               classes: list[str] | None = None) -> Folds:
    """Repeated stratified k-fold; k shrinks (with a note) when a class has fewer rows."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    groups = strata_of(y, task)
    counts = np.bincount(groups)
    smallest = int(counts[counts > 0].min())
    notes = []
    if task == "classification" and smallest < 2:
        rare = int(np.flatnonzero(counts == smallest)[0])
        name = classes[rare] if classes and rare < len(classes) else rare
        raise DataError(f"cross-validation needs at least 2 labelled rows of every class; "
                        f"class {name!r} has {smallest} of the {len(y)} labelled target rows "
                        f"(the training + validation split after n_train / n_val: add labelled "
                        f"rows of it)")
    if smallest < k:
        if task == "classification":
            notes.append(f"{k}-fold cross-validation lowered to {max(smallest, 2)} folds: a "
                         f"class has only {smallest} labelled rows")
            k = max(smallest, 2)
        else:  # strata of numbers or label sets: merge the rare ones into the largest group
            rare = np.isin(groups, np.flatnonzero((counts > 0) & (counts < k)))
            groups = np.where(rare, int(counts.argmax()), groups)
    if len(y) < 2 * k:
        k = max(2, len(y) // 2)
        notes.append(f"only {len(y)} labelled rows: {k}-fold cross-validation")
    rskf = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    splits = [(np.sort(a), np.sort(b)) for a, b in rskf.split(np.zeros(len(y)), groups)]
    return Folds(splits, k, repeats, notes)


def default_metric(task: str, n_classes: int) -> str:
    if task == "regression":
        return "rmse"
    if task == "multilabel":
        return "map"
    return "auroc" if n_classes == 2 else "accuracy"


def score(metric: str, y: np.ndarray, proba: np.ndarray,
          threshold: float | None = None) -> float:
    """One fold's score (as the metric reads: rmse in the label's units, log loss in nats)."""
    if metric in ("rmse", "mae", "r2"):
        err = proba[:, 0] - y
        if metric == "rmse":
            return float(np.sqrt(np.mean(err ** 2)))
        if metric == "mae":
            return float(np.mean(np.abs(err)))
        ss = float(((y - y.mean()) ** 2).sum())
        return float(1 - (err ** 2).sum() / ss) if ss else float("nan")
    if metric == "map":
        aps = [skm.average_precision_score(y[:, j], proba[:, j]) for j in range(y.shape[1])
               if y[:, j].any()]
        return float(np.mean(aps)) if aps else float("nan")
    if metric == "log_loss":
        return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1)).mean())
    if metric == "auroc":
        if len(np.unique(y)) < 2:
            return float("nan")
        if proba.shape[1] == 2:
            return float(skm.roc_auc_score(y, proba[:, 1]))
        return float(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro",
                                       labels=np.arange(proba.shape[1])))
    pred = proba.argmax(1) if threshold is None else (proba[:, 1] >= threshold).astype(int)
    if metric == "accuracy":
        return float((pred == y).mean())
    if metric == "balanced_accuracy":
        return float(skm.balanced_accuracy_score(y, pred))
    if metric == "f1":
        average = "binary" if proba.shape[1] == 2 else "macro"
        return float(skm.f1_score(y, pred, average=average, zero_division=0))
    raise ValueError(metric)


def fold_scores(metric: str, y: np.ndarray, oof: np.ndarray, folds: Folds,
                decision: dict[str, Any] | None) -> list[float]:
    """Each fold's score from out-of-fold predictions. A decision threshold (binary, rule
    threshold) is chosen for fold j on the other folds' OOF rows of the same repeat, so no
    fold is scored at a threshold chosen on its own labels."""
    out = []
    # `decision` here is the rule to apply ({"rule", "optimize"}), not yet a chosen one
    rule = None if decision is None else Decision(dict(decision))
    thresholded = rule is not None and rule.rule == "threshold" and not rule.multilabel and \
        metric in ("accuracy", "balanced_accuracy", "f1") and oof.shape[-1] == 2
    for j, (_, held) in enumerate(folds.splits):
        r = folds.repeat_of(j)
        proba = oof[r][held]
        t = None
        if thresholded:
            others = np.concatenate([h for i, (_, h) in enumerate(folds.splits)
                                     if folds.repeat_of(i) == r and i != j])
            t = choose_threshold(y[others], oof[r][others][:, 1],
                                 decision["optimize"])["threshold"]
        out.append(score(metric, y[held], proba, t))
    return out


@dataclass
class Scored:
    """One candidate's cross-validation result."""

    name: str
    complexity: int
    scores: list[float]  # per fold, as the metric reads
    sign: int  # +1: higher is better; -1: lower is better
    epochs: list[int] | None = None  # per round, chosen by the mean held-out score
    notes: list[str] = field(default_factory=list)

    @property
    def valid(self) -> list[float]:
        return [s for s in self.scores if not math.isnan(s)]

    @property
    def mean(self) -> float:
        v = self.valid
        return float(np.mean(v)) if v else float("nan")

    @property
    def se(self) -> float:
        v = self.valid
        return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")

    @property
    def rank_value(self) -> float:
        """Higher is better, for every metric."""
        return -math.inf if math.isnan(self.mean) else self.sign * self.mean


def choose(results: list[Scored], rule: str,
           band: float = 3.0) -> tuple[Scored, dict[str, Any]]:
    """The best mean score, or under one_se the simplest candidate within one standard error
    of it (ties: the better mean), or under ensemble the best and the candidates to average
    (how["members"]). Returns the winner and how it was chosen."""
    ranked = [r for r in results if not math.isnan(r.mean)]
    if not ranked:
        raise DataError("select: no candidate got a cross-validation score (every fold was "
                        "undefined: too few labelled rows of some class?)")
    best = max(ranked, key=lambda r: (r.rank_value, -r.complexity))
    if rule == "ensemble":
        # every candidate not clearly worse than the best: mean within `band` standard errors
        # of it (3 ~ a two-sided 95% interval for the difference of two means with the best's
        # standard error each, 2 x sqrt(2) = 2.83); the caller averages them
        se = 0.0 if math.isnan(best.se) else best.se
        bar = best.rank_value - band * se
        members = [r for r in ranked if r.rank_value >= bar - 1e-12]
        members.sort(key=lambda r: (-r.rank_value, r.complexity, r.name))
        return best, {"rule": rule, "best": best.name, "bar": best.sign * bar, "band": band,
                      "members": [r.name for r in members]}
    if rule == "best" or math.isnan(best.se):
        return best, {"rule": rule, "best": best.name, "bar": None}
    bar = best.rank_value - best.se
    within = [r for r in ranked if r.rank_value >= bar - 1e-12]
    winner = min(within, key=lambda r: (r.complexity, -r.rank_value))
    return winner, {"rule": rule, "best": best.name,
                    "bar": best.sign * bar, "within_one_se": [r.name for r in within]}
