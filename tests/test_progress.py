"""Progress reports: the engine reports through tltool.progress, only the CLI shows them."""

from __future__ import annotations

import io
import json
import re

from tltool import progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_epoch_lines_carry_metrics_and_time_left():
    out, clock = io.StringIO(), Clock()
    rep = progress.Plain(out, clock=clock)
    for epoch in (1, 2):
        clock.now += 2.0
        rep.epoch(progress.Epoch(round=1, rounds=2, epoch=epoch, planned=10, seconds=2.0,
                                 metrics={"train_loss": 0.5, "val_auroc": 0.75,
                                          "val_f1": None}))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("tltool: train: epoch 1/10 (round 1/2) train_loss 0.5000 "
                               "val_auroc 0.7500")
    assert "val_f1" not in lines[0]  # a missing number is left out, not printed as None
    assert lines[1].endswith("· 2.0 s · at most 16 s left")  # 8 epochs left at 2 s each


def test_plain_steps_quiet_when_short_and_report_when_long():
    out, clock = io.StringIO(), Clock()
    rep = progress.Plain(out, every=10.0, clock=clock)
    with rep.steps("predict", total=100) as advance:
        clock.now += 1.0
        advance(100)
    assert out.getvalue() == ""  # a one-second step says nothing
    with rep.steps("extract: train", total=1000) as advance:
        for _ in range(4):
            clock.now += 5.0
            advance(250)
    lines = out.getvalue().splitlines()
    assert lines == ["tltool: extract: train: 500/1,000 · about 10 s left",
                     "tltool: extract: train: 1,000/1,000",
                     "tltool: extract: train: done in 20 s"]


def test_default_reporter_shows_nothing_and_use_restores():
    assert type(progress.current()) is progress.Reporter
    rep = progress.Plain(io.StringIO())
    with progress.use(rep):
        assert progress.current() is rep
    assert type(progress.current()) is progress.Reporter


def test_for_stream_chooses_by_terminal_and_quiet():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert type(progress.for_stream(io.StringIO(), quiet=False)) is progress.Plain
    assert type(progress.for_stream(Tty(), quiet=True)) is progress.Reporter
    assert type(progress.for_stream(io.StringIO(), quiet=True)) is progress.Reporter


def test_durations():
    assert [progress.duration(s) for s in (0.4, 59, 61, 3725)] == [
        "0 s", "59 s", "1 min 01 s", "1 h 02 min"]
    assert progress.eta(0, 10, 5.0) is None


def test_cli_prints_one_line_per_epoch_on_stderr_and_quiet_silences(cli, write_config):
    cfg = write_config("src", {"train": {"epochs": 3, "early_stopping": {"patience": None}}})
    res = cli("pretrain", cfg)
    assert res.code == 0, res.err
    epochs = [ln for ln in res.err.splitlines() if re.match(r"tltool: train: epoch \d/3", ln)]
    assert len(epochs) == 3, res.err
    assert "train_loss" in epochs[0] and "val_loss" in epochs[0]
    assert "epoch" not in res.out  # stdout keeps only the run folder
    quiet = cli("pretrain", cfg, "--quiet", "--json")
    assert quiet.code == 0
    assert "epoch" not in quiet.err and "run folder" not in quiet.err
    assert json.loads(quiet.out)["status"] == "complete"  # stdout is the JSON object alone


def test_select_reports_candidates_not_every_fold(cli, write_config):
    cfg = write_config("sel", {"source": None, "train": {"epochs": 2},
                               "select": {"folds": 2, "repeats": 1, "candidates": [
                                   {"name": "lr", "set": {"model.backbone": "raw",
                                                          "model.backbone_args": {},
                                                          "model.head":
                                                              "logistic_regression"}},
                                   {"name": "net", "set": {}}]}})
    res = cli("select", cfg)
    assert res.code == 0, res.err
    epochs = [ln for ln in res.err.splitlines() if "train: epoch" in ln]
    # 2 folds x 2 epochs of cross-validation are silent; only the winner's refit may report
    assert len(epochs) <= 2, res.err
