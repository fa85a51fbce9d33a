"""`tltool select`: candidate routes scored by cross-validation on the labelled target rows,
the winner refit and saved; the test split never influences the choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BASE, merge
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from tltool.config import validate_config
from tltool.datasets import load_table
from tltool.select.rules import Scored, choose
from tltool.select.scoring import make_folds

NEW_ROWS = Path(__file__).resolve().parents[1] / "configs" / "credit" / "new_applicants.csv"


def _candidates(src: Path) -> list[dict]:
    raw = {"model.backbone": "raw", "model.backbone_args": {}, "model.weights": "none"}
    return [
        {"name": "source-only", "set": {"model.weights": str(src), "model.backbone_args": {},
                                        "model.keep_head": True, "train.epochs": 0}},
        {"name": "target-lr", "set": {**raw, "model.head": "logistic_regression"}},
        {"name": "prior-lr", "set": {**raw, "model.head": "logistic_regression",
                                     "model.prior": "offset", "model.prior_weights": str(src),
                                     "model.head_args": {"C": 0.1}}},
        {"name": "finetune", "set": {"model.weights": str(src), "model.backbone_args": {},
                                     "model.frozen_layers": 1}},
    ]


def _select_cfg(write_config, src: Path, name: str = "sel", **changes) -> str:
    return write_config(name, merge({"target": {"n_train": 60, "n_val": 30},
                                     "select": {"folds": 3, "repeats": 1, "rule": "one_se",
                                                "candidates": _candidates(src)}}, changes))


@pytest.fixture
def chosen(pretrained, cli, write_config, tmp_path) -> Path:
    res = cli("select", _select_cfg(write_config, pretrained))
    assert res.code == 0, res.err
    return tmp_path / res.out.strip()


def test_select_writes_a_leaderboard_and_a_usable_model(chosen, cli, tmp_path):
    board = json.loads((chosen / "leaderboard.json").read_text())
    names = [c["name"] for c in board["candidates"]]
    assert sorted(names) == ["finetune", "prior-lr", "source-only", "target-lr"]
    assert board["metric"] == "auroc" and board["folds"] == 3
    assert sum(c["chosen"] for c in board["candidates"]) == 1
    for c in board["candidates"]:
        assert len(c["fold_scores"]) == 3 and c["mean"] == pytest.approx(
            np.mean(c["fold_scores"]), abs=1e-6)
    assert (chosen / "leaderboard.csv").read_text().startswith("rank,name,chosen")
    assert (chosen / "plots" / "leaderboard.png").stat().st_size > 1000
    m = json.loads((chosen / "metrics.json").read_text())
    winner = next(c for c in board["candidates"] if c["chosen"])
    assert m["select"]["winner"] == winner["name"] and m["test"]["n"] == 181
    assert m["decision"]["chosen_on"] in ("out-of-fold", None)
    oof = pd.read_csv(chosen / "oof_predictions.csv")
    assert len(oof) == 90 and set(oof["label"]) == {"good", "bad"}
    # the run folder is a trained model for evaluate / predict
    ev = cli("evaluate", str(chosen))
    assert ev.code == 0, ev.err
    again = json.loads((tmp_path / ev.out.strip() / "metrics.json").read_text())
    assert again["test"]["auroc"] == pytest.approx(m["test"]["auroc"], abs=1e-9)
    pred = cli("predict", str(chosen), str(NEW_ROWS), "--id-column", "applicant_id")
    assert pred.code == 0, pred.err


def test_one_standard_error_rule_takes_the_simplest_close_candidate():
    def s(name, c, scores):
        return Scored(name, c, scores, 1)

    results = [s("complex", 4, [0.80, 0.70, 0.75]), s("simple", 0, [0.74, 0.73, 0.72]),
               s("far", 1, [0.60, 0.61, 0.62])]
    winner, how = choose(results, "one_se")
    assert winner.name == "simple" and how["best"] == "complex"
    assert set(how["within_one_se"]) == {"complex", "simple"}
    assert choose(results, "best")[0].name == "complex"
    lower = [Scored("a", 2, [1.0, 1.1], -1), Scored("b", 0, [3.0, 3.2], -1)]
    assert choose(lower, "one_se")[0].name == "a"  # rmse: lower is better


def test_rule_ensemble_averages_the_candidates_within_the_band():
    results = [Scored("simple", 0, [0.71, 0.73, 0.75], 1), Scored("rich", 3, [0.74, 0.76, 0.78], 1),
               Scored("poor", 1, [0.50, 0.52, 0.54], 1),
               Scored("undefined", 1, [float("nan")] * 3, 1)]
    best, how = choose(results, "ensemble", band=3.0)
    assert best.name == "rich" and how["members"] == ["rich", "simple"]
    assert how["bar"] == pytest.approx(0.76 - 3 * np.std([0.74, 0.76, 0.78], ddof=1) / 3 ** 0.5)
    assert choose(results, "ensemble", band=0.0)[1]["members"] == ["rich"]
    assert choose(results, "ensemble", band=100.0)[1]["members"] == ["rich", "simple", "poor"]


def test_folds_are_stratified_seeded_and_disjoint():
    y = np.array([0] * 30 + [1] * 12)
    a = make_folds(y, "classification", 4, 2, seed=5)
    b = make_folds(y, "classification", 4, 2, seed=5)
    assert len(a.splits) == 8 and all(np.array_equal(x[1], z[1])
                                      for x, z in zip(a.splits, b.splits, strict=True))
    for r in range(2):
        held = np.concatenate([h for j, (_, h) in enumerate(a.splits) if a.repeat_of(j) == r])
        assert sorted(held) == list(range(42))  # each row held out once per repeat
    for train, held in a.splits:
        assert not set(train) & set(held)
        assert 2 <= y[held].sum() <= 4  # 12 positives over 4 folds
    rare = make_folds(np.array([0] * 20 + [1] * 3), "classification", 5, 1, seed=0)
    assert rare.k == 3 and "lowered to 3 folds" in rare.notes[0]


@pytest.mark.slow  # two selects; reruns are byte-identical for every command (test_workflows)
def test_leaderboard_is_byte_identical_on_a_rerun(pretrained, cli, write_config, tmp_path):
    cfg = _select_cfg(write_config, pretrained)
    runs = []
    for _ in range(2):
        res = cli("select", cfg)
        assert res.code == 0, res.err
        runs.append(tmp_path / res.out.strip())
    for name in ("leaderboard.json", "leaderboard.csv", "oof_predictions.csv"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name


def test_changing_the_test_labels_leaves_the_choice_unchanged(pretrained, cli, write_config,
                                                              tmp_path):
    """The test split is read only after the choice: other test labels, same leaderboard."""
    from tltool.data.tabular import load_tabular

    frame = load_table("credit_data")
    frame = frame[frame["Job"] == "partime"].reset_index(drop=True)
    target = {"kind": "csv", "label": "Status", "positive": "bad",
              "n_train": 60, "n_val": 30, "split": {"val": 0.2, "test": 0.4,
                                                    "stratify": False}}
    frame.to_csv(tmp_path / "a.csv", index=False)
    data_cfg = validate_config(merge(BASE, {"target": {**target, "path": str(tmp_path /
                                                                           "a.csv")}}),
                               "t").target
    test_rows = load_tabular(data_cfg).test.ids.astype(int)
    flipped = frame.copy()
    flipped.loc[test_rows, "Status"] = np.where(frame.loc[test_rows, "Status"] == "bad",
                                                "good", "bad")
    flipped.to_csv(tmp_path / "b.csv", index=False)
    runs = []
    for name in ("a", "b"):
        cfg = _select_cfg(write_config, pretrained, name=f"sel-{name}", target={
            **target, "path": str(tmp_path / f"{name}.csv")})
        res = cli("select", cfg)
        assert res.code == 0, res.err
        runs.append(tmp_path / res.out.strip())
    for name in ("leaderboard.json", "leaderboard.csv", "oof_predictions.csv"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    tests = [json.loads((r / "metrics.json").read_text())["test"]["auroc"] for r in runs]
    assert tests[0] == pytest.approx(1 - tests[1], abs=1e-9)  # the labels did change


def test_cross_validation_of_a_classic_route_matches_scikit_learn(pretrained, write_config):
    """target-lr's fold scores are those of a plain scikit-learn LogisticRegression fitted on
    the same encoded rows of the same folds."""
    from tltool.cache import PrefixStore
    from tltool.config import load_config
    from tltool.routes.route import prepare
    from tltool.select.candidates import Candidate
    from tltool.select.crossval import CrossValidation, cross_validate, labelled_rows
    from tltool.select.scoring import fold_scores

    cfg = load_config(_select_cfg(write_config, pretrained), [
        "model.backbone=raw", "model.backbone_args={}", "model.weights=none",
        "model.head=logistic_regression"])
    route = prepare(cfg, "freeze-finetune")
    cand = Candidate("target-lr", {}, None, False)
    rows = labelled_rows([(cand, route)])
    folds = make_folds(rows.y, "classification", 3, 2, seed=1)
    scored, oof = cross_validate(route, cand, CrossValidation(rows, folds, "auroc",
                                                              PrefixStore()))
    x = rows.of(route).x.numpy().astype(np.float64)
    expected = []
    for train, held in folds.splits:
        lr = LogisticRegression(max_iter=5000).fit(x[train], rows.y[train])
        expected.append(roc_auc_score(rows.y[held], lr.predict_proba(x[held])[:, 1]))
    assert np.allclose(scored.scores, expected, atol=1e-6)
    assert np.allclose(fold_scores("auroc", rows.y, oof, folds, (cfg.decision, route.kind)),
                       expected, atol=1e-6)
    assert scored.complexity == 3  # a linear model on the raw table


def test_ensemble_of_select_runs_uses_their_out_of_fold_predictions(
        pretrained, cli, write_config, tmp_path):
    runs = []
    for seed in (0, 1):
        cfg = _select_cfg(write_config, pretrained, name=f"sel{seed}", seed=seed,
                          select={"seed": seed})
        res = cli("select", cfg)
        assert res.code == 0, res.err
        runs.append(tmp_path / res.out.strip())
    res = cli("ensemble", *map(str, runs), "--name", "sel-avg")
    assert res.code == 0, res.err
    m = json.loads((tmp_path / res.out.strip() / "metrics.json").read_text())
    assert m["val_from"] == "out-of-fold" and m["decision"]["chosen_on"] == "out-of-fold"
    assert m["val"]["n"] == 90 and m["labelled_rows_seen"] == 90


def test_select_refuses_unknown_sources_and_bad_candidates(cli, write_config):
    cfg = write_config("bad", {"select": {"candidates": [
        {"name": "a", "set": {"model.weights": "source:nope"}},
        {"name": "b", "set": {"train.lr": -1}}]}})
    res = cli("select", cfg)
    assert res.code == 2
    assert "select.candidates.0 (a): 'source:nope' names no source model" in res.err
    assert "select.candidates.1 (b): train.lr: input should be greater than 0" in res.err
    assert "Traceback" not in res.err


def test_prior_offset_starts_at_the_source_answer(pretrained):
    """A network with a prior offset and a zero-initialised head predicts exactly the prior's
    log-probabilities before training."""
    from tltool.checkpoint import Checkpoint
    from tltool.models import build_model
    from tltool.models.loading import load_trained

    ckpt = Checkpoint.load(pretrained / "checkpoints" / "best.pt")
    source = load_trained(ckpt)
    spec = dict(ckpt.spec, prior={"mode": "offset", "specs": [ckpt.spec],
                                  "classes": ckpt.classes, "binary": True})
    model = build_model(spec)
    model.prior.models[0].load_state_dict(source.state_dict())
    x = torch.randn(7, ckpt.spec["in_features"])
    with torch.no_grad():
        assert torch.allclose(torch.softmax(model(x), 1), torch.softmax(source(x), 1),
                              atol=1e-6)


def test_select_without_target_labels_chooses_by_an_unsupervised_criterion(
        cli, write_config, tmp_path):
    """select.target_labels false: pretrain routes (no adaptation, CORAL) scored without any
    target label; every criterion is in the leaderboard, the test split scored once after."""
    cfg = write_config("da", {"train": {"epochs": 3}, "select": {
        "target_labels": False, "criterion": "ensv", "research": True, "candidates": [
            {"name": "source-only", "set": {"adapt.method": "none"}},
            {"name": "coral", "set": {"adapt.method": "coral"}}]}})
    res = cli("select", cfg)
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    board = json.loads((run / "leaderboard.json").read_text())
    assert board["target_labels"] is False and board["criterion"] == "ensv"
    rows = board["candidates"]
    assert [r["name"] for r in rows] == sorted((r["name"] for r in rows),
                                               key=lambda n: -next(
                                                   r["ensv"] for r in rows if r["name"] == n))
    for r in rows:
        assert 0 <= r["ensv"] <= 1 and r["dev"] is not None and r["iwcv"] >= 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["select"]["winner"] == rows[0]["name"] and m["test"]["n"] == 181
    research = json.loads((run / "research.json").read_text())
    assert {c["name"] for c in research["candidates"]} == {"source-only", "coral"}
    ev = cli("evaluate", str(run))
    assert ev.code == 0, ev.err


def test_ensv_agreement_and_dev_control_variate():
    from tltool.select.criteria import dev_risk, ensv_scores, iwcv_risk

    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    b = np.array([[0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    c = np.array([[0.7, 0.3], [0.4, 0.6], [0.3, 0.7]])
    # averaged: [0.8, 0.2], [0.3, 0.7], [0.333, 0.667] -> pseudo labels 0, 1, 1
    assert ensv_scores({"a": a, "b": b, "c": c}) == {"a": 2 / 3, "b": 1.0, "c": 1.0}
    losses = np.array([0.5, 1.0, 0.2, 0.8])
    weights = np.array([1.0, 1.0, 1.0, 1.0])
    assert iwcv_risk(losses, weights) == pytest.approx(0.625)
    assert dev_risk(losses, weights) == pytest.approx(0.625)  # constant weights: no correction
    w = np.array([0.5, 1.5, 0.5, 1.5])
    weighted = w * losses
    eta = -np.cov(weighted, w, ddof=1)[0, 1] / np.var(w, ddof=1)
    assert dev_risk(losses, w) == pytest.approx(weighted.mean() + eta * w.mean() - eta)


def test_adaptation_that_lowers_the_target_validation_score_is_reported(cli, write_config,
                                                                        tmp_path, caplog):
    """pretrain + adapt: the target's labelled validation rows are scored every epoch (never
    trained or stopped on) and metrics.json says how the kept epoch compares."""
    res = cli("pretrain", write_config("ad", {"train": {"epochs": 6},
                                              "adapt": {"method": "mmd", "weight": 5.0}}))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    watch = json.loads((run / "metrics.json").read_text())["target_watch"]
    assert set(watch) >= {"first_epoch", "best", "best_epoch", "kept", "kept_epoch", "warned"}
    frame = pd.read_csv(run / "metrics.csv")
    assert frame["target_val_score"].notna().all() and len(frame) == 6
    assert watch["best"] == pytest.approx(frame["target_val_score"].max(), abs=1e-6)
    assert watch["warned"] == (watch["best"] - watch["kept"] > 0.02)
    said = "adapt: the target's labelled validation rows score" in caplog.text
    assert said == watch["warned"]


def test_default_grid_offers_every_family_that_applies(write_config):
    """Tables with a source section: reference models, source models as is / averaged / as a
    prior, fine-tunes, L2-SP, pooled, adapt; each candidate a valid config."""
    from tltool.config import load_config
    from tltool.routes.route import InputCache
    from tltool.select.candidates import candidate_list, facts, source_plan

    cfg = load_config(write_config("g", {"target": {"n_train": 60, "n_val": 30}}))
    found = facts(cfg, InputCache("labelled"))
    sources = source_plan(cfg, found)
    assert set(sources) == {"net", "lr", "gb"} and found.same_classes and found.pool
    names = [c.name for c in candidate_list(cfg, found, sources)]
    for expected in ("target-lr", "target-gb", "pooled-lr", "pooled-gb", "source-only-lr",
                     "source-only-gb", "source-only", "source-avg", "prior-avg", "prior-gb",
                     "extract-lr", "linear-probe", "bias-only", "finetune-freeze1",
                     "finetune-full", "l2sp", "pooled-net", "target-net", "adapt-coral",
                     "adapt-mmd", "adapt-dann"):
        assert expected in names, expected
    # regression: ridge instead of logistic regression; no source section: no source routes
    reg = load_config(write_config("r", {"target": {"label": "Amount", "task": "regression",
                                                    "drop": ["Status"]},
                                         "source": {"label": "Amount", "task": "regression",
                                                    "drop": ["Status"]},
                                         "decision": {"rule": "argmax"}}))
    found = facts(reg, InputCache("labelled"))
    cands = {c.name: c for c in candidate_list(reg, found, source_plan(reg, found))}
    assert cands["target-lr"].raw["model"]["head"] == "ridge"
    alone = load_config(write_config("a", {"source": None}))
    found = facts(alone, InputCache("labelled"))
    assert [c.name for c in candidate_list(alone, found, source_plan(alone, found))] == [
        "target-lr", "target-gb", "target-net"]


def test_a_metric_that_does_not_fit_the_task_is_refused(cli, write_config):
    res = cli("select", write_config("m", {"select": {"metric": "rmse"}}))
    assert res.code == 2 and "select.metric: 'rmse' does not apply to a classification " \
                              "target; allowed: auto, auroc" in res.err


@pytest.mark.parametrize("changes, message", [
    ({"target.n_train": 50}, "target.n_train: a candidate may not change the target's rows"),
    ({"target.split.seed": 3}, "target.split: a candidate may not change the target's rows"),
    ({"select.folds": 10}, "select.folds: the select run's own settings"),
])
def test_a_candidate_may_not_change_the_target_rows(changes, message, cli, write_config,
                                                    tmp_path):
    cfg = write_config("c", {"select": {"candidates": [
        {"name": "lr", "set": {"model.backbone": "raw", "model.backbone_args": {},
                               "model.head": "logistic_regression", **changes}}]}})
    res = cli("select", cfg)
    assert res.code == 2 and "select.candidates.0 (lr): " + message in res.err, res.err
    assert not (tmp_path / "runs").exists()  # refused before any run folder


def test_select_without_labels_refuses_other_classes_and_twice_named_candidates(
        cli, write_config, tmp_path):
    frame = load_table("credit_data")
    frame["Status"] = frame["Status"].map({"good": "ok", "bad": "default"})
    frame.to_csv(tmp_path / "renamed.csv", index=False)
    res = cli("select", write_config("u", {
        "target": {"kind": "csv", "path": str(tmp_path / "renamed.csv"), "label": "Status",
                   "positive": "default"},
        "select": {"target_labels": False}}))
    assert res.code == 2 and "the target's classes must be the source's" in res.err
    res = cli("select", write_config("d", {"select": {"target_labels": False, "candidates": [
        {"name": "a", "set": {"adapt.method": "coral"}},
        {"name": "a", "set": {"adapt.method": "mmd"}}]}}))
    assert res.code == 2 and "name(s) a given twice" in res.err


def test_a_damaged_out_of_fold_file_is_refused_by_ensemble(chosen, pretrained, cli,
                                                           write_config, tmp_path):
    other = cli("select", _select_cfg(write_config, pretrained, name="sel-b", seed=1))
    assert other.code == 0, other.err
    oof = chosen / "oof_predictions.csv"
    frame = pd.read_csv(oof)
    for damage in (lambda f: f.assign(label="maybe"), lambda f: f.drop(columns=["p_bad"]),
                   lambda f: f.assign(p_bad="abc")):
        damage(frame).to_csv(oof, index=False)
        res = cli("ensemble", str(chosen), str(tmp_path / other.out.strip()))
        assert res.code == 2 and "oof_predictions.csv is damaged" in res.err, res.err
        assert "Traceback" not in res.err


def test_an_ensemble_of_runs_with_other_labelled_rows_says_so(cli, write_config, tmp_path,
                                                              caplog):
    raw = {"backbone": "raw", "backbone_args": {}, "weights": "none",
           "head": "logistic_regression"}
    runs = []
    for i, extra in enumerate(({"sample_seed": None}, {"sample_seed": 5})):
        res = cli("freeze-finetune", write_config(f"m{i}", {"name": "m", "model": raw,
                                                            "target": extra}))
        assert res.code == 0, res.err
        runs.append(tmp_path / res.out.strip())
    res = cli("ensemble", *map(str, runs))
    assert res.code == 0, res.err
    m = json.loads((tmp_path / res.out.strip() / "metrics.json").read_text())
    assert m["labelled_rows_seen"] > max(m["labelled_rows_per_member"])
    assert "the members drew different labelled rows" in caplog.text


def test_rule_ensemble_averages_every_candidate_refit_as_members(pretrained, cli, write_config,
                                                                tmp_path):
    res = cli("select", _select_cfg(write_config, pretrained, name="selens",
                                    select={"rule": "ensemble", "band": 100,
                                            "research": True}))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    board = json.loads((run / "leaderboard.json").read_text())
    names = sorted(c["name"] for c in board["candidates"] if c["name"] != "ensemble of "
                   "candidates")
    ens = next(c for c in board["candidates"] if c["name"] == "ensemble of candidates")
    assert ens["chosen"] and sum(c["chosen"] for c in board["candidates"]) == 1
    assert sorted(ens["route"]["average_of"]) == names
    # its cross-validation score is that of the averaged out-of-fold predictions
    npz = np.load(run / "research_predictions.npz")
    y = npz["y_labelled"]
    folds = make_folds(y, "classification", 3, 1, 0)
    avg = np.mean([npz[f"oof/{n}"] for n in names], axis=0)
    for (_, held), s in zip(folds.splits, ens["fold_scores"], strict=True):
        assert s == pytest.approx(roc_auc_score(y[held], avg[0][held][:, 1]), abs=1e-6)
    # every member is a complete run of its own; the test predictions are their average
    members = json.loads((run / "ensemble.json").read_text())["members"]
    assert sorted(members) == [f"members/{n}" for n in names]
    assert all(json.loads((run / m / "run.json").read_text())["status"] == "complete"
               for m in members)
    mine = pd.read_csv(run / "test_predictions.csv")
    assert np.allclose(mine["p_bad"], np.mean([npz[f"test/{n}"][:, 1] for n in names], axis=0),
                       atol=2e-6)
    m = json.loads((run / "metrics.json").read_text())
    assert m["select"]["winner"] == "ensemble of candidates" and len(m["members_test"]) == 4
    research = json.loads((run / "research.json").read_text())
    assert research["chosen"] == "ensemble of candidates"
    # evaluate and predict take the ensemble; one-model commands name a member instead
    ev = cli("evaluate", str(run))
    assert ev.code == 0, ev.err
    again = json.loads((tmp_path / ev.out.strip() / "metrics.json").read_text())
    assert again["test"]["auroc"] == pytest.approx(m["test"]["auroc"], abs=1e-9)
    assert cli("predict", str(run), str(NEW_ROWS), "--id-column", "applicant_id").code == 0
    ex = cli("export", str(run), "--format", "torchscript")
    assert ex.code == 2 and "members" in ex.err and "\n  File" not in ex.err
    # `ensemble` over select ensembles averages their members
    en = cli("ensemble", str(run), str(run / members[0]), "--name", "both")
    assert en.code == 2 and "given twice" in en.err
    # a member is usable alone, and what it writes goes next to the experiment's runs
    ev = cli("evaluate", str(run / members[0]))
    assert ev.code == 0, ev.err
    assert (tmp_path / ev.out.strip()).parent == run.parent
