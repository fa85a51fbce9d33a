"""A behaviour snapshot: run a fixed battery of tltool commands and digest every file they
write, so that two versions of the code can be compared file by file (a refactor must leave
every digest unchanged on the same machine and thread count).

What is compared: every JSON file (content, with the run root, time stamps and wall times
taken out), CSV and text files (the run root taken out), checkpoints (every tensor's bytes and
every other field), .npz arrays, and what each command printed on stdout. Not compared: PNG
plots, TensorBoard event files, timing.json / runtime.json / env.json / run.json /
command.txt (times, hosts, versions).

Usage: python tools/snapshot.py --out SNAPSHOT.json [--only NAME ...] [--list]
       python tools/snapshot.py --diff A.json B.json
Run with OMP_NUM_THREADS=1 for digests that hold across machines' thread counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_FILES = {"timing.json", "runtime.json", "env.json", "run.json", "command.txt"}
SKIP_SUFFIX = {".png"}
SKIP_DIRS = {"tensorboard"}
VOLATILE = {"wall_seconds", "seconds", "rows_per_second", "started", "pid", "host",
            "pid_started", "elapsed", "tltool"}
STAMP = re.compile(r"\d{8}-\d{6}-([a-z-]+)(-\d+)?")
# wall times in what a command prints (progress lines, select's per-candidate seconds), and
# the progress lines of long steps, printed at most every 10 s (so as often as time allows)
TIMES = re.compile(r"\d+(\.\d+)? ?(s|ms|rows/s)\b|at most .* left")
PROGRESS = re.compile(r": \d+/\d+ · |: done in T$")

CREDIT = "configs/credit"
E = ["--set", "train.epochs=4"]

# (name, argv after `tltool`): run in order in one output root; RUN(name) is that
# experiment's latest run.
BATTERY: list[tuple[str, list[str]]] = [
    ("pretrain", ["pretrain", f"{CREDIT}/pretrain.yaml", *E]),
    ("finetune", ["freeze-finetune", f"{CREDIT}/finetune.yaml", *E,
                  "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("evaluate", ["evaluate", "ROOT/credit-finetune/latest"]),
    ("evaluate-source", ["evaluate", "ROOT/credit-pretrain/latest", "--on", "target"]),
    ("evaluate-csv", ["evaluate", "ROOT/credit-finetune/latest", "--csv",
                      f"{CREDIT}/new_applicants.csv"]),
    ("predict", ["predict", "ROOT/credit-finetune/latest", f"{CREDIT}/new_applicants.csv",
                 "--id-column", "applicant_id"]),
    ("bias-only", ["freeze-finetune", f"{CREDIT}/bias_only.yaml", *E,
                   "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("rounds", ["freeze-finetune", f"{CREDIT}/rounds.yaml",
                "--set", "model.weights=ROOT/credit-pretrain/latest",
                "--set", "train.rounds=[{frozen_layers: 2, epochs: 2}, "
                "{frozen_layers: 0, epochs: 2, lr: 0.0003}]"]),
    ("coral", ["freeze-finetune", f"{CREDIT}/adapt.yaml", *E,
               "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("mmd-pretrain", ["pretrain", f"{CREDIT}/pretrain.yaml", "--set", "train.epochs=3",
                      "--set", "name=mmd-pretrain", "--set", "adapt.method=mmd"]),
    ("dann", ["freeze-finetune", f"{CREDIT}/adapt.yaml", "--set", "train.epochs=3",
              "--set", "name=dann", "--set", "adapt.method=dann",
              "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("l2sp", ["freeze-finetune", f"{CREDIT}/finetune.yaml", *E, "--set", "name=l2sp",
              "--set", "model.frozen_layers=0", "--set", "train.weight_decay=0",
              "--set", "train.l2sp={alpha: 0.1, beta: 0.01}",
              "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("pooled", ["freeze-finetune", f"{CREDIT}/finetune.yaml", *E, "--set", "name=pooled",
                "--set", "train.source_weight=0.5", "--set", "train.domain_offset=true",
                "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("prior-offset", ["freeze-finetune", f"{CREDIT}/target_only.yaml", *E,
                      "--set", "name=prior-offset", "--set", "model.prior=offset",
                      "--set", "model.prior_weights=ROOT/credit-pretrain/latest"]),
    ("prior-input-lr", ["freeze-finetune", f"{CREDIT}/target_only.yaml",
                        "--set", "name=prior-input-lr", "--set", "model.backbone=raw",
                        "--set", "model.backbone_args={}",
                        "--set", "model.head=logistic_regression", "--set", "model.prior=input",
                        "--set", "model.prior_weights=ROOT/credit-pretrain/latest"]),
    ("keep-head", ["freeze-finetune", f"{CREDIT}/finetune.yaml", "--set", "name=keep-head",
                   "--set", "model.keep_head=true", "--set", "train.epochs=0",
                   "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("target-gb", ["freeze-finetune", f"{CREDIT}/target_only.yaml", "--set", "name=target-gb",
                   "--set", "model.backbone=raw", "--set", "model.backbone_args={}",
                   "--set", "model.head=gradient_boosting", "--set", "train.source_weight=1"]),
    ("ridge-amount", ["freeze-finetune", "configs/credit_amount/target_only.yaml",
                      "--set", "name=ridge-amount", "--set", "model.backbone=raw",
                      "--set", "model.backbone_args={}", "--set", "model.head=ridge"]),
    ("calibrated", ["freeze-finetune", f"{CREDIT}/finetune.yaml", *E, "--set", "name=calibrated",
                    "--set", "decision.calibrate=temperature", "--set", "decision.optimize=f1",
                    "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("predict-calibrated", ["predict", "ROOT/calibrated/latest", f"{CREDIT}/new_applicants.csv",
                            "--id-column", "applicant_id"]),
    ("seed1", ["freeze-finetune", f"{CREDIT}/finetune.yaml", *E, "--set", "seed=1",
               "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("ensemble", ["ensemble", "ROOT/credit-finetune/latest", "ROOT/l2sp/latest",
                  "--name", "credit-avg"]),
    ("evaluate-ensemble", ["evaluate", "ROOT/credit-avg/latest"]),
    ("extract", ["extract", f"{CREDIT}/extract.yaml",
                 "--set", "model.weights=ROOT/credit-pretrain/latest"]),
    ("amount-pretrain", ["pretrain", "configs/credit_amount/pretrain.yaml", *E]),
    ("amount-finetune", ["freeze-finetune", "configs/credit_amount/finetune.yaml", *E,
                         "--set", "model.weights=ROOT/credit-amount-pretrain/latest"]),
    ("amount-predict", ["predict", "ROOT/credit-amount-finetune/latest",
                        f"{CREDIT}/new_applicants.csv"]),
    ("amount-extract", ["extract", "configs/credit_amount/extract.yaml",
                        "--set", "model.weights=ROOT/credit-amount-pretrain/latest"]),
    ("select", ["select", f"{CREDIT}/select.yaml", "--set", "select.folds=3",
                "--set", "select.repeats=1", "--set", "train.epochs=6",
                "--set", "target.n_train=40", "--set", "target.n_val=20",
                "--set", "select.research=true"]),
    ("evaluate-select", ["evaluate", "ROOT/credit-select/latest"]),
    ("predict-select", ["predict", "ROOT/credit-select/latest", f"{CREDIT}/new_applicants.csv",
                        "--id-column", "applicant_id"]),
    ("select-one-se", ["select", f"{CREDIT}/select.yaml", "--set", "select.folds=3",
                       "--set", "select.repeats=1", "--set", "train.epochs=6",
                       "--set", "name=select-one-se", "--set", "select.rule=one_se",
                       "--set", "target.n_train=40", "--set", "target.n_val=20",
                       "--set", "decision.calibrate=temperature"]),
    ("select-amount", ["select", "configs/credit_amount/select.yaml", "--set", "select.folds=3",
                       "--set", "select.repeats=1", "--set", "train.epochs=5",
                       "--set", "target.n_train=40", "--set", "target.n_val=20"]),
    ("mnist", ["pretrain", "configs/digits/pretrain_mnist.yaml", "--set", "train.epochs=2",
               "--set", "source.n_train=600"]),
    ("digits", ["freeze-finetune", "configs/digits/finetune_digits.yaml",
                "--set", "train.epochs=3", "--set", "model.weights=ROOT/mnist-pretrain/latest"]),
    ("digits-evaluate", ["evaluate", "ROOT/digits-finetune/latest"]),
    ("digits-adapt", ["pretrain", "configs/digits/adapt_mnist.yaml", "--set", "train.epochs=2",
                      "--set", "source.n_train=600", "--set", "target.n_train=300"]),
    ("digits-select", ["select", "configs/digits/select.yaml", "--set", "select.folds=2",
                       "--set", "select.repeats=1", "--set", "train.epochs=2",
                       "--set", "source.n_train=600", "--set", "target.n_train=40",
                       "--set", "target.n_val=20"]),
    ("digits-select-adapt", ["select", "configs/digits/select_adapt.yaml",
                             "--set", "train.epochs=2", "--set", "source.n_train=600",
                             "--set", "target.n_train=200"]),
    ("mosaic", ["freeze-finetune", "configs/multilabel/small_cnn_mnist_mosaic.yaml",
                "--set", "train.epochs=2", "--set", "target.options={n: 300}"]),
    ("mosaic-evaluate", ["evaluate", "ROOT/mosaic-small-cnn/latest"]),
]


def tltool(args: list[str], root: Path, env: dict[str, str]) -> dict:
    argv = [a.replace("ROOT", str(root)) for a in args]
    if argv[0] in ("pretrain", "freeze-finetune", "extract", "select"):
        argv += ["--set", f"output.root={root}"]
    res = subprocess.run([sys.executable, "-m", "tltool", *argv], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    return {"exit": res.returncode, "stdout": clean(res.stdout, root),
            "stderr": [line for line in (TIMES.sub("T", raw) for raw in
                                         clean(res.stderr, root).splitlines())
                       if not PROGRESS.search(line)]}


def clean(text: str, root: Path) -> str:
    text = text.replace(str(root), "ROOT").replace(str(ROOT), "REPO")
    return STAMP.sub(lambda m: f"RUN-{m.group(1)}", text)


def scrub(value, root: Path):
    if isinstance(value, dict):
        return {k: scrub(v, root) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v, root) for v in value]
    if isinstance(value, str):
        return clean(value, root)
    return value


def digest_tensorish(value, h) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        h.update(f"T{tuple(value.shape)}{value.dtype}".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                 .tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(f"K{k}".encode())
            digest_tensorish(value[k], h)
    elif isinstance(value, list | tuple):
        h.update(b"L")
        for v in value:
            digest_tensorish(v, h)
    else:
        h.update(repr(value).encode())


def read_file(path: Path, root: Path):
    if path.suffix == ".json":
        try:
            return scrub(json.loads(path.read_text()), root)
        except ValueError:
            return "unreadable json"
    if path.suffix in (".csv", ".txt", ".yaml", ".md"):
        return clean(path.read_text(), root)
    if path.suffix == ".pt":
        import torch

        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict):  # the task kind, stored since issue 19, is compared
            payload = {k: v for k, v in payload.items() if k != "task"}  # through metrics
        if isinstance(payload, dict) and "resume" in payload:
            payload = dict(payload)
            state = dict(payload["resume"])
            state.pop("timing", None)
            payload["resume"] = state
        h = hashlib.sha1()
        digest_tensorish(payload, h)
        return "sha1:" + h.hexdigest()
    if path.suffix == ".npz":
        import numpy as np

        h = hashlib.sha1()
        with np.load(path, allow_pickle=False) as z:
            for k in sorted(z.files):
                h.update(k.encode())
                h.update(np.ascontiguousarray(z[k]).tobytes())
        return "sha1:" + h.hexdigest()
    return "sha1:" + hashlib.sha1(path.read_bytes()).hexdigest()


def collect(root: Path) -> dict:
    out = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name in SKIP_FILES or path.suffix in SKIP_SUFFIX:
            continue
        rel = path.relative_to(root)
        if any(p in SKIP_DIRS for p in rel.parts) or path.name.startswith("."):
            continue
        out[clean(str(rel), root)] = read_file(path, root)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--diff", nargs=2, type=Path)
    args = ap.parse_args()
    if args.list:
        print("\n".join(n for n, _ in BATTERY))
        return 0
    if args.diff:
        return diff(*args.diff)
    env = dict(os.environ, TLTOOL_CACHE_DIR=tempfile.mkdtemp(prefix="tltool-snap-cache-"))
    result = {"commands": {}, "files": {}}
    with tempfile.TemporaryDirectory(prefix="tltool-snap-") as tmp:
        root = Path(tmp)
        for name, argv in BATTERY:
            if args.only and name not in args.only:
                continue
            result["commands"][name] = tltool(argv, root, env)
            print(f"{name}: exit {result['commands'][name]['exit']}", flush=True)
        result["files"] = collect(root)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


def diff(a: Path, b: Path) -> int:
    A, B = json.loads(a.read_text()), json.loads(b.read_text())
    for side in (A, B):  # snapshots taken before the progress lines were left out
        for cmd in side["commands"].values():
            cmd["stderr"] = [line for line in cmd.get("stderr", []) if not PROGRESS.search(line)]
    bad = 0
    for part in ("commands", "files"):
        for k in sorted(set(A[part]) | set(B[part])):
            if A[part].get(k) != B[part].get(k):
                bad += 1
                print(f"DIFF {part}/{k}")
                if isinstance(A[part].get(k), dict) and isinstance(B[part].get(k), dict):
                    for kk in sorted(set(A[part][k]) | set(B[part][k])):
                        if A[part][k].get(kk) != B[part][k].get(kk):
                            print(f"   {kk}: {str(A[part][k].get(kk))[:300]}\n"
                                  f"   -> {str(B[part][k].get(kk))[:300]}")
    print(f"{bad} difference(s); {len(A['files'])} vs {len(B['files'])} files")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
