"""Decoding image files: PIL decode, resize and greyscale/colour handling; the decode-all step
(in threads, sharded under torchrun), the choice between decoding once (through the decoded
cache, `tltool.data.decoded`) and decoding lazily (`LazyImages`), and uint8 resizing.

Geometry: every image is stretched to size x size (the whole image is kept; the aspect ratio is
not). Transparent pixels are composited onto black; 16-bit and float greyscale are scaled to
0..255; EXIF orientation is applied; an animated GIF gives its first frame. Images are kept as
uint8 tensors (N, C, size, size): C = 1 when every image is greyscale, else 3.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F

from tltool import distributed, progress
from tltool.config import DataConfig
from tltool.data import decoded
from tltool.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ALLOWED = "png, jpg, jpeg, bmp, gif, webp, tif"
_NOTE_LIST = 5  # file names listed in a note before "and N more"


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


class _BadImage(Exception):
    pass


def _refuse(first_bad: tuple[int, str], names: list[str]) -> NoReturn:
    """The error for the first unreadable file (on_bad_image: error)."""
    i, reason = first_bad
    raise DataError(f"{names[i]}: not a readable image ({reason}); allowed: a valid "
                    f"{ALLOWED} file, or set on_bad_image: skip to leave such files out")


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


def _decode_all(files: list[Path], size: int, on_bad_image: str, names: list[str],
                workers: int | None = None, shard: bool = False):
    """Decode in threads (PIL releases the GIL); the first bad file in order raises under
    on_bad_image=error, named as `names` says. Returns (uint8 tensor, kept indices,
    [(index, reason)] skipped).

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
        _refuse(bad[0], names)
    out = torch.empty((len(mine), 3 if colour else 1, size, size), dtype=torch.uint8)
    for row, i in enumerate(mine):
        a = torch.from_numpy(arrays[i])
        out[row] = a.permute(2, 0, 1) if a.ndim == 3 else a.unsqueeze(0)  # broadcasts grey
        arrays[i] = None  # free as we go: peak memory stays about one copy
    if sizes is not None:
        out = distributed.gather_rows(out, sum(sizes), sizes)
    skipped = {i for i, _ in bad}
    return out, [i for i in range(len(files)) if i not in skipped], bad


def _probe_all(files: list[Path], on_bad_image: str, names: list[str],
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
        _refuse(bad[0], names)
    skipped = {i for i, _ in bad}
    return [i for i in range(len(files)) if i not in skipped], bad


def read_pixels(cfg: DataConfig, files: list[Path], size: int, names: list[str],
                notes: list[str]) -> tuple[torch.Tensor | LazyImages, list[int],
                                           list[tuple[int, str]]]:
    """The images of a data section at size x size: decoded once into uint8 when that fits in
    cfg.decode_once_max_gb (through the decoded-image cache when cfg.decode_cache), else
    decoded lazily. Returns (pixels, indices of the files kept, [(index, reason)] skipped);
    `names` name the files in an error (the first unreadable one under on_bad_image: error),
    `notes` gain a line when the cache was read or decoding is lazy."""
    need = len(files) * 3 * size * size
    if need <= cfg.decode_once_max_gb * 2**30:
        if not cfg.decode_cache:
            return _decode_all(files, size, cfg.on_bad_image, names, cfg.workers, shard=True)
        k = decoded.key(files, size, cfg.on_bad_image)
        hit = None if k is None else decoded.load(k)
        if distributed.active() and not all(distributed.gather_objects(hit is not None)):
            hit = None  # a rank without the entry (another node): every rank decodes a share
        if hit is not None:
            notes.append(f"{len(hit[1])} images read from the decoded-image cache "
                         f"({decoded.root() / k}); any change to the files decodes them again")
            return hit
        x, kept, bad = _decode_all(files, size, cfg.on_bad_image, names, cfg.workers,
                                   shard=True)
        if k is not None and distributed.local_rank() == 0:  # one writer per machine
            decoded.save(k, x, kept, bad)
        return x, kept, bad
    kept, bad = _probe_all(files, cfg.on_bad_image, names, cfg.workers)
    notes.append(f"{len(kept)} images decoded batch by batch when used ({need / 2**30:.1f} GiB "
                 f"decoded would exceed decode_once_max_gb {cfg.decode_once_max_gb})")
    return LazyImages([files[i] for i in kept], size), kept, bad


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
                        f"({listing([str(paths[i]) for i, _ in bad])})")
    return x, kept


def listing(names: list[str]) -> str:
    """The first few names, then "and N more"."""
    shown = ", ".join(names[:_NOTE_LIST])
    more = len(names) - _NOTE_LIST
    return shown + (f" and {more} more" if more > 0 else "")


def skip_note(bad: list[tuple[int, str]], ids: list[str]) -> str:
    """The note for images skipped as unreadable (on_bad_image: skip), by their ids."""
    return (f"skipped {len(bad)} unreadable image{'s' if len(bad) != 1 else ''}: "
            f"{listing([ids[i] for i, _ in bad])}")


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, C, size, size), bilinear (antialiased when shrinking),
    in chunks so that any temporary copy stays small."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for lo in range(0, x.shape[0], chunk):
        out[lo:lo + chunk] = resize_u8(x[lo:lo + chunk], size)
    return out


def resize_u8(x: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 batch -> uint8 (B, C, size, size) in one pass, bilinear (antialiased when
    shrinking)."""
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

