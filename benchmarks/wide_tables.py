"""Wide tables: the time to read, validate and encode a 30-row CSV of 1,000 to 100,000 columns,
per column, and the whole `tltool pretrain` (a small MLP, one epoch) and `tltool predict` on it.

Each table: numeric columns (one digit a cell, as in issue 20's table; a few empty cells and
a few constant columns, so imputation and the dropping of constant columns are exercised),
three categorical columns and a yes/no label. The time per column should stay flat as the
width grows.

Stages, timed in this process (wall seconds): read (`read_csv` alone), load (`load_tabular`:
the read again, then the label, the type check of every cell and the splits), encode
(`TabularPreprocessor` fitted on the training rows, then the three splits encoded);
read+validate+encode is load + encode, in wall and CPU seconds, and its CPU time per column
(the figure that should stay flat). The commands run as `python -m tltool` in a
child process (torch's import included, a few seconds).

Usage: python benchmarks/wide_tables.py [--columns 1000 10000 100000] [--no-commands]
           [--limit SECONDS]
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROWS = 30
CATEGORICAL = 3


def write_table(path: Path, columns: int, seed: int = 0) -> None:
    """A 30-row CSV: `columns` numeric columns, three categorical ones and a yes/no label."""
    rng = np.random.default_rng(seed)
    # one digit a cell, as the table of issue 20 (100,000 columns: 6.7 MB)
    values = rng.integers(0, 10, size=(ROWS, columns)).astype(str)
    values[rng.random(size=values.shape) < 0.01] = ""  # missing cells: imputed
    values[:, ::97] = "1"  # constant columns: dropped
    names = [f"x{i}" for i in range(columns)] + [f"c{j}" for j in range(CATEGORICAL)] + ["label"]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(",".join(names) + "\n")
        for r in range(ROWS):
            cats = [f"k{(r * (j + 2)) % (j + 3)}" for j in range(CATEGORICAL)]
            fh.write(",".join([*values[r], *cats, "yes" if r % 2 else "no"]) + "\n")


class OutOfTime(Exception):
    pass


def _alarm(signum, frame):
    raise OutOfTime


class Clock:
    """Wall and CPU seconds since it was made (CPU: this process, or its finished children).
    The machine is shared: CPU seconds move less with the others' load than wall seconds."""

    def __init__(self, children: bool = False) -> None:
        self.children = children
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    def _cpu(self) -> float:
        if not self.children:
            return time.process_time()
        use = resource.getrusage(resource.RUSAGE_CHILDREN)
        return use.ru_utime + use.ru_stime

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, self._cpu() - self.cpu


def stages(path: Path) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds to read; to load (read, validate, split); to encode; and the total
    of read + validate + encode (load + encode), in this process."""
    from tltool.config import DataConfig
    from tltool.data.csv import read_csv
    from tltool.data.preprocess import TabularPreprocessor
    from tltool.data.tabular import load_tabular
    from tltool.inputs import encode_tabular

    cfg = DataConfig(kind="csv", path=str(path), label="label",
                     split={"val": 0.2, "test": 0.2, "seed": 0})
    clock = Clock()
    read_csv(path)
    read = clock.read()
    clock = total = Clock()
    data = load_tabular(cfg)  # reads again, then validates and splits
    load = clock.read()
    clock = Clock()
    pre = TabularPreprocessor().fit(data.train.frame, data.feature_columns, data.categorical,
                                    data.origin)
    for split in (data.train, data.val, data.test):
        encode_tabular(pre, split, data.origin)
    return {"read": read, "load": load, "encode": clock.read(), "total": total.read()}


def command(argv: list[str], cwd: Path, limit: int) -> tuple[float, float] | None:
    """(wall, CPU) seconds of `python -m tltool ARGV`, None past `limit` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    clock = Clock(children=True)
    try:
        subprocess.run([sys.executable, "-m", "tltool", *argv], cwd=cwd, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    return clock.read()


def commands(path: Path, work: Path, limit: int) -> list[tuple[float, float] | None | str]:
    """`tltool pretrain` (MLP [16], 1 epoch) and `tltool predict` with it, timed."""
    config = {"seed": 0, "source": {"kind": "csv", "path": str(path), "label": "label",
                                    "split": {"val": 0.2, "test": 0.2, "seed": 0}},
              "model": {"backbone": "mlp", "backbone_args": {"hidden": [16]}},
              "train": {"epochs": 1, "batch_size": 32},
              "output": {"root": str(work / "runs")}, "name": "wide"}
    cfg = work / "wide.yaml"
    cfg.write_text(yaml.safe_dump(config))
    pretrain = command(["pretrain", str(cfg)], work, limit)
    if pretrain is None:
        return [None, "not run"]  # nothing to predict with
    out = work / "predictions.csv"
    predict = command(["predict", str(work / "runs" / "wide" / "latest"), str(path),
                       "--out", str(out)], work, limit)
    return [pretrain, predict]


def _cells(seconds: tuple[float, float] | None | str, limit: int) -> str:
    """'wall | CPU' seconds."""
    if seconds is None:
        return f"> {limit} | -"
    if isinstance(seconds, str):
        return f"{seconds} | -"
    return f"{seconds[0]:.2f} | {seconds[1]:.2f}"


def measure(columns: int, work: Path, args: argparse.Namespace) -> str:
    """One row of the table: the stages (in this process) and the commands."""
    path = work / "wide.csv"
    write_table(path, columns)
    row = [f"{columns:,}", f"{path.stat().st_size / 1e6:.1f}"]
    signal.alarm(args.limit)
    try:
        t = stages(path)
        row += [f"{t[k][0]:.2f}" for k in ("read", "load", "encode")]
        row += [_cells(t["total"], args.limit), f"{t['total'][1] / columns * 1e6:.0f}"]
    except OutOfTime:
        row += ["-", "-", "-", _cells(None, args.limit), "-"]
    finally:
        signal.alarm(0)
    timed = ["", ""] if args.no_commands else commands(path, work, args.limit)
    row += [" | " if t == "" else _cells(t, args.limit) for t in timed]
    return "| " + " | ".join(row) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--columns", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--no-commands", action="store_true", help="time the stages only")
    ap.add_argument("--limit", type=int, default=600,
                    help="give up on a measurement after this many seconds")
    args = ap.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    print("| columns | MB | read (s) | load (s) | encode (s) | read+validate+encode (s) | CPU (s) "
          "| CPU µs per column | pretrain (s) | CPU (s) | predict (s) | CPU (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for columns in args.columns:
            work = Path(tmp) / str(columns)
            work.mkdir()
            print(measure(columns, work, args), flush=True)


if __name__ == "__main__":
    main()
