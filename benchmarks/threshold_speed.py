"""The decision-threshold sweep: tltool's one-pass sweep against the loop it replaced (one
criterion evaluation per candidate threshold), side by side on the same scores.

Usage: python benchmarks/threshold_speed.py [--rows 500 2000 8000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn import metrics as skm

from tltool.metrics import choose_threshold


def loop_sweep(y: np.ndarray, p: np.ndarray, optimize: str) -> float:
    """The earlier implementation: every candidate threshold scored from scratch."""
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
            v = float(pred[y == 1].mean() - pred[y == 0].mean())
        if v > best_v + 1e-12 or (abs(v - best_v) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)):
            best_t, best_v = float(t), v
    return best_t


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[500, 2000, 8000])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| rows | rule | loop (s) | one pass (s) | speed-up | same threshold |")
    print("|---|---|---|---|---|---|")
    for n in args.rows:
        y = rng.integers(0, 2, n)
        p = np.clip(0.5 * y + rng.normal(0.25, 0.25, n), 0, 1)
        for optimize in ("accuracy", "f1", "youden"):
            slow = best_of(lambda o=optimize, y=y, p=p: loop_sweep(y, p, o), 1 if n > 1000 else 2)
            fast = best_of(lambda o=optimize, y=y, p=p: choose_threshold(y, p, o), 5)
            same = loop_sweep(y, p, optimize) == choose_threshold(y, p, optimize)["threshold"]
            print(f"| {n} | {optimize} | {slow:.3f} | {fast:.5f} | {slow / fast:,.0f}x | "
                  f"{same} |", flush=True)


if __name__ == "__main__":
    main()
