"""Image data: folders, CSVs (single- and multi-label), bad files, splits, preparation,
built-in image sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tltool.config import DataConfig
from tltool.data.images.dataset import ImageData, is_image_config, load_images
from tltool.data.images.decoding import load_image_files
from tltool.data.images.prepare import make_prepare
from tltool.datasets.images import FASHION_DIR, IMAGE_SETS, describe, load_image_set
from tltool.errors import DataError


def _png(path: Path, size=(12, 10), mode="RGB", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """cat: 6 RGB PNGs of mixed sizes; dog: 5 grey PNGs + 1 grey JPEG; a stray text file."""
    root = tmp_path / "pets"
    for i in range(6):
        _png(root / "cat" / f"c{i}.png", size=(10 + i, 8 + 2 * i), seed=i)
    for i in range(5):
        _png(root / "dog" / f"d{i}.PNG", size=(16, 16), mode="L", seed=10 + i)
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(root / "dog" / "d5.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def _folder_cfg(path: Path, **kw) -> DataConfig:
    base = {"kind": "image_folder", "path": str(path), "split": {"val": 0.25, "test": 0.25}}
    return DataConfig.model_validate(base | kw)


def _all_ids(data: ImageData) -> list[str]:
    return [*data.train.ids, *data.val.ids, *data.test.ids]


def test_image_folder_classes_shapes_ids_and_splits(folder):
    data = load_images(_folder_cfg(folder), size=16)
    assert data.classes == ["cat", "dog"] and not data.multilabel
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    for part in (data.train, data.val, data.test):
        assert part.x.dtype == torch.uint8 and part.y.dtype == np.int64
        assert tuple(part.x.shape[1:]) == (3, 16, 16)  # one colour image -> all stored as RGB
        assert len(part.x) == len(part.y) == len(part.ids)
    ids = _all_ids(data)
    assert sorted(ids) == sorted([f"cat/c{i}.png" for i in range(6)]
                                 + [f"dog/d{i}.PNG" for i in range(5)] + ["dog/d5.jpg"])
    labels = dict(zip(ids, np.concatenate([data.train.y, data.val.y, data.test.y]), strict=True))
    assert labels["cat/c3.png"] == 0 and labels["dog/d5.jpg"] == 1
    # A grey image stored as RGB has three equal channels.
    grey = data.train.x[data.train.y == 1][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert any("not images" in n for n in data.notes)
    summary = data.summary()
    assert summary["rows"] == {"train": 6, "val": 3, "test": 3}
    assert summary["multilabel"] is False and summary["origin"] == str(folder)


def test_grey_only_folder_keeps_one_channel_and_splits_are_fixed_across_seeds(tmp_path):
    root = tmp_path / "grey"
    for k in "abc":
        for i in range(8):
            _png(root / k / f"{i}.png", size=(9, 9), mode="L", seed=i)
    cfg = _folder_cfg(root, n_train=6)
    a, b = load_images(cfg, size=8), load_images(cfg, size=8)
    assert a.train.x.shape == (6, 1, 8, 8)
    # the data section alone fixes the split (no training seed reaches the loader): the
    # test images and the labelled ones stay, unless a sample_seed asks for others
    assert list(a.test.ids) == list(b.test.ids)
    assert list(a.train.ids) == list(b.train.ids)
    c = load_images(cfg.model_copy(update={"sample_seed": 1}), size=8)
    assert list(c.test.ids) == list(a.test.ids) and list(c.train.ids) != list(a.train.ids)
    assert sorted(np.bincount(a.test.y).tolist()) == [2, 2, 2]  # stratified


def test_corrupt_file_error_names_it_and_skip_counts_it(folder):
    bad = folder / "cat" / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as exc:
        load_images(_folder_cfg(folder), size=16)
    assert str(exc.value) == (
        f"{bad}: not a readable image (not a recognised image format); allowed: a valid png, "
        f"jpg, jpeg, bmp, gif, webp, tif file, or set on_bad_image: skip to leave such files out")
    data = load_images(_folder_cfg(folder, on_bad_image="skip"), size=16)
    assert len(data.train) + len(data.val) + len(data.test) == 12
    assert "skipped 1 unreadable image: cat/broken.png" in data.notes
    assert "cat/broken.png" not in _all_ids(data)


def test_truncated_png_is_unreadable(folder):
    good = (folder / "cat" / "c5.png").read_bytes()
    (folder / "cat" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.png: not a readable image"):
        load_images(_folder_cfg(folder), size=16)


def test_folder_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: the image folder is empty; expected"):
        load_images(_folder_cfg(empty), size=8)
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match=r"flat: the image folder has no class sub-folders"):
        load_images(_folder_cfg(tmp_path / "flat"), size=8)
    _png(tmp_path / "two" / "a" / "1.png")
    (tmp_path / "two" / "b").mkdir()
    with pytest.raises(DataError) as exc:
        load_images(_folder_cfg(tmp_path / "two"), size=8)
    assert str(exc.value).startswith(f"{tmp_path / 'two' / 'b'}: class folder 'b' holds no "
                                     f"images (allowed: png, jpg")
    with pytest.raises(DataError, match="image folder not found"):
        load_images(_folder_cfg(tmp_path / "nowhere"), size=8)
    with pytest.raises(DataError, match="`where` does not apply to kind image_folder"):
        load_images(_folder_cfg(tmp_path / "two", where={"a": 1}), size=8)


# ---------------------------------------------------------------- CSV


@pytest.fixture
def multilabel_csv(tmp_path) -> Path:
    """12 images under imgs/, labels 'a|b' style, some empty."""
    labels = ["a|b", "a", "", "b", "a|b", "c", "", "a", "b|c", "a", "", "b"]
    lines = ["file,tags,key"]
    for i, lab in enumerate(labels):
        _png(tmp_path / "imgs" / f"{i}.png", size=(8, 8), mode="L", seed=i)
        lines.append(f"imgs/{i}.png,{lab},k{i}")
    path = tmp_path / "tags.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _csv_cfg(path: Path, **kw) -> DataConfig:
    base = {"kind": "image_csv", "path": str(path), "image_column": "file", "label": "tags",
            "split": {"val": 0.25, "test": 0.25}}
    return DataConfig.model_validate(base | kw)


def test_multilabel_csv_gives_multi_hot_rows(multilabel_csv):
    data = load_images(_csv_cfg(multilabel_csv, label_sep="|"), size=8)
    assert data.multilabel and data.classes == ["a", "b", "c"]
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    assert data.train.y.dtype == np.float32 and data.train.y.shape == (6, 3)
    ys = np.concatenate([data.train.y, data.val.y, data.test.y])
    rows = dict(zip(_all_ids(data), ys, strict=True))
    assert rows["imgs/0.png"].tolist() == [1, 1, 0]
    assert rows["imgs/2.png"].tolist() == [0, 0, 0]  # empty label: no label at all, kept
    assert rows["imgs/8.png"].tolist() == [0, 1, 1]
    assert data.train.x.shape[1:] == (1, 8, 8)
    assert "3 image(s) carry no label" in data.notes
    # Stratified on the first present label; 'c' comes first in one row only -> unstratified.
    assert "split not stratified: first label 'c' has only 1 row(s)" in data.notes


def test_csv_ids_root_and_single_label(multilabel_csv, tmp_path):
    (tmp_path / "other").mkdir()
    single = tmp_path / "other" / "single.csv"
    rows = ["file,tags,key"] + [f"imgs/{i}.png,{'yes' if i % 2 else 'no'},k{i}"
                                for i in range(12)]
    single.write_text("\n".join(rows) + "\n")
    cfg = _csv_cfg(single, root=str(tmp_path), id_column="key", positive="no")
    data = load_images(cfg, size=8)
    assert data.classes == ["yes", "no"]  # the positive class goes last
    assert sorted(_all_ids(data)) == sorted(f"k{i}" for i in range(12))


def test_csv_missing_file_names_the_row(multilabel_csv):
    text = multilabel_csv.read_text().replace("imgs/3.png", "imgs/gone.png")
    multilabel_csv.write_text(text)
    with pytest.raises(DataError) as exc:
        load_images(_csv_cfg(multilabel_csv, label_sep="|"), size=8)
    root = multilabel_csv.parent
    assert str(exc.value) == (f"{multilabel_csv}: row 5: image file not found: "
                              f"{root / 'imgs' / 'gone.png'} (relative paths start at {root}; "
                              f"set `root` to change that)")
    data = load_images(_csv_cfg(multilabel_csv, label_sep="|", on_bad_image="skip"),
                       size=8)
    assert "skipped 1 missing image file(s): imgs/gone.png" in data.notes


def test_csv_duplicate_images_are_dropped_or_refused(multilabel_csv):
    lines = multilabel_csv.read_text().splitlines()
    multilabel_csv.write_text("\n".join([*lines, lines[1], "./" + lines[2],
                                         "imgs/0.png, b | a ,k50"]) + "\n")
    data = load_images(_csv_cfg(multilabel_csv, label_sep="|"), size=8)
    assert len(_all_ids(data)) == 12 == len(set(_all_ids(data)))
    assert "dropped 3 row(s) that list an image already listed (e.g. row 14 repeats row 2)" \
        in data.notes  # the same label set in another order is the same row
    multilabel_csv.write_text("\n".join([*lines, "imgs/1.png,b,k99"]) + "\n")
    with pytest.raises(DataError, match="row 14 lists the image of row 3 again with another "
                                        "label"):
        load_images(_csv_cfg(multilabel_csv, label_sep="|"), size=8)


def test_hidden_folders_are_skipped_and_linked_folders_followed(folder, tmp_path):
    _png(folder / "cat" / ".ipynb_checkpoints" / "c0-checkpoint.png")
    extra = tmp_path / "elsewhere"
    for i in range(3):
        _png(extra / f"x{i}.png", seed=40 + i)
    (folder / "dog" / "linked").symlink_to(extra, target_is_directory=True)
    (folder / "dog" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    data = load_images(_folder_cfg(folder), size=16)
    ids = _all_ids(data)
    assert not any(".ipynb_checkpoints" in i for i in ids)
    assert sum(i.startswith("dog/linked/") for i in ids) == 3 and len(ids) == 15
    assert "ignored 1 broken symbolic link(s) in class folders" in data.notes


def test_csv_missing_column_and_empty_csv(multilabel_csv, tmp_path):
    with pytest.raises(DataError) as exc:
        load_images(_csv_cfg(multilabel_csv, image_column="path"), size=8)
    assert str(exc.value) == (f"{multilabel_csv}: image_column 'path' is not a column "
                              f"(columns: file, tags, key)")
    with pytest.raises(DataError, match="label column 'tag' is not a column; did you mean"):
        load_images(_csv_cfg(multilabel_csv, label="tag"), size=8)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.csv: the CSV file is empty"):
        load_images(_csv_cfg(empty), size=8)
    header = tmp_path / "header.csv"
    header.write_text("file,tags\n")
    with pytest.raises(DataError, match="header.csv: the CSV file has a header but no rows"):
        load_images(_csv_cfg(header), size=8)


def test_an_image_csv_goes_through_the_shared_csv_reader(multilabel_csv, tmp_path):
    """Ids stay text (007), a ';'-separated copy reads as the comma file does, and a folder
    given as the CSV keeps the image wording."""
    text = multilabel_csv.read_text().replace(",k1\n", ",007\n")
    multilabel_csv.write_text(text)
    comma = load_images(_csv_cfg(multilabel_csv, label_sep="|", id_column="key"),
                        size=8)
    assert "007" in _all_ids(comma)
    semi = tmp_path / "semi.csv"
    semi.write_text(text.replace(",", ";"))
    again = load_images(_csv_cfg(semi, label_sep="|", id_column="key"), size=8)
    assert _all_ids(again) == _all_ids(comma) and again.classes == comma.classes
    assert np.array_equal(again.train.y, comma.train.y)
    with pytest.raises(DataError) as exc:
        load_images(_csv_cfg(tmp_path / "imgs"), size=8)
    assert str(exc.value) == (f"{tmp_path / 'imgs'}: is a folder; kind image_csv expects a CSV "
                              f"file (for one sub-folder per class use kind image_folder)")


def test_load_image_files_for_prediction(folder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    paths = [str(folder / "cat" / "c0.png"), str(bad), str(folder / "dog" / "d1.PNG")]
    x, kept = load_image_files(paths, size=20, on_bad_image="skip")
    assert kept == [0, 2] and x.shape == (2, 3, 20, 20) and x.dtype == torch.uint8
    with pytest.raises(DataError, match=r"bad\.png: not a readable image"):
        load_image_files(paths, size=20, on_bad_image="error")
    grey, _ = load_image_files(paths[2:], size=20, on_bad_image="error")
    assert grey.shape == (1, 1, 20, 20)


# ---------------------------------------------------------------- preparation


def test_prepare_scales_resizes_normalises_and_repeats_grey():
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    prep = make_prepare(32, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], channels=3)
    out = prep(x, False)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 32, 32)
    assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5
    assert torch.equal(out[:, 0], out[:, 2])
    same = make_prepare(28, [0.0], [1.0], channels=1)(x, False)
    assert torch.allclose(same, x.float() / 255)
    assert torch.equal(prep(x, False), prep(x, False))  # no randomness at evaluation


@pytest.mark.parametrize("preset", ["flip", "light", "standard"])
def test_augmentation_only_in_training_and_reproducible(preset):
    x = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8)
    prep = make_prepare(24, [0.4, 0.4, 0.4], [0.2, 0.2, 0.2], augment=preset)
    plain = make_prepare(24, [0.4, 0.4, 0.4], [0.2, 0.2, 0.2])(x, False)
    assert torch.equal(prep(x, False), plain)
    torch.manual_seed(3)
    a = prep(x, True)
    torch.manual_seed(3)
    b = prep(x, True)
    assert torch.equal(a, b) and a.shape == plain.shape
    assert not torch.allclose(a, plain)


def test_prepare_rejects_unknown_preset():
    with pytest.raises(ValueError, match="allowed: none, flip, light, standard"):
        make_prepare(8, [0.5], [0.5], augment="heavy")


# ---------------------------------------------------------------- built-in image sets


def test_registry_and_config_detection():
    assert {"digits", "mnist5k", "fashion_mnist", "fashion_mosaic", "mnist_mosaic"} <= set(
        IMAGE_SETS)
    assert all(d["description"] and "options" in d for d in describe())
    assert is_image_config(DataConfig(kind="builtin", name="digits"))
    assert not is_image_config(DataConfig(kind="builtin", name="credit_data"))
    assert is_image_config(DataConfig(kind="image_csv", path="x.csv"))


def test_builtin_digits():
    data = load_images(DataConfig(kind="builtin", name="digits"), size=28)
    assert data.classes == [str(d) for d in range(10)]
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.train.x.shape[1:] == (1, 28, 28) and data.train.x.dtype == torch.uint8
    assert data.train.x.max() == 255
    assert data.test.ids[0].startswith("digits:")
    framed, *_ = load_image_set("digits", {"frame": True})
    assert framed.shape == (1797, 1, 28, 28)
    assert framed[:, :, :4].max() == 0 and framed[:, :, 24:].max() == 0  # 20-px box in 28
    with pytest.raises(DataError, match="unknown option 'frames'; allowed: frame"):
        load_image_set("digits", {"frames": True})


def test_builtin_mnist5k_is_shuffled_into_every_split():
    data = load_images(DataConfig(kind="builtin", name="mnist5k"), size=28)
    assert len(data.train) + len(data.val) + len(data.test) == 5000
    for part in (data.train, data.val, data.test):
        assert set(part.y.tolist()) == set(range(10))
    assert np.bincount(data.test.y).tolist() == [100] * 10
    with pytest.raises(DataError) as exc:
        load_images(DataConfig(kind="builtin", name="mnist5k", n_train=4000), size=28)
    assert str(exc.value) == ("built-in mnist5k: n_train = 4000 but the training split has only "
                              "3000 images (split val 0.2 / test 0.2); use at most 3000 or "
                              "leave it unset")


def test_mosaics_are_multilabel_and_deterministic():
    x, y, classes, multilabel = load_image_set("mnist_mosaic", {"n": 200, "seed": 1})
    assert multilabel and classes == ["0", "1", "2"]
    assert x.shape == (200, 1, 56, 56) and x.dtype == np.uint8 and y.dtype == np.float32
    per_row = y.sum(axis=1)
    assert (per_row == 0).any() and (per_row > 1).any()
    again, y2, *_ = load_image_set("mnist_mosaic", {"n": 200, "seed": 1})
    assert np.array_equal(x, again) and np.array_equal(y, y2)
    other, *_ = load_image_set("mnist_mosaic", {"n": 200, "seed": 2})
    assert not np.array_equal(x, other)
    with pytest.raises(DataError, match="'x' is not a class; allowed: 0, 1, 2"):
        load_image_set("mnist_mosaic", {"labels": ["x"]})
    data = load_images(DataConfig(kind="builtin", name="mnist_mosaic", options={"n": 200}),
                       size=32)
    assert data.multilabel and data.train.y.shape[1] == 3 and data.train.x.shape[1:] == (1, 32, 32)


needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-labels-idx1-ubyte.gz").exists()
    and not (FASHION_DIR / "train-labels-idx1-ubyte").exists(),
    reason=f"Fashion-MNIST files not in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")


@needs_fashion
def test_builtin_fashion_mnist_subset():
    cfg = DataConfig(kind="builtin", name="fashion_mnist", options={"limit": 1000})
    data = load_images(cfg, size=28)
    assert data.classes[0] == "T-shirt/top" and len(data.classes) == 10
    assert len(data.train) + len(data.val) + len(data.test) == 1000
    assert np.bincount(data.test.y).tolist() == [20] * 10
    x, y, _, _ = load_image_set("fashion_mnist", {"split": "test", "limit": None})
    assert x.shape == (10000, 1, 28, 28)
    with pytest.raises(DataError, match="option split = 'val'; allowed: train, test, all"):
        load_image_set("fashion_mnist", {"split": "val"})


@needs_fashion
def test_fashion_mosaic():
    x, y, classes, multilabel = load_image_set("fashion_mosaic", {"n": 300})
    assert multilabel and len(classes) == 3 and x.shape == (300, 1, 56, 56)
    assert (y.sum(axis=1) == 0).any() and (y.sum(axis=1) > 1).any()


@pytest.mark.slow
@needs_fashion
def test_fashion_mnist_all_at_64px():
    cfg = DataConfig(kind="builtin", name="fashion_mnist", options={"split": "all",
                                                                   "limit": None})
    data = load_images(cfg, size=64)
    assert len(data.train) + len(data.val) + len(data.test) == 70000
    assert data.train.x.shape[1:] == (1, 64, 64)


def _write_idx(path: Path, array: np.ndarray) -> None:
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_from_cache_or_says_how_to_install(tmp_path, monkeypatch):
    import torchvision.datasets

    import tltool.datasets.images as sets

    def no_download(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(sets, "FASHION_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_download)
    sets.fashion_arrays.cache_clear()
    try:
        with pytest.raises(DataError) as exc:
            load_image_set("fashion_mnist")
        assert "apt-get install dataset-fashion-mnist" in str(exc.value)
        assert "RuntimeError: no network" in str(exc.value)
        raw = tmp_path / "cache" / "tltool" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        images = (np.arange(784).reshape(1, 28, 28) + 7 * np.arange(30).reshape(30, 1, 1)) % 256
        _write_idx(raw / "train-images-idx3-ubyte.gz", images)
        _write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
        x, y, _, _ = load_image_set("fashion_mnist", {"limit": 20})
        assert x.shape == (20, 1, 28, 28) and np.bincount(y).tolist() == [2] * 10
        for xi, yi in zip(x[:, 0], y, strict=True):  # each image keeps its own label
            (j,) = [j for j in range(30) if np.array_equal(images[j], xi)]
            assert j % 10 == yi
        (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"junk")
        sets.fashion_arrays.cache_clear()
        with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: cannot read the IDX"):
            load_image_set("fashion_mnist")
    finally:
        sets.fashion_arrays.cache_clear()
