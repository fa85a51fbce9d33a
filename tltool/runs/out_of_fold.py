"""oof_predictions.csv: a select run's out-of-fold predictions of the labelled target rows
(each row predicted by fold models that never trained on it; the mean over repeats). They are
what `tltool ensemble` chooses an ensemble of select runs' threshold on (a select run trained
on its validation rows too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tltool.errors import RunError
from tltool.runs.files import write_text
from tltool.task import MULTILABEL, REGRESSION

FILE = "oof_predictions.csv"


def write_out_of_fold(folder: Path, ids, y: np.ndarray, oof: np.ndarray,
                      answers: tuple[str, list[str]]) -> None:
    """Out-of-fold predictions (repeats x rows x outputs; their mean over repeats is kept) of
    rows `ids` with labels `y`, for a model of `answers` (task kind, classes)."""
    kind, classes = answers
    mean = oof.mean(axis=0)
    cols: dict = {"id": ids}
    if kind == REGRESSION:
        cols["prediction"] = np.round(mean[:, 0], 8)
        cols["label"] = y
    else:
        for i, c in enumerate(classes):
            cols[f"p_{c}"] = np.round(mean[:, i], 8)
        cols["label"] = (["|".join(np.asarray(classes)[r.astype(bool)]) for r in y]
                         if kind == MULTILABEL else np.asarray(classes)[y])
    write_text(Path(folder) / FILE, pd.DataFrame(cols).to_csv(index=False))


def has_out_of_fold(run: Path) -> bool:
    """Whether a select run kept out-of-fold predictions (one made without target labels
    has none)."""
    return (Path(run) / FILE).exists()


def read_out_of_fold(runs: list[Path], classes: list[str],
                     kind: str) -> tuple[np.ndarray, np.ndarray, list[set[str]]]:
    """Select runs: their out-of-fold predictions on the labelled rows they share (averaged),
    the labels, and each run's labelled rows."""
    frames = []
    for run in runs:
        path = Path(run) / FILE
        try:
            frames.append(pd.read_csv(path, dtype={"id": str}, keep_default_na=False))
        except (OSError, ValueError):
            raise RunError(f"{path}: missing or unreadable (a select run keeps its "
                           f"out-of-fold predictions there)") from None
    cols = ["prediction"] if kind == REGRESSION else [f"p_{c}" for c in classes]
    try:
        labelled = [set(f["id"]) for f in frames]
        common = sorted(set.intersection(*labelled))
        parts = [f.drop_duplicates("id").set_index("id").loc[common] for f in frames]
        avg = np.mean([p[cols].to_numpy(np.float64) for p in parts], axis=0)
        y = _labels(parts[0]["label"], classes, kind)
    except (KeyError, ValueError, TypeError) as exc:
        raise RunError(f"ensemble: a member's oof_predictions.csv is damaged ({type(exc).__name__}"
                       f": {str(exc)[:120]}); expected columns id, {', '.join(cols)}, label "
                       f"with the run's classes") from None
    if not common:
        raise RunError("ensemble: the select runs share no labelled row; their out-of-fold "
                       "predictions cannot choose a common threshold")
    if not np.isfinite(avg).all():
        raise RunError("ensemble: a member's oof_predictions.csv holds non-finite numbers")
    return avg, y, labelled


def _labels(labels: pd.Series, classes: list[str], kind: str) -> np.ndarray:
    if kind == REGRESSION:
        return labels.to_numpy(np.float64)
    if kind == MULTILABEL:
        return np.array([[c in str(v).split("|") for c in classes] for v in labels],
                        dtype=np.int64)
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[str(v)] for v in labels], dtype=np.int64)
