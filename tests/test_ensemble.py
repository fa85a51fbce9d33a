"""`tltool ensemble`: averaged probabilities, a threshold on validation rows, predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

NEW_ROWS = Path(__file__).resolve().parents[1] / "configs" / "credit" / "new_applicants.csv"


@pytest.fixture
def members(pretrained, cli, write_config, tmp_path) -> list[Path]:
    runs = []
    for seed in (0, 1, 2):
        cfg = write_config(f"ft{seed}", {"name": "ft", "seed": seed,
                                         "target": {"n_val": 40},
                                         "model": {"backbone_args": {},
                                                   "weights": str(pretrained),
                                                   "frozen_layers": 1}})
        res = cli("freeze-finetune", cfg)
        assert res.code == 0, res.err
        runs.append(tmp_path / res.out.strip())
    return runs


def test_ensemble_averages_members_and_chooses_the_threshold_on_validation(
        members, cli, tmp_path):
    res = cli("ensemble", *map(str, members), "--name", "avg")
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    assert run.parent.name == "avg" and run.name.endswith("-ensemble")
    m = json.loads((run / "metrics.json").read_text())
    assert m["decision"]["rule"] == "threshold" and m["decision"]["chosen_on"] == "validation"
    assert m["decision"]["averaged"] == 3
    # the members' 40 validation rows: the same rows for every seed (sample_seed not set)
    assert m["val_rows"] == 40 and m["val"]["n"] == m["val_rows"]
    assert m["labelled_rows_seen"] == 140 and m["labelled_rows_per_member"] == [140] * 3
    assert m["test"]["n"] == 181 and len(m["members_test"]) == 3
    # the averaged probability is the mean of the members' own test probabilities
    ens = pd.read_csv(run / "test_predictions.csv")
    own = []
    for member in members:
        ev = cli("evaluate", str(member))
        assert ev.code == 0, ev.err
        own.append(pd.read_csv(tmp_path / ev.out.strip() / "test_predictions.csv"))
    assert all((o["id"].astype(str) == ens["id"].astype(str)).all() for o in own)
    mean = np.mean([o["p_bad"].to_numpy() for o in own], axis=0)
    assert np.allclose(ens["p_bad"], mean, atol=2e-6)
    decided = np.where(ens["p_bad"] >= m["decision"]["threshold"], "bad", "good")
    assert (decided == ens["prediction"]).all()
    # predict with the ensemble: members' probabilities averaged on new rows
    pred = cli("predict", str(run), str(NEW_ROWS))
    assert pred.code == 0, pred.err
    summary = json.loads((tmp_path / pred.out.strip() / "metrics.json").read_text())
    assert summary["members"] == 3 and summary["rows"] == len(pd.read_csv(NEW_ROWS))
    # evaluate the ensemble: the same test metrics as the ensemble run's own
    ev = cli("evaluate", str(run))
    assert ev.code == 0, ev.err
    again = json.loads((tmp_path / ev.out.strip() / "metrics.json").read_text())
    assert again["members"] == 3 and again["test"]["accuracy"] == m["test"]["accuracy"]
    assert again["test"]["auroc"] == pytest.approx(m["test"]["auroc"])
    # and on all rows of a labelled CSV, each member encoding them its own way
    labelled = pd.read_csv(NEW_ROWS).assign(Status="good")
    labelled.loc[labelled.index[:3], "Status"] = "bad"
    labelled.to_csv(tmp_path / "labelled.csv", index=False)
    ev = cli("evaluate", str(run), "--csv", str(tmp_path / "labelled.csv"))
    assert ev.code == 0, ev.err
    on_csv = json.loads((tmp_path / ev.out.strip() / "metrics.json").read_text())
    assert on_csv["test"]["n"] == len(labelled)


def test_ensemble_rejects_what_cannot_be_averaged(members, pretrained, cli, tmp_path):
    one = cli("ensemble", str(members[0]))
    assert one.code == 2 and "at least two" in one.err
    twice = cli("ensemble", str(members[0]), str(members[0]))
    assert twice.code == 2 and "given twice" in twice.err
    mixed = cli("ensemble", str(members[0]), str(pretrained))
    assert mixed.code == 2 and "pretrain run" in mixed.err
    escape = cli("ensemble", str(members[0]), str(members[1]), "--name", "../../elsewhere")
    assert escape.code == 2 and "--name: got '../../elsewhere'" in escape.err
    bad = cli("ensemble", str(members[0]), str(members[1]), "--rule", "vote")
    assert bad.code == 2 and "allowed: auto, threshold, argmax" in bad.err
    ev = cli("evaluate", str(members[0].parent.parent / "ft" / "latest"))
    assert ev.code == 0
    assert not (tmp_path / "runs" / "ft-ensemble").exists()
