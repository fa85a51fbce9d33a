"""Choice rules compared offline on kept `select` runs: which members each rule would average,
and what that average scores on the test split (research only; the test split never feeds a
rule).

Input: the folders `python benchmarks/select_table.py --keep DIR` writes (DIR/n-N-seed-S/ with
leaderboard.json and research_predictions.npz: every candidate's per-fold cross-validation
scores and its refit's test predictions). Every rule reads the leaderboard only; the average
of its members' test predictions is then scored like `select`'s own ensemble (AUROC or
accuracy of the averaged probabilities, RMSE of the averaged values).

Rules:
- band3: the default (every candidate within 3 standard errors of the best mean);
- paired2: every candidate whose per-fold difference to the best has a mean within 2 corrected
  standard errors (Nadeau & Bengio's correction for overlapping training sets,
  var * (1/J + n_test/n_train)): the candidates a corrected resampled t-test cannot tell
  from the best;
- all: every candidate; top5: the five best means; best: the best mean alone.

Usage: python benchmarks/rule_study.py DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

ENSEMBLE = "ensemble of candidates"


def members(board: dict, rule: str) -> list[str]:
    lower = board["lower_is_better"]
    sign = -1 if lower else 1
    cands = [c for c in board["candidates"] if c["name"] != ENSEMBLE and c["mean"] is not None]
    best = max(cands, key=lambda c: (sign * c["mean"], -c["complexity"]))
    ranked = sorted(cands, key=lambda c: -sign * c["mean"])
    if rule == "best":
        return [best["name"]]
    if rule == "all":
        return [c["name"] for c in cands]
    if rule == "top5":
        return [c["name"] for c in ranked[:5]]
    if rule == "band3":
        bar = sign * best["mean"] - 3 * (best["se"] or 0.0)
        return [c["name"] for c in cands if sign * c["mean"] >= bar - 1e-12]
    if rule == "paired2":
        k = board["folds"]
        out = []
        b = np.array([np.nan if s is None else s for s in best["fold_scores"]])
        for c in cands:
            s = np.array([np.nan if v is None else v for v in c["fold_scores"]])
            d = sign * (b - s)
            d = d[~np.isnan(d)]
            if c["name"] == best["name"] or len(d) < 2:
                out.append(c["name"])
                continue
            var = d.var(ddof=1) * (1 / len(d) + 1 / (k - 1))
            if d.mean() <= 2 * math.sqrt(var) + 1e-12:
                out.append(c["name"])
        return out
    raise ValueError(rule)


def test_score(metric: str, y: np.ndarray, proba: np.ndarray) -> float:
    if metric == "auroc":
        return float(skm.roc_auc_score(y, proba[:, 1]))
    if metric == "accuracy":
        return float((proba.argmax(1) == y).mean())
    if metric == "rmse":
        return float(np.sqrt(np.mean((proba[:, 0] - y) ** 2)))
    raise ValueError(metric)


RULES = ("band3", "paired2", "all", "top5", "best")


def study(folder: Path) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for run in sorted(folder.glob("n-*-seed-*")):
        n = run.name.split("-")[1]
        board = json.loads((run / "leaderboard.json").read_text())
        z = np.load(run / "research_predictions.npz")
        y = z["y_test"]
        for rule in RULES:
            names = members(board, rule)
            proba = np.mean([z[f"test/{m}"] for m in names], axis=0)
            out[n][rule].append(test_score(board["metric"], y, proba))
            out[n][rule + " size"].append(len(names))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+")
    args = ap.parse_args()
    for folder in args.folders:
        res = study(folder)
        print(f"## {folder}")
        sizes = sorted(res, key=lambda n: (n == "all", int(n) if n.isdigit() else 0))
        print("| rule | " + " | ".join(f"n={n}" for n in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        for rule in RULES:
            cells = [f"{statistics.mean(res[n][rule]):.3f} "
                     f"({statistics.mean(res[n][rule + ' size']):.0f})" for n in sizes]
            print(f"| {rule} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
