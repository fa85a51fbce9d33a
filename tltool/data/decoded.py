"""A disk cache of decoded images: the uint8 pixels of a list of image files at one size,
kept as a memory-mapped .npy file so that a second command on the same files (pretrain then
freeze-finetune, extract, evaluate, select, other seeds) skips decoding.

The key is the files' identity: each file's resolved path, byte size and modification time
(nanoseconds), the image size and the bad-image rule. Any change to any file, a file added or
removed, another image_size: another key, so the pixels are decoded again (never stale).
Entries are not deleted automatically: remove the folder to free the space. Location:
$TLTOOL_CACHE_DIR/decoded, else $XDG_CACHE_HOME/tltool/decoded or ~/.cache/tltool/decoded. A
cache that cannot be read or written is simply not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

VERSION = 1


def root() -> Path:
    base = os.environ.get("TLTOOL_CACHE_DIR")
    if not base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tltool")
    return Path(base) / "decoded"


def key(files: list[Path], size: int, on_bad_image: str) -> str | None:
    """The files' identity at this size; None when a file cannot be looked at."""
    h = hashlib.sha256(f"v{VERSION}|{size}|{on_bad_image}|{len(files)}".encode())
    try:
        for f in files:
            st = os.stat(f)
            h.update(f"\n{os.path.realpath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
    except OSError:
        return None
    return h.hexdigest()[:40]


def load(k: str) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]] | None:
    """(pixels, kept, bad) of an entry, the pixels memory-mapped (copy on write)."""
    folder = root() / k
    try:
        meta = json.loads((folder / "meta.json").read_text())
        pixels = np.load(folder / "pixels.npy", mmap_mode="c")
        if list(pixels.shape) != meta["shape"] or pixels.dtype != np.uint8:
            return None
        return (torch.from_numpy(pixels), [int(i) for i in meta["kept"]],
                [(int(i), str(r)) for i, r in meta["bad"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(k: str, pixels: torch.Tensor, kept: list[int], bad: list[tuple[int, str]]) -> None:
    """Write an entry atomically (a folder renamed into place); failures are ignored."""
    final = root() / k
    if final.exists():
        return
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        np.save(tmp / "pixels.npy", pixels.numpy())
        meta: dict[str, Any] = {"shape": list(pixels.shape), "kept": kept,
                                "bad": [[i, r] for i, r in bad]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(locals().get("tmp", final.parent / ".none"), ignore_errors=True)
