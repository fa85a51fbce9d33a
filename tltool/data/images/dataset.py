"""An image data set assembled from its source: checked, labelled, split and sub-sampled.

`load_images` reads the source (`tltool.data.images.sources`), orders the classes and splits
the images with the tabular protocol (`tltool.data.splits`): a train/val/test partition fixed
by `split.seed` (stratified by class), then `n_train` / `n_val` sub-sampled with `sample_seed`
(default: split.seed), so neither the test images nor the labelled ones change with the
training seed. Multi-label data are stratified on each row's first present label (in class
order), with rows that carry no label as one more group; when a group has fewer than 3 rows
the split falls back to an unstratified one (with a note).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from tltool.config import DataConfig
from tltool.data.images.decoding import LazyImages
from tltool.data.images.sources import SourceImages, from_builtin, from_csv, from_folder
from tltool.data.splits import Split, left_out, partition, small_split_notes, subsample
from tltool.datasets.images import IMAGE_SETS
from tltool.errors import DataError


@dataclass
class ImageSplit:
    """uint8 images (N, C, H, W), labels and ids of one split."""

    x: torch.Tensor | LazyImages
    y: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class ImageData:
    """An image data set loaded for training: its classes and splits."""

    origin: str
    classes: list[str]
    multilabel: bool
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    notes: list[str] = field(default_factory=list)
    # Training-pool images n_train left out; only domain adaptation (`adapt`) reads them, as
    # unlabelled images.
    unlabeled: ImageSplit | None = None

    @property
    def channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def size(self) -> int:
        return int(self.train.x.shape[-1])

    def summary(self) -> dict:
        counts = {s: int(len(getattr(self, s))) for s in ("train", "val", "test")}
        return {"origin": self.origin, "classes": self.classes, "rows": counts,
                "multilabel": self.multilabel, "image": {"channels": self.channels,
                                                          "size": self.size},
                "notes": self.notes}


# ---------------------------------------------------------------- entry points


def is_image_config(cfg: DataConfig) -> bool:
    """True for kind image_folder / image_csv and for a built-in image set name."""
    if cfg.kind in ("image_folder", "image_csv"):
        return True
    return cfg.kind == "builtin" and cfg.name in IMAGE_SETS


def load_images(cfg: DataConfig, size: int) -> ImageData:
    """Load (decode + resize to size x size once), label, split (split.seed), sub-sample
    (sample_seed)."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not is_image_config(cfg):
        raise DataError(f"{_origin(cfg)}: not an image source; use kind image_folder or "
                        f"image_csv, or a built-in image set: {', '.join(IMAGE_SETS)}")
    origin = _origin(cfg)
    _reject_unused(cfg, origin)
    notes: list[str] = []
    if cfg.kind == "builtin":
        found = from_builtin(cfg, size)
    elif cfg.kind == "image_folder":
        found = from_folder(cfg, size, notes)
    else:
        found = from_csv(cfg, size, notes)
    classes, multilabel = found.classes, found.multilabel
    if not multilabel:
        found.classes, found.y = _order_classes(classes, found.y, cfg, origin)
        classes = found.classes
    elif cfg.positive is not None:
        raise DataError(f"{origin}: `positive` does not apply to multi-label data (each of "
                        f"{', '.join(classes)} is its own yes/no label)")
    train, val, test, rest = _split(found, cfg, origin, notes)
    notes += small_split_notes({"validation": val.y, "test": test.y},
                               None if multilabel else classes)
    if multilabel:
        for name, part in (("validation", val), ("test", test)):
            absent = [c for j, c in enumerate(classes) if not np.asarray(part.y)[:, j].any()]
            if absent and len(part.y):
                notes.append(f"the {name} split holds no image with label(s) {absent}: their "
                             f"precision/recall/F1 there are 0 by definition and pull macro "
                             f"averages down")
    return ImageData(origin, classes, multilabel, train, val, test, notes, rest)


def _origin(cfg: DataConfig) -> str:
    return f"built-in {cfg.name}" if cfg.kind == "builtin" else str(cfg.path)


# Fields that only some image sources use (their defaults mean "not set").
_USED_BY = {
    "builtin": {"options"},
    "image_folder": set(),
    "image_csv": {"image_column", "root", "label_sep", "label", "id_column"},
}
_IMAGE_ONLY = {"options", "image_column", "root", "label_sep", "label", "id_column"}
_TABLE_ONLY = {"features", "categorical", "drop", "where"}


def _reject_unused(cfg: DataConfig, origin: str) -> None:
    """A key that means nothing for this source is an error, not silently ignored."""
    used = _USED_BY[cfg.kind]
    for name in sorted(_IMAGE_ONLY - used) + sorted(_TABLE_ONLY):
        default = DataConfig.model_fields[name].default
        if getattr(cfg, name) != default:
            users = [k for k, keys in _USED_BY.items() if name in keys]
            where = (f"kind {' / '.join(users)}" if users else "tables (kind csv or a built-in "
                     "table)")
            what = f"built-in image set {cfg.name!r}" if cfg.kind == "builtin" else \
                f"kind {cfg.kind}"
            raise DataError(f"{origin}: `{name}` does not apply to {what}; it is used by "
                            f"{where}")


# ---------------------------------------------------------------- labels and splits


def _order_classes(classes: list[str], y: np.ndarray, cfg: DataConfig, origin: str):
    if len(classes) < 2:
        only = classes[0] if classes else "(none)"
        raise DataError(f"{origin}: a single class {only!r}; a classifier needs at least 2")
    if cfg.positive is None:
        return classes, y
    if len(classes) != 2:
        raise DataError(f"{origin}: `positive` only applies to 2 classes; there are "
                        f"{len(classes)}: {', '.join(classes)}")
    if str(cfg.positive) not in classes:
        raise DataError(f"{origin}: positive class {cfg.positive!r} is not a class; classes: "
                        f"{', '.join(classes)}")
    if classes[1] == str(cfg.positive):
        return classes, y
    return [classes[1], classes[0]], (1 - y).astype(np.int64)


def _strat_key(y: np.ndarray, classes: list[str], multilabel: bool):
    """Single-label: the class. Multi-label: the first present label, or 'no label'."""
    if not multilabel:
        return y, classes
    on = y > 0
    first = np.where(on.any(axis=1), on.argmax(axis=1), len(classes))
    names = [*classes, "(no label)"]
    present, key = np.unique(first, return_inverse=True)
    return key.astype(np.int64), [names[i] for i in present]


def _split(found: SourceImages, cfg: DataConfig, origin: str,
           notes: list[str]) -> tuple[ImageSplit, ImageSplit, ImageSplit, ImageSplit]:
    """Train, validation, test and the training images n_train left out."""
    x, y, ids = found.x, found.y, found.ids
    key, key_names = _strat_key(y, found.classes, found.multilabel)
    split_cfg = cfg.split
    if found.multilabel and cfg.split.stratify:
        counts = np.bincount(key)
        if counts.min() < 3:
            rare = key_names[int(counts.argmin())]
            notes.append(f"split not stratified: first label {rare!r} has only "
                         f"{int(counts.min())} row(s)")
            split_cfg = cfg.split.model_copy(update={"stratify": False})
    whole = Split(pd.DataFrame({"row": np.arange(len(key))}), key, ids)
    train, val, test = partition(whole, split_cfg, origin, key_names)
    for key_name, n, part in (("n_train", cfg.n_train, train), ("n_val", cfg.n_val, val)):
        if n is not None and n > len(part):
            which = "training" if key_name == "n_train" else "validation"
            raise DataError(f"{origin}: {key_name} = {n} but the {which} split has only "
                            f"{len(part)} images (split val {cfg.split.val} / test "
                            f"{cfg.split.test}); use at most {len(part)} or leave it unset")
    pool = train
    train, val = subsample(train, val, cfg, origin)

    def build(part: Split) -> ImageSplit:
        idx = part.frame["row"].to_numpy()
        return ImageSplit(x[torch.as_tensor(np.array(idx, dtype=np.int64))], y[idx], ids[idx])

    return build(train), build(val), build(test), build(left_out(pool, train))
