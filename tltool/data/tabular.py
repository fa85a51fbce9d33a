"""Tabular data: a CSV file or built-in table -> a selected population, its label, features
and splits (the CSV reader is `tltool.data.csv`, the splits `tltool.data.splits`).

Everything here validates the user's data and says which file, column or row is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tltool.config import DataConfig
from tltool.data.csv import read_csv
from tltool.data.preprocess import (
    column_chunks,
    column_positions,
    csv_line,
    dtype_flags,
    infer_numeric,
    value_text,
)
from tltool.data.splits import Split, left_out, partition, small_split_notes, subsample
from tltool.datasets import TABLES, load_table
from tltool.errors import DataError
from tltool.suggest import did_you_mean


@dataclass
class TabularData:
    """A table loaded for training: its label, classes, feature columns and splits."""

    origin: str
    label: str
    classes: list[str]
    feature_columns: list[str]
    categorical: list[str]
    train: Split
    val: Split
    test: Split
    notes: list[str] = field(default_factory=list)
    # Training-pool rows whose labels are not used: those n_train left out, and rows with an
    # empty label cell. Only domain adaptation (`adapt`) reads them, as unlabelled rows.
    unlabeled: Split | None = None
    task: str = "classification"  # or "regression": classes is then [label], y floats

    def summary(self) -> dict:
        counts = {s: int(len(getattr(self, s))) for s in ("train", "val", "test")}
        out = {"origin": self.origin, "label": self.label, "classes": self.classes,
               "rows": counts, "features": self.feature_columns, "notes": self.notes}
        if self.task == "regression":
            out["task"] = "regression"
            out["label_mean"] = {s: float(np.mean(getattr(self, s).y))
                                 for s in ("train", "val", "test")}
        return out


def origin_of(cfg: DataConfig) -> str:
    return f"built-in {cfg.name}" if cfg.kind == "builtin" else str(cfg.path)


def read_frame(cfg: DataConfig) -> pd.DataFrame:
    """All rows of the configured table, index = 0-based data row of the file."""
    if cfg.kind == "builtin":
        return load_table(cfg.name)
    return read_csv(Path(cfg.path), text_columns=[cfg.id_column] if cfg.id_column else [])


def _check_columns(frame: pd.DataFrame, names: list[str], what: str, origin: str) -> None:
    for name in names:
        if name not in frame.columns:
            hint = did_you_mean(name, frame.columns, around=("; ", ""))
            if len(frame.columns) == 1:
                sep = next((c for c in ";\t|" if c in str(frame.columns[0])), None)
                if sep:
                    hint = (f"; the file seems to use {sep!r} as separator, but tltool reads "
                            f"comma-separated files")
            raise DataError(f"{origin}: {what} {name!r} is not a column{hint} "
                            f"(columns: {', '.join(map(str, frame.columns))})")


def _matches(series: pd.Series, wanted: list) -> pd.Series:
    if pd.api.types.is_numeric_dtype(series) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in wanted):
        return series.isin(wanted)
    return series.astype(str).isin([str(v) for v in wanted])


def select_population(frame: pd.DataFrame, where: dict, origin: str) -> pd.DataFrame:
    """Keep rows whose columns hold one of the allowed values."""
    _check_columns(frame, list(where), "`where` column", origin)
    keep = pd.Series(True, index=frame.index)
    for col, allowed in where.items():
        wanted = allowed if isinstance(allowed, list) else [allowed]
        hit = _matches(frame[col], wanted)
        if not hit.any():
            present = ", ".join(map(str, frame[col].dropna().unique()[:12]))
            raise DataError(f"{origin}: where {col} in {wanted} matches no row; "
                            f"values present: {present}")
        keep &= hit
    out = frame[keep]
    if out.empty:
        raise DataError(f"{origin}: the `where` filter {where} leaves no rows")
    return out


@dataclass
class _Section:
    """The data section being loaded, where it comes from, its label column and the notes
    gathered so far: what every step of `load_tabular` reads."""

    cfg: DataConfig
    origin: str
    label: str
    notes: list[str] = field(default_factory=list)


def load_tabular(cfg: DataConfig) -> TabularData:
    """Load, filter, label, split (fixed by split.seed) and sub-sample (by sample_seed)."""
    origin = origin_of(cfg)
    if cfg.options:
        raise DataError(f"{origin}: `options` ({', '.join(map(str, cfg.options))}) do not "
                        f"apply to tables; they are options of the built-in image sets "
                        f"(tltool datasets)")
    frame = read_frame(cfg)
    label = cfg.label or (TABLES[cfg.name].label if cfg.kind == "builtin" else None)
    if label is None:
        raise DataError(f"{origin}: set `label` to the column that holds the class")
    section = _Section(cfg, origin, label)
    _check_section(frame, section)
    frame, unlabeled_frame = _labelled_rows(frame, section)
    if cfg.task == "regression":
        return _finish(section, frame, unlabeled_frame, [label],
                       numeric_label(frame[label], label, origin))
    classes, y = _class_indices(frame[label], section)
    return _finish(section, frame, unlabeled_frame, classes, y)


def _check_section(frame: pd.DataFrame, section: _Section) -> None:
    """The label and every column the section names exist, and the label is only a label."""
    cfg, origin, label = section.cfg, section.origin, section.label
    if cfg.label_sep is not None:
        raise DataError(f"{origin}: label_sep (multi-label) applies to image data (kind "
                        f"image_csv); a table holds one label per row")
    for key, names in (("categorical", cfg.categorical), ("drop", cfg.drop),
                       ("id_column", [cfg.id_column])):
        if label in names:
            raise DataError(f"{origin}: the label {label!r} is also listed as {key}; the "
                            f"label is neither a feature nor an id")
    _check_columns(frame, [label], "label column", origin)
    for what, names in (("feature", cfg.features or []), ("categorical column", cfg.categorical),
                        ("dropped column", cfg.drop),
                        ("id column", [cfg.id_column] if cfg.id_column else [])):
        _check_columns(frame, names, what, origin)


def _labelled_rows(frame: pd.DataFrame,
                   section: _Section) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The selected rows (`where`) that hold a label, and those that do not."""
    cfg, origin, label, notes = section.cfg, section.origin, section.label, section.notes
    if cfg.where:
        frame = select_population(frame, cfg.where, origin)
        notes.append(f"where {cfg.where}: {len(frame)} rows")
    no_label = frame[label].isna() | (frame[label].astype(str).str.strip() == "")
    unlabeled_frame = frame[no_label]
    if no_label.all():
        raise DataError(f"{origin}: label column {label!r} is empty in all {len(frame)} "
                        f"selected rows; give labelled rows (rows with an empty label are used "
                        f"only as unlabelled rows)")
    if no_label.any():
        notes.append(f"{int(no_label.sum())} rows with no label: not trained on (domain "
                     f"adaptation may use them as unlabelled rows)")
        frame = frame[~no_label]
    return frame, unlabeled_frame


def _class_indices(values: pd.Series, section: _Section) -> tuple[list[str], np.ndarray]:
    """The class names (sorted; a binary label's positive class last) and each row's index."""
    origin, label = section.origin, section.label
    labels = values.map(value_text)
    classes = sorted(labels.unique().tolist())
    if len(classes) < 2:
        raise DataError(f"{origin}: label {label!r} has a single class {classes[0]!r} in the "
                        f"{len(values)} selected rows; a classifier needs at least 2 classes")
    _check_classifiable(values, classes, label, origin)
    positive = _positive(section, classes)
    if positive is not None:
        if len(classes) != 2:
            raise DataError(f"{origin}: `positive` only applies to a binary label; "
                            f"{label!r} has {len(classes)} classes")
        if str(positive) not in classes:
            raise DataError(f"{origin}: positive class {positive!r} is not a value of "
                            f"{label!r}; values: {', '.join(classes)}")
        # The positive class goes last, so column 1 of the probabilities is P(positive).
        classes = [c for c in classes if c != str(positive)] + [str(positive)]
    y = labels.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    return classes, y


def _positive(section: _Section, classes: list[str]) -> str | None:
    """The positive class as spelled in the data: the configured one, else a built-in
    table's own (with its own label)."""
    cfg, origin, label = section.cfg, section.origin, section.label
    positive = cfg.positive
    if positive is None and cfg.kind == "builtin" and cfg.name in TABLES and \
            label == TABLES[cfg.name].label:  # the built-in default goes with its own label
        positive = TABLES[cfg.name].positive
    if isinstance(positive, bool):  # YAML reads yes/no/true/on unquoted as booleans
        spelled = [c for c in classes if c.lower() in
                   (("true", "yes", "y", "on", "1") if positive else ("false", "no", "n", "off",
                                                                      "0"))]
        if len(spelled) != 1:
            raise DataError(f"{origin}: positive class {positive!r} (YAML reads an unquoted "
                            f"yes/no/true/false/on/off as a boolean; quote it, e.g. "
                            f"positive: \"yes\") is not a value of {label!r}; values: "
                            f"{', '.join(classes)}")
        return spelled[0]
    if positive is not None:
        return value_text(positive)
    return None


def numeric_label(values: pd.Series, label: str, origin: str,
                  training: bool = True) -> np.ndarray:
    """A regression label as float64: every cell a finite number (the first bad row named);
    `training` also refuses a label that never varies."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() | ~np.isfinite(numbers.astype(float))
    if bad.any():
        row = values.index[bad.to_numpy()][0]
        raise DataError(f"{origin}: task regression needs a finite number in label {label!r}, "
                        f"but {csv_line(row)} holds {str(values.loc[row])!r} "
                        f"({int(bad.sum())} such rows); fix or blank them (blank labels are "
                        f"left out)")
    if training and numbers.nunique() < 2:
        raise DataError(f"{origin}: label {label!r} is the same number in every selected row; "
                        f"nothing to regress")
    return numbers.to_numpy(np.float64)


def _ids(frame: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    """Row ids: the id column as text, else the 0-based data row of the file."""
    return (frame[cfg.id_column].astype(str).to_numpy() if cfg.id_column
            else frame.index.astype(str).to_numpy())


def _features(frame: pd.DataFrame, section: _Section) -> list[str]:
    """The configured features, else every column but the label, ids, dropped columns and
    row-number-like columns (with a note)."""
    cfg, label = section.cfg, section.label
    reserved = {label, *cfg.drop, *([cfg.id_column] if cfg.id_column else [])}
    features = cfg.features or [c for c in frame.columns if c not in reserved]
    if not cfg.features:
        counters = row_number_columns(frame, features)
        if counters:
            counted = set(counters)
            features = [c for c in features if c not in counted]
            section.notes.append(
                f"column(s) {', '.join(map(repr, counters))} left out of the features: "
                f"whole numbers, unique and increasing row after row, like a row "
                f"number (set id_column, or list the column under features to use it)")
    if label in features:
        raise DataError(f"{section.origin}: the label {label!r} is also listed as a feature")
    return features


def _finish(section: _Section, frame: pd.DataFrame, unlabeled_frame: pd.DataFrame,
            classes: list[str], y: np.ndarray) -> TabularData:
    """Features, type checks, the fixed split, sub-samples and the unlabelled pool."""
    cfg, origin, notes = section.cfg, section.origin, section.notes
    regression = cfg.task == "regression"
    features = _features(frame, section)
    # Type check over every selected row, so a typo is reported whatever split it lands in.
    infer_numeric(frame, list(features), list(cfg.categorical), origin)
    if len(unlabeled_frame):
        infer_numeric(unlabeled_frame, list(features), list(cfg.categorical), origin)
    whole = Split(frame[features], y, _ids(frame, cfg))
    pool, val, test = partition(whole, cfg.split, origin, classes, regression)
    train, val = subsample(pool, val, cfg, origin, regression)
    if not regression and len(np.unique(train.y)) < 2:
        raise DataError(f"{origin}: the {len(train)} training row(s) hold only class "
                        f"{classes[int(train.y[0])]!r}; a classifier needs rows of at least 2 "
                        f"classes (raise n_train to {len(classes)} or more)")
    notes += small_split_notes({"validation": val.y, "test": test.y},
                               None if regression else classes)
    # Unlabelled: the training rows n_train left out, then the rows with an empty label.
    blank = Split(unlabeled_frame[features], np.full(len(unlabeled_frame), -1, np.int64),
                  _ids(unlabeled_frame, cfg))
    rest = left_out(pool, train)
    unlabeled = Split(pd.concat([rest.frame, blank.frame]),
                      np.concatenate([np.full(len(rest), -1, np.int64), blank.y]),
                      np.concatenate([rest.ids, blank.ids]))
    return TabularData(origin, section.label, classes, list(features), list(cfg.categorical),
                       train, val, test, notes, unlabeled, cfg.task)


def _check_classifiable(values: pd.Series, classes: list[str], label: str, origin: str) -> None:
    """Refuse, as a class label, one that is a measurement (that is task: regression)."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        fractional = (numbers != numbers.round()).sum()
        if fractional:
            example = values[numbers != numbers.round()].iloc[0]
            raise DataError(f"{origin}: label {label!r} holds fractional numbers (e.g. "
                            f"{example!r}, {int(fractional)} rows): a continuous target. To "
                            f"predict the number set `task: regression` on this data section; "
                            f"to classify, bin it into classes (e.g. low/high)")
    rows_per_class = values.value_counts().median()
    if len(classes) > 50 and rows_per_class < 10:
        raise DataError(f"{origin}: label {label!r} has {len(classes)} distinct values with a "
                        f"median of {rows_per_class:g} rows each: too few rows per class to "
                        f"learn (a continuous or id-like column?). To predict the number set "
                        f"`task: regression` on this data section; to classify, bin it into "
                        f"classes or pick a column of class labels")


def row_number_columns(frame: pd.DataFrame, names: list[str]) -> list[str]:
    """The columns of `names` that `looks_like_row_number`, in their order. Plain number
    columns are tested as one block (a wide table has thousands), the others one by one."""
    if len(frame) < 10:
        return []
    positions = column_positions(frame, names)
    number = dtype_flags(frame, positions, pd.api.types.is_numeric_dtype)
    plain_at = dtype_flags(frame, positions, lambda d: isinstance(d, np.dtype) and
                           d.kind in "biuf")
    plain = positions[plain_at]
    found: set[str] = set()
    for chunk in column_chunks(frame, plain):
        values = frame.iloc[:, plain[chunk]].to_numpy(dtype=np.float64)
        counter = ~np.isnan(values).any(axis=0) & (values == np.round(values)).all(axis=0) & \
            (np.diff(values, axis=0) > 0).all(axis=0)
        found.update(frame.columns[plain[chunk][counter]])
    found.update(c for c, at, other in zip(names, positions, number & ~plain_at, strict=True)
                 if other and looks_like_row_number(frame.iloc[:, at]))
    return [c for c in names if c in found]


def looks_like_row_number(values: pd.Series) -> bool:
    """A row-number or index column (R's rownames, pandas' "Unnamed: 0"): whole numbers,
    unique, strictly increasing in file order. As a feature it would only encode where a row
    sits in the file."""
    if len(values) < 10 or not pd.api.types.is_numeric_dtype(values) or values.isna().any():
        return False
    numbers = values.to_numpy(dtype=np.float64)
    return bool(np.all(numbers == np.round(numbers)) and np.all(np.diff(numbers) > 0))
