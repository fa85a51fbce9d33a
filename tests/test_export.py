"""tltool export: ONNX (checked with onnxruntime) and TorchScript models that reproduce tltool
predict from the raw input tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tltool import calibration

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["torchscript", pytest.param("onnx", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnxruntime") is None
    or __import__("importlib").util.find_spec("onnxscript") is None,
    reason="onnx export needs onnxruntime and onnxscript (pip install 'tltool[export]')"))]


def _json(p: Path):
    return json.loads(p.read_text())


def _exported(folder: Path, raw: np.ndarray) -> np.ndarray:
    report = _json(folder / "export.json")
    if report["format"] == "onnx":
        import onnxruntime as ort

        s = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        return s.run(None, {"input": raw})[0]
    return torch.jit.load(str(folder / "model.pt"))(torch.from_numpy(raw)).numpy()


@pytest.mark.parametrize("fmt", FORMATS)
def test_table_model_export_matches_predict(fmt, cli, write_config, pretrained, tmp_path):
    cfg = write_config("cal", {"model": {"weights": str(pretrained)},
                               "decision": {"rule": "threshold", "calibrate": "temperature"}})
    res = cli("freeze-finetune", cfg)
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    ex = cli("export", str(run), "--format", fmt, "--json")
    assert ex.code == 0, ex.err
    report = json.loads(ex.out)["export"]
    folder = Path(report["folder"])
    assert report["parity"]["passed"] and report["parity"]["rows"] == 100
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert report["output"]["columns"] == ["good", "bad"]
    assert "temperature-calibrated" in report["output"]["what"]
    # What a server does: encode rows with preprocessing.json's state, run the file alone.
    import pandas as pd

    from tltool.data.preprocess import TabularPreprocessor

    pre = TabularPreprocessor.from_state(_json(folder / "preprocessing.json"))
    rows = pd.read_csv(ROOT / "configs/credit/new_applicants.csv")
    x = pre.transform(rows, "new_applicants.csv").astype(np.float32)
    got = _exported(folder, x)
    pr = cli("predict", str(run), str(ROOT / "configs/credit/new_applicants.csv"), "--out", "-")
    assert pr.code == 0, pr.err
    want = pd.read_csv(__import__("io").StringIO(pr.out))[["p_good", "p_bad"]].to_numpy()
    assert np.abs(got - want).max() <= 1e-4  # predict rounds to 6 decimals
    decision = _json(folder / "decision.json")
    assert decision["calibration"]["method"] == "temperature"
    # a second export into the same folder is refused without --force, replaced with it
    again = cli("export", str(run), "--format", fmt)
    assert again.code == 2 and "--force" in again.err
    assert cli("export", str(run), "--format", fmt, "--force").code == 0


def test_image_model_export_takes_uint8_pixels(cli, write_config, tmp_path):
    from tests.test_image_workflows import IMG

    res = cli("freeze-finetune", write_config("dig", {"source": None, "train": {"epochs": 1}},
                                              base=IMG))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    ex = cli("export", str(run), "--format", "torchscript", "--out", "served")
    assert ex.code == 0, ex.err
    folder = tmp_path / "served"
    report = _json(folder / "export.json")
    assert report["input"]["dtype"] == "uint8" and report["input"]["shape"] == ["N", 1, 28, 28]
    assert not (folder / "preprocessing.json").exists()
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 1, 28, 28), dtype=np.uint8)
    out = _exported(folder, pixels)
    assert out.shape == (5, 10) and np.allclose(out.sum(axis=1), 1, atol=1e-5)


def test_regression_export_gives_values_in_label_units(cli, tmp_path):
    res = cli("freeze-finetune", str(ROOT / "configs/credit_amount/target_only.yaml"),
              "--set", "train.epochs=3", "--set", f"output.root={tmp_path / 'runs'}")
    assert res.code == 0, res.err
    ex = cli("export", res.out.strip(), "--format", "torchscript", "--json")
    assert ex.code == 0, ex.err
    report = json.loads(ex.out)["export"]
    assert report["output"]["what"] == "predicted value" and report["parity"]["passed"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradient_boosting_head_exports(fmt, cli, tmp_path):
    res = cli("freeze-finetune", str(ROOT / "configs/credit/target_only.yaml"),
              "--set", "model.backbone=raw", "--set", "model.backbone_args={}",
              "--set", "model.head=gradient_boosting",
              "--set", f"output.root={tmp_path / 'runs'}")
    assert res.code == 0, res.err
    ex = cli("export", res.out.strip(), "--format", fmt, "--json")
    assert ex.code == 0, ex.err
    assert json.loads(ex.out)["export"]["parity"]["passed"]


def test_export_refuses_bad_input(cli, write_config, tmp_path, pretrained):
    assert cli("export", str(pretrained), "--format", "tflite").code == 2
    missing = cli("export", str(tmp_path / "nope"), "--format", "onnx")
    assert missing.code == 2 and "error:" in missing.err
    (tmp_path / "taken").write_text("mine")
    taken = cli("export", str(pretrained), "--format", "torchscript", "--out", "taken",
                "--force")
    assert taken.code == 2 and (tmp_path / "taken").read_text() == "mine"
    assert cli("export", str(pretrained), "--format", "torchscript", "--out", "-").code == 2
    other = cli("pretrain", write_config("o", {"train": {"epochs": 1}}))
    inside = cli("export", str(pretrained), "--format", "torchscript", "--out",
                 str(tmp_path / other.out.strip() / "exp"))
    assert inside.code == 2 and "never changes another run's files" in inside.err


def test_scale_by_temperature_matches_softmax_of_scaled_logits():
    z = torch.randn(20, 3, dtype=torch.float64)
    p = torch.softmax(z, 1).numpy()
    assert np.allclose(calibration.scale(p, 2.5, False), torch.softmax(z / 2.5, 1).numpy())
