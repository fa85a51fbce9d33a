"""Image transfer end to end through the CLI: small CNN on built-in digits sets, multi-label
mosaics, predictions for a folder of PNG files, and feature extraction."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

IMG = {
    "seed": 0,
    "source": {"kind": "builtin", "name": "mnist5k", "n_train": 600, "n_val": 200},
    "target": {"kind": "builtin", "name": "digits", "options": {"frame": True},
               "n_train": 100, "n_val": 50, "split": {"val": 0.2, "test": 0.4}},
    "model": {"backbone": "small_cnn", "backbone_args": {"hidden": 32}},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.002},
}


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture
def mnist_run(cli, write_config, tmp_path):
    res = cli("pretrain", write_config("mnist", base=IMG))
    assert res.code == 0, res.err
    return tmp_path / res.out.strip()


def test_mnist_to_digits_transfer_with_frozen_convolutions(mnist_run, cli, write_config,
                                                           tmp_path):
    cfg = write_config("digits", {"model": {"weights": str(mnist_run), "frozen_layers": 2}},
                       base=IMG)
    res = cli("freeze-finetune", cfg)
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    m = _json(run / "metrics.json")
    assert m["classes"] == [str(d) for d in range(10)] and m["test"]["n"] == 719
    assert m["freeze_check"]["unchanged"]
    assert m["cache"][0]["cached_blocks"] == 2  # the frozen convolutions ran once
    assert set(m["test"]["per_class"]) == set(m["classes"])
    plan = _json(run / "freeze_plan.json")[0]
    assert [b["state"] for b in plan["blocks"]] == ["frozen", "frozen", "trainable", "trainable"]
    src = torch.load(mnist_run / "checkpoints/best.pt", weights_only=True)
    dst = torch.load(run / "checkpoints/best.pt", weights_only=True)
    frozen = [k for k in src["state_dict"] if k.startswith(("backbone.blocks.0.",
                                                            "backbone.blocks.1."))]
    assert frozen and all(torch.equal(src["state_dict"][k], dst["state_dict"][k])
                          for k in frozen)
    assert dst["preprocessor"]["kind"] == "image" and dst["preprocessor"]["size"] == 28
    # Source-only: the MNIST model on the digits test split.
    ev = cli("evaluate", str(mnist_run), "--on", "target")
    assert ev.code == 0, ev.err
    assert _json(tmp_path / ev.out.strip() / "metrics.json")["test"]["n"] == 719
    # Predict on a folder of PNG files (grey, RGB, other sizes) and a broken one.
    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / "b.png")
    (folder / "c.png").write_bytes(b"not an image")
    pr = cli("predict", str(run), str(folder), "--out", "preds.csv")
    assert pr.code == 0, pr.err
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert [p.rsplit("/", 1)[-1] for p in preds["id"]] == ["a.png", "b.png"]
    assert np.allclose(preds.filter(like="p_").sum(axis=1), 1, atol=1e-4)
    assert _json(tmp_path / pr.out.strip() / "metrics.json")["skipped_images"][0].endswith(
        "c.png")
    # hidden folders (e.g. .ipynb_checkpoints) are not searched
    (folder / ".ipynb_checkpoints").mkdir()
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(
        folder / ".ipynb_checkpoints" / "a-checkpoint.png")
    pr = cli("predict", str(run), str(folder), "--out", "preds2.csv")
    assert pr.code == 0 and len(pd.read_csv(tmp_path / "preds2.csv")) == 2
    # one image file; a CSV of paths keeps the ids as written
    pr = cli("predict", str(run), str(folder / "b.png"), "--out", "one.csv")
    assert pr.code == 0, pr.err
    assert len(pd.read_csv(tmp_path / "one.csv")) == 1
    pd.DataFrame({"path": ["b.png", "a.png"]}).to_csv(folder / "list.csv", index=False)
    pr = cli("predict", str(run), str(folder / "list.csv"), "--out", "listed.csv")
    assert pr.code == 0, pr.err
    assert pd.read_csv(tmp_path / "listed.csv")["id"].tolist() == ["b.png", "a.png"]
    # bad inputs: a missing path, an empty path cell
    pr = cli("predict", str(run), str(folder / "nothere"))
    assert pr.code == 2 and "not found" in pr.err
    pd.DataFrame({"path": ["b.png", None]}).to_csv(folder / "holes.csv", index=False)
    pr = cli("predict", str(run), str(folder / "holes.csv"))
    assert pr.code == 2 and "row 3: empty image path in column 'path'" in pr.err


def test_multilabel_mosaics_train_sigmoid_heads_with_per_label_thresholds(cli, write_config,
                                                                          tmp_path):
    cfg = {"seed": 0, "name": "mosaic",
           "target": {"kind": "builtin", "name": "mnist_mosaic", "options": {"n": 400},
                      "split": {"val": 0.25, "test": 0.25, "stratify": False}},
           "model": {"backbone": "small_cnn", "head": "multilabel",
                     "backbone_args": {"hidden": 32}},
           "train": {"epochs": 2, "batch_size": 64, "lr": 0.003},
           "decision": {"rule": "threshold", "optimize": "f1"}}
    res = cli("freeze-finetune", write_config("mosaic", base=cfg))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    m = _json(run / "metrics.json")
    assert m["multilabel"] and m["classes"] == ["0", "1", "2"]
    test = m["test"]
    for key in ("map", "micro_f1", "macro_f1", "exact_match", "hamming_loss"):
        assert test[key] is not None
    assert test["rows_without_label"] > 0  # "no label" is a real outcome
    thr = _json(run / "thresholds.json")
    assert thr["chosen_on"] == "validation" and len(thr["per_label"]) == 3
    assert [test["per_label"][c]["threshold"] for c in m["classes"]] == thr["per_label"]
    ev = cli("evaluate", str(run))
    assert ev.code == 0, ev.err
    rows = pd.read_csv(tmp_path / ev.out.strip() / "test_predictions.csv", keep_default_na=False)
    assert len(rows) == 100 and set(rows.columns) >= {"p_0", "p_1", "p_2", "prediction"}
    # evaluate ran only the head, on the backbone features the training run stored; the same
    # metrics as training's and as a forward pass (--recompute)
    ev_m = _json(tmp_path / ev.out.strip() / "metrics.json")
    assert ev_m["backbone"] == ["stored features"]
    assert ev_m["test"]["map"] == pytest.approx(test["map"], abs=1e-12)
    re = cli("evaluate", str(run), "--recompute")
    assert re.code == 0, re.err
    re_m = _json(tmp_path / re.out.strip() / "metrics.json")
    assert re_m["backbone"] == ["forward pass"]
    assert re_m["test"]["map"] == pytest.approx(test["map"], abs=1e-6)
    index = _json(run / "features" / "index.json")
    assert sorted(e["file"] for e in index.values()) == ["test.pt", "val.pt"]
    # a stored file that is not the one written (zeroed, or cut to another width) is never
    # used: the backbone runs and the scores are the run's own
    feats = torch.load(run / "features" / "test.pt", weights_only=True)
    for damaged in (torch.zeros_like(feats), feats[:, :5].clone()):
        torch.save(damaged, run / "features" / "test.pt")
        ev = cli("evaluate", str(run))
        assert ev.code == 0, ev.err
        m = _json(tmp_path / ev.out.strip() / "metrics.json")
        assert m["backbone"] == ["forward pass", "stored features"]  # val stored, test not
        assert m["test"]["map"] == pytest.approx(test["map"], abs=1e-6)


def test_image_config_errors(cli, write_config):
    res = cli("pretrain", write_config("e1", base=dict(IMG, model={"backbone": "mlp"})))
    assert res.code == 2 and "source: holds images but backbone 'mlp' takes tabular" in res.err
    res = cli("pretrain", write_config("e2", {"model": {"head": "multilabel"}}, base=IMG))
    assert res.code == 2 and "model.head: 'multilabel' needs multi-label data" in res.err
    res = cli("pretrain", write_config("e3", {"source": {"name": "mnist6k"}}, base=IMG))
    assert res.code == 2 and "unknown built-in data set 'mnist6k'; did you mean 'mnist5k'?" \
        in res.err


def test_backbones_command_lists_blocks(cli):
    res = cli("backbones", "--name", "resnet18")
    assert res.code == 0, res.err
    assert "stem" in res.out and "layer4" in res.out and "IMAGENET1K_V1" in res.out


def _image_folder(root, n_per_class=12, size=32):
    rng = np.random.default_rng(1)
    for c, shade in (("dark", 60), ("light", 190)):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = np.clip(rng.normal(shade, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_local_torchvision_weights_file_and_another_architecture(cli, write_config, tmp_path):
    import torchvision

    _image_folder(tmp_path / "imgs")
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    cfg = {"seed": 0, "name": "folder",
           "target": {"kind": "image_folder", "path": str(tmp_path / "imgs"), "image_size": 32},
           "model": {"backbone": "resnet18", "weights": str(tmp_path / "r18.pth"),
                     "frozen_layers": 4},
           "train": {"epochs": 1, "batch_size": 8}}
    res = cli("freeze-finetune", write_config("r18", base=cfg))
    assert res.code == 0, res.err
    saved = torch.load(tmp_path / res.out.strip() / "checkpoints/best.pt", weights_only=True)
    original = torch.load(tmp_path / "r18.pth", weights_only=True)
    assert torch.equal(saved["state_dict"]["backbone.blocks.1.0.conv1.weight"],
                       original["layer1.0.conv1.weight"])
    bad = cli("freeze-finetune", write_config("r34", {"model": {"weights": str(
        tmp_path / "r34.pth")}}, base=cfg))
    assert bad.code == 2 and "tensors this architecture lacks: layer1.2." in bad.err


def test_lazy_decoding_gives_the_same_model_as_decoding_once(cli, write_config, tmp_path):
    _image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dark" / "broken.png").write_bytes(b"no image")
    cfg = {"seed": 0, "name": "lazy",
           "target": {"kind": "image_folder", "path": str(tmp_path / "imgs"), "image_size": 28,
                      "on_bad_image": "skip"},
           "model": {"backbone": "small_cnn", "backbone_args": {"hidden": 16},
                     "frozen_layers": 1},
           "train": {"epochs": 2, "batch_size": 8}}
    eager = cli("freeze-finetune", write_config("eager", base=cfg))
    lazy = cli("freeze-finetune", write_config("lazy", {"target": {
        "decode_once_max_gb": 1e-9}}, base=cfg))
    assert eager.code == 0 and lazy.code == 0, (eager.err, lazy.err)
    me = _json(tmp_path / eager.out.strip() / "metrics.json")
    ml = _json(tmp_path / lazy.out.strip() / "metrics.json")
    assert me["test"] == ml["test"] and me["val"] == ml["val"]
    assert any("decoded batch by batch" in n for n in ml["data"]["notes"])
    assert any("broken.png" in n for n in ml["data"]["notes"])  # skipped and counted


def test_adapted_transfer_caches_every_domain_behind_frozen_blocks(mnist_run, cli,
                                                                   write_config, tmp_path):
    """freeze-finetune + adapt on images: MNIST rows trained alongside the digits, the
    unlabelled digits pool aligned, the frozen convolutions computed once for all three."""
    cfg = write_config("digits-da", {"model": {"weights": str(mnist_run), "frozen_layers": 2},
                                     "adapt": {"method": "mmd"}}, base=IMG)
    res = cli("freeze-finetune", cfg)
    assert res.code == 0, res.err
    m = _json(tmp_path / res.out.strip() / "metrics.json")
    assert m["cache"][0]["cached_blocks"] == 2 and m["freeze_check"]["unchanged"]
    # digits: 1797 images, 40% test, 20% val; the rest is the pool (100 labelled among them)
    assert m["adapt"]["target_rows_aligned"] == 1797 - 719 - 360
    assert m["adapt"]["source_rows"] == 600


def test_image_size_the_backbone_cannot_take_is_a_config_error(cli, write_config, tmp_path):
    cfg = write_config("tiny", {"source": {"image_size": 2}, "train": {"epochs": 1}}, base=IMG)
    res = cli("pretrain", cfg)
    assert res.code == 2 and "Traceback" not in res.err
    assert "source.image_size: backbone 'small_cnn' cannot take 2x2 images" in res.err
    assert not (tmp_path / "runs").exists()


def test_stored_features_key_changes_with_rows_weights_preparation_and_precision():
    from tltool import features
    from tltool.data.images.prepare import make_prepare
    from tltool.models import HeadSettings, build_model, model_spec
    from tltool.runtime import Runtime
    from tltool.tensors import Tensors

    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    data = Tensors(x, torch.zeros(6, dtype=torch.long), prepare=make_prepare(28, [0.5], [0.5], 1))
    model = build_model(model_spec("small_cnn", {"hidden": 8}, 1, HeadSettings("linear", 0, 0.0),
                                   3))
    rt = Runtime()
    k = features.key(model, data, rt)
    assert features.usable(model, data) and features.key(model, data, rt) == k
    x2 = x.clone()
    x2[3, 0, 5, 5] ^= 1  # one pixel
    assert features.key(model, Tensors(x2, data.y, prepare=data.prepare), rt) != k
    other = Tensors(x, data.y, prepare=make_prepare(28, [0.4], [0.5], 1))
    assert features.key(model, other, rt) != k
    with torch.no_grad():
        model.backbone.blocks[0][0].weight[0, 0, 0, 0] += 1e-3
    assert features.key(model, data, rt) != k
    assert features.key(model, data, Runtime(dtype=torch.bfloat16)) != features.key(model, data, rt)
    # the head's answer from the stored features is the forward pass's
    from tltool.engine.predict import predict_proba
    p, how = features.predict(model, data, rt, features.Pass(False, 4))
    assert how == "forward pass"
    assert np.allclose(p, predict_proba(model, data, False, 4, rt), atol=1e-6)


def test_symlinked_images_keep_one_class(cli, write_config, tmp_path):
    """A link to an image of the same class is read once; a link into another class folder,
    or back up to the top folder, would give one image two classes and is refused."""
    img = tmp_path / "img"
    for c in ("a", "b"):
        (img / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), i * 40 + (c == "b") * 9, np.uint8)).save(
                img / c / f"{i}.png")
    (img / "a" / "again.png").symlink_to(img / "a" / "0.png")
    config = write_config("links", base={
        "source": {"kind": "image_folder", "path": str(img), "decode_cache": False,
                   "image_size": 8, "split": {"val": 0.34, "test": 0.34, "stratify": False}},
        "model": {"backbone": "pixels", "backbone_args": {}}, "train": {"epochs": 1},
        "decision": {"rule": "argmax"}})
    res = cli("pretrain", config)
    assert res.code == 0, res.err
    data = _json(tmp_path / res.out.strip() / "metrics.json")["data"]
    assert sum(data["rows"].values()) == 6 and any("used once" in n for n in data["notes"])
    (img / "b" / "x.png").symlink_to(img / "a" / "1.png")
    res = cli("pretrain", config)
    assert res.code == 2 and "an image needs one class" in res.err
    (img / "b" / "x.png").unlink()
    (img / "a" / "loop").symlink_to(img)  # a link back to the top folder
    res = cli("pretrain", config)
    assert res.code == 2 and "an image needs one class" in res.err
