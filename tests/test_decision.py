"""The typed decision rule: one object knows every rule kind; damaged ones are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tltool.decision import DamagedDecision, Decision

P = np.array([[0.7, 0.3], [0.4, 0.6], [0.55, 0.45]])


def test_rule_kinds():
    arg = Decision.from_dict({"rule": "argmax", "threshold": None}, ["good", "bad"])
    thr = Decision.from_dict({"rule": "threshold", "threshold": 0.4, "positive": "bad"},
                             ["good", "bad"])
    assert arg.decide(P).tolist() == [0, 1, 0] and thr.decide(P).tolist() == [0, 1, 1]
    assert thr.threshold == 0.4 and not thr.multilabel and not thr.regression
    ml = Decision.from_dict({"rule": "threshold", "threshold": None, "per_label": [0.5, 0.35]},
                            ["a", "b"])
    assert ml.multilabel and ml.threshold is None
    assert ml.decide(P).tolist() == [[1, 0], [0, 1], [1, 1]]
    reg = Decision.from_dict({"rule": "regression", "threshold": None}, ["amount"])
    assert reg.regression and reg.decide(np.array([[2.5], [3.0]])).tolist() == [2.5, 3.0]
    frame = thr.frame(["a", "b", "c"], P, np.array([0, 1, 0]))
    assert frame["prediction"].tolist() == ["good", "bad", "bad"]
    assert frame["label"].tolist() == ["good", "bad", "good"]
    assert thr.to_dict() == {"rule": "threshold", "positive": "bad", "threshold": 0.4,
                             "optimize": None, "validation_score": None, "chosen_on": None}
    assert Decision.from_dict(thr.to_dict(), ["good", "bad"]) == thr


def test_calibration_is_applied_before_the_rule():
    cal = {"method": "temperature", "temperature": 0.5}
    d = Decision.from_dict({"rule": "threshold", "threshold": 0.5, "calibration": cal}, ["x", "y"])
    sharp = d.calibrated(P)
    assert sharp[0, 0] > P[0, 0] and np.allclose(sharp.sum(1), 1)
    assert d.frame(["a", "b", "c"], P)["p_x"].iloc[0] == pytest.approx(
        round(sharp[0, 0], 6))


@pytest.mark.parametrize("bad", [
    None, [], "threshold", {"rule": "threshold"}, {"rule": "threshold", "threshold": "0.5"},
    {"rule": "threshold", "threshold": float("nan")}, {"per_label": [0.5, "x"]},
    {"per_label": 0.5}, {"rule": "argmax", "threshold": None,
                         "calibration": {"method": "temperature", "temperature": -1}},
    {"per_label": [0.5, 0.5], "calibration": {"method": "temperature", "temperature": [1.0]}}])
def test_damaged_rules_are_refused(bad):
    with pytest.raises(DamagedDecision):
        Decision.from_dict(bad, ["a", "b"])


def test_a_thresholds_file_that_does_not_fit_the_model_is_refused(cli, pretrained):
    for rule, message in (
            ({"rule": "threshold", "threshold": 5, "positive": "bad"}, "not a probability"),
            ({"rule": "regression"}, "a regression rule for a single-label model"),
            ({"rule": "threshold", "threshold": None, "per_label": [0.5, 0.5]},
             "multi-label rule")):
        (pretrained / "thresholds.json").write_text(json.dumps(rule))
        res = cli("evaluate", str(pretrained))
        assert res.code == 2 and message in res.err, rule


# -- each rule through the commands: the run's saved rule is the one its answers follow

RAW_LOGISTIC = {"backbone": "raw", "backbone_args": {}, "weights": "none",
                "head": "logistic_regression"}


def _run(cli, tmp_path, *args) -> Path:
    res = cli(*args)
    assert res.code == 0, res.err
    return tmp_path / res.out.strip()


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _test_predictions(cli, tmp_path, run: Path) -> pd.DataFrame:
    return pd.read_csv(_run(cli, tmp_path, "evaluate", str(run)) / "test_predictions.csv",
                       keep_default_na=False)


def test_a_threshold_chosen_on_validation_rows_beats_the_usual_half(cli, write_config,
                                                                   tmp_path):
    """About a third of the part-time applicants are bad: the F1 threshold is not 0.5, scores
    better than 0.5 (argmax, same model) on the validation rows, and decides every answer."""
    runs = {rule: _run(cli, tmp_path, "freeze-finetune", write_config(rule, {
        "model": RAW_LOGISTIC, "decision": {"rule": rule, "optimize": "f1"}}))
        for rule in ("threshold", "argmax")}
    thr = _json(runs["threshold"] / "thresholds.json")
    assert thr["rule"] == "threshold" and thr["chosen_on"] == "validation"
    assert thr["threshold"] != 0.5
    val = {rule: _json(run / "metrics.json")["val"] for rule, run in runs.items()}
    assert val["threshold"]["f1"] == pytest.approx(thr["validation_score"], abs=1e-12)
    assert val["threshold"]["f1"] > val["argmax"]["f1"]
    preds = _test_predictions(cli, tmp_path, runs["threshold"])
    assert (preds["prediction"] == np.where(preds["p_bad"] >= thr["threshold"], "bad",
                                            "good")).all()
    between = preds["p_bad"].between(*sorted((thr["threshold"], 0.5)))
    assert between.any()  # rows the threshold decides otherwise than argmax would


def test_argmax_answers_the_most_probable_of_several_classes(cli, write_config, tmp_path):
    run = _run(cli, tmp_path, "freeze-finetune", write_config("home", {
        "target": {"label": "Home", "n_train": None}, "decision": {"rule": "argmax"},
        "model": RAW_LOGISTIC}))
    classes = _json(run / "metrics.json")["classes"]
    assert len(classes) > 2
    preds = _test_predictions(cli, tmp_path, run)
    proba = preds[[f"p_{c}" for c in classes]].to_numpy()
    assert (preds["prediction"] == np.asarray(classes)[proba.argmax(1)]).all()
    assert preds["prediction"].nunique() > 1
    test = _json(run / "metrics.json")["test"]
    assert test["accuracy"] == pytest.approx((preds["prediction"] == preds["label"]).mean())


def _multilabel_images(folder: Path, n: int = 240) -> Path:
    """8x8 images with labels a (common) and b (rare), each read from its own image region."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir()
    rows = []
    for i in range(n):
        s = rng.normal(size=2)
        on = (s[0] + rng.normal(scale=0.8) > 0, s[1] + rng.normal(scale=0.8) > 1.2)
        pixels = 128 + 40 * rng.normal(size=(8, 8))
        pixels[:, :4] += 30 * s[0]
        pixels[:4, 4:] += 30 * s[1]
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
        rows.append((f"{i}.png", "|".join(c for c, yes in zip("ab", on, strict=True) if yes)))
    path = folder / "labels.csv"
    pd.DataFrame(rows, columns=["path", "y"]).to_csv(path, index=False)
    return path


def test_multilabel_thresholds_are_chosen_per_label_and_decide_each_label(cli, write_config,
                                                                         tmp_path):
    labels = _multilabel_images(tmp_path / "img")
    base = {"seed": 0,
            "target": {"kind": "image_csv", "path": str(labels), "label": "y",
                       "label_sep": "|", "image_size": 8,
                       "split": {"val": 0.3, "test": 0.3, "stratify": False}},
            "model": {"backbone": "pixels", "backbone_args": {}, "head": "multilabel"},
            "train": {"epochs": 3, "batch_size": 64, "lr": 0.01}}
    runs = {rule: _run(cli, tmp_path, "freeze-finetune", write_config(rule, {
        "decision": {"rule": rule, "optimize": "f1"}}, base=base))
        for rule in ("threshold", "argmax")}
    thr = _json(runs["threshold"] / "thresholds.json")
    assert thr["chosen_on"] == "validation" and len(thr["per_label"]) == 2
    assert _json(runs["argmax"] / "thresholds.json")["per_label"] == [0.5, 0.5]
    assert any(t != 0.5 for t in thr["per_label"])
    val = {rule: _json(run / "metrics.json")["val"]["per_label"] for rule, run in runs.items()}
    for label, t, score in zip("ab", thr["per_label"], thr["validation_score"], strict=True):
        assert val["threshold"][label]["threshold"] == t
        assert val["threshold"][label]["f1"] == pytest.approx(score, abs=1e-12)
        if t != 0.5:  # a threshold other than 0.5 is chosen only when it scores better
            assert val["threshold"][label]["f1"] > val["argmax"][label]["f1"], label
    preds = _test_predictions(cli, tmp_path, runs["threshold"])
    for label, t in zip("ab", thr["per_label"], strict=True):
        on = preds["prediction"].str.split("|").apply(lambda names, c=label: c in names)
        assert (on == (preds[f"p_{label}"] >= t)).all(), label
    assert any(preds[f"p_{label}"].between(*sorted((t, 0.5))).any()
               for label, t in zip("ab", thr["per_label"], strict=True))
