"""The decoded-image cache: a second read of the same files skips decoding and gives the same
pixels; any change to a file, or another image size, decodes again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tltool.config import DataConfig
from tltool.data import decoded
from tltool.data.images.decoding import read_pixels


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "img" / c / f"{i}.png")
    return tmp_path / "img"


def _read(folder: Path, size: int = 16, **kw):
    files = sorted(folder.rglob("*.png"))
    cfg = DataConfig(kind="image_folder", path=str(folder), **kw)
    notes: list[str] = []
    x, kept, bad = read_pixels(cfg, files, size, [str(f) for f in files], notes)
    return x, kept, bad, notes


def test_second_read_comes_from_the_cache_with_the_same_pixels(folder):
    x1, kept1, _, notes1 = _read(folder)
    assert not any("cache" in n for n in notes1)
    x2, kept2, _, notes2 = _read(folder)
    assert any("decoded-image cache" in n for n in notes2)
    assert torch.equal(x1, x2) and kept1 == kept2 and x2.dtype == torch.uint8
    x2[0, 0, 0, 0] = 255 - x2[0, 0, 0, 0]  # copy on write: the cache file is not changed
    x3, _, _, _ = _read(folder)
    assert torch.equal(x1, x3)


def test_a_changed_file_or_size_decodes_again(folder):
    x1, _, _, _ = _read(folder)
    target = sorted(folder.rglob("*.png"))[3]
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    x2, _, _, notes = _read(folder)
    assert not any("cache" in n for n in notes) and int(x2[3].sum()) == 0
    assert not torch.equal(x1, x2)
    _, _, _, notes = _read(folder, size=8)  # another size: another entry
    assert not any("cache" in n for n in notes)


def test_skipped_bad_files_are_remembered_and_the_cache_can_be_off(folder, tmp_path):
    (folder / "a" / "broken.png").write_bytes(b"not an image")
    x1, kept1, bad1, _ = _read(folder, on_bad_image="skip")
    x2, kept2, bad2, notes = _read(folder, on_bad_image="skip")
    assert any("cache" in n for n in notes) and bad1 == bad2 and kept1 == kept2
    assert len(bad2) == 1
    before = sorted(p.name for p in decoded.root().iterdir())
    _read(folder, size=12, decode_cache=False, on_bad_image="skip")
    assert sorted(p.name for p in decoded.root().iterdir()) == before


def test_the_number_of_decoding_threads_does_not_change_the_pixels(folder):
    one, kept1, _, _ = _read(folder, decode_cache=False, workers=1)
    many, kept3, _, _ = _read(folder, decode_cache=False, workers=3)
    assert torch.equal(one, many) and kept1 == kept3
    with pytest.raises(ValueError):
        DataConfig(kind="image_folder", path=str(folder), workers=0)
