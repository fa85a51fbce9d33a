"""Image data: a folder per class, a CSV of paths and labels, or a built-in image set.

Images are decoded and resized ONCE, at load time, to a square `size` and kept as uint8 tensors
(N, C, size, size): C = 1 when every image is greyscale, else 3. `make_prepare` turns a uint8
batch into the float input of a network (scaling, resizing, channels, training-only
augmentation, normalisation) on the fly.

Splits follow the tabular protocol (`tltool.data.tabular`): a train/val/test partition fixed by
`split.seed` (stratified by class), then `n_train` / `n_val` sub-sampled with `sample_seed`
(default: split.seed), so neither the test images nor the labelled ones change with the
training seed. Multi-label data are stratified on each
row's first present label (in class order), with rows that carry no label as one more group;
when a group has fewer than 3 rows the split falls back to an unstratified one (with a note).

Geometry: every image is stretched to size x size (the whole image is kept; the aspect ratio is
not). Transparent pixels are composited onto black; 16-bit and float greyscale are scaled to
0..255; EXIF orientation is applied; an animated GIF gives its first frame.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from tltool import distributed, progress
from tltool.config import DataConfig
from tltool.data.tabular import Split, _partition, _subsample, left_out, sample_seed
from tltool.datasets.images import IMAGE_SETS, get_image_set, load_image_set
from tltool.errors import DataError
from tltool.suggest import did_you_mean

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ALLOWED = "png, jpg, jpeg, bmp, gif, webp, tif"
AUGMENT_PRESETS = ("none", "flip", "light", "standard")
_NOTE_LIST = 5  # file names listed in a note before "and N more"


@dataclass
class ImageSplit:
    """uint8 images (N, C, H, W), labels and ids of one split."""

    x: torch.Tensor
    y: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


class LazyImages:
    """Image files decoded on demand, batch by batch, so memory stays flat however many images
    there are (used when a decoded store would exceed `decode_once_max_gb`). Indexing gives a
    lazy subset; `materialize()` decodes it to uint8 (B, 3, size, size)."""

    def __init__(self, files: list[Path], size: int):
        self.files = list(files)
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, self.size, self.size)

    def __getitem__(self, idx) -> LazyImages:
        if isinstance(idx, slice):
            return LazyImages(self.files[idx], self.size)
        return LazyImages([self.files[int(i)] for i in np.asarray(idx).reshape(-1)], self.size)

    def materialize(self) -> torch.Tensor:
        x, _, _ = _decode_all(self.files, self.size, "error", [str(f) for f in self.files])
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


@dataclass
class ImageData:
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


def load_images(cfg: DataConfig, seed: int, size: int) -> ImageData:
    """Load (decode + resize to size x size once), label, split (split.seed), sub-sample (seed)."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not is_image_config(cfg):
        raise DataError(f"{_origin(cfg)}: not an image source; use kind image_folder or "
                        f"image_csv, or a built-in image set: {', '.join(IMAGE_SETS)}")
    origin = _origin(cfg)
    _reject_unused(cfg, origin)
    notes: list[str] = []
    if cfg.kind == "builtin":
        x, y, classes, multilabel, ids = _from_builtin(cfg, size)
    elif cfg.kind == "image_folder":
        x, y, classes, ids = _from_folder(cfg, size, notes)
        multilabel = False
    else:
        x, y, classes, multilabel, ids = _from_csv(cfg, size, notes)
    if not multilabel:
        classes, y = _order_classes(classes, y, cfg, origin)
    elif cfg.positive is not None:
        raise DataError(f"{origin}: `positive` does not apply to multi-label data (each of "
                        f"{', '.join(classes)} is its own yes/no label)")
    train, val, test, rest = _split(x, y, ids, classes, multilabel, cfg, seed, origin, notes)
    from tltool.data.tabular import small_split_notes

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


def load_image_files(paths: list[str], size: int,
                     on_bad_image: str) -> tuple[torch.Tensor, list[int]]:
    """Decode and resize image files (e.g. new images to predict): uint8 (K, C, size, size)
    and the indices into `paths` that were kept (all of them unless on_bad_image is skip)."""
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image = {on_bad_image!r}; allowed: error, skip")
    files = [Path(p) for p in paths]
    for p, f in zip(paths, files, strict=True):
        if on_bad_image == "error" and not f.is_file():
            raise DataError(f"{p}: image file not found")
    x, kept, bad = _decode_all(files, size, on_bad_image, [str(p) for p in paths],
                               shard=True)
    if not kept:
        raise DataError(f"none of the {len(paths)} image files could be read "
                        f"({_listing([str(paths[i]) for i, _ in bad])})")
    return x, kept


# ---------------------------------------------------------------- preparation for a network


class Prepare:
    """prepare(x_uint8, train) -> float32 (B, channels, size, size), normalised.

    Steps: /255; resize to size (antialiased) when the stored size differs; augmentation when
    train is True only; greyscale -> RGB by repeating the channel (RGB -> grey by luminance when
    channels == 1); (x - mean) / std. Random draws come from torch's global CPU generator, so
    torch.manual_seed makes a run reproducible on any device. A class (not a closure) so that it
    pickles into DataLoader workers.
    """

    def __init__(self, size: int, mean: list[float], std: list[float], channels: int = 3,
                 augment: str = "none") -> None:
        if augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment = {augment!r}; allowed: {', '.join(AUGMENT_PRESETS)}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        for what, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise ValueError(f"{what} has {len(values)} values; expected 1 or {channels}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.size, self.channels, self.augment = int(size), int(channels), augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __repr__(self) -> str:
        return (f"Prepare(size={self.size}, channels={self.channels}, "
                f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
                f"augment={self.augment!r})")

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
        side = (self.size, self.size)
        augmenting = train and self.augment != "none" and len(x) > 0
        # Upsampling is left to the augmentation's own resampling (one pass instead of two);
        # otherwise resize first, antialiased when shrinking, in uint8 when the input is uint8.
        resize = tuple(x.shape[-2:]) != side and not (
            augmenting and self.augment != "flip" and max(x.shape[-2:]) < self.size)
        if resize and x.dtype == torch.uint8:
            x, resize = _resize_u8(x, self.size), False
        # A fresh float tensor either way, so the in-place steps below never touch the caller's.
        out = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float().clone()
        if resize:
            out = F.interpolate(out, size=side, mode="bilinear",
                                antialias=max(out.shape[-2:]) > self.size, align_corners=False)
        if augmenting:
            out = _augment(out, self.augment, self.size)
        out = _to_channels(out, self.channels)
        mean, std = self.mean.to(out.device), self.std.to(out.device)
        out = out - mean if out.stride(1) == 0 else out.sub_(mean)  # stride 0: grey expanded
        return out.div_(std)


def make_prepare(size: int, mean: list[float], std: list[float], channels: int = 3,
                 augment: str = "none") -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """See `Prepare`; augment presets: none, flip (random horizontal flip), light (flip + a
    random crop of 80-100% of the side, aspect 0.9-1.1, anywhere inside the image), standard
    (light + rotation within +-10 degrees + brightness/contrast/saturation jitter of +-20%)."""
    return Prepare(size, mean, std, channels, augment)


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot turn {have}-channel images into {channels} channels")


def _augment(x: torch.Tensor, preset: str, size: int) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    flip = torch.rand(n) < 0.5
    if preset == "flip":
        return torch.where(flip.to(dev).view(-1, 1, 1, 1), x.flip(-1), x)
    # Random resized crop (+ rotation for standard) as one affine resampling per batch:
    # output coordinates in [-1, 1] map to input coordinates R(angle) diag(sx, sy) p + t.
    u = torch.rand(n, 5)
    side = 0.8 + 0.2 * u[:, 0]
    aspect = torch.exp(math.log(1.1) * (2 * u[:, 1] - 1))
    sx = torch.clamp(side * aspect.sqrt(), max=1.0)
    sy = torch.clamp(side / aspect.sqrt(), max=1.0)
    tx = (1 - sx) * (2 * u[:, 2] - 1)
    ty = (1 - sy) * (2 * u[:, 3] - 1)
    angle = (2 * u[:, 4] - 1) * math.radians(10) if preset == "standard" else torch.zeros(n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    fx = torch.where(flip, -sx, sx)
    theta = torch.stack([torch.stack([cos * fx, -sin * sy, tx], dim=1),
                         torch.stack([sin * fx, cos * sy, ty], dim=1)], dim=1)
    grid = F.affine_grid(theta.to(dev), [n, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    if preset != "standard":
        return out
    # Brightness b, contrast c (around the image's mean grey m) and saturation s (RGB only),
    # applied in sequence, fold into one expression:
    # out = s*b*c*x + (1-s)*b*c*grey(x) + b*m*(1-c).
    b, c, sat = (0.8 + 0.4 * torch.rand(n, 3)).to(dev).unbind(dim=1)
    grey = _to_channels(out, 1) if out.shape[1] == 3 else out
    m = grey.mean(dim=(1, 2, 3))
    gain = (b * c).view(-1, 1, 1, 1)
    offset = (b * m * (1 - c)).view(-1, 1, 1, 1)
    if out.shape[1] == 3:
        sat = sat.view(-1, 1, 1, 1)
        out = torch.addcmul(offset + (1 - sat) * gain * grey, out, sat * gain)
    else:
        out = torch.addcmul(offset, out, gain)
    return out.clamp_(0.0, 1.0)


# ---------------------------------------------------------------- decoding


class _BadImage(Exception):
    pass


def _decode(path: Path, size: int) -> np.ndarray:
    """One file -> uint8 (size, size) for greyscale or (size, size, 3) for colour."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(None, (size, size))  # decode big JPEGs at a reduced scale
            img.load()
            img = ImageOps.exif_transpose(img) or img
            img = _normalise_mode(img)
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.array(img, dtype=np.uint8)  # a writable copy
    except UnidentifiedImageError:
        raise _BadImage("not a recognised image format") from None
    except FileNotFoundError:
        raise _BadImage("file not found") from None
    except Exception as exc:  # truncated/corrupt data: any decoder error means "unreadable"
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise _BadImage(f"{type(exc).__name__}: {text}"[:160]) from None


def _normalise_mode(img):
    """Any PIL mode -> 'L' (greyscale) or 'RGB'."""
    from PIL import Image

    mode = img.mode
    if mode in ("1", "L"):
        return img.convert("L")
    if mode in ("LA", "La", "PA", "P", "RGBA", "RGBa"):
        if mode == "P" and "transparency" not in img.info:
            return img.convert("RGB")
        if mode in ("LA", "La"):
            arr = np.asarray(img.convert("LA"), dtype=np.float32)
            return Image.fromarray(np.rint(arr[..., 0] * arr[..., 1] / 255).astype(np.uint8))
        arr = np.asarray(img.convert("RGBA"), dtype=np.float32)
        rgb = np.rint(arr[..., :3] * arr[..., 3:] / 255).astype(np.uint8)
        return Image.fromarray(rgb)
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and top > 255):
            arr = arr / 257.0
        elif mode == "F" and top <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _workers(asked: int | None = None) -> int:
    """Decoding threads: data.workers, else the CPU count (at most 8)."""
    return asked or max(1, min(8, os.cpu_count() or 1))


def _decode_all(files: list[Path], size: int, on_bad_image: str, shown: list[str],
                where: list[str] | None = None, workers: int | None = None,
                shard: bool = False):
    """Decode in threads (PIL releases the GIL); the first bad file in order raises under
    on_bad_image=error. Returns (uint8 tensor, kept indices, [(index, reason)] skipped).

    shard=True, under torchrun (every rank calls it with the same files): each rank decodes
    its contiguous share of the files and the pixels are gathered, so every rank holds all of
    them after 1/N of the decoding; skipped files, the error raised and the colour verdict
    are the same on every rank."""

    def one(f: Path):
        try:
            return _decode(f, size)
        except _BadImage as exc:
            return exc

    sharded = shard and distributed.sharded_inference(len(files))
    lo, hi = distributed.rows_of_rank(len(files)) if sharded else (0, len(files))
    arrays: list = []
    with ThreadPoolExecutor(max_workers=_workers(workers)) as pool, \
            progress.current().steps("decoding images", total=hi - lo) as advance:
        for a in pool.map(one, files[lo:hi], chunksize=16):
            arrays.append(a)
            advance(1)
    bad = [(lo + i, str(a)) for i, a in enumerate(arrays) if isinstance(a, _BadImage)]
    mine = [i for i, a in enumerate(arrays) if not isinstance(a, _BadImage)]
    colour = any(arrays[i].ndim == 3 for i in mine)
    sizes = None
    if sharded:
        shares = distributed.gather_objects((bad, colour, len(mine)))
        bad = [b for share in shares for b in share[0]]
        colour = any(share[1] for share in shares)
        sizes = [share[2] for share in shares]
    if bad and on_bad_image == "error":
        i, reason = bad[0]
        prefix = where[i] if where else ""
        raise DataError(f"{prefix}{shown[i]}: not a readable image ({reason}); allowed: a valid "
                        f"{ALLOWED} file, or set on_bad_image: skip to leave such files out")
    out = torch.empty((len(mine), 3 if colour else 1, size, size), dtype=torch.uint8)
    for row, i in enumerate(mine):
        a = torch.from_numpy(arrays[i])
        out[row] = a.permute(2, 0, 1) if a.ndim == 3 else a.unsqueeze(0)  # broadcasts grey
        arrays[i] = None  # free as we go: peak memory stays about one copy
    if sizes is not None:
        out = distributed.gather_rows(out, sum(sizes), sizes)
    skipped = {i for i, _ in bad}
    return out, [i for i in range(len(files)) if i not in skipped], bad


def _probe_all(files: list[Path], on_bad_image: str, shown: list[str],
               where: list[str] | None = None,
               workers: int | None = None) -> tuple[list[int], list[tuple[int, str]]]:
    """Check that every file decodes as an image (pixels read once, nothing kept), so a
    truncated file is found now and not epochs into training. Under torchrun each rank
    checks its contiguous share of the files and the verdicts are gathered."""
    from PIL import Image

    def one(f: Path) -> str | None:
        try:
            with Image.open(f) as img:
                img.load()
            return None
        except FileNotFoundError:
            return "file not found"
        except Exception as exc:  # any reader error means "not an image"
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]

    sharded = distributed.sharded_inference(len(files))
    lo, hi = distributed.rows_of_rank(len(files)) if sharded else (0, len(files))
    with ThreadPoolExecutor(max_workers=_workers(workers)) as pool:
        problems = list(pool.map(one, files[lo:hi], chunksize=64))
    bad = [(lo + i, p) for i, p in enumerate(problems) if p is not None]
    if sharded:
        bad = [b for share in distributed.gather_objects(bad) for b in share]
    if bad and on_bad_image == "error":
        i, reason = bad[0]
        prefix = where[i] if where else ""
        raise DataError(f"{prefix}{shown[i]}: not a readable image ({reason}); allowed: a valid "
                        f"{ALLOWED} file, or set on_bad_image: skip to leave such files out")
    skipped = {i for i, _ in bad}
    return [i for i in range(len(files)) if i not in skipped], bad


def _store(cfg: DataConfig, files: list[Path], size: int, shown: list[str], notes: list[str],
           where: list[str] | None = None):
    """Decode once into uint8 when that fits in cfg.decode_once_max_gb, else decode lazily."""
    need = len(files) * 3 * size * size
    if need <= cfg.decode_once_max_gb * 2**30:
        if not cfg.decode_cache:
            return _decode_all(files, size, cfg.on_bad_image, shown, where, cfg.workers,
                               shard=True)
        from tltool.data import decoded

        k = decoded.key(files, size, cfg.on_bad_image)
        hit = None if k is None else decoded.load(k)
        if distributed.active() and not all(distributed.gather_objects(hit is not None)):
            hit = None  # a rank without the entry (another node): every rank decodes a share
        if hit is not None:
            notes.append(f"{len(hit[1])} images read from the decoded-image cache "
                         f"({decoded.root() / k}); any change to the files decodes them again")
            return hit
        x, kept, bad = _decode_all(files, size, cfg.on_bad_image, shown, where, cfg.workers,
                                   shard=True)
        if k is not None and distributed.local_rank() == 0:  # one writer per machine
            decoded.save(k, x, kept, bad)
        return x, kept, bad
    kept, bad = _probe_all(files, cfg.on_bad_image, shown, where, cfg.workers)
    notes.append(f"{len(kept)} images decoded batch by batch when used ({need / 2**30:.1f} GiB "
                 f"decoded would exceed decode_once_max_gb {cfg.decode_once_max_gb})")
    return LazyImages([files[i] for i in kept], size), kept, bad


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_NOTE_LIST])
    more = len(names) - _NOTE_LIST
    return shown + (f" and {more} more" if more > 0 else "")


def _skip_note(bad: list[tuple[int, str]], ids: list[str]) -> str:
    return (f"skipped {len(bad)} unreadable image{'s' if len(bad) != 1 else ''}: "
            f"{_listing([ids[i] for i, _ in bad])}")


# ---------------------------------------------------------------- sources


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


def _from_builtin(cfg: DataConfig, size: int):
    spec = get_image_set(cfg.name)
    x, y, classes, multilabel = load_image_set(cfg.name, cfg.options)
    xt = resize_uint8(torch.from_numpy(np.ascontiguousarray(x)), size)
    ids = np.array([f"{spec.name}:{i}" for i in range(len(y))])
    return xt, y, list(classes), multilabel, ids


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, C, size, size), bilinear (antialiased when shrinking),
    in chunks so that any temporary copy stays small."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for lo in range(0, x.shape[0], chunk):
        out[lo:lo + chunk] = _resize_u8(x[lo:lo + chunk], size)
    return out


def _resize_u8(x: torch.Tensor, size: int) -> torch.Tensor:
    shrink = max(x.shape[-2:]) > size
    if x.device.type == "cpu":
        try:  # native uint8 bilinear: about 10x faster than a float round trip on CPU
            return F.interpolate(x, size=(size, size), mode="bilinear", antialias=shrink,
                                 align_corners=False)
        except (RuntimeError, NotImplementedError):
            pass
    part = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=shrink,
                         align_corners=False)
    return part.round_().clamp_(0, 255).to(torch.uint8)


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


def _from_folder(cfg: DataConfig, size: int, notes: list[str]):
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
    x, kept, bad = _store(cfg, files, size, [str(f) for f in files], notes)
    if bad:
        notes.append(_skip_note(bad, ids))
    _check_any(kept, files, root)
    y = np.asarray(labels, dtype=np.int64)[kept]
    return x, y, [d.name for d in class_dirs], np.array([ids[i] for i in kept])


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


def _check_any(kept: list[int], files: list, where) -> None:
    if not kept:
        raise DataError(f"{where}: none of the {len(files)} images could be read")


def _read_image_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: CSV file not found (relative paths are taken from the "
                        f"current folder {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; kind image_csv expects a CSV file (for one "
                        f"sub-folder per class use kind image_folder)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the CSV file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file: {str(exc).splitlines()[0]}") from None
    if frame.empty:
        raise DataError(f"{path}: the CSV file has a header but no rows")
    return frame


def _row(i: int) -> str:
    return f"row {i + 2}"  # the file's line number: the header is line 1


def _from_csv(cfg: DataConfig, size: int, notes: list[str]):
    csv = Path(cfg.path)
    frame = _read_image_csv(csv)
    label = cfg.label or "label"
    for what, name in (("image_column", cfg.image_column), ("label column", label),
                       ("id_column", cfg.id_column)):
        if name is not None and name not in frame.columns:
            hint = did_you_mean(name, frame.columns, prefix="; ")
            default = " (set `label`)" if what == "label column" and not cfg.label else ""
            raise DataError(f"{csv}: {what} {name!r} is not a column{default}{hint} "
                            f"(columns: {', '.join(map(str, frame.columns))})")
    root = Path(cfg.root) if cfg.root else csv.parent
    if not root.is_dir():
        raise DataError(f"{csv}: root {str(root)!r} is not a folder (image paths start there)")
    multilabel = cfg.label_sep is not None
    if multilabel and cfg.label_sep == "":
        raise DataError(f"{csv}: label_sep is empty; use the character that joins labels, "
                        f"e.g. '|'")
    rows = np.arange(len(frame))
    if not multilabel:
        unlabeled = frame[label].isna() | (frame[label].str.strip() == "")
        if unlabeled.any():
            notes.append(f"dropped {int(unlabeled.sum())} rows with no label")
            rows = rows[~unlabeled.to_numpy()]
    shown: list[str] = []
    files: list[Path] = []
    missing: list[int] = []
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
            missing.append(len(files))
        shown.append(rel)
        files.append(f)
    if duplicates:
        rows = _drop_duplicates(rows, duplicates, frame[label], csv, notes, cfg.label_sep)
    where = [f"{csv}: {_row(i)}: " for i in rows]
    x, kept, bad = _store(cfg, files, size, [str(f) for f in files], notes, where)
    if bad:
        gone = [b for b in bad if b[0] in set(missing)]
        broken = [b for b in bad if b[0] not in set(missing)]
        if gone:
            notes.append(f"skipped {len(gone)} missing image file(s): "
                         f"{_listing([shown[i] for i, _ in gone])}")
        if broken:
            notes.append(_skip_note(broken, shown))
    if not kept:
        raise DataError(f"{csv}: none of the {len(files)} images could be read (paths start "
                        f"at {root})")
    rows = rows[kept]
    ids = (frame[cfg.id_column].iloc[rows].fillna("").astype(str).to_numpy()
           if cfg.id_column else np.array([shown[i] for i in kept]))
    values = frame[label].iloc[rows]
    if multilabel:
        sets = [[] if pd.isna(v) else [t.strip() for t in str(v).split(cfg.label_sep)
                                       if t.strip()] for v in values]
        classes = sorted({t for s in sets for t in s})
        if not classes:
            raise DataError(f"{csv}: label column {label!r} holds no labels at all (multi-label "
                            f"with label_sep {cfg.label_sep!r})")
        pos = {c: j for j, c in enumerate(classes)}
        y = np.zeros((len(sets), len(classes)), dtype=np.float32)
        for r, s in enumerate(sets):
            for t in s:
                y[r, pos[t]] = 1.0
        none = int((y.sum(axis=1) == 0).sum())
        if none:
            notes.append(f"{none} image(s) carry no label")
    else:
        text = values.str.strip()
        classes = sorted(text.unique().tolist())
        y = text.map({c: j for j, c in enumerate(classes)}).to_numpy(np.int64)
    return x, y, classes, multilabel, ids


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


def _split(x: torch.Tensor, y: np.ndarray, ids: np.ndarray, classes: list[str], multilabel: bool,
           cfg: DataConfig, seed: int, origin: str, notes: list[str]):
    key, key_names = _strat_key(y, classes, multilabel)
    split_cfg = cfg
    if multilabel and cfg.split.stratify:
        counts = np.bincount(key)
        if counts.min() < 3:
            rare = key_names[int(counts.argmin())]
            notes.append(f"split not stratified: first label {rare!r} has only "
                         f"{int(counts.min())} row(s)")
            split_cfg = cfg.model_copy(update={"split": cfg.split.model_copy(
                update={"stratify": False})})
    whole = Split(pd.DataFrame({"row": np.arange(len(key))}), key, ids)
    train, val, test = _partition(whole, split_cfg, origin, key_names)
    for key_name, n, part in (("n_train", cfg.n_train, train), ("n_val", cfg.n_val, val)):
        if n is not None and n > len(part):
            which = "training" if key_name == "n_train" else "validation"
            raise DataError(f"{origin}: {key_name} = {n} but the {which} split has only "
                            f"{len(part)} images (split val {cfg.split.val} / test "
                            f"{cfg.split.test}); use at most {len(part)} or leave it unset")
    pool = train
    draw = sample_seed(cfg)
    train = _subsample(train, cfg.n_train, draw, "n_train", origin, cfg)
    val = _subsample(val, cfg.n_val, draw + 1, "n_val", origin, cfg)

    def build(part: Split) -> ImageSplit:
        idx = part.frame["row"].to_numpy()
        return ImageSplit(x[torch.as_tensor(np.array(idx, dtype=np.int64))], y[idx], ids[idx])

    return build(train), build(val), build(test), build(left_out(pool, train))
