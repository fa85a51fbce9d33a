"""What the stored backbone features save `evaluate`: a trained multi-label image run
evaluated on its own test split through the features its training stored (only the head runs)
and with `--recompute` (the backbone over every test image again), alternating, timed side by
side in one run; the two must report the same mAP.

Usage: python benchmarks/evaluate_stored.py [--repeats 2]
Case: configs/multilabel/lite0_fashion_mosaic.yaml (EfficientNet-Lite0 with ImageNet weights,
linear probe, 3,000 Fashion-MNIST mosaics at 112 px, 900 test images; needs the Debian package
dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "multilabel" / "lite0_fashion_mosaic.yaml"


def _tltool(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "tltool", *args, "-q"], check=True,
                         capture_output=True, text=True)
    return res.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"stored features": [], "--recompute": []}
    maps: dict[str, set[float]] = {k: set() for k in times}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = Path(_tltool("freeze-finetune", str(CONFIG), "--set", f"output.root={tmp}"))
        print(f"training: {time.perf_counter() - start:.1f} s")
        for _ in range(args.repeats):
            for how in times:
                start = time.perf_counter()
                out = _tltool("evaluate", str(run), *([how] if how.startswith("--") else []))
                times[how].append(time.perf_counter() - start)
                metrics = json.loads((Path(out) / "metrics.json").read_text())
                maps[how].add(round(metrics["test"]["map"], 6))
    for how, ts in times.items():
        print(f"{how}: " + ", ".join(f"{t:.1f} s" for t in ts) +
              f"; median {statistics.median(ts):.1f} s; test mAP {sorted(maps[how])}")
    stored, recomputed = (statistics.median(ts) for ts in times.values())
    print(f"ratio stored / recompute (medians): {stored / recomputed:.2f}")


if __name__ == "__main__":
    main()
