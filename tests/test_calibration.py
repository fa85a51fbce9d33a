"""Calibration: ECE, temperature scaling, and a run's saved temperature applied everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tltool import calibration


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_temperature_recovers_the_true_one():
    """Labels drawn from softmax(z / 2): the fit of the model softmax(z) finds T close to 2."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(20000, 4))
    truth = _softmax(z / 2.0)
    y = np.array([rng.choice(4, p=p) for p in truth])
    t = calibration.fit_temperature(_softmax(z), y, multilabel=False)
    assert abs(t - 2.0) < 0.1
    # and the fitted temperature never makes the log loss on its own rows worse
    before = calibration.log_loss(_softmax(z), y, False)
    after = calibration.log_loss(calibration.scale(_softmax(z), t, False), y, False)
    assert after <= before


def test_scaling_keeps_argmax_and_auroc_and_t1_is_identity():
    rng = np.random.default_rng(1)
    p = _softmax(rng.normal(0, 2, size=(500, 3)))
    for t in (0.3, 1.0, 4.0):
        q = calibration.scale(p, t, False)
        assert np.allclose(q.sum(axis=1), 1)
        assert (q.argmax(axis=1) == p.argmax(axis=1)).all()
    assert np.allclose(calibration.scale(p, 1.0, False), p, atol=1e-12)
    y = rng.integers(0, 2, 500)
    pb = _softmax(rng.normal(0, 2, size=(500, 2)))
    assert roc_auc_score(y, calibration.scale(pb, 3.0, False)[:, 1]) == pytest.approx(
        roc_auc_score(y, pb[:, 1]), abs=1e-12)


def test_multilabel_gets_one_temperature_per_label():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, size=(8000, 2))
    y = (rng.random((8000, 2)) < 1 / (1 + np.exp(-z / np.array([0.5, 3.0])))).astype(int)
    t = calibration.fit_temperature(1 / (1 + np.exp(-z)), y, multilabel=True)
    assert len(t) == 2 and abs(t[0] - 0.5) < 0.05 and abs(t[1] - 3.0) < 0.3


def test_ece_by_hand():
    # 4 rows, top probabilities 0.9, 0.9 (bin 14) and 0.6, 0.6 (bin 9) with 15 bins;
    # accuracy 1/2 in each bin: ECE = 0.5 * |0.9 - 0.5| + 0.5 * |0.6 - 0.5| = 0.25
    p = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 0, 0, 0])
    assert calibration.ece(y, p) == pytest.approx(0.25)
    assert calibration.ece(np.array([0, 0]), np.array([[1.0, 0.0], [1.0, 0.0]])) == 0.0


def test_saved_calibration_is_checked():
    assert calibration.valid(None, None)
    assert calibration.valid({"method": "temperature", "temperature": 1.5}, None)
    assert calibration.valid({"method": "temperature", "temperature": [1.0, 2.0]}, 2)
    for bad in ({"method": "platt", "temperature": 1.0},
                {"method": "temperature", "temperature": 0},
                {"method": "temperature", "temperature": float("nan")},
                {"method": "temperature", "temperature": "2"},
                {"method": "temperature", "temperature": [1.0]}):
        assert not calibration.valid(bad, 2), bad


def _json(p: Path):
    return json.loads(p.read_text())


def test_a_run_saves_its_temperature_and_every_command_applies_it(cli, write_config, pretrained,
                                                                  tmp_path):
    cfg = write_config("cal", {"model": {"weights": str(pretrained)},
                               "decision": {"rule": "threshold", "calibrate": "temperature"}})
    res = cli("freeze-finetune", cfg)
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    decision = _json(run / "thresholds.json")
    cal = decision["calibration"]
    assert cal["method"] == "temperature" and cal["fitted_on"] == "validation"
    assert cal["log_loss"]["after"] <= cal["log_loss"]["before"] + 1e-9
    metrics = _json(run / "metrics.json")
    for name in ("roc_pr.png", "reliability.png"):
        assert (run / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    # evaluate scores the test split with the same calibrated probabilities
    ev = cli("evaluate", str(run))
    assert ev.code == 0, ev.err
    evm = _json(tmp_path / ev.out.strip() / "metrics.json")["test"]
    for key in ("accuracy", "log_loss", "ece", "brier", "auroc"):
        assert evm[key] == pytest.approx(metrics["test"][key], abs=1e-9), key
    # predict writes calibrated probabilities: those of evaluate's test_predictions.csv
    tp = pd.read_csv(tmp_path / ev.out.strip() / "test_predictions.csv")
    assert (tp["prediction"] == tp["label"]).mean() == pytest.approx(evm["accuracy"])
    # a damaged temperature is refused before anything is scored
    decision["calibration"]["temperature"] = -1
    (run / "thresholds.json").write_text(json.dumps(decision))
    bad = cli("evaluate", str(run))
    assert bad.code == 2 and "damaged calibration" in bad.err


def test_calibration_changes_probabilities_not_ranking(cli, write_config, pretrained, tmp_path):
    plain = cli("freeze-finetune", write_config("p0", {"model": {"weights": str(pretrained)}}))
    cal = cli("freeze-finetune", write_config("p1", {"model": {"weights": str(pretrained)},
                                                     "decision": {"calibrate": "temperature"}}))
    assert plain.code == cal.code == 0
    a = _json(tmp_path / plain.out.strip() / "metrics.json")["test"]
    b = _json(tmp_path / cal.out.strip() / "metrics.json")["test"]
    assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-9)
    assert a["accuracy"] == b["accuracy"]  # argmax rule: the same decisions
    assert "ece" in a and a["ece"] is not None


def test_temperature_scaling_lowers_the_validation_log_loss_and_rescales_every_answer(
        cli, write_config, tmp_path):
    """An over-confident model (logistic regression, almost unpenalised, on 100 rows): the
    fitted temperature softens it, lowers the validation log loss, and evaluate answers with
    the rescaled probabilities of the very same model."""
    head = {"backbone": "raw", "backbone_args": {}, "weights": "none",
            "head": "logistic_regression", "head_args": {"C": 100.0}}
    runs = {}
    for calibrate in ("none", "temperature"):
        res = cli("freeze-finetune", write_config(calibrate, {
            "model": head, "decision": {"rule": "argmax", "calibrate": calibrate}}))
        assert res.code == 0, res.err
        runs[calibrate] = tmp_path / res.out.strip()
    cal = _json(runs["temperature"] / "thresholds.json")["calibration"]
    assert cal["temperature"] > 1.2  # softened
    assert cal["log_loss"]["after"] < cal["log_loss"]["before"] - 0.01
    val = {k: _json(run / "metrics.json")["val"] for k, run in runs.items()}
    assert val["none"]["log_loss"] == pytest.approx(cal["log_loss"]["before"], abs=1e-6)
    assert val["temperature"]["log_loss"] == pytest.approx(cal["log_loss"]["after"], abs=1e-6)
    preds = {}
    for k, run in runs.items():
        ev = cli("evaluate", str(run))
        assert ev.code == 0, ev.err
        preds[k] = pd.read_csv(tmp_path / ev.out.strip() / "test_predictions.csv")
    plain = preds["none"][["p_good", "p_bad"]].to_numpy()
    scaled = calibration.scale(plain, cal["temperature"], False)
    got = preds["temperature"][["p_good", "p_bad"]].to_numpy()
    # (the CSV files hold 6 decimals: rescaling rounded probabilities is exact to ~1e-4)
    assert np.abs(got - scaled).max() < 1e-3 and np.abs(got - plain).max() > 0.05
