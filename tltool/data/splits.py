"""Splits shared by tables and images: the fixed train/val/test partition and the sub-samples.

The partition is fixed by `split.seed` (stratified by class, or by quintile of a number), so
every run of a data section is tested on the same rows. `n_train` / `n_val` are then drawn from
the training / validation split with `sample_seed` (default: split.seed), not the training seed,
so neither the test rows nor the labelled ones change with the training seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tltool.config import DataConfig, SplitConfig
from tltool.errors import DataError


@dataclass
class Split:
    """Raw feature rows, labels (class indices; float values for regression) and row ids."""

    frame: pd.DataFrame
    y: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def sample_seed(cfg: DataConfig) -> int:
    """Seed of the n_train / n_val draws: fixed by the data section (sample_seed, else
    split.seed), not by the training seed, so several training seeds (an ensemble) see the same
    labelled rows unless a config asks for other ones."""
    return cfg.split.seed if cfg.sample_seed is None else cfg.sample_seed


def take(split: Split, idx: np.ndarray) -> Split:
    """The rows `idx` (positions) of a split."""
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


def partition(whole: Split, s: SplitConfig, origin: str, classes: list[str],
              regression: bool = False) -> tuple[Split, Split, Split]:
    """Train, validation and test rows (each in row order), drawn with split.seed."""
    n = len(whole)
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


def _subsample(split: Split, key: str, seed: int, cfg: DataConfig, origin: str,
               regression: bool) -> Split:
    n = getattr(cfg, key)
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


def subsample(train: Split, val: Split, cfg: DataConfig, origin: str,
              regression: bool = False) -> tuple[Split, Split]:
    """The n_train training rows and n_val validation rows (all of a split when its n is
    unset), drawn with sample_seed (the validation draw with sample_seed + 1)."""
    draw = sample_seed(cfg)
    return (_subsample(train, "n_train", draw, cfg, origin, regression),
            _subsample(val, "n_val", draw + 1, cfg, origin, regression))
