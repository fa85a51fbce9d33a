"""Tabular preprocessing fitted on training rows only, saved as plain values with the model.

State is a dict of lists and numbers (no pickled objects), so it travels inside a checkpoint
that loads with `torch.load(weights_only=True)`, and `predict` applies exactly the same transform.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from tltool.errors import DataError

log = logging.getLogger("tltool")

MISSING = "(missing)"
# A text column counts as numeric when at least this share of its values parse as numbers;
# the rest are then typos to report, not categories to learn.
NUMERIC_SHARE = 0.9


def value_text(v: Any) -> str:
    """A cell as a category or class name. Whole numbers read as floats (pandas turns a
    number column with one empty cell into floats) keep their integer spelling: 1.0 -> "1",
    so the same file with or without a blank cell gives the same categories."""
    if isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


def csv_line(index: Any) -> str:
    """Human row reference: the original frame index is the 0-based data row of the CSV."""
    return f"row {int(index) + 2}" if isinstance(index, (int, np.integer)) else f"row {index}"


def infer_numeric(frame: pd.DataFrame, columns: list[str], forced_categorical: list[str],
                  origin: str) -> list[str]:
    """Columns to treat as numbers; a mostly-numeric column with stray text is an error."""
    numeric = []
    for col in columns:
        series = frame[col]
        if col in forced_categorical or pd.api.types.is_bool_dtype(series):
            continue
        if pd.api.types.is_numeric_dtype(series):
            numeric.append(col)
            continue
        present = series.dropna()
        if present.empty:
            continue
        parsed = pd.to_numeric(present, errors="coerce")
        share = parsed.notna().mean()
        if share >= NUMERIC_SHARE:
            bad = parsed[parsed.isna()]
            if not bad.empty:
                first = bad.index[0]
                raise DataError(
                    f"{origin}: column {col!r} holds numbers but {csv_line(first)} has "
                    f"{present[first]!r} ({len(bad)} such value{'s' if len(bad) > 1 else ''}); "
                    f"fix the value(s), leave them empty for missing, or list the column "
                    f"under `categorical`")
            numeric.append(col)
    return numeric


def _shown(value: Any) -> str:
    """A cell as a message shows it: numbers plainly (inf, 1e+308), text quoted."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return str(float(value)) if isinstance(value, (float, np.floating)) else str(int(value))
    return repr(value)


def _check_finite(values: pd.Series, raw: pd.Series, col: str, origin: str) -> None:
    """inf, -inf (or a number too large for float64) in a numeric column: the row named."""
    bad = np.isinf(values.to_numpy(dtype=np.float64))
    if bad.any():
        first = raw.index[int(np.argmax(bad))]
        raise DataError(f"{origin}: column {col!r}: {csv_line(first)} holds "
                        f"{_shown(raw[first])}, not a finite number ({int(bad.sum())} such "
                        f"rows); fix it or leave the cell empty for a missing value")


class TabularPreprocessor:
    """Median imputation + standardisation for numbers, one-hot for categories.

    Columns constant on the training rows are dropped: they carry no information, and a
    population filter (e.g. `where: {Job: fixed}`) makes its own column constant, which would
    otherwise become a systematic input shift between source and target.
    """

    def __init__(self) -> None:
        self.numeric: list[dict[str, Any]] = []  # {name, median, mean, std}
        self.categorical: list[dict[str, Any]] = []  # {name, categories}
        self.dropped: list[str] = []

    # -- fitting
    def fit(self, frame: pd.DataFrame, columns: list[str], forced_categorical: list[str],
            origin: str) -> TabularPreprocessor:
        numeric = set(infer_numeric(frame, columns, forced_categorical, origin))
        for col in columns:
            if col in numeric:
                values = pd.to_numeric(frame[col], errors="coerce").astype("float64")
                _check_finite(values, frame[col], col, origin)
                if values.notna().sum() == 0 or values.nunique() <= 1:
                    self.dropped.append(col)
                    continue
                median = float(values.median())
                filled = values.fillna(median)
                std = float(filled.std(ddof=0)) or 1.0
                self.numeric.append({"name": col, "median": median,
                                     "mean": float(filled.mean()), "std": std})
            else:
                cats = sorted(self._as_text(frame[col]).unique().tolist())
                if len(cats) <= 1:
                    self.dropped.append(col)
                    continue
                if len(cats) > 20 and len(cats) > 0.5 * len(frame):
                    log.warning("%s: column %r has %d distinct values in %d training rows: "
                                "one-hot it is mostly unseen values at prediction time (an id, "
                                "a date, free text, or numbers written with separators?); set "
                                "it as id_column, list it under drop, or fix its format",
                                origin, col, len(cats), len(frame))
                self.categorical.append({"name": col, "categories": cats})
        if not columns:
            raise DataError(f"{origin}: no feature columns besides the label (and any id or "
                            f"dropped columns); a model needs at least one input column")
        if not self.numeric and not self.categorical:
            raise DataError(f"{origin}: no usable feature columns (all were constant or empty "
                            f"on the {len(frame)} training rows: {', '.join(self.dropped)})")
        if self.dropped:
            log.info("%s: left out column(s) constant or empty on the training rows: %s",
                     origin, ", ".join(self.dropped))
        return self

    @staticmethod
    def _as_text(series: pd.Series) -> pd.Series:
        return series.map(lambda v: MISSING if pd.isna(v) else value_text(v))

    # -- applying
    @property
    def input_columns(self) -> list[str]:
        return [c["name"] for c in self.numeric] + [c["name"] for c in self.categorical]

    @property
    def feature_names(self) -> list[str]:
        names = [c["name"] for c in self.numeric]
        for c in self.categorical:
            names += [f"{c['name']}={v}" for v in c["categories"]]
        return names

    def transform(self, frame: pd.DataFrame, origin: str) -> np.ndarray:
        """Rows -> float32 matrix; unseen categories become all-zero one-hot rows."""
        missing = [c for c in self.input_columns if c not in frame.columns]
        if missing:
            raise DataError(f"{origin}: missing column(s) the model was trained on: "
                            f"{', '.join(missing)}")
        parts = []
        for c in self.numeric:
            raw = frame[c["name"]]
            values = pd.to_numeric(raw, errors="coerce")
            bad = values.isna() & raw.notna()
            if bad.any():
                first = bad[bad].index[0]
                raise DataError(f"{origin}: column {c['name']!r} must be numeric but "
                                f"{csv_line(first)} has {raw[first]!r}")
            filled = values.astype("float64").fillna(c["median"])
            _check_finite(filled, raw, c["name"], origin)
            scaled = ((filled - c["mean"]) / c["std"]).to_numpy()
            too_big = np.abs(scaled) > np.finfo(np.float32).max / 2
            if too_big.any():
                first = raw.index[int(np.argmax(too_big))]
                raise DataError(f"{origin}: column {c['name']!r}: {csv_line(first)} holds "
                                f"{_shown(raw[first])}, {abs(scaled[too_big][0]):.3g} standard "
                                f"deviations from the training mean: too large to compute with "
                                f"(a typo or a wrong unit?)")
            parts.append(scaled[:, None])
        for c in self.categorical:
            text = self._as_text(frame[c["name"]]).to_numpy()
            cats = np.asarray(c["categories"], dtype=object)
            parts.append((text[:, None] == cats[None, :]).astype("float64"))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def unseen_counts(self, frame: pd.DataFrame) -> dict[str, int]:
        """How many rows hold a category not seen in training, per column."""
        out = {}
        for c in self.categorical:
            if c["name"] not in frame.columns:
                continue  # transform() reports missing columns
            n = int((~self._as_text(frame[c["name"]]).isin(c["categories"])).sum())
            if n:
                out[c["name"]] = n
        return out

    # -- persistence
    def state_dict(self) -> dict[str, Any]:
        return {"numeric": self.numeric, "categorical": self.categorical, "dropped": self.dropped}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TabularPreprocessor:
        """The saved preprocessing, checked: it comes from a file (a checkpoint)."""
        pre = cls()
        try:
            pre.numeric = [_numeric_entry(c) for c in state["numeric"]]
            pre.categorical = [_categorical_entry(c) for c in state["categorical"]]
            pre.dropped = [str(c) for c in state["dropped"]]
        except (KeyError, TypeError, ValueError) as exc:
            from tltool.errors import CheckpointError

            raise CheckpointError(f"checkpoint: damaged preprocessing state ({exc})") from None
        return pre


def _numeric_entry(c: Any) -> dict[str, Any]:
    if not isinstance(c, dict) or not isinstance(c.get("name"), str):
        raise ValueError("a numeric column without a name")
    out = {"name": c["name"]}
    for key in ("median", "mean", "std"):
        value = c[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not np.isfinite(value):
            raise ValueError(f"column {c['name']!r}: {key} {value!r} is not a finite number")
        out[key] = float(value)
    if out["std"] <= 0:
        raise ValueError(f"column {c['name']!r}: standard deviation {out['std']} is not positive")
    return out


def _categorical_entry(c: Any) -> dict[str, Any]:
    if not isinstance(c, dict) or not isinstance(c.get("name"), str) or \
            not isinstance(c.get("categories"), list) or \
            not all(isinstance(v, str) for v in c["categories"]):
        raise ValueError("a categorical column needs a name and a list of text categories")
    return {"name": c["name"], "categories": list(c["categories"])}
