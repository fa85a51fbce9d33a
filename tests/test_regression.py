"""task: regression — a numeric label, predicted in its own units, through every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BASE, merge

from tltool.config import DataConfig
from tltool.data.tabular import load_tabular
from tltool.datasets import load_table

NEW_ROWS = Path(__file__).resolve().parents[1] / "configs" / "credit" / "new_applicants.csv"
REGRESSION = {"label": "Amount", "task": "regression", "drop": ["Status"]}
RBASE = merge({k: v for k, v in BASE.items() if k != "decision"},
              {"source": REGRESSION, "target": REGRESSION, "train": {"epochs": 6}})


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def amount_source(cli, write_config, tmp_path) -> Path:
    res = cli("pretrain", write_config("amount-src", base=RBASE))
    assert res.code == 0, res.err
    return tmp_path / res.out.strip()


def test_split_keeps_the_label_distribution_and_values():
    cfg = DataConfig(kind="builtin", name="credit_data", **REGRESSION)
    data = load_tabular(cfg)
    assert data.classes == ["Amount"] and data.task == "regression"
    assert data.train.y.dtype == np.float64
    frame = load_table("credit_data")
    # labels are the rows' own amounts, not class indices
    rows = data.test.frame.index
    assert np.array_equal(data.test.y, frame.loc[rows, "Amount"].to_numpy(float))
    # quintile stratification: each split's median within 5% of the whole column's
    whole = np.median(frame["Amount"])
    for split in (data.train, data.val, data.test):
        assert abs(np.median(split.y) - whole) / whole < 0.05


def test_pretrain_finetune_evaluate_predict(amount_source, cli, write_config, tmp_path):
    m = _read(amount_source / "metrics.json")
    assert m["decision"]["rule"] == "regression" and m["classes"] == ["Amount"]
    assert {"rmse", "mae", "r2", "bias"} <= set(m["test"])
    assert (amount_source / "plots" / "predicted_vs_true_test.png").is_file()
    cfg = write_config("amount-ft", {"model": {"weights": str(amount_source),
                                               "backbone_args": {}, "frozen_layers": 1}},
                       base=RBASE)
    res = cli("freeze-finetune", cfg)
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    metrics = _read(run / "metrics.json")
    ev = cli("evaluate", str(run))
    assert ev.code == 0, ev.err
    out = tmp_path / ev.out.strip()
    preds = pd.read_csv(out / "test_predictions.csv")
    assert list(preds.columns) == ["id", "prediction", "label", "error"]
    # the reported errors are those of the saved predictions, in the label's units
    err = preds["prediction"] - preds["label"]
    again = _read(out / "metrics.json")["test"]
    assert again["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-5)
    assert again["rmse"] == pytest.approx(metrics["test"]["rmse"], rel=1e-6)
    ss = ((preds["label"] - preds["label"].mean()) ** 2).sum()
    assert again["r2"] == pytest.approx(1 - (err ** 2).sum() / ss, rel=1e-5)
    # predictions are amounts, not standardised values
    assert 200 < preds["prediction"].mean() < 3000
    pred = cli("predict", str(run), str(NEW_ROWS), "--out", "amounts.csv")
    assert pred.code == 0, pred.err
    new = pd.read_csv(tmp_path / "amounts.csv")
    assert len(new) == len(pd.read_csv(NEW_ROWS)) and set(new.columns) == {"id", "prediction"}
    assert "rows predicted: mean" in pred.err


def test_extract_fits_regressors(amount_source, cli, write_config, tmp_path):
    cfg = write_config("amount-ex", {"model": {"weights": str(amount_source),
                                               "backbone_args": {}}}, base=RBASE)
    res = cli("extract", cfg)
    assert res.code == 0, res.err
    heads = _read(tmp_path / res.out.strip() / "metrics.json")["heads"]
    assert set(heads) == {"ridge", "random_forest", "svm"}
    assert all(h["test"]["n"] == 181 and h["test"]["rmse"] > 0 for h in heads.values())


def test_ensemble_averages_predicted_values(amount_source, cli, write_config, tmp_path):
    runs = []
    for seed in (0, 1):
        res = cli("freeze-finetune", write_config(f"amount-ft{seed}", {
            "name": "amount-ft", "seed": seed,
            "model": {"weights": str(amount_source), "backbone_args": {}}}, base=RBASE))
        assert res.code == 0, res.err
        runs.append(tmp_path / res.out.strip())
    res = cli("ensemble", *map(str, runs))
    assert res.code == 0, res.err
    ens = pd.read_csv(tmp_path / res.out.strip() / "test_predictions.csv")
    own = [pd.read_csv(tmp_path / cli("evaluate", str(r)).out.strip() / "test_predictions.csv")
           for r in runs]
    mean = np.mean([o["prediction"].to_numpy() for o in own], axis=0)
    assert np.allclose(ens["prediction"], mean, atol=1e-3)


@pytest.mark.parametrize("changes, fragment", [
    ({"train": {"early_stopping": {"monitor": "val_auroc"}}},
     "'val_auroc' is a classification score; a regression run monitors val_loss"),
    ({"model": {"head": "multilabel"}}, "head: 'multilabel' predicts labels"),
    ({"decision": {"rule": "threshold"}}, "decision.rule: 'threshold' turns probabilities"),
    ({"source": {"positive": 500}}, "'positive' applies to class labels"),
    ({"extract": {"heads": ["logistic_regression"]}},
     "extract.heads: ['logistic_regression'] cannot fit"),
])
def test_what_regression_refuses(changes, fragment, cli, write_config, request):
    command = "extract" if "extract" in changes else "pretrain"
    if command == "extract":  # needs a trained regression model (only this case trains one)
        source = request.getfixturevalue("amount_source")
        changes = merge(changes, {"model": {"weights": str(source), "backbone_args": {}}})
    res = cli(command, write_config("bad", changes, base=RBASE))
    assert res.code == 2 and "Traceback" not in res.err
    assert fragment in res.err, res.err


def test_text_in_a_numeric_label_names_the_row(cli, write_config, tmp_path):
    frame = load_table("credit_data").astype({"Amount": object})
    frame.loc[frame.index[frame.Job == "fixed"][3], "Amount"] = "a lot"
    frame.to_csv(tmp_path / "c.csv", index=False)
    res = cli("pretrain", write_config("bad", {"source": {
        "kind": "csv", "path": str(tmp_path / "c.csv"), "name": None}}, base=RBASE))
    assert res.code == 2
    assert "task regression needs a finite number in label 'Amount'" in res.err
    row = frame.index[frame.Job == "fixed"][3] + 2  # the file's line, as for feature errors
    assert f"row {row} holds 'a lot'" in res.err


def test_labels_far_from_zero_keep_their_digits(cli, write_config, tmp_path):
    """Standardising and un-standardising happen in float64: 1e9 + 75 stays 1e9 + 75."""
    frame = load_table("credit_data")
    frame["Amount"] = frame["Amount"] + 1_000_000_000
    frame.insert(0, "loan", [f"{i:05d}" for i in range(len(frame))])
    frame.to_csv(tmp_path / "big.csv", index=False)
    section = {"kind": "csv", "path": str(tmp_path / "big.csv"), "name": None,
               "id_column": "loan"}
    res = cli("pretrain", write_config("big", {"source": section}, base=RBASE))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    ev = cli("evaluate", str(run))
    out = tmp_path / ev.out.strip()
    preds = pd.read_csv(out / "test_predictions.csv", dtype={"id": str})
    truth = frame.set_index("loan").loc[preds["id"], "Amount"].to_numpy()
    assert np.array_equal(preds["label"].to_numpy(), truth)
    assert len(np.unique(np.diff(np.sort(preds["prediction"])) % 64)) > 1  # not float32 steps
    test = _read(out / "metrics.json")["test"]
    err = preds["prediction"].to_numpy() - truth
    assert test["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-6)
    # evaluate --csv keeps the run's id column, and a CSV of one row (constant label) scores
    frame.iloc[:1].to_csv(tmp_path / "one.csv", index=False)
    ev = cli("evaluate", str(run), "--csv", str(tmp_path / "one.csv"))
    assert ev.code == 0, ev.err
    one = pd.read_csv(tmp_path / ev.out.strip() / "test_predictions.csv", dtype={"id": str})
    assert one["id"].tolist() == ["00000"]
    assert _read(tmp_path / ev.out.strip() / "metrics.json")["test"]["r2"] is None


def test_regression_on_images_and_label_misuse_are_refused(cli, write_config):
    img = {"source": {"kind": "builtin", "name": "digits", "task": "regression",
                      "label": None, "drop": []},
           "model": {"backbone": "small_cnn", "backbone_args": {"hidden": 8}}}
    res = cli("pretrain", write_config("img", img, base=RBASE))
    assert res.code == 2 and "'regression' is supported for tables" in res.err
    res = cli("pretrain", write_config("cat", {"source": {"categorical": ["Amount"]}},
                                       base=RBASE))
    assert res.code == 2 and "the label 'Amount' is also listed as categorical" in res.err


def test_a_ridge_head_predicts_amounts_better_than_their_mean(cli, write_config, tmp_path):
    """The classic ridge head on the raw columns (the price asked explains much of the amount
    lent): well above R² 0, the score of answering every row with the mean amount."""
    res = cli("freeze-finetune", write_config("ridge", {"model": {
        "backbone": "raw", "backbone_args": {}, "weights": "none", "head": "ridge"}},
        base=RBASE))
    assert res.code == 0, res.err
    m = _read(tmp_path / res.out.strip() / "metrics.json")
    assert m["route"]["head"] == "ridge" and m["decision"]["rule"] == "regression"
    assert m["test"]["r2"] > 0.5
