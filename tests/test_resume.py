"""`tltool resume`: an interrupted training continues from its last epoch and ends with the
metrics.json of an uninterrupted run, byte for byte (CPU)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tltool.runs.folder as runs
from tltool.runs.status import run_status

CASES = {
    # several rounds (head only -> top block -> everything), early stopping in play
    "rounds": {"train": {"epochs": 4, "rounds": [
        {"strategy": "linear_probe", "epochs": 3, "lr": 0.01},
        {"frozen_layers": 1, "epochs": 4, "lr": 0.005},
        {"frozen_layers": 0, "strategy": "full", "epochs": 3, "lr": 0.002}],
        "early_stopping": {"patience": 2}}},
    # domain adaptation with a DANN critic (its weights and optimiser state)
    "dann": {"train": {"epochs": 5}, "adapt": {"method": "dann", "weight": 0.5}},
}


def _interrupt_after(monkeypatch, saves: int) -> None:
    """Stop the process like Ctrl-C after `saves` checkpoint writes (`monkeypatch`: a context
    of its own, so undoing it leaves the test's other patches alone)."""
    count = {"n": 0}
    original = runs.RunFolder.save_checkpoint

    def save(self, name, payload):
        path = original(self, name, payload)
        count["n"] += 1
        if count["n"] >= saves:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(runs.RunFolder, "save_checkpoint", save)


# dann resumes like rounds plus a critic: slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "dann" else c
                                  for c in CASES])
def test_an_interrupted_training_resumes_to_the_same_result(case, pretrained, cli,
                                                            write_config, monkeypatch,
                                                            tmp_path):
    changes = {"model": {"weights": str(pretrained), "backbone_args": {}}, **CASES[case]}
    whole = cli("freeze-finetune", write_config("whole", changes))
    assert whole.code == 0, whole.err
    reference = tmp_path / whole.out.strip()
    for saves in (2, 7):
        with pytest.MonkeyPatch.context() as mp:
            _interrupt_after(mp, saves)
            res = cli("freeze-finetune", write_config(f"cut{saves}", {
                **changes, "name": "whole", "output": {"root": f"cut{saves}"}}))
        assert res.code == 130
        cut = next((tmp_path / f"cut{saves}" / "whole").iterdir())
        assert json.loads((cut / "run.json").read_text())["status"] == "failed"
        again = cli("resume", str(cut))
        assert again.code == 0, again.err
        resumed = tmp_path / again.out.strip()
        status = json.loads((resumed / "run.json").read_text())
        assert status["resumed_from"] == str(cut.resolve()) and status["status"] == "complete"
        for name in ("metrics.json", "metrics.csv", "thresholds.json"):
            assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name


def test_resume_refuses_what_it_cannot_continue(pretrained, cli, tmp_path):
    res = cli("resume", str(pretrained))
    assert res.code == 2 and "the run is complete; nothing to resume" in res.err
    res = cli("resume", str(tmp_path))
    assert res.code == 2 and "not a tltool run folder" in res.err


def test_a_killed_run_is_stale_not_running(cli, write_config, tmp_path):
    """SIGKILL leaves run.json saying running; every command that reads it sees stale."""
    proc = subprocess.Popen([sys.executable, "-m", "tltool", "pretrain",
                             write_config("k", {"train": {"epochs": 200}})], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    folder = tmp_path / "runs" / "k"
    deadline = time.time() + 120
    while not list(folder.glob("*/checkpoints/last.pt")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = next(folder.iterdir())
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert run_status(run)["status"] == "stale"
    res = cli("evaluate", str(run))
    assert res.code == 2 and "'stale'" in res.err and "tltool resume" in res.err


@pytest.mark.slow
def test_sigkill_at_ten_random_points_then_resume_gives_the_same_result(tmp_path):
    """The kill test: SIGKILL a training at random moments (inside epochs, during checkpoint
    writes), resume each, compare with the uninterrupted run: all identical."""
    root = Path(__file__).resolve().parents[1]
    config = root / "configs" / "credit" / "rounds.yaml"
    tl = [sys.executable, "-m", "tltool"]
    src = subprocess.run([*tl, "pretrain", str(root / "configs/credit/pretrain.yaml"),
                          "--set", f"output.root={tmp_path}", "--set", "train.epochs=10"],
                         capture_output=True, text=True, cwd=tmp_path, check=True)
    sets = ["--set", f"model.weights={src.stdout.strip()}", "--set", "train.rounds.0.epochs=8",
            "--set", "train.rounds.1.epochs=8", "--set", "train.rounds.2.epochs=8"]
    whole = subprocess.run([*tl, "freeze-finetune", str(config), "--set",
                            f"output.root={tmp_path}/whole", *sets], capture_output=True,
                           text=True, cwd=tmp_path, check=True)
    reference = Path(whole.stdout.strip())
    rng = random.Random(0)
    for trial in range(10):
        out = tmp_path / f"cut{trial}"
        proc = subprocess.Popen([*tl, "freeze-finetune", str(config), "--set",
                                 f"output.root={out}", *sets], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stop_after = rng.randint(1, 23)
        deadline = time.time() + 300
        while time.time() < deadline:
            csvs = list(out.glob("*/*/metrics.csv"))
            if csvs and len(csvs[0].read_text().splitlines()) > stop_after:
                break
            time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cut = next(out.glob("*/*"))
        again = subprocess.run([*tl, "resume", str(cut)], capture_output=True, text=True,
                               cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        resumed = Path(again.stdout.strip())
        for name in ("metrics.json", "metrics.csv"):
            assert (resumed / name).read_bytes() == (reference / name).read_bytes(), \
                (trial, stop_after, name)


def test_an_image_training_with_augmented_cached_views_resumes_exactly(cli, write_config,
                                                                       tmp_path):
    """Images: augmentation draws from the random state, the cached prefix holds augmented
    views (rebuilt at the round's start from the saved state), layouts as first chosen."""
    changes = {"target": {"kind": "builtin", "name": "digits", "where": {}, "n_train": 120,
                          "n_val": 40, "image_size": 16, "augment": "light",
                          "split": {"val": 0.2, "test": 0.2}},
               "model": {"backbone": "small_cnn", "backbone_args": {"channels": [8, 8],
                                                                    "hidden": 16},
                         "weights": "none", "frozen_layers": 1, "strategy": "freeze"},
               "train": {"epochs": 5, "batch_size": 32, "cache_views": 2},
               "decision": {"rule": "argmax"}}
    whole = cli("freeze-finetune", write_config("img", changes))
    assert whole.code == 0, whole.err
    reference = tmp_path / whole.out.strip()
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_after(mp, 5)
        res = cli("freeze-finetune", write_config("img-cut", {**changes, "name": "img",
                                                              "output": {"root": "cut"}}))
    assert res.code == 130
    again = cli("resume", str(next((tmp_path / "cut" / "img").iterdir())))
    assert again.code == 0, again.err
    resumed = tmp_path / again.out.strip()
    for name in ("metrics.json", "metrics.csv"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
