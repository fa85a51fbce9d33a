"""Classification and regression metrics, and decision thresholds (chosen on validation data
only)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

from tltool.calibration import ece


def decide(proba: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class indices: argmax, or for a binary task P(positive) >= threshold."""
    if threshold is None:
        return proba.argmax(axis=1)
    return (proba[:, 1] >= threshold).astype(np.int64)


def decide_multilabel(proba: np.ndarray, thresholds: list[float] | None) -> np.ndarray:
    """Multi-hot decisions: each label on when its probability reaches its own threshold."""
    t = np.full(proba.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
    return (proba >= t[None, :]).astype(np.int64)


def choose_threshold(y: np.ndarray, p_pos: np.ndarray, optimize: str) -> dict[str, float]:
    """Sweep the midpoints between distinct validation scores; maximise the chosen criterion.

    Ties go to the threshold closest to 0.5, so a flat criterion keeps the usual rule. One
    pass over the sorted scores: for every candidate threshold the counts of positives and
    negatives at or above it come from binary searches (O(n log n), not O(n^2))."""
    y = np.asarray(y).astype(np.int64)
    p_pos = np.asarray(p_pos, dtype=np.float64)
    scores = np.unique(p_pos)
    candidates = np.concatenate([[0.5], (scores[:-1] + scores[1:]) / 2, scores[:1] - 1e-9])
    pos, neg = np.sort(p_pos[y == 1]), np.sort(p_pos[y == 0])
    n1, n0 = len(pos), len(neg)
    tp = n1 - np.searchsorted(pos, candidates, side="left")  # predicted positive: p >= t
    fp = n0 - np.searchsorted(neg, candidates, side="left")
    values = _criteria(tp, fp, n1, n0, optimize)
    best_v = values.max()
    near = np.flatnonzero(values >= best_v - 1e-12)
    pick = near[np.argmin(np.abs(candidates[near] - 0.5))]  # first of the closest to 0.5
    return {"threshold": float(candidates[pick]), "optimize": optimize,
            "validation_score": float(values[pick])}


def _criteria(tp: np.ndarray, fp: np.ndarray, n1: int, n0: int, optimize: str) -> np.ndarray:
    """Accuracy, F1 (positive class; 0 when undefined) or Youden's J of each threshold."""
    tp, fp = tp.astype(np.float64), fp.astype(np.float64)
    if optimize == "accuracy":
        return (tp + (n0 - fp)) / max(n1 + n0, 1)
    if optimize == "f1":
        denom = 2 * tp + fp + (n1 - tp)
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return (tp / n1 if n1 else 0.0) - (fp / n0 if n0 else 0.0)


def classification_report(y: np.ndarray, proba: np.ndarray, classes: list[str],
                          threshold: float | None = None) -> dict[str, Any]:
    """Every metric a user compares runs by; keys are stable (None where undefined)."""
    pred = decide(proba, threshold)
    binary = len(classes) == 2
    average = "binary" if binary else "macro"
    present = np.unique(y)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)) if len(present) > 1
        else None,
        "precision": float(skm.precision_score(y, pred, average=average, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, average=average, zero_division=0)),
        "f1": float(skm.f1_score(y, pred, average=average, zero_division=0)),
        "auroc": None,
        "average_precision": None,
        "brier": None,
        "log_loss": float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1)).mean()),
        "ece": ece(y, proba) if len(y) else None,
        "threshold": threshold,
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=range(len(classes))).tolist(),
        "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0,
                                       labels=range(len(classes)))),
        "per_class": _per_class(y, pred, classes),
    }
    onehot = np.eye(len(classes))[y]
    out["brier"] = float(((proba - onehot) ** 2).sum(axis=1).mean() / (2 if binary else 1))
    if len(present) == len(classes):
        if binary:
            out["auroc"] = float(skm.roc_auc_score(y, proba[:, 1]))
            out["average_precision"] = float(skm.average_precision_score(y, proba[:, 1]))
        else:
            out["auroc"] = float(skm.roc_auc_score(y, proba, multi_class="ovr",
                                                   average="macro"))
            out["average_precision"] = float(skm.average_precision_score(onehot, proba,
                                                                         average="macro"))
    return out


def _per_class(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    p, r, f, support = skm.precision_recall_fscore_support(
        y, pred, labels=range(len(classes)), zero_division=0)
    return {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                "support": int(support[i])} for i, c in enumerate(classes)}


def format_report(report: dict[str, Any], classes: list[str]) -> str:
    """A readable table of one report (what `evaluate` prints and saves as report.txt)."""
    keys = ["n", "accuracy", "balanced_accuracy", "precision", "recall", "f1", "macro_f1",
            "auroc", "average_precision", "brier", "log_loss", "ece", "threshold"]
    lines = [f"{k:<18} {_fmt(report.get(k))}" for k in keys]
    if len(classes) > 2:
        lines.append(f"{'class':<12} {'precision':>10} {'recall':>8} {'f1':>8} {'support':>8}")
        for c, r in report["per_class"].items():
            lines.append(f"{c:<12} {r['precision']:>10.4f} {r['recall']:>8.4f} {r['f1']:>8.4f} "
                         f"{r['support']:>8}")
    width = max(len(c) for c in classes) + 2
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "".join(f"{c:>{width}}" for c in classes))
    for c, row in zip(classes, report["confusion_matrix"], strict=True):
        lines.append(f"{c:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def multilabel_report(y: np.ndarray, proba: np.ndarray, labels: list[str],
                      thresholds: list[float] | None = None) -> dict[str, Any]:
    """Per-label precision/recall/F1/AP/AUROC, micro and macro F1, mAP, exact match, Hamming.

    `accuracy` is the exact-match ratio, `f1` macro F1 and `auroc` macro AUROC, so the same
    keys serve early stopping for single- and multi-label tasks.
    """
    y = y.astype(np.int64)
    pred = decide_multilabel(proba, thresholds)
    per_label, aps, aucs = {}, [], []
    for j, name in enumerate(labels):
        has_both = 0 < y[:, j].sum() < len(y)
        ap = float(skm.average_precision_score(y[:, j], proba[:, j])) if y[:, j].any() else None
        auc = float(skm.roc_auc_score(y[:, j], proba[:, j])) if has_both else None
        if ap is not None:
            aps.append(ap)
        if auc is not None:
            aucs.append(auc)
        per_label[name] = {
            "support": int(y[:, j].sum()),
            "threshold": 0.5 if thresholds is None else float(thresholds[j]),
            "precision": float(skm.precision_score(y[:, j], pred[:, j], zero_division=0)),
            "recall": float(skm.recall_score(y[:, j], pred[:, j], zero_division=0)),
            "f1": float(skm.f1_score(y[:, j], pred[:, j], zero_division=0)),
            "average_precision": ap, "auroc": auc}
    exact = float((pred == y).all(axis=1).mean())
    return {
        "n": int(len(y)),
        "rows_without_label": int((y.sum(axis=1) == 0).sum()),
        "accuracy": exact,
        "exact_match": exact,
        "hamming_loss": float((pred != y).mean()),
        "precision": float(skm.precision_score(y, pred, average="micro", zero_division=0)),
        "recall": float(skm.recall_score(y, pred, average="micro", zero_division=0)),
        "micro_f1": float(skm.f1_score(y, pred, average="micro", zero_division=0)),
        "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "map": float(np.mean(aps)) if aps else None,
        "auroc": float(np.mean(aucs)) if aucs else None,
        "ece": ece(y, proba, multilabel=True) if len(y) else None,
        "per_label": per_label,
    }


def format_multilabel(report: dict[str, Any]) -> str:
    """A readable table of one multi-label report."""
    keys = ["n", "rows_without_label", "exact_match", "hamming_loss", "micro_f1", "macro_f1",
            "map", "auroc"]
    lines = [f"{k:<20} {_fmt(report[k])}" for k in keys]
    lines.append(f"{'label':<16} {'support':>8} {'thresh':>8} {'precision':>10} {'recall':>8} "
                 f"{'f1':>8} {'AP':>8}")
    for name, r in report["per_label"].items():
        lines.append(f"{name:<16} {r['support']:>8} {r['threshold']:>8.3f} "
                     f"{r['precision']:>10.4f} {r['recall']:>8.4f} {r['f1']:>8.4f} "
                     f"{_fmt(r['average_precision']):>8}")
    return "\n".join(lines)


def _auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Binary AUROC by the rank-sum (Mann-Whitney) formula, ties averaged, as sklearn's."""
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def regression_report(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Errors of predicted values, in the label's units (R² against predicting the split's
    own mean; `bias` is the mean of prediction - truth)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    err = pred - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"n": int(len(y)), "rmse": float(np.sqrt((err ** 2).mean())),
            "mae": float(np.abs(err).mean()), "median_ae": float(np.median(np.abs(err))),
            "r2": None if ss_tot == 0 else float(1 - (err ** 2).sum() / ss_tot),
            "bias": float(err.mean()),
            "spearman": _spearman(y, pred),
            "label_mean": float(y.mean()), "label_std": float(y.std())}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def format_regression(report: dict[str, Any]) -> str:
    keys = ["n", "rmse", "mae", "median_ae", "r2", "bias", "spearman", "label_mean",
            "label_std"]
    return "\n".join(f"{k:<18} {_fmt(report[k])}" for k in keys)


def epoch_scores(y: np.ndarray, proba: np.ndarray, multilabel: bool,
                 regression: bool = False) -> dict[str, Any]:
    """The validation numbers the training loop logs and monitors each epoch, in plain numpy
    (the full reports cost more than a small model's epoch). Same definitions as the reports:
    accuracy (exact match for multi-label), f1 (positive-class F1 for binary, else macro),
    auroc (binary, or macro over classes/labels); for regression rmse and r2."""
    if regression:
        err = proba.reshape(-1) - y.reshape(-1)
        ss_tot = float(((y - y.mean()) ** 2).sum())
        return {"rmse": float(np.sqrt((err ** 2).mean())),
                "r2": None if ss_tot == 0 else float(1 - (err ** 2).sum() / ss_tot)}
    if multilabel:
        yi = y.astype(np.int64)
        pred = (proba >= 0.5).astype(np.int64)
        tp = (pred & yi).sum(0)
        fp = (pred & (1 - yi)).sum(0)
        fn = ((1 - pred) & yi).sum(0)
        aucs = [a for j in range(yi.shape[1]) if (a := _auroc(yi[:, j], proba[:, j])) is not None]
        return {"accuracy": float((pred == yi).all(1).mean()), "f1": float(_f1(tp, fp, fn).mean()),
                "auroc": float(np.mean(aucs)) if aucs else None}
    k = proba.shape[1]
    pred = proba.argmax(1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm)
    f1 = _f1(tp, cm.sum(0) - tp, cm.sum(1) - tp)
    if k == 2:
        return {"accuracy": float(tp.sum() / len(y)), "f1": float(f1[1]),
                "auroc": _auroc(y, proba[:, 1])}
    aucs = [_auroc((y == c).astype(np.int64), proba[:, c]) for c in range(k)]
    return {"accuracy": float(tp.sum() / len(y)), "f1": float(f1.mean()),
            "auroc": None if any(a is None for a in aucs) else float(np.mean(aucs))}
