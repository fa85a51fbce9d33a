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
# Numeric columns are standardised as blocks of float64 of at most this many cells (32 MB)
CHUNK_CELLS = 1 << 22


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


def column_positions(frame: pd.DataFrame, names: list) -> np.ndarray:
    """Where each of `names` sits among the frame's columns (one hashed lookup for all:
    thousands of `frame[col]` each build a Series, and most of the time went there)."""
    positions = frame.columns.get_indexer(names)
    if (positions < 0).any():
        raise KeyError(names[int(np.argmax(positions < 0))])
    return positions


def dtype_flags(frame: pd.DataFrame, positions: np.ndarray, test: Any) -> np.ndarray:
    """`test(dtype)` of each column at `positions`, asked once per distinct dtype (a table
    has a handful of dtypes and may have 100,000 columns)."""
    dtypes = frame.dtypes.to_numpy()[positions]
    answers = {dtype: bool(test(dtype)) for dtype in set(dtypes)}
    return np.array([answers[dtype] for dtype in dtypes], dtype=bool)


def plain_number(dtype: Any) -> bool:
    """A NumPy int / unsigned / float column: `pd.to_numeric` leaves it as it is, and a block
    of such columns converts to float64 in one go."""
    return isinstance(dtype, np.dtype) and dtype.kind in "iuf"


def _number_dtype(dtype: Any) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _text_dtype(dtype: Any) -> bool:
    return not pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def infer_numeric(frame: pd.DataFrame, columns: list[str], forced_categorical: list[str],
                  origin: str) -> list[str]:
    """Columns to treat as numbers; a mostly-numeric column with stray text is an error.
    Columns of a number dtype are decided by their dtype alone; only text columns are read."""
    forced = set(forced_categorical)
    positions = column_positions(frame, columns)
    number = dtype_flags(frame, positions, _number_dtype)
    text = dtype_flags(frame, positions, _text_dtype)
    numeric = []
    for i, col in enumerate(columns):
        if col in forced:
            continue
        if number[i] or text[i] and _mostly_numbers(frame.iloc[:, positions[i]], col, origin):
            numeric.append(col)
    return numeric


def _mostly_numbers(series: pd.Series, col: str, origin: str) -> bool:
    """A text column that holds numbers (at least NUMERIC_SHARE of its cells); any other
    text in it is an error naming the first such row."""
    present = series.dropna()
    if present.empty:
        return False
    parsed = pd.to_numeric(present, errors="coerce")
    share = parsed.notna().mean()
    if share < NUMERIC_SHARE:
        return False
    bad = parsed[parsed.isna()]
    if not bad.empty:
        first = bad.index[0]
        raise DataError(
            f"{origin}: column {col!r} holds numbers but {csv_line(first)} has "
            f"{present[first]!r} ({len(bad)} such value{'s' if len(bad) > 1 else ''}); "
            f"fix the value(s), leave them empty for missing, or list the column "
            f"under `categorical`")
    return True


def numbers(frame: pd.DataFrame, names: list) -> np.ndarray:
    """The columns `names` as float64, one row per column (each column contiguous): what
    `pd.to_numeric(frame[name], errors="coerce").astype("float64")` gives each. Plain number
    columns are converted as one block; others (text, nullable dtypes) one by one."""
    positions = column_positions(frame, names)
    plain = dtype_flags(frame, positions, plain_number)
    out = np.empty((len(names), len(frame)), dtype=np.float64)
    if plain.any():
        out[plain] = frame.iloc[:, positions[plain]].to_numpy(dtype=np.float64).T
    for i in np.flatnonzero(~plain):
        out[i] = pd.to_numeric(frame.iloc[:, positions[i]],
                               errors="coerce").astype("float64").to_numpy()
    return out


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


def _scaled_column(c: dict[str, Any], raw: pd.Series, origin: str) -> np.ndarray:
    """One numeric column standardised with its saved statistics; text that is not a number,
    inf, or a value too far from the training mean is an error naming the row."""
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
    return scaled


class _NumericStats:
    """Per column (a row of `values`, NaN = missing): whether it is usable (some value, not
    constant), its median, and the mean and population standard deviation once missing cells
    hold the median. The same float64 operations, in the same order, as pandas' Series
    median / fillna / mean / std(ddof=0) per column, so the numbers are the same to the bit."""

    def __init__(self, values: np.ndarray) -> None:
        rows = np.arange(len(values))
        count = (~np.isnan(values)).sum(axis=1)
        ordered = np.sort(values, axis=1) if values.shape[1] else \
            np.full((len(values), 1), np.nan)  # NaN last; no rows: nothing usable
        last = np.maximum(count, 1) - 1
        with np.errstate(all="ignore"):
            low, high = ordered[rows, last // 2], ordered[rows, (last + 1) // 2]
            self.median = np.where(last % 2 == 0, low, (low + high) / 2)
            # -0.0 and 0.0 sort as equals: which one a median of zero is depends on the order
            # pandas' own selection leaves them in, so such a column asks pandas itself
            signed = (self.median == 0) & (np.signbit(values) & (values == 0)).any(axis=1)
            for i in np.flatnonzero(signed):
                self.median[i] = pd.Series(values[i]).median()
            filled = np.where(np.isnan(values), self.median[:, None], values)
            n = np.float64(values.shape[1])
            self.mean = filled.sum(axis=1, dtype=np.float64) / n
            square = (self.mean[:, None] - filled) ** 2
            self.std = np.sqrt(square.sum(axis=1, dtype=np.float64) / n)
        self.infinite = np.isinf(values).any(axis=1)
        self.usable = (count > 0) & (ordered[:, 0] != ordered[rows, last])

    @classmethod
    def of(cls, frame: pd.DataFrame, names: list[str]) -> _NumericStats:
        """The statistics of the columns `names` of `frame`, a few at a time (memory)."""
        parts = [cls(numbers(frame, names[chunk])) for chunk in column_chunks(frame, names)]
        out = cls(np.empty((0, len(frame))))
        for key in ("median", "mean", "std", "infinite", "usable"):
            setattr(out, key, np.concatenate([getattr(out, key)] +
                                             [getattr(p, key) for p in parts]))
        return out


def column_chunks(frame: pd.DataFrame, names: list) -> list[slice]:
    """Slices of `names` of at most CHUNK_CELLS cells each: a wide table in one or a few
    blocks, a long one a few columns at a time (a block of float64 copies per step)."""
    step = max(1, CHUNK_CELLS // max(len(frame), 1))
    return [slice(i, i + step) for i in range(0, len(names), step)]


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
        names = infer_numeric(frame, columns, forced_categorical, origin)
        # every numeric column's statistics at once; the loop below only looks them up, in
        # column order, so messages and errors come in the order they always did
        stats = _NumericStats.of(frame, names)
        where = {name: i for i, name in enumerate(names)}
        for col in columns:
            if col in where:
                i = where[col]
                if stats.infinite[i]:  # raises, naming the row
                    values = pd.to_numeric(frame[col], errors="coerce").astype("float64")
                    _check_finite(values, frame[col], col, origin)
                if not stats.usable[i]:
                    self.dropped.append(col)
                    continue
                self.numeric.append({"name": col, "median": float(stats.median[i]),
                                     "mean": float(stats.mean[i]),
                                     "std": float(stats.std[i]) or 1.0})
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
        parts = [self._numeric_part(frame, origin)]
        for c in self.categorical:
            text = self._as_text(frame[c["name"]]).to_numpy()
            cats = np.asarray(c["categories"], dtype=object)
            parts.append((text[:, None] == cats[None, :]).astype("float64"))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def _numeric_part(self, frame: pd.DataFrame, origin: str) -> np.ndarray:
        """The numeric columns standardised, one matrix (rows x columns). Plain number columns
        are computed as one block; a column with a problem and every other column (text,
        nullable dtypes) go through `_scaled_column` in column order, so the first column with
        a problem raises exactly the error it always did."""
        names = [c["name"] for c in self.numeric]
        out = np.empty((len(frame), len(names)), dtype=np.float64)
        plain = dtype_flags(frame, column_positions(frame, names), plain_number)
        done = np.zeros(len(names), dtype=bool)
        block = np.flatnonzero(plain)
        for chunk in column_chunks(frame, block):
            self._scale_block(frame, block[chunk], out, done)
        for i in np.flatnonzero(~done):
            out[:, i] = _scaled_column(self.numeric[i], frame[names[i]], origin)
        return out

    def _scale_block(self, frame: pd.DataFrame, block: np.ndarray, out: np.ndarray,
                     done: np.ndarray) -> None:
        """Standardise the plain number columns at positions `block` into `out`; mark done
        those without a problem (inf, or too far from the mean: `_scaled_column` names it)."""
        median, mean, std = (np.array([self.numeric[i][k] for i in block], dtype=np.float64)
                             for k in ("median", "mean", "std"))
        values = numbers(frame, [self.numeric[i]["name"] for i in block])
        filled = np.where(np.isnan(values), median[:, None], values)
        with np.errstate(all="ignore"):  # overflow: such a column is `trouble`, named below
            scaled = (filled - mean[:, None]) / std[:, None]
            trouble = np.isinf(filled).any(axis=1) | \
                (np.abs(scaled) > np.finfo(np.float32).max / 2).any(axis=1)
        out[:, block] = scaled.T
        done[block] = ~trouble

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
