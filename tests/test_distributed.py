"""torchrun: 2 gloo processes train (and evaluate / predict) what 1 process does (same global
batch), only rank 0 writes a run folder, and commands that are not data-parallel are
refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

CFG = {"name": "ddp", "seed": 0,
       "source": {"kind": "builtin", "name": "credit_data", "where": {"Job": "fixed"},
                  "split": {"val": 0.2, "test": 0.2}},
       "model": {"backbone": "mlp", "backbone_args": {"hidden": [16, 8]}},
       # 2244 training rows, batch 50: the last global batch (44 rows) splits 22 / 22, and
       # balanced class weights make each rank's share of the mean uneven
       "train": {"epochs": 3, "batch_size": 50, "lr": 0.003, "class_weights": "balanced",
                 "early_stopping": {"patience": None}},
       "decision": {"rule": "threshold"}}


def _torchrun(args: list[str], cwd: Path, n: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # a standalone rendezvous on a free port: tests may run beside other torchrun jobs
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(n), "-m", "tltool", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(), reason="no gloo backend")
def test_two_processes_train_what_one_process_trains(cli, tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CFG))
    one = cli("pretrain", "cfg.yaml", "--set", f"output.root={tmp_path / 'one'}", "-q")
    assert one.code == 0, one.err
    two = _torchrun(["pretrain", "cfg.yaml", "--set", f"output.root={tmp_path / 'two'}"],
                    tmp_path)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    runs = list((tmp_path / "two" / "ddp").iterdir())
    assert len(runs) == 1  # one run folder: rank 0's
    assert two.stdout.strip().splitlines() == [str(runs[0])]  # rank 0 alone prints
    a = torch.load(runs[0] / "checkpoints" / "best.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / one.out.strip() / "checkpoints" / "best.pt",
                   weights_only=True)["state_dict"]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-5
    ma = json.loads((runs[0] / "metrics.json").read_text())
    mb = json.loads((tmp_path / one.out.strip() / "metrics.json").read_text())
    assert ma["best_epoch"] == mb["best_epoch"]
    assert ma["decision"]["threshold"] == pytest.approx(mb["decision"]["threshold"], abs=1e-5)
    assert json.loads((runs[0] / "run.json").read_text())["status"] == "complete"


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(), reason="no gloo backend")
def test_two_processes_evaluate_and_predict_what_one_process_does(cli, tmp_path):
    import pandas as pd

    cfg = dict(CFG, train=dict(CFG["train"], epochs=1))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    trained = cli("pretrain", "cfg.yaml", "--set", f"output.root={tmp_path / 'runs'}", "-q")
    assert trained.code == 0, trained.err
    run = str(tmp_path / trained.out.strip())
    one = cli("evaluate", run, "-q")
    assert one.code == 0, one.err
    two = _torchrun(["evaluate", run], tmp_path)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    evaluations = sorted((tmp_path / "runs" / "ddp").glob("*-evaluate"))
    assert len(evaluations) == 2  # the 1-process one and rank 0's
    a = pd.read_csv(evaluations[0] / "test_predictions.csv")
    b = pd.read_csv(evaluations[1] / "test_predictions.csv")
    assert len(a) == len(b) == 561 and (a["id"] == b["id"]).all()
    assert (a["p_bad"] - b["p_bad"]).abs().max() <= 1e-6  # every row, in the same order
    new = Path(__file__).resolve().parents[1] / "configs" / "credit" / "new_applicants.csv"
    out = tmp_path / "pred.csv"
    two = _torchrun(["predict", run, str(new), "--out", str(out)], tmp_path)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = cli("predict", run, str(new), "--out", "-", "-q")
    assert one.code == 0, one.err
    from io import StringIO

    c, d = pd.read_csv(out), pd.read_csv(StringIO(one.out))
    assert len(c) == 20 and (c["p_bad"] - d["p_bad"]).abs().max() <= 1e-6
    assert len(list((tmp_path / "runs" / "ddp").glob("*-predict"))) == 2


def test_commands_that_are_not_data_parallel_are_refused(tmp_path):
    res = _torchrun(["select", "nothing.yaml"], tmp_path)
    assert res.returncode != 0
    assert "select does not run data-parallel under torchrun yet" in res.stdout + res.stderr


@pytest.mark.slow
def test_a_killed_rank_fails_the_whole_run(tmp_path):
    """SIGKILL one worker mid-training: torchrun stops the other, the run folder says failed
    and nothing counts as latest."""
    import signal
    import time

    cfg = dict(CFG, train=dict(CFG["train"], epochs=500))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "-m", "tltool", "pretrain", "cfg.yaml",
                             "--set", f"output.root={tmp_path / 'runs'}", "-q"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = list((tmp_path / "runs").rglob("metrics.csv"))
        if rows and len(rows[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("training never started")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(max(workers, key=int)), signal.SIGKILL)  # the later-started worker: rank 1
    proc.wait(timeout=300)
    assert proc.returncode != 0
    run = next((tmp_path / "runs" / "ddp").iterdir())
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    from tltool.errors import RunError
    from tltool.runs import resolve_run

    with pytest.raises(RunError):
        resolve_run(tmp_path / "runs" / "ddp" / "latest")
