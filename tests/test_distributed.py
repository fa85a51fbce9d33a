"""torchrun: 2 gloo processes train (and evaluate / predict) what 1 process does (same global
batch), only rank 0 writes a run folder, and commands that are not data-parallel are
refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _one_and_two(cli, tmp_path: Path, command: str, config: str) -> tuple[Path, Path]:
    """`command config` as one process (into one/) and as 2 torchrun processes (into two/);
    both must succeed. Returns (the 1-process run folder, rank 0's run folder)."""
    one = cli(command, config, "--set", f"output.root={tmp_path / 'one'}", "-q")
    assert one.code == 0, one.err
    two = _torchrun([command, config, "--set", f"output.root={tmp_path / 'two'}"], tmp_path)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    name = yaml.safe_load((tmp_path / config).read_text())["name"]
    (run,) = list((tmp_path / "two" / name).iterdir())  # one run folder: rank 0's
    return tmp_path / one.out.strip(), run


def _same_weights(run_a: Path, run_b: Path, tol: float = 1e-5) -> tuple[dict, dict]:
    """The two runs' best weights agree to `tol` and they chose the same epoch; returns their
    metrics.json."""
    a = torch.load(run_a / "checkpoints" / "best.pt", weights_only=True)["state_dict"]
    b = torch.load(run_b / "checkpoints" / "best.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= tol
    ma = json.loads((run_a / "metrics.json").read_text())
    mb = json.loads((run_b / "metrics.json").read_text())
    assert ma["best_epoch"] == mb["best_epoch"]
    return ma, mb


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
    ma, mb = _same_weights(runs[0], tmp_path / one.out.strip())
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


@pytest.mark.slow  # caches built on shares: also in the (default) sharded decoding test
@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(), reason="no gloo backend")
def test_two_processes_fine_tune_from_a_prefix_cache_each_built_on_its_share(cli, tmp_path):
    """freeze-finetune with a frozen, cached first block: each rank computes the cache on its
    share of the rows and the shares are gathered; the weights match one process."""
    cfg = dict(CFG, train=dict(CFG["train"], epochs=1))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    src = cli("pretrain", "cfg.yaml", "--set", f"output.root={tmp_path / 'src'}", "-q")
    assert src.code == 0, src.err
    tune = dict(CFG, name="tune",
                target={"kind": "builtin", "name": "credit_data", "where": {"Job": "partime"},
                        "split": {"val": 0.2, "test": 0.2}},
                model={"backbone": "mlp", "weights": str(tmp_path / src.out.strip()),
                       "frozen_layers": 1, "strategy": "freeze"},
                train=dict(CFG["train"], epochs=3, batch_size=25))
    del tune["source"]
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tune))
    single, run = _one_and_two(cli, tmp_path, "freeze-finetune", "tune.yaml")
    ma, mb = _same_weights(run, single)
    assert ma["cache"][0]["cached_blocks"] == mb["cache"][0]["cached_blocks"] == 1
    # extract: each rank computes its share of the features; rank 0 writes them, fits the head
    ext = dict(tune, name="ext", extract={"heads": ["logistic_regression"], "fit_on": "target"})
    (tmp_path / "ext.yaml").write_text(yaml.safe_dump(ext))
    single, run = _one_and_two(cli, tmp_path, "extract", "ext.yaml")
    for split in ("train", "val", "test"):
        a = np.load(run / "features" / f"target_{split}.npz")
        b = np.load(single / "features" / f"target_{split}.npz")
        assert (a["ids"] == b["ids"]).all() and len(a["ids"]) > 50
        assert np.abs(a["features"] - b["features"]).max() <= 1e-5
    ma = json.loads((run / "metrics.json").read_text())["heads"]["logistic_regression"]
    mb = json.loads((single / "metrics.json").read_text())
    assert ma["test"]["auroc"] == pytest.approx(mb["heads"]["logistic_regression"]["test"]
                                                ["auroc"], abs=1e-6)


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(), reason="no gloo backend")
# coral and mmd take dann's way through the loop (gathered features): slow, as is the pretrain
# variant of the same
@pytest.mark.parametrize("route", ["pooled", pytest.param("coral", marks=pytest.mark.slow),
                                   pytest.param("mmd", marks=pytest.mark.slow), "dann",
                                   pytest.param("pretrain-mmd", marks=pytest.mark.slow)])
def test_two_processes_train_pooled_and_adapted_routes_as_one_process(cli, tmp_path, route):
    """Pooled source rows (with the learned domain offset, balanced class weights) and the
    adapt methods: the alignment loss sees the whole global batch (features gathered with
    their gradients), the labelled losses are shares of the global means, the gradients are
    averaged; so 2 processes end with 1 process's weights (the domain critic's included)."""
    target = {"kind": "builtin", "name": "credit_data", "where": {"Job": "partime"},
              "split": {"val": 0.2, "test": 0.2}, "n_train": 90, "n_val": 40}
    cfg = dict(CFG, name="route", target=target,
               train=dict(CFG["train"], epochs=2, batch_size=25))
    if route == "pooled":
        cfg["train"].update(source_weight=0.3, domain_offset=True, batch_size=64)
    elif route == "pretrain-mmd":  # unsupervised: labelled source batches, target unlabelled
        cfg["adapt"] = {"method": "mmd", "weight": 1.0}
        cfg["train"].update(epochs=1)
    else:
        cfg["adapt"] = {"method": route, "weight": 0.5, "source_weight": 0.5}
    command = "pretrain" if route.startswith("pretrain") else "freeze-finetune"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    single, run = _one_and_two(cli, tmp_path, command, "cfg.yaml")
    _same_weights(run, single)
    rows_a = (run / "metrics.csv").read_text().splitlines()
    rows_b = (single / "metrics.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) > 1
    if route == "dann":
        a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["resume"]
        b = torch.load(single / "checkpoints" / "last.pt",
                       weights_only=True)["resume"]
        assert max((a["critic"][k] - b["critic"][k]).abs().max().item()
                   for k in a["critic"]) <= 1e-5


SHARDS = """
import sys
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import torch

torch.distributed.init_process_group("gloo")
from tltool import distributed
from tltool.cache import Budget, build_prefix_cache
from tltool.config import DataConfig
from tltool.data.images.dataset import load_images
from tltool.data.images.decoding import load_image_files
from tltool.errors import DataError
from tltool.tensors import Tensors

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
files = [str(f) for f in sorted(folder.glob("*/*.png"))]
opened = []
real_open = PIL.Image.open
PIL.Image.open = lambda f, *a, **k: opened.append(Path(f).name) or real_open(f, *a, **k)
x, kept = load_image_files(files, 16, "skip")
first = list(opened)  # this call's files
try:
    load_image_files(files, 16, "error")
    error = None
except DataError as exc:
    error = str(exc)
opened.clear()
# more pixels than decode_once_max_gb: every file is only checked now (decoded when used)
lazy = load_images(DataConfig(kind="image_folder", path=str(folder), on_bad_image="skip",
                              decode_cache=False, decode_once_max_gb=1e-9,
                              split={"val": 0.2, "test": 0.2, "stratify": False}), 16)
probed = list(opened)
lazy_ids = sorted(i for part in (lazy.train, lazy.val, lazy.test) for i in part.ids.tolist())
r = distributed.rank()
half = distributed.gather_rows(torch.full((r + 1, 2), r + 0.5, dtype=torch.bfloat16), 3, [1, 2])
seen = []
def blocks(xb, n, pool=False):
    seen.append(len(xb))
    return xb * 2
backbone = SimpleNamespace(forward_blocks=blocks, laid_out=lambda z, n: z)
model = SimpleNamespace(eval=lambda: None, backbone=backbone)
rows = Tensors(torch.arange(10.0).reshape(5, 2), torch.zeros(5))
cache = build_prefix_cache(model, rows, 1, Budget(2, 1e9))
torch.save({"x": x, "kept": kept, "error": error, "decoded": first, "probed": probed,
            "lazy": (lazy_ids, lazy.notes), "half": half, "cache": cache.x, "seen": seen},
           out / f"rank{r}.pt")
torch.distributed.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(), reason="no gloo backend")
def test_each_rank_decodes_and_caches_its_share_and_every_rank_holds_all(tmp_path):
    """Sharded decoding (bad files skipped or refused the same way on every rank), sharded
    checking of files decoded later, half precision gathered, and a prefix cache built on
    shares: every rank ends with what one process computes, each having done only its
    share."""
    from PIL import Image

    from tltool.data.images.decoding import load_image_files

    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(7):
        shape = (20, 24, 3) if i == 5 else (20, 24)  # one colour file: all become RGB
        (folder / "ab"[i >= 4]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            folder / "ab"[i >= 4] / f"{i}.png")
    (folder / "a" / "3.png").write_bytes(b"not an image")  # in rank 0's share
    (folder / "b" / "6.png").write_bytes(b"nor this")  # in rank 1's share
    (tmp_path / "shards.py").write_text(SHARDS)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "shards.py", str(folder), str(tmp_path)],
                         cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    files = [str(f) for f in sorted(folder.glob("*/*.png"))]
    x, kept = load_image_files(files, 16, "skip")
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for g, share in zip(got, (range(4), range(4, 7)), strict=True):
        assert sorted(g["decoded"]) == [f"{i}.png" for i in share]  # its share only
        assert sorted(g["probed"]) == [f"{i}.png" for i in share]
    for g in got:
        assert torch.equal(g["x"], x) and x.shape == (5, 3, 16, 16)
        assert g["kept"] == kept == [0, 1, 2, 4, 5]
        assert g["error"].startswith(f"{files[3]}: not a readable image")  # the first, on both
        ids, notes = g["lazy"]
        assert ids == ["a/0.png", "a/1.png", "a/2.png", "b/4.png", "b/5.png"]
        assert "skipped 2 unreadable images: a/3.png, b/6.png" in notes
        assert g["half"].dtype == torch.bfloat16 and g["half"].tolist() == [[0.5, 0.5],
                                                                            [1.5, 1.5],
                                                                            [1.5, 1.5]]
        assert torch.equal(g["cache"], torch.arange(10.0).reshape(5, 2) * 2)
    assert got[0]["seen"] == [2, 1] and got[1]["seen"] == [2]  # rows 0-2 and 3-4


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
    from tltool.runs.status import resolve_run

    with pytest.raises(RunError):
        resolve_run(tmp_path / "runs" / "ddp" / "latest")


def test_sync_batchnorm_on_gpus_only(monkeypatch):
    """Under torchrun on GPUs BatchNorm layers become SyncBatchNorm in place (the same
    parameters); on CPUs PyTorch has none, so the model is left as it is with a warning; one
    process or sync_batchnorm false: untouched."""
    from torch import nn

    from tltool import distributed

    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))

    m = model()
    assert distributed.sync_batchnorm(m, torch.device("cuda"), True) is None  # one process
    assert type(m[1]) is nn.BatchNorm2d
    monkeypatch.setattr(distributed, "active", lambda: True)
    assert distributed.sync_batchnorm(m, torch.device("cuda"), False) is None
    assert type(m[1]) is nn.BatchNorm2d
    warning = distributed.sync_batchnorm(m, torch.device("cpu"), True)
    assert "needs GPUs" in warning and type(m[1]) is nn.BatchNorm2d
    weight, mean = m[1].weight, m[1].running_mean
    m.frozen_modules, m.adapting_norms = [m[1], m[0]], [m[3][1]]  # as tltool.freeze sets them
    m[1].eval()
    assert distributed.sync_batchnorm(m, torch.device("cuda"), True) is None
    assert type(m[1]) is nn.SyncBatchNorm and type(m[3][1]) is nn.SyncBatchNorm
    assert m[1].weight is weight and m[1].running_mean is mean
    # the freeze lists name the new layers (a frozen layer stays frozen), modes are kept
    assert m.frozen_modules[0] is m[1] and m.frozen_modules[1] is m[0]
    assert m.adapting_norms[0] is m[3][1]
    assert not m[1].training and m[3][1].training
    assert distributed.sync_batchnorm(nn.Linear(2, 2), torch.device("cpu"), True) is None
