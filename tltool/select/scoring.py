"""Scoring candidates by cross-validation: the folds (repeated stratified k-fold: classes;
quintiles of the label for regression; the first present label for multi-label; seeded, over
the labelled rows only), the metric, and each fold's score from out-of-fold (OOF) predictions
— at a decision threshold chosen on the other folds, never on the fold's own labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn import metrics as skm

from tltool.data.splits import strata
from tltool.decision import fold_threshold
from tltool.errors import DataError
from tltool.task import CLASSIFICATION, MULTILABEL, REGRESSION

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
    if task == REGRESSION:
        return strata(y, True)
    if task == MULTILABEL:
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
    if task == CLASSIFICATION and smallest < 2:
        rare = int(np.flatnonzero(counts == smallest)[0])
        name = classes[rare] if classes and rare < len(classes) else rare
        raise DataError(f"cross-validation needs at least 2 labelled rows of every class; "
                        f"class {name!r} has {smallest} of the {len(y)} labelled target rows "
                        f"(the training + validation split after n_train / n_val: add labelled "
                        f"rows of it)")
    if smallest < k:
        if task == CLASSIFICATION:
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
    if task == REGRESSION:
        return "rmse"
    if task == MULTILABEL:
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
                rule: tuple[object, str]) -> list[float]:
    """Each fold's score from out-of-fold predictions. `rule`: the config's decision section
    and the task kind; a binary threshold (rule threshold) is chosen for fold j on the other
    folds' OOF rows of the same repeat, so no fold is scored at a threshold chosen on its own
    labels."""
    out = []
    settings, kind = rule
    thresholded = metric in ("accuracy", "balanced_accuracy", "f1")
    for j, (_, held) in enumerate(folds.splits):
        r = folds.repeat_of(j)
        t = None
        if thresholded:
            others = np.concatenate([h for i, (_, h) in enumerate(folds.splits)
                                     if folds.repeat_of(i) == r and i != j])
            t = fold_threshold(settings, kind, y[others], oof[r][others])
        out.append(score(metric, y[held], oof[r][held], t))
    return out
