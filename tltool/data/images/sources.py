"""Where images and their labels come from: a folder per class (kind image_folder), a CSV of
image paths and labels (kind image_csv, single- or multi-label), or a built-in image set.

Each source checks its files, decodes them once at size x size (`tltool.data.images.decoding`)
and yields a `SourceImages`: pixels, labels, class names and row ids, in a fixed order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tltool.config import DataConfig
from tltool.data.csv import CsvRules, read_csv
from tltool.data.images.decoding import (
    ALLOWED,
    IMAGE_EXTENSIONS,
    LazyImages,
    listing,
    read_pixels,
    resize_uint8,
    skip_note,
)
from tltool.datasets.images import get_image_set, load_image_set
from tltool.errors import DataError
from tltool.suggest import did_you_mean

# An image CSV: every column as text; a malformed file is left to pandas, as it always was.
IMAGE_CSV = CsvRules(expects="kind image_csv expects a CSV file (for one sub-folder per class "
                             "use kind image_folder)",
                     unreadable="not a readable CSV file", all_text=True, strict=False)


@dataclass
class SourceImages:
    """What a source yields, before splitting: uint8 images (N, C, size, size) or lazily decoded
    ones, labels (class indices, or multi-hot rows), class names and row ids."""

    x: torch.Tensor | LazyImages
    y: np.ndarray
    classes: list[str]
    ids: np.ndarray
    multilabel: bool = False


# ---------------------------------------------------------------- built-in image sets


def from_builtin(cfg: DataConfig, size: int) -> SourceImages:
    """A built-in image set (its `options` applied), resized to size x size."""
    spec = get_image_set(cfg.name)
    x, y, classes, multilabel = load_image_set(cfg.name, cfg.options)
    xt = resize_uint8(torch.from_numpy(np.ascontiguousarray(x)), size)
    ids = np.array([f"{spec.name}:{i}" for i in range(len(y))])
    return SourceImages(xt, y, list(classes), ids, multilabel)


# ---------------------------------------------------------------- kind image_folder


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def walk_files(top: Path) -> tuple[list[Path], int]:
    """Every file under `top`, following symlinked folders (each real folder once), skipping
    hidden files and folders (.ipynb_checkpoints, .git, ...). Also returns the number of
    broken links."""
    found: list[Path] = []
    broken = 0
    seen: set[str] = set()
    for here, dirs, names in os.walk(top, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(here) / name
            if path.is_file():
                found.append(path)
            elif path.is_symlink():
                broken += 1
    return sorted(found), broken


def _one_per_real_file(files: list[Path], labels: list[int], class_dirs: list[Path],
                       notes: list[str]) -> tuple[list[Path], list[int]]:
    """Each real image once: a file reached again through a link in the same class is
    dropped with a note; one reached from two class folders (a link into another class, or a
    link back to the top folder) has two labels and is refused."""
    first: dict[str, tuple[Path, int]] = {}
    keep_files, keep_labels, repeats = [], [], 0
    for f, k in zip(files, labels, strict=True):
        real = os.path.realpath(f)
        if real in first:
            other, k0 = first[real]
            if k0 != k:
                raise DataError(f"{f}: the same image as {other} (through a symbolic link) but "
                                f"in class folder {class_dirs[k].name!r}, not "
                                f"{class_dirs[k0].name!r}; an image needs one class: remove "
                                f"the link")
            repeats += 1
            continue
        first[real] = (f, k)
        keep_files.append(f)
        keep_labels.append(k)
    if repeats:
        notes.append(f"{repeats} image(s) reached twice in the same class folder (symbolic "
                     f"links) used once")
    return keep_files, keep_labels


def from_folder(cfg: DataConfig, size: int, notes: list[str]) -> SourceImages:
    """Kind image_folder: the images under each class sub-folder of cfg.path (searched
    recursively, links followed, each real image once), labelled by their folder's name."""
    root = Path(cfg.path)
    if not root.exists():
        raise DataError(f"{root}: image folder not found (relative paths are taken from the "
                        f"current folder {Path.cwd()})")
    if not root.is_dir():
        raise DataError(f"{root}: is a file; kind image_folder expects a folder with one "
                        f"sub-folder per class (for a CSV of image paths use kind image_csv)")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: d.name)
    if not class_dirs:
        what = "is empty" if not any(root.iterdir()) else "has no class sub-folders"
        raise DataError(f"{root}: the image folder {what}; expected {root}/<class>/<images> "
                        f"with one sub-folder per class ({ALLOWED} files)")
    files: list[Path] = []
    labels: list[int] = []
    ignored = broken = 0
    for k, d in enumerate(class_dirs):
        found, dead = walk_files(d)
        broken += dead
        images = [p for p in found if _is_image(p)]
        ignored += len(found) - len(images)
        if not images:
            raise DataError(f"{d}: class folder {d.name!r} holds no images (allowed: {ALLOWED}; "
                            f"remove the folder or add images)")
        files += images
        labels += [k] * len(images)
    if len(class_dirs) < 2:
        raise DataError(f"{root}: only one class folder ({class_dirs[0].name!r}); a classifier "
                        f"needs at least 2 (one sub-folder per class)")
    files, labels = _one_per_real_file(files, labels, class_dirs, notes)
    loose = sum(1 for p in root.iterdir() if p.is_file())
    if ignored or loose:
        notes.append(f"ignored {ignored + loose} file(s) that are not images in class folders")
    if broken:
        notes.append(f"ignored {broken} broken symbolic link(s) in class folders")
    ids = [p.relative_to(root).as_posix() for p in files]
    x, kept, bad = read_pixels(cfg, files, size, [str(f) for f in files], notes)
    if bad:
        notes.append(skip_note(bad, ids))
    _check_any(kept, files, root)
    y = np.asarray(labels, dtype=np.int64)[kept]
    return SourceImages(x, y, [d.name for d in class_dirs], np.array([ids[i] for i in kept]))


def _check_any(kept: list[int], files: list, where) -> None:
    if not kept:
        raise DataError(f"{where}: none of the {len(files)} images could be read")


# ---------------------------------------------------------------- kind image_csv


def _row(i: int) -> str:
    return f"row {i + 2}"  # the file's line number: the header is line 1


@dataclass
class _Listed:
    """The image CSV being read: its path, its rows, the label column and the folder that
    relative image paths start at."""

    csv: Path
    frame: pd.DataFrame
    label: str
    root: Path


@dataclass
class _Files:
    """The image files of the rows kept (`rows`, in file order): their paths, as written
    (`shown`), and which of them (indices into `files`) do not exist."""

    rows: np.ndarray
    files: list[Path]
    shown: list[str]
    missing: list[int]


def _open_listing(cfg: DataConfig) -> _Listed:
    """The CSV read and its columns, root and label_sep checked."""
    csv = Path(cfg.path)
    frame = read_csv(csv, rules=IMAGE_CSV)
    label = cfg.label or "label"
    for what, name in (("image_column", cfg.image_column), ("label column", label),
                       ("id_column", cfg.id_column)):
        if name is not None and name not in frame.columns:
            hint = did_you_mean(name, frame.columns, around=("; ", ""))
            default = " (set `label`)" if what == "label column" and not cfg.label else ""
            raise DataError(f"{csv}: {what} {name!r} is not a column{default}{hint} "
                            f"(columns: {', '.join(map(str, frame.columns))})")
    root = Path(cfg.root) if cfg.root else csv.parent
    if not root.is_dir():
        raise DataError(f"{csv}: root {str(root)!r} is not a folder (image paths start there)")
    if cfg.label_sep is not None and cfg.label_sep == "":
        raise DataError(f"{csv}: label_sep is empty; use the character that joins labels, "
                        f"e.g. '|'")
    return _Listed(csv, frame, label, root)


def _listed_files(listed: _Listed, cfg: DataConfig, notes: list[str]) -> _Files:
    """The image file of each labelled row, each image once (a repeat is dropped with a note,
    or refused when its label differs)."""
    csv, frame, root = listed.csv, listed.frame, listed.root
    rows = np.arange(len(frame))
    if cfg.label_sep is None:
        unlabeled = frame[listed.label].isna() | (frame[listed.label].str.strip() == "")
        if unlabeled.any():
            notes.append(f"dropped {int(unlabeled.sum())} rows with no label")
            rows = rows[~unlabeled.to_numpy()]
    found = _Files(rows, [], [], [])
    first_row: dict[str, int] = {}
    duplicates: list[tuple[int, int]] = []
    for i in rows:
        raw = frame[cfg.image_column].iloc[i]
        if pd.isna(raw) or not str(raw).strip():
            raise DataError(f"{csv}: {_row(i)}: empty image path in column "
                            f"{cfg.image_column!r}")
        rel = str(raw).strip()
        f = Path(rel) if Path(rel).is_absolute() else root / rel
        key = os.path.realpath(f)  # the same file under another spelling or a link
        if key in first_row:
            duplicates.append((int(i), first_row[key]))
            continue
        first_row[key] = int(i)
        if not f.is_file():
            if cfg.on_bad_image == "error":
                raise DataError(f"{csv}: {_row(i)}: image file not found: {f} (relative paths "
                                f"start at {root}; set `root` to change that)")
            found.missing.append(len(found.files))
        found.shown.append(rel)
        found.files.append(f)
    if duplicates:
        found.rows = _drop_duplicates(rows, duplicates, frame[listed.label], csv, notes,
                                      cfg.label_sep)
    return found


def _drop_duplicates(rows: np.ndarray, duplicates: list[tuple[int, int]], labels: pd.Series,
                     csv: Path, notes: list[str], label_sep: str | None = None) -> np.ndarray:
    """The same image listed twice would land in training and test alike: keep its first row
    (the same label again — for multi-label, the same set in any order — is dropped with a
    note; another label is an error)."""
    def key(v):
        if pd.isna(v):
            return frozenset() if label_sep else ""
        if label_sep:
            return frozenset(t.strip() for t in str(v).split(label_sep) if t.strip())
        return str(v).strip()

    for later, first in duplicates:
        a, b = labels.iloc[first], labels.iloc[later]
        if key(a) != key(b):
            raise DataError(f"{csv}: {_row(later)} lists the image of {_row(first)} again with "
                            f"another label ({str(b)!r} vs {str(a)!r}); an image needs one row "
                            f"(join several labels with label_sep for multi-label data)")
    notes.append(f"dropped {len(duplicates)} row(s) that list an image already listed "
                 f"(e.g. {_row(duplicates[0][0])} repeats {_row(duplicates[0][1])})")
    drop = {later for later, _ in duplicates}
    return np.array([i for i in rows if int(i) not in drop], dtype=np.int64)


def _label_sets(values: pd.Series, label_sep: str, listed: _Listed,
                notes: list[str]) -> tuple[list[str], np.ndarray]:
    """Multi-label: the sorted label names and a multi-hot row per image."""
    sets = [[] if pd.isna(v) else [t.strip() for t in str(v).split(label_sep)
                                   if t.strip()] for v in values]
    classes = sorted({t for s in sets for t in s})
    if not classes:
        raise DataError(f"{listed.csv}: label column {listed.label!r} holds no labels at all "
                        f"(multi-label with label_sep {label_sep!r})")
    pos = {c: j for j, c in enumerate(classes)}
    y = np.zeros((len(sets), len(classes)), dtype=np.float32)
    for r, s in enumerate(sets):
        for t in s:
            y[r, pos[t]] = 1.0
    none = int((y.sum(axis=1) == 0).sum())
    if none:
        notes.append(f"{none} image(s) carry no label")
    return classes, y


def from_csv(cfg: DataConfig, size: int, notes: list[str]) -> SourceImages:
    """Kind image_csv: the images a CSV lists (paths relative to `root`, else to the CSV's
    folder) with their labels (several per row, joined by label_sep, for multi-label data)."""
    listed = _open_listing(cfg)
    found = _listed_files(listed, cfg, notes)
    files, shown, missing = found.files, found.shown, found.missing
    names = [f"{listed.csv}: {_row(i)}: {f}" for i, f in zip(found.rows, files, strict=True)]
    x, kept, bad = read_pixels(cfg, files, size, names, notes)
    if bad:
        gone = [b for b in bad if b[0] in set(missing)]
        broken = [b for b in bad if b[0] not in set(missing)]
        if gone:
            notes.append(f"skipped {len(gone)} missing image file(s): "
                         f"{listing([shown[i] for i, _ in gone])}")
        if broken:
            notes.append(skip_note(broken, shown))
    if not kept:
        raise DataError(f"{listed.csv}: none of the {len(files)} images could be read (paths "
                        f"start at {listed.root})")
    rows = found.rows[kept]
    ids = (listed.frame[cfg.id_column].iloc[rows].fillna("").astype(str).to_numpy()
           if cfg.id_column else np.array([shown[i] for i in kept]))
    values = listed.frame[listed.label].iloc[rows]
    if cfg.label_sep is not None:
        classes, y = _label_sets(values, cfg.label_sep, listed, notes)
        return SourceImages(x, y, classes, ids, multilabel=True)
    text = values.str.strip()
    classes = sorted(text.unique().tolist())
    y = text.map({c: j for j, c in enumerate(classes)}).to_numpy(np.int64)
    return SourceImages(x, y, classes, ids)
