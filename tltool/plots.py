"""PNG figures written into run folders: learning curves, confusion matrices and, for
regression, predicted against true values.

matplotlib is imported here only (Agg backend, no display needed), so commands that do not plot
do not pay for it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _save(fig, out: Path, dpi: int) -> None:
    """Write a figure (a full disk: one clear error naming the file)."""
    from tltool.runs.files import writing

    plt = _pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with writing(out):
            fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(metrics_csv: Path, out: Path, best_epoch: int | None = None) -> Path:
    """Training/validation loss and validation scores per epoch; rounds are shaded."""
    plt = _pyplot()
    frame = pd.read_csv(metrics_csv)
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.6))
    if not frame.empty:
        ax_loss.plot(frame["epoch"], frame["train_loss"], label="train loss")
        ax_loss.plot(frame["epoch"], frame["val_loss"], label="val loss")
        for key in ("val_accuracy", "val_f1", "val_auroc", "val_r2"):
            if key in frame and frame[key].notna().any():
                ax_score.plot(frame["epoch"], frame[key], label=key)
        for r, rows in frame.groupby("round"):
            if r % 2 == 0:
                for ax in (ax_loss, ax_score):
                    ax.axvspan(rows["epoch"].min() - 0.5, rows["epoch"].max() + 0.5,
                               color="0.92", zorder=0)
        if best_epoch:
            for ax in (ax_loss, ax_score):
                ax.axvline(best_epoch, color="0.4", linestyle="--", linewidth=1)
    ax_loss.set(xlabel="epoch", title="loss")
    ax_score.set(xlabel="epoch", title="validation (dashed: best epoch)")
    for ax in (ax_loss, ax_score):
        if ax.get_legend_handles_labels()[0]:  # nothing to label when no epoch ran
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out, 100)
    return out


def confusion_matrix(matrix: list[list[int]], classes: list[str], out: Path,
                     title: str = "") -> Path:
    """Counts with rows = true class, columns = predicted class."""
    plt = _pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(3.2, 1.2 + 0.6 * n), max(3.0, 1.0 + 0.6 * n)))
    ax.imshow(matrix, cmap="Blues")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > top / 2 else "black", fontsize=8)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    _save(fig, out, 100)
    return out


def predicted_vs_true(y, pred, out: Path, title: str) -> Path:
    """A regression model's predictions against the true values, with the identity line."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.scatter(y, pred, s=8, alpha=0.5)
    lo, hi = float(np.min([np.min(y), np.min(pred)])), float(np.max([np.max(y), np.max(pred)]))
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, out, 110)
    return out


def leaderboard(rows: list[dict], out: Path, metric: str, bar: float | None,
                bar_label: str, title: str) -> Path:
    """Each candidate's mean cross-validation score with its standard error; the chosen one
    in a darker colour, the one-standard-error bar as a dashed line."""
    plt = _pyplot()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(7.0, max(2.4, 0.9 + 0.32 * n)))
    ys = list(range(n))[::-1]
    for y, row in zip(ys, rows, strict=True):
        mean, se = row["mean"], row["se"]
        if mean is None:
            continue
        colour = "tab:blue" if row["chosen"] or row.get("averaged") else "0.55"
        ax.errorbar(mean, y, xerr=None if se is None else se, fmt="o", color=colour,
                    capsize=3, ms=5)
    ax.set_yticks(ys, [f"{r['name']} (c{r['complexity']})" for r in rows], fontsize=8)
    if bar is not None:
        ax.axvline(bar, color="tab:red", ls="--", lw=1, label=bar_label)
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel(f"cross-validation {metric} (mean ± standard error over folds)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", color="0.9")
    fig.tight_layout()
    _save(fig, out, 110)
    return out


# Curves per class / label are drawn for at most this many; a note says how many were left out.
MAX_CURVES = 12


def _curve_sets(y, proba, classes: list[str], multilabel: bool):
    """(name, 0/1 truth, score) for each curve: the positive class of a binary task, each
    class one-vs-rest, or each label; classes without both outcomes are left out."""
    import numpy as np

    y = np.asarray(y)
    if multilabel:
        sets = [(c, y[:, j].astype(int), proba[:, j]) for j, c in enumerate(classes)]
    elif len(classes) == 2:
        sets = [(classes[1], (y == 1).astype(int), proba[:, 1])]
    else:
        sets = [(c, (y == j).astype(int), proba[:, j]) for j, c in enumerate(classes)]
    return [s for s in sets if 0 < s[1].sum() < len(s[1])]


def roc_pr(y, proba, classes: list[str], multilabel: bool, out: Path, title: str) -> Path:
    """ROC and precision-recall curves side by side (per class one-vs-rest, or per label),
    with each curve's AUROC / average precision in the legend."""
    from sklearn import metrics as skm

    plt = _pyplot()
    sets = _curve_sets(y, proba, classes, multilabel)
    shown, left = sets[:MAX_CURVES], len(sets) - MAX_CURVES
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9.0, 4.2))
    for name, truth, score in shown:
        fpr, tpr, _ = skm.roc_curve(truth, score)
        roc.plot(fpr, tpr, lw=1.2, label=f"{name} ({skm.roc_auc_score(truth, score):.3f})")
        prec, rec, _ = skm.precision_recall_curve(truth, score)
        pr.step(rec, prec, where="post", lw=1.2,
                label=f"{name} ({skm.average_precision_score(truth, score):.3f})")
    roc.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (AUROC)")
    pr.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02),
           title="precision-recall (average precision)")
    if shown:
        roc.legend(fontsize=7, loc="lower right")
        pr.legend(fontsize=7, loc="lower left")
    note = f" ({left} more not drawn)" if left > 0 else ""
    fig.suptitle(f"{title}{note}", fontsize=9)
    fig.tight_layout()
    _save(fig, out, 100)
    return out


def reliability(y, proba, out: Path, title: str, multilabel: bool = False,
                calibrated=None) -> Path:
    """Reliability diagram: accuracy (multi-label: how often the label is present) against
    the mean predicted confidence per bin, before and (when given) after calibration."""
    from tltool.calibration import ece
    from tltool.calibration import reliability as bins_of

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfectly calibrated")
    for label, p, style in (("as trained", proba, "o-"), ("temperature-scaled", calibrated,
                                                           "s-")):
        if p is None:
            continue
        b = bins_of(y, p, multilabel=multilabel)
        pts = [(c, a) for c, a, n in zip(b["confidence"], b["accuracy"], b["count"],
                                         strict=True) if n]
        ax.plot([c for c, _ in pts], [a for _, a in pts], style, ms=4, lw=1.2,
                label=f"{label} (ECE {ece(y, p, multilabel=multilabel):.3f})")
    ax.set(xlabel="predicted probability" if multilabel else "confidence (top probability)",
           ylabel="observed frequency" if multilabel else "accuracy", xlim=(0, 1),
           ylim=(0, 1.02))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, out, 110)
    return out


def decision_plots(y, proba, rule, folder: Path, title: str) -> None:
    """roc_pr.png and reliability.png of a classification split into `folder` (the
    reliability diagram before and after the run's calibration (`rule`: the run's
    tltool.decision.Decision), when it has one)."""
    multilabel, classes = rule.multilabel, list(rule.classes)
    calibrated = rule.calibrated(proba) if rule.calibration else None
    roc_pr(y, proba if calibrated is None else calibrated, classes, multilabel,
           folder / "roc_pr.png", title)
    reliability(y, proba, folder / "reliability.png", title, multilabel, calibrated)
