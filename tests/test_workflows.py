"""The five commands end to end on the built-in credit_data (small, fast settings)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tltool.datasets import load_table
from tltool.metrics import choose_threshold

METRIC_KEYS = ["n", "accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc",
               "average_precision", "brier", "log_loss", "ece", "threshold", "confusion_matrix",
               "macro_f1", "per_class"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_pretrain_writes_a_complete_run_folder(pretrained):
    names = {p.name for p in pretrained.iterdir()}
    assert {"config.yaml", "command.txt", "env.json", "run.json", "metrics.csv", "metrics.json",
            "thresholds.json", "freeze_plan.txt", "freeze_plan.json", "checkpoints", "plots",
            "runtime.json", "timing.json"} <= names
    for png in ("learning_curves.png", "confusion_matrix_test.png"):
        assert (pretrained / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _json(pretrained / "run.json")["status"] == "complete"
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(pretrained / "checkpoints" / name, weights_only=True)
        assert ckpt["format"] == "tltool-checkpoint" and ckpt["classes"] == ["good", "bad"]
    metrics = _json(pretrained / "metrics.json")
    assert list(metrics["test"]) == METRIC_KEYS
    assert metrics["test"]["auroc"] > 0.7  # a real signal on the source population
    epochs = pd.read_csv(pretrained / "metrics.csv")
    assert len(epochs) == metrics["epochs_run"] == 4
    assert _json(pretrained / "env.json")["seed"] == 0


def test_finetune_transfers_freezes_and_chooses_threshold_on_validation(
        pretrained, cli, write_config, tmp_path):
    cfg = write_config("ft", {"model": {"backbone_args": {}, "weights": str(pretrained),
                                        "frozen_layers": 1},
                              "train": {"backbone_lr_mult": 0.1}})
    res = cli("freeze-finetune", cfg)
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    metrics = _json(run / "metrics.json")
    assert metrics["freeze_check"]["unchanged"] and metrics["freeze_check"]["frozen_tensors"] > 0
    assert metrics["data"]["rows"] == {"train": 100, "val": 91, "test": 181}
    plan = _json(run / "freeze_plan.json")[0]
    assert [b["state"] for b in plan["blocks"]] == ["frozen", "trainable", "trainable"]
    assert metrics["trainable_params"] == 16 * 8 + 8 + 8 * 2 + 2
    # The frozen block is exactly the source model's.
    src = torch.load(pretrained / "checkpoints/best.pt", weights_only=True)["state_dict"]
    dst = torch.load(run / "checkpoints/best.pt", weights_only=True)["state_dict"]
    assert torch.equal(src["backbone.blocks.0.0.weight"], dst["backbone.blocks.0.0.weight"])
    assert not torch.equal(src["backbone.blocks.1.0.weight"], dst["backbone.blocks.1.0.weight"])
    # The threshold is the one that maximises accuracy on the validation split.
    thr = _json(run / "thresholds.json")
    assert thr["chosen_on"] == "validation" and thr["rule"] == "threshold"
    ev = cli("evaluate", str(run))
    assert ev.code == 0, ev.err
    evaluation = tmp_path / ev.out.strip()
    assert _json(evaluation / "metrics.json")["test"] == metrics["test"]
    preds = pd.read_csv(evaluation / "test_predictions.csv")
    assert len(preds) == 181
    assert (preds["prediction"] == np.where(preds["p_bad"] >= thr["threshold"], "bad",
                                            "good")).all()
    assert "confusion matrix" in (evaluation / "report.txt").read_text()


def test_threshold_selection_uses_only_the_given_rows():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.7, 0.6, 0.8, 0.9])
    chosen = choose_threshold(y, p, "accuracy")
    assert chosen["validation_score"] == 0.8 and 0.1 < chosen["threshold"] <= 0.6
    assert choose_threshold(y, p, "youden")["validation_score"] == 2 / 3


def test_predict_applies_saved_preprocessing(pretrained, cli, tmp_path):
    rows = pd.read_csv(Path(__file__).parents[1] / "configs/credit/new_applicants.csv")
    rows.loc[0, "Home"] = "houseboat"  # an unseen category must not crash
    rows.loc[1, "Income"] = np.nan  # a missing value is imputed
    rows.to_csv(tmp_path / "new.csv", index=False)
    res = cli("predict", str(pretrained), "new.csv", "--out", "preds.csv",
              "--id-column", "applicant_id")
    assert res.code == 0, res.err
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert list(preds.columns) == ["id", "p_good", "p_bad", "prediction"]
    assert preds["id"].tolist() == rows["applicant_id"].tolist()
    assert np.allclose(preds["p_good"] + preds["p_bad"], 1, atol=1e-5)
    run = tmp_path / res.out.strip()
    assert pd.read_csv(run / "predictions.csv").equals(preds)
    summary = _json(run / "metrics.json")
    assert summary["unseen_categories"] == {"Home": 1}
    assert summary["ignored_columns"] == ["Job"]  # constant in the source: dropped


def test_same_config_and_seed_give_identical_metrics(cli, write_config, tmp_path):
    cfg = write_config("rep", {"train": {"epochs": 3}})
    a, b = cli("pretrain", cfg), cli("pretrain", cfg)
    assert a.code == b.code == 0
    assert a.out != b.out  # a new folder each time, never overwritten
    ja = (tmp_path / a.out.strip() / "metrics.json").read_bytes()
    jb = (tmp_path / b.out.strip() / "metrics.json").read_bytes()
    assert ja == jb


def test_n_train_one_below_the_split_size_draws_a_sample(cli, write_config):
    # the target's training split: 271 part-time applicants minus 40% test, minus 20% val
    res = cli("freeze-finetune", write_config("n", {"target": {"n_train": None}}), "--json")
    rows = json.loads(res.out)
    assert res.code == 0
    run = Path(rows["run"])
    n = json.loads((run / "metrics.json").read_text())["data"]["splits"]["train"]["rows"]
    res = cli("freeze-finetune", write_config("n1", {"target": {"n_train": n - 1}}))
    assert res.code == 0, res.err


def test_evaluate_on_a_relative_run_path_writes_beside_it(cli, pretrained):
    os.chdir(pretrained)
    res = cli("evaluate", ".")
    assert res.code == 0, res.err
    out = Path(res.out.strip())
    assert out.parent == pretrained.parent and not any(
        p.name.endswith("-evaluate") for p in pretrained.iterdir())


def test_latest_resolves_to_the_newest_complete_run(pretrained, cli, tmp_path):
    failed = pretrained.parent / "99999999-999999-pretrain"
    failed.mkdir()
    (failed / "run.json").write_text(json.dumps({"command": "pretrain", "status": "failed"}))
    res = cli("evaluate", str(pretrained.parent / "latest"))
    assert res.code == 0, res.err
    assert _json(tmp_path / res.out.strip() / "metrics.json")["run"] == str(pretrained)


def test_rounds_run_in_order(pretrained, cli, write_config, tmp_path):
    cfg = write_config("rounds", {"model": {"backbone_args": {}, "weights": str(pretrained)},
                                  "train": {"rounds": [
                                      {"strategy": "linear_probe", "epochs": 2},
                                      {"frozen_layers": 1, "epochs": 2, "lr": 0.001},
                                      {"frozen_layers": 0, "strategy": "full", "epochs": 2}]}})
    res = cli("freeze-finetune", cfg)
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    epochs = pd.read_csv(run / "metrics.csv")
    assert epochs["round"].tolist() == [1, 1, 2, 2, 3, 3]
    assert epochs["trainable_params"].tolist()[::2] == [18, 18 + 136, 18 + 136 + 23 * 16 + 16]
    assert len(_json(run / "freeze_plan.json")) == 3


def test_target_only_and_source_only_baselines(pretrained, cli, write_config, tmp_path):
    res = cli("freeze-finetune", write_config("tgt", {"model": {"weights": "none",
                                                                "strategy": "full"}}))
    assert res.code == 0, res.err
    src = cli("evaluate", str(pretrained), "--on", "target")
    assert src.code == 0, src.err
    m = _json(tmp_path / src.out.strip() / "metrics.json")
    assert m["on"] == "target" and m["test"]["n"] == 181


def test_extract_writes_features_and_fits_sklearn_heads(pretrained, cli, write_config,
                                                        tmp_path):
    res = cli("extract", write_config("ex", {"model": {"weights": str(pretrained)}}))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    feats = np.load(run / "features" / "target_train.npz")
    assert feats["features"].shape == (100, 8) and len(feats["labels"]) == len(feats["ids"])
    # the heads fit on the target only: the source data are neither read nor passed through
    assert sorted(p.name for p in (run / "features").iterdir()) == sorted(
        f"target_{s}.npz" for s in ("train", "val", "test"))
    heads = _json(run / "metrics.json")["heads"]
    assert set(heads) == {"logistic_regression", "random_forest", "svm"}
    assert all(0.5 < h["test"]["auroc"] <= 1 for h in heads.values())
    # every section on request, and with no heads at all
    for changes in ({"sections": "both"}, {"heads": []}):
        res = cli("extract", write_config("ex2", {"model": {"weights": str(pretrained)},
                                                  "extract": changes}))
        assert res.code == 0, res.err
        run = tmp_path / res.out.strip()
        assert sorted(p.name for p in (run / "features").iterdir()) == sorted(
            f"{d}_{s}.npz" for d in ("source", "target") for s in ("train", "val", "test"))
        assert bool(_json(run / "metrics.json")["heads"]) == ("sections" in changes)


def test_resmlp_backbone_transfers(cli, write_config, tmp_path):
    from conftest import BASE

    base = dict(BASE, model={"backbone": "resmlp", "backbone_args": {"width": 16, "depth": 1}})
    src = cli("pretrain", write_config("rsrc", base=base))
    assert src.code == 0, src.err
    ft = cli("freeze-finetune", write_config("rft", {"model": {
        "weights": str(tmp_path / src.out.strip()), "frozen_layers": 1,
        "strategy": "bias_only"}}, base=base))
    assert ft.code == 0, ft.err
    plan = _json(tmp_path / ft.out.strip() / "freeze_plan.json")[0]
    assert [b["state"] for b in plan["blocks"]] == ["frozen", "bias_only", "trainable"]


def test_epoch_scores_match_the_full_reports():
    from tltool.metrics import classification_report, epoch_scores, multilabel_report

    rng = np.random.default_rng(0)
    for k in (2, 4):
        y = rng.integers(0, k, 300)
        proba = rng.dirichlet(np.ones(k), 300)
        proba[np.arange(300), y] += rng.random(300)  # some signal, some ties
        proba = proba / proba.sum(1, keepdims=True)
        if k == 2:  # rounded scores: ties must be ranked as sklearn ranks them
            proba[:, 1] = np.round(proba[:, 1], 2)
            proba[:, 0] = 1 - proba[:, 1]
        fast = epoch_scores(y, proba, multilabel=False)
        full = classification_report(y, proba, [str(i) for i in range(k)])
        for key in ("accuracy", "f1", "auroc"):
            assert fast[key] == pytest.approx(full[key], abs=1e-12), (k, key)
    y = rng.integers(0, 2, (200, 3)).astype(np.float32)
    proba = np.round(np.clip(y * 0.6 + rng.random((200, 3)) * 0.5, 0, 1), 2)
    fast = epoch_scores(y, proba, multilabel=True)
    full = multilabel_report(y, proba, ["a", "b", "c"])
    for key in ("accuracy", "f1", "auroc"):
        assert fast[key] == pytest.approx(full[key], abs=1e-12), key


def test_evaluate_warns_when_the_data_changed_since_training(cli, write_config, tmp_path,
                                                             caplog):
    frame = load_table("credit_data")
    frame.iloc[:3000].to_csv(tmp_path / "c.csv", index=False)
    cfg = write_config("changing", {"source": {"kind": "csv", "path": str(tmp_path / "c.csv"),
                                               "label": "Status", "name": None},
                                    "train": {"epochs": 1}})
    res = cli("pretrain", cfg)
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    assert cli("evaluate", str(run)).code == 0
    assert "data changed" not in caplog.text
    frame.to_csv(tmp_path / "c.csv", index=False)  # more rows: the split moves
    assert cli("evaluate", str(run)).code == 0
    assert "the data changed since" in caplog.text


def _start_long_pretrain(write_config, tmp_path, preexec_fn=None):
    """A pretrain that would run for hours, once it has written its first epoch."""
    import subprocess
    import sys
    import time

    cfg = write_config("long", {"train": {"epochs": 100000, "early_stopping": {
        "patience": None}}})
    proc = subprocess.Popen([sys.executable, "-m", "tltool", "pretrain", cfg], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "runs").glob("long/*/metrics.csv")):
        time.sleep(0.2)
    time.sleep(0.5)
    return proc


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_mark_the_run_failed(write_config, tmp_path, name, code):
    import signal

    proc = _start_long_pretrain(write_config, tmp_path)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"tltool: stopped by {name}; a run folder it had started is marked failed" in err
    status = json.loads(next((tmp_path / "runs").glob("long/*/run.json")).read_text())
    assert status["status"] == "failed"


def test_a_run_started_under_nohup_outlives_sighup(write_config, tmp_path):
    """`nohup tltool ...` (SIGHUP ignored) keeps running when the session closes."""
    import signal
    import time

    proc = _start_long_pretrain(write_config, tmp_path, preexec_fn=lambda: signal.signal(
        signal.SIGHUP, signal.SIG_IGN))
    proc.send_signal(signal.SIGHUP)
    time.sleep(2)
    assert proc.poll() is None
    status = json.loads(next((tmp_path / "runs").glob("long/*/run.json")).read_text())
    assert status["status"] == "running"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143


@pytest.mark.slow  # thousands of random cases; the threshold tests check the sweep's choices
def test_the_vectorised_threshold_sweep_chooses_what_the_loop_chose():
    """The one-pass sweep gives the threshold and score of the plain loop over candidates
    (kept here as the reference), for every rule, ties and tiny splits included."""
    from sklearn import metrics as skm

    from tltool.metrics import choose_threshold

    def loop(y, p, optimize):
        scores = np.unique(p)
        cands = np.concatenate([[0.5], (scores[:-1] + scores[1:]) / 2, scores[:1] - 1e-9])
        best_t, best_v = 0.5, -np.inf
        for t in cands:
            pred = (p >= t).astype(np.int64)
            if optimize == "accuracy":
                v = float((pred == y).mean())
            elif optimize == "f1":
                v = float(skm.f1_score(y, pred, zero_division=0))
            else:
                v = float((pred[y == 1].mean() if (y == 1).any() else 0.0)
                          - (pred[y == 0].mean() if (y == 0).any() else 0.0))
            if v > best_v + 1e-12 or (abs(v - best_v) <= 1e-12 and
                                      abs(t - 0.5) < abs(best_t - 0.5)):
                best_t, best_v = float(t), float(v)
        return best_t, best_v

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 60))
        y = rng.integers(0, 2, n)
        p = np.round(rng.random(n), int(rng.integers(1, 4)))  # rounded: many ties
        for optimize in ("accuracy", "f1", "youden"):
            got = choose_threshold(y, p, optimize)
            assert (got["threshold"], got["validation_score"]) == pytest.approx(
                loop(y, p, optimize), abs=1e-12), (trial, optimize)


@pytest.mark.slow  # the in-process command tests cover each step; this runs the installed
# script in 7 processes
def test_a_ci_job_chains_the_commands_with_json(tmp_path):
    """tests/ci_chain.sh: pretrain -> freeze-finetune -> evaluate -> predict, each step reading
    the previous one's --json output; a failing step prints JSON too (exit 2)."""
    import shutil
    import subprocess
    import sys

    tl = shutil.which("tltool", path=str(Path(sys.executable).parent))
    script = Path(__file__).parent / "ci_chain.sh"
    res = subprocess.run(["bash", str(script), str(tmp_path / "runs"), tl],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ci chain ok" in res.stdout


def test_runs_lists_and_diffs_run_folders(pretrained, cli, write_config, tmp_path):
    res = cli("freeze-finetune", write_config("ft", {"model": {
        "weights": str(pretrained), "backbone_args": {}, "frozen_layers": 1}}))
    assert res.code == 0, res.err
    table = cli("runs", str(tmp_path / "runs"))
    assert table.code == 0
    lines = table.out.strip().splitlines()
    assert lines[0].split()[:4] == ["name", "run", "command", "status"] and len(lines) == 3
    assert "freeze-finetune" in table.out and "complete" in table.out and "auroc" in table.out
    rows = json.loads(cli("runs", str(tmp_path / "runs"), "--json", "--command",
                          "pretrain").out)
    assert [r["command"] for r in rows] == ["pretrain"] and rows[0]["data"] == "credit_data"
    diff = cli("runs", "diff", str(pretrained), str(tmp_path / res.out.strip()), "--json")
    d = json.loads(diff.out)
    assert d["config"]["model.frozen_layers"] == [0, 1] and "test.auroc" in d["metrics"]
    bad = cli("runs", "diff", str(pretrained))
    assert bad.code == 2 and "two run folders" in bad.err
    # a run from an older tltool lacks a newer key: it ran with the default, no difference
    import yaml

    cfg_file = pretrained / "config.yaml"
    old = yaml.safe_load(cfg_file.read_text())
    del old["decision"]["calibrate"]
    cfg_file.write_text(yaml.safe_dump(old))
    d = json.loads(cli("runs", "diff", str(pretrained), str(tmp_path / res.out.strip()),
                       "--json").out)
    assert "decision.calibrate" not in d["config"]
