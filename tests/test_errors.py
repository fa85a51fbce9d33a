"""Bad input: each gives one clear line on stderr naming the problem, exit code 2, no
traceback, and no run folder that looks complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import BASE, merge

from tltool.datasets import load_table


def _csv(tmp_path, name, frame: pd.DataFrame | None = None, text: str | None = None) -> str:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    else:
        frame.to_csv(path, index=False)
    return str(path)


def _credit_csv(tmp_path, name="credit.csv", edit=None) -> str:
    frame = load_table("credit_data")
    if edit:
        frame = edit(frame)
    return _csv(tmp_path, name, frame)


def _csv_target(path: str, **extra) -> dict:
    return {"target": {"kind": "csv", "path": path, "label": "Status", "positive": "bad",
                       **extra}, "model": {"weights": "none", "strategy": "full"}}


def _fifo(tmp_path, name: str) -> str:
    path = tmp_path / name
    os.mkfifo(path)
    return str(path)


def _with_text_income(f):
    f = f.astype({"Income": object})
    f.loc[f.index[f.Job == "partime"][0], "Income"] = "twelve hundred"
    return f


CASES = {
    "unknown key": (lambda t, w: ["pretrain", w("c", {"train": {"epochz": 3}})],
                    "train.epochz: unknown key; did you mean 'epochs'?"),
    "wrong type": (lambda t, w: ["pretrain", w("c", {"train": {"lr": "fast"}})],
                   "train.lr: input should be a valid number"),
    "value not allowed": (lambda t, w: ["pretrain", w("c", {"model": {"head": "svm2"}})],
                          "model.head: got 'svm2'; allowed: 'linear', 'mlp', 'multilabel', "
        "'logistic_regression', 'ridge' or 'gradient_boosting'"),
    "config file missing": (lambda t, w: ["pretrain", "nope.yaml"],
                            "nope.yaml: config file not found"),
    "invalid yaml": (lambda t, w: ["pretrain", _csv(t, "bad.yaml", text="train: {epochs: 3\n")],
                     "not valid YAML"),
    "malformed --set": (lambda t, w: ["pretrain", w("c"), "--set", "train.epochs"],
                        "--set 'train.epochs': expected KEY=VALUE"),
    "csv file missing": (lambda t, w: ["freeze-finetune", w("c", _csv_target("missing.csv"))],
                         "missing.csv: CSV file not found"),
    "empty csv": (lambda t, w: ["freeze-finetune", w("c", _csv_target(
        _csv(t, "empty.csv", text="")))], "empty.csv: the CSV file is empty"),
    "duplicate header": (lambda t, w: ["freeze-finetune", w("c", _csv_target(
        _csv(t, "dup.csv", text="a,b,a,Status\n1,2,3,good\n")))],
        "column 'a' appears twice in the header"),
    "output root is a file": (lambda t, w: ["pretrain", w("c", {"output": {
        "root": _csv(t, "afile", text="x")}})], "is a file; run folders need a folder there"),
    "header-only csv": (lambda t, w: ["freeze-finetune", w("c", _csv_target(
        _csv(t, "head.csv", text="a,b,Status\n")))],
        "head.csv: the CSV file has a header but no rows"),
    "missing label column": (lambda t, w: ["freeze-finetune", w("c", _csv_target(
        _credit_csv(t, edit=lambda f: f.drop(columns=["Status"]))))],
        "label column 'Status' is not a column"),
    "label with one class": (lambda t, w: ["freeze-finetune", w("c", _csv_target(
        _credit_csv(t, edit=lambda f: f[f.Status == "good"]), positive=None))],
        "label 'Status' has a single class 'good'"),
    "continuous label": (lambda t, w: ["freeze-finetune", w("c", _csv_target(
        _credit_csv(t), label="Amount", positive=None))],
        "label 'Amount' has 95 distinct values with a median of"),
    "fractional label": (lambda t, w: ["freeze-finetune", w("c", _csv_target(
        _credit_csv(t, edit=lambda f: f.assign(Ratio=f.Amount / f.Price)), label="Ratio",
        positive=None))], "label 'Ratio' holds fractional numbers"),
    "text in numeric column": (lambda t, w: ["freeze-finetune", w("c", _csv_target(
        _credit_csv(t, edit=_with_text_income)))],
        "column 'Income' holds numbers but row 11 has 'twelve hundred'"),
    "n_train too large": (lambda t, w: ["pretrain", w("c", {"source": {"n_train": 99999}})],
                          "n_train = 99999 but the training split has only 1683 rows"),
    "frozen_layers beyond blocks": (lambda t, w: ["pretrain", w("c", {"model": {
        "frozen_layers": 5}})], "model.frozen_layers = 5 but the backbone has 2 blocks"),
    "source run missing": (lambda t, w: ["freeze-finetune", w("c", {"model": {
        "weights": "runs/nothing/latest"}})], "runs/nothing/latest: no experiment folder"),
    "unknown backbone": (lambda t, w: ["pretrain", w("c", {"model": {"backbone": "mpl"}})],
                         "unknown backbone 'mpl'; did you mean 'mlp'?"),
    "unknown backbone option": (lambda t, w: ["pretrain", w("c", {"model": {
        "backbone_args": {"hiden": [3]}}})], "model.backbone_args.hiden: unknown option of mlp"),
    "where matches nothing": (lambda t, w: ["pretrain", w("c", {"source": {
        "where": {"Job": "astronaut"}}})], "where Job in ['astronaut'] matches no row"),
    "where column missing": (lambda t, w: ["pretrain", w("c", {"source": {
        "where": {"Jobb": "fixed"}}})],
        "`where` column 'Jobb' is not a column; did you mean 'Job'?"),
    "positive not a class": (lambda t, w: ["pretrain", w("c", {"source": {"positive": "ugly"}})],
                             "positive class 'ugly' is not a value of 'Status'"),
    "unknown builtin": (lambda t, w: ["pretrain", w("c", {"source": {"name": "mnist9"}})],
                        "unknown built-in data set 'mnist9'"),
    "pretrain without source": (lambda t, w: ["pretrain", w("c", base={"name": "c"})],
                                "pretrain needs a `source` data section"),
    "evaluate a non-run": (lambda t, w: ["evaluate", str(t)], "not a tltool run folder"),
    "evaluate missing run": (lambda t, w: ["evaluate", "runs/x/2020"], "run folder not found"),
    "extract without weights": (lambda t, w: ["extract", w("c")],
                                "extract needs trained weights"),
    "checkpoint file not a checkpoint": (lambda t, w: ["freeze-finetune", w("c", {"model": {
        "weights": _csv(t, "w.pt", text="not a checkpoint")}})], "not a PyTorch weights file"),
    "only a label column": (lambda t, w: ["freeze-finetune", w("c", base=dict(BASE, **_csv_target(
        _csv(t, "y.csv", text="Status\n" + "good\nbad\n" * 10))))],
        "no feature columns besides the label"),
    "n_train leaves one class": (lambda t, w: ["freeze-finetune", w("c", {"target": {
        "n_train": 1}})], "the 1 training row(s) hold only class"),
    "negative seed": (lambda t, w: ["pretrain", w("c", {"seed": -1})],
                      "seed: input should be greater than or equal to 0; got -1"),
    "evaluate --on bad value": (lambda t, w: ["evaluate", str(t), "--on", "both"],
                                "--on: got 'both'; allowed: source, target"),
    "a mapping used as a yaml key": (lambda t, w: ["config", _csv(t, "k.yaml",
                                                                  text="? [a, b]\n: 1\n")],
                                     "keys must be plain names"),
    **{f"layer width {h}": (lambda t, w, h=h: ["pretrain", w("c", {"model": {
        "backbone_args": {"hidden": [h]}}})], "model.backbone_args.hidden")
       for h in (-5, 0, 2_000_000_000)},
    "runs --status bogus": (lambda t, w: ["runs", str(t), "--status", "bogus"],
                            "allowed: complete"),
    "options of a table": (lambda t, w: ["pretrain", w("c", {"source": {"options": {
        "bogus": 1}}})], "do not apply to tables"),
    "a fifo as data file": (lambda t, w: ["pretrain", w("c", {"source": {
        "kind": "csv", "path": _fifo(t, "data.csv"), "label": "y", "where": None}})],
        "not a regular file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line_and_exit_2(case, cli, write_config, tmp_path):
    build, fragment = CASES[case]
    res = cli(*build(tmp_path, write_config))
    assert res.code == 2, (res.out, res.err)
    assert fragment in res.err
    assert "Traceback" not in res.err + res.out
    assert res.err.startswith("error: ") and res.err.count("\n") == 1, res.err
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.rglob("run.json"))  # nothing half-written


def test_other_architecture_lists_mismatched_keys(pretrained, cli, write_config):
    res = cli("freeze-finetune", write_config("c", {"model": {
        "weights": str(pretrained), "backbone_args": {"hidden": [32, 8]}}}))
    assert res.code == 2
    assert "model.backbone_args differ from the source model's (hidden: source [16, 8] vs " \
           "config [32, 8])" in res.err
    other = cli("freeze-finetune", write_config("d", {"model": {
        "weights": str(pretrained), "backbone": "resmlp", "backbone_args": {}}}))
    assert other.code == 2 and "the source model is a 'mlp' backbone" in other.err


def test_predict_input_missing_a_column_or_text_in_numbers(pretrained, cli, tmp_path):
    frame = load_table("credit_data").drop(columns=["Status"]).head(5)
    _csv(tmp_path, "no_income.csv", frame.drop(columns=["Income"]))
    res = cli("predict", str(pretrained), "no_income.csv")
    assert res.code == 2 and "missing column(s) the model was trained on: Income" in res.err
    bad = frame.astype({"Age": object})
    bad.loc[3, "Age"] = "old"
    _csv(tmp_path, "text.csv", bad)
    res = cli("predict", str(pretrained), "text.csv")
    assert res.code == 2 and "column 'Age' must be numeric but row 5 has 'old'" in res.err
    res = cli("predict", str(pretrained), "text.csv", "--out", "nowhere/preds.csv")
    assert res.code == 2


def test_a_failed_run_is_marked_failed_and_never_picked(pretrained, cli, write_config,
                                                        tmp_path, monkeypatch):
    import tltool.routes.training as routes

    def boom(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(routes, "fit", boom)
    with pytest.raises(RuntimeError):
        cli("pretrain", write_config("src"))
    statuses = sorted(json.loads(p.read_text())["status"]
                      for p in pretrained.parent.glob("*/run.json"))
    assert statuses == ["complete", "failed"]
    monkeypatch.undo()
    res = cli("evaluate", str(pretrained.parent / "latest"))
    assert res.code == 0 and str(pretrained) in (tmp_path / res.out.strip() /
                                                 "metrics.json").read_text()


def test_multiclass_label_rejects_a_threshold_rule(cli, write_config, tmp_path):
    frame = load_table("credit_data").dropna(subset=["Home"])
    path = _csv(tmp_path, "homes.csv", frame)
    cfg = merge(BASE, {"source": {"kind": "csv", "path": path, "label": "Home", "where": {}}})
    res = cli("pretrain", write_config("c", base=cfg))
    assert res.code == 2
    assert "decision.rule: 'threshold' needs a binary or multi-label target" in res.err


def test_non_finite_numbers_are_refused_with_their_row(pretrained, cli, write_config, tmp_path):
    """inf in a training CSV, inf or 1e308 in rows to predict: one line naming column and row,
    never empty probabilities; a checkpoint with NaN weights or a zero standard deviation is
    refused by evaluate and predict."""
    frame = load_table("credit_data")
    frame = frame[frame["Job"] == "partime"].reset_index(drop=True)
    bad = frame.astype({"Income": float})
    bad.loc[7, "Income"] = float("inf")
    bad.to_csv(tmp_path / "inf.csv", index=False)
    res = cli("freeze-finetune", write_config("c", base=dict(BASE, **_csv_target(
        str(tmp_path / "inf.csv")))))
    assert res.code == 2 and "column 'Income': row 9 holds inf, not a finite number" in res.err
    for value, expected in ((float("inf"), "not a finite number"),
                            (1e308, "too large to compute with")):
        rows = frame.drop(columns=["Status"]).head(5).astype({"Income": float})
        rows.loc[2, "Income"] = value
        rows.to_csv(tmp_path / "new.csv", index=False)
        res = cli("predict", str(pretrained), str(tmp_path / "new.csv"))
        assert res.code == 2 and "column 'Income'" in res.err and "row 4" in res.err, res.err
        assert expected in res.err
    best = pretrained / "checkpoints" / "best.pt"
    good = torch.load(best, weights_only=True)
    broken = dict(good, state_dict=dict(good["state_dict"]))
    name = next(iter(broken["state_dict"]))
    broken["state_dict"][name] = torch.full_like(broken["state_dict"][name], float("nan"))
    torch.save(broken, best)
    res = cli("evaluate", str(pretrained))
    assert res.code == 2 and f"tensor {name} holds NaN" in res.err
    zero = dict(good, preprocessor=dict(good["preprocessor"]))
    zero["preprocessor"]["numeric"] = [dict(c, std=0.0) for c in zero["preprocessor"]["numeric"]]
    torch.save(zero, best)
    res = cli("predict", str(pretrained), str(tmp_path / "new.csv"))
    assert res.code == 2 and "damaged preprocessing state" in res.err
    assert "Traceback" not in res.err
    torch.save(good, best)


def test_a_diverging_training_stops_and_is_never_latest(cli, write_config, tmp_path):
    res = cli("pretrain", write_config("big", {"train": {"lr": 1e30, "epochs": 3}}))
    assert res.code == 2 and "training diverged: the loss became" in res.err
    assert "round 1, epoch 1" in res.err or "round 1, epoch" in res.err
    runs = list((tmp_path / "runs" / "big").iterdir())
    assert [json.loads((r / "run.json").read_text())["status"] for r in runs] == ["failed"]
    res = cli("evaluate", str(tmp_path / "runs" / "big" / "latest"))
    assert res.code == 2 and "no complete" in res.err


def test_predict_out_never_destroys(pretrained, cli, tmp_path):
    """--out refuses devices, FIFOs, folders, links (unless --force to a regular file) and files
    inside a run folder; '-' writes to standard output (not with --json, which does too)."""
    new_rows = str(Path(__file__).resolve().parents[1] / "configs/credit/new_applicants.csv")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    real = tmp_path / "real.csv"
    real.write_text("keep me\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    metrics = pretrained / "metrics.json"
    before = metrics.read_bytes()
    for target, message in ((os.devnull, "is a device"), (str(fifo), "is a FIFO"),
                            (str(tmp_path), "is a folder"), (str(link), "is a symbolic link"),
                            (str(metrics), "is inside the run folder")):
        res = cli("predict", str(pretrained), new_rows, "--out", target)
        assert res.code == 2 and message in res.err, (target, res.err)
        assert "Traceback" not in res.err
    assert metrics.read_bytes() == before and real.read_text() == "keep me\n"
    assert Path(os.devnull).is_char_device() and fifo.is_fifo()
    res = cli("predict", str(pretrained), new_rows, "--out", str(link), "--force")
    assert res.code == 0 and link.is_symlink() and real.read_text().startswith("id,")
    res = cli("predict", str(pretrained), new_rows, "--out", "-")
    assert res.code == 0 and res.out.startswith("id,p_good,p_bad,prediction")
    assert "rows predicted" in res.err and str(tmp_path) in res.err
    res = cli("predict", str(pretrained), new_rows, "--out", "-", "--json")
    assert res.code == 2 and "both would use standard output" in res.err


@pytest.mark.parametrize("tamper, message", [
    (lambda p: p["spec"]["backbone_args"].update(hidden=[10**9, 10**9]),
     "backbone_args.hidden.0: input should be less than or equal to 65536"),
    (lambda p: p["spec"]["backbone_args"].update(hidden=[60000, 60000, 60000]),
     "describes a network of"),
    (lambda p: p["spec"].update(backbone="nonet"), "spec.backbone: not a known backbone"),
    (lambda p: p["spec"].update(in_features="20"), "spec.in_features: expected a whole number"),
    (lambda p: p.update(classes=[]), "classes: expected a non-empty list"),
    (lambda p: p["preprocessor"]["numeric"][0].update(mean="zero"),
     "damaged preprocessing state"),
    (lambda p: p["preprocessor"]["numeric"].pop(), "preprocessor: encodes"),
    (lambda p: p["spec"].update(prior={"mode": "offset", "specs": [{"backbone": "mlp"}] * 99}),
     "spec.prior.specs: expected 1 to 64 models"),
])
def test_a_tampered_checkpoint_is_refused_before_anything_is_allocated(
        tamper, message, pretrained, cli, tmp_path):
    import time

    best = pretrained / "checkpoints" / "best.pt"
    good = best.read_bytes()
    payload = torch.load(best, weights_only=True)
    tamper(payload)
    torch.save(payload, best)
    start = time.perf_counter()
    res = cli("evaluate", str(pretrained))
    assert time.perf_counter() - start < 20
    assert res.code == 2 and message in res.err, res.err
    assert "Traceback" not in res.err and res.err.count("\n") == 1
    best.write_bytes(good)


@pytest.mark.parametrize("where", ["checkpoint", "plot"])
def test_a_full_disk_stops_the_run_with_the_file_named(where, cli, write_config, tmp_path,
                                                        monkeypatch):
    import errno

    import matplotlib.figure


    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":
        monkeypatch.setattr(torch, "save", full)
        expected = "checkpoints/best.pt"
    else:
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
        expected = "plots/learning_curves.png"
    res = cli("pretrain", write_config("full"))
    assert res.code == 1 and "no space left on device while writing" in res.err, res.err
    assert expected in res.err and "Traceback" not in res.err
    status = [json.loads(p.read_text())["status"]
              for p in (tmp_path / "runs" / "full").glob("*/run.json")]
    assert status == ["failed"]
