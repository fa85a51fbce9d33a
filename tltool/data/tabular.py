"""Tabular data: read a CSV or built-in table, select a population, split, sub-sample.

Everything here validates the user's data and says which file, column or row is wrong.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tltool.config import DataConfig
from tltool.data.preprocess import csv_line, infer_numeric, value_text
from tltool.datasets import TABLES, load_table
from tltool.errors import DataError
from tltool.suggest import did_you_mean

log = logging.getLogger("tltool")


@dataclass
class Split:
    """Raw feature rows, labels (class indices; float values for regression) and row ids."""

    frame: pd.DataFrame
    y: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class TabularData:
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


def _separator(path: Path, encoding: str) -> str:
    """Comma, or the semicolon / tab / pipe that the header line uses instead (a semicolon
    is the usual separator where the decimal mark is a comma)."""
    with open(path, encoding=encoding, errors="replace") as fh:
        header = fh.readline()
    if "," in header:
        return ","
    counts = {sep: header.count(sep) for sep in (";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def read_csv(path: Path, text_columns: list[str] | None = None) -> pd.DataFrame:
    """A CSV file as written: comma, semicolon, tab or pipe separated; UTF-8 (with or
    without BOM), else Latin-1 with a warning. `text_columns` (ids) are kept as text, so
    00101 stays 00101."""
    if not path.exists():
        raise DataError(f"{path}: CSV file not found (relative paths are taken from the "
                        f"current folder {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a CSV file")
    if not path.is_file():  # a FIFO, device or socket would block or never end
        raise DataError(f"{path}: is not a regular file; expected a CSV file")
    dtype = {c: str for c in text_columns or []}
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            sep = _separator(path, encoding)
            # ';'-separated files come from locales whose decimal mark is a comma
            with warnings.catch_warnings():
                # rows with more fields than the header: pandas would drop them (ParserWarning)
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(path, sep=sep, encoding=encoding, dtype=dtype or None,
                                    decimal="," if sep == ";" else ".", index_col=False)
            break
        except pd.errors.ParserWarning:
            raise DataError(f"{path}: some rows have more fields than the header (separator "
                            f"{sep!r}); every row needs one value per column") from None
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: the CSV file is empty") from None
        except UnicodeDecodeError:
            continue
        except pd.errors.ParserError as exc:
            raise DataError(f"{path}: not a readable CSV file (separator {sep!r}): "
                            f"{str(exc).splitlines()[0]}") from None
    header = pd.read_csv(path, sep=sep, encoding=encoding, header=None, nrows=1,
                         dtype=str).iloc[0].tolist()
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header; give each "
                            f"column its own name")
        seen.add(name)
    if encoding != "utf-8-sig":
        log.warning("%s: not UTF-8; read as Latin-1 (save it as UTF-8 if accents look wrong)",
                    path)
    if sep != ",":
        log.info("%s: %r-separated", path, sep)
    if frame.empty:
        raise DataError(f"{path}: the CSV file has a header but no rows")
    return frame


def _check_columns(frame: pd.DataFrame, names: list[str], what: str, origin: str) -> None:
    for name in names:
        if name not in frame.columns:
            hint = did_you_mean(name, frame.columns, prefix="; ")
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


def load_tabular(cfg: DataConfig, seed: int) -> TabularData:
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
    notes = []
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
    if cfg.task == "regression":
        return _finish(frame, unlabeled_frame, cfg, seed, origin, label, [label],
                       _numeric_label(frame[label], label, origin), notes)
    labels = frame[label].map(value_text)
    classes = sorted(labels.unique().tolist())
    if len(classes) < 2:
        raise DataError(f"{origin}: label {label!r} has a single class {classes[0]!r} in the "
                        f"{len(frame)} selected rows; a classifier needs at least 2 classes")
    _check_classifiable(frame[label], classes, label, origin)
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
        positive = spelled[0]
    elif positive is not None:
        positive = value_text(positive)
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
    return _finish(frame, unlabeled_frame, cfg, seed, origin, label, classes, y, notes)


def _numeric_label(values: pd.Series, label: str, origin: str,
                   training: bool = True) -> np.ndarray:
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


def _finish(frame, unlabeled_frame, cfg: DataConfig, seed: int, origin: str, label: str,
            classes: list[str], y: np.ndarray, notes: list[str]) -> TabularData:
    """Features, type checks, the fixed split, sub-samples and the unlabelled pool."""
    regression = cfg.task == "regression"
    reserved = {label, *cfg.drop, *([cfg.id_column] if cfg.id_column else [])}
    features = cfg.features or [c for c in frame.columns if c not in reserved]
    if not cfg.features:
        counters = [c for c in features if looks_like_row_number(frame[c])]
        if counters:
            features = [c for c in features if c not in counters]
            notes.append(f"column(s) {', '.join(map(repr, counters))} left out of the features: "
                         f"whole numbers, unique and increasing row after row, like a row "
                         f"number (set id_column, or list the column under features to use it)")
    if label in features:
        raise DataError(f"{origin}: the label {label!r} is also listed as a feature")
    # Type check over every selected row, so a typo is reported whatever split it lands in.
    infer_numeric(frame, list(features), list(cfg.categorical), origin)
    if len(unlabeled_frame):
        infer_numeric(unlabeled_frame, list(features), list(cfg.categorical), origin)
    ids = (frame[cfg.id_column].astype(str).to_numpy() if cfg.id_column
           else frame.index.astype(str).to_numpy())
    whole = Split(frame[features], y, ids)
    train, val, test = _partition(whole, cfg, origin, classes, regression)
    pool = train
    draw = sample_seed(cfg)
    train = _subsample(train, cfg.n_train, draw, "n_train", origin, cfg, regression)
    val = _subsample(val, cfg.n_val, draw + 1, "n_val", origin, cfg, regression)
    if not regression and len(np.unique(train.y)) < 2:
        raise DataError(f"{origin}: the {len(train)} training row(s) hold only class "
                        f"{classes[int(train.y[0])]!r}; a classifier needs rows of at least 2 "
                        f"classes (raise n_train to {len(classes)} or more)")
    notes += small_split_notes({"validation": val.y, "test": test.y},
                               None if regression else classes)
    blank_ids = (unlabeled_frame[cfg.id_column].astype(str).to_numpy() if cfg.id_column
                 else unlabeled_frame.index.astype(str).to_numpy())
    blank = Split(unlabeled_frame[features], np.full(len(unlabeled_frame), -1, np.int64),
                  blank_ids)
    rest = left_out(pool, train)
    unlabeled = Split(pd.concat([rest.frame, blank.frame]),
                      np.concatenate([np.full(len(rest), -1, np.int64), blank.y]),
                      np.concatenate([rest.ids, blank.ids]))
    return TabularData(origin, label, classes, list(features), list(cfg.categorical),
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


def looks_like_row_number(values: pd.Series) -> bool:
    """A row-number or index column (R's rownames, pandas' "Unnamed: 0"): whole numbers,
    unique, strictly increasing in file order. As a feature it would only encode where a row
    sits in the file."""
    if len(values) < 10 or not pd.api.types.is_numeric_dtype(values) or values.isna().any():
        return False
    numbers = values.to_numpy(dtype=np.float64)
    return bool(np.all(numbers == np.round(numbers)) and np.all(np.diff(numbers) > 0))


def sample_seed(cfg: DataConfig) -> int:
    """Seed of the n_train / n_val draws: fixed by the data section (sample_seed, else
    split.seed), not by the training seed, so several training seeds (an ensemble) see the same
    labelled rows unless a config asks for other ones."""
    return cfg.split.seed if cfg.sample_seed is None else cfg.sample_seed


def take(split: Split, idx: np.ndarray) -> Split:
    return Split(split.frame.iloc[idx], split.y[idx], split.ids[idx])


def left_out(pool: Split, kept: Split) -> Split:
    """The rows of `pool` that a sub-sample `kept` of it does not hold (labels hidden: -1)."""
    position = {row: i for i, row in enumerate(pool.frame.index)} \
        if isinstance(pool.frame, pd.DataFrame) and pool.frame.index.is_unique else None
    if position is None:  # fall back on ids
        chosen = set(kept.ids.tolist())
        idx = np.array([i for i, r in enumerate(pool.ids) if r not in chosen], dtype=np.int64)
    else:
        mask = np.ones(len(pool), dtype=bool)
        mask[[position[r] for r in kept.frame.index]] = False
        idx = np.flatnonzero(mask)
    rest = take(pool, idx)
    return Split(rest.frame, np.full(len(idx), -1, np.int64), rest.ids)


def small_split_notes(splits: dict[str, np.ndarray], classes: list[str] | None) -> list[str]:
    """Warnings for splits too small to trust: scores on a handful of rows (or with a class
    missing) swing by chance."""
    notes = []
    for name, y in splits.items():
        if len(y) < 10:
            notes.append(f"only {len(y)} {name} row(s): scores on it are unreliable; raise "
                         f"n_val or the split fraction")
        elif classes is not None and np.asarray(y).ndim == 1:
            absent = [c for i, c in enumerate(classes) if not (np.asarray(y) == i).any()]
            if absent:
                notes.append(f"the {name} split holds no row of class(es) {absent}")
    return notes


def strata(y: np.ndarray, regression: bool) -> np.ndarray:
    """What a stratified split keeps in proportion: the class, or the quintile of a number."""
    if not regression:
        return y
    bins = min(5, max(len(y) // 10, 1))
    return pd.qcut(pd.Series(y).rank(method="first"), bins, labels=False).to_numpy(np.int64)


def _partition(whole: Split, cfg: DataConfig, origin: str, classes: list[str],
               regression: bool = False):
    n = len(whole)
    s = cfg.split
    idx = np.arange(n)
    strat = strata(whole.y, regression) if s.stratify else None
    if s.stratify and not regression:
        counts = np.bincount(whole.y, minlength=len(classes))
        if counts.min() < 3:
            rare = classes[int(counts.argmin())]
            raise DataError(f"{origin}: class {rare!r} has only {counts.min()} row(s); a "
                            f"stratified train/val/test split needs at least 3 per class "
                            f"(add rows or set split.stratify: false)")
    try:
        rest, test_idx = train_test_split(idx, test_size=s.test, random_state=s.seed,
                                          stratify=strat)
        val_share = s.val / (1 - s.test)
        train_idx, val_idx = train_test_split(
            rest, test_size=val_share, random_state=s.seed,
            stratify=None if strat is None else strat[rest])
    except ValueError as exc:
        raise DataError(f"{origin}: cannot split {n} rows into train/val/test "
                        f"(val {s.val}, test {s.test}): {exc}") from None
    return take(whole, np.sort(train_idx)), take(whole, np.sort(val_idx)), \
        take(whole, np.sort(test_idx))


def _subsample(split: Split, n: int | None, seed: int, key: str, origin: str,
               cfg: DataConfig, regression: bool = False) -> Split:
    if n is None:
        return split
    if n > len(split):
        which = "training" if key == "n_train" else "validation"
        raise DataError(f"{origin}: {key} = {n} but the {which} split has only {len(split)} rows "
                        f"(after the `where` filter and split val {cfg.split.val} / "
                        f"test {cfg.split.test}); use at most {len(split)} or leave it unset")
    if n == len(split):
        return split
    idx = np.arange(len(split))
    groups = strata(split.y, regression)
    n_classes = len(np.unique(groups))
    stratify = groups if n >= n_classes and len(split) - n >= n_classes and \
        np.bincount(groups).min() >= 2 else None
    chosen, _ = train_test_split(idx, train_size=n, random_state=seed, stratify=stratify)
    return take(split, np.sort(chosen))
