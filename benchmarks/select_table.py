"""Every route and `tltool select` on one split, measured with tltool's own code.

For each seed and each number n of labelled target rows, one `tltool select` run with
`select.research: true` does all the work: it cross-validates every candidate on the n
labelled rows, chooses, refits the winner on all n rows and scores it on the fixed test split;
research mode then refits every other candidate on the same n rows (with the epochs its own
cross-validation chose) and scores it on the same test split. So every row of the table comes
from the same labelled rows, and the choice never saw a test label.

n labelled rows = n_train (two thirds) + n_val (one third) drawn with target.sample_seed =
seed; "all" = every row of the target's training and validation splits.

Usage: python benchmarks/select_table.py --case credit [--seeds 0 1 2 3 4]
       [--sizes 25 50 100 all] [--out docs/TRANSFER.md]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tables import machine_line

from tltool.config import load_config
from tltool.select.rules import Scored, choose

# tltool's own name of the averaged candidate (tltool.workflows.select.ENSEMBLE, which imports
# torch: this module's tables and overrides are also used without it, by autogluon_peer.py)
ENSEMBLE = "ensemble of candidates"

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "credit": {
        "config": "configs/credit/select.yaml", "sizes": ["25", "50", "100", "all"],
        "title": "credit_data: fixed-job applicants -> part-time applicants",
        "metric": "auroc", "test": "181 part-time applicants (40%, split seed 0)",
        "all": 271,
        "external": {
            "AutoGluon-Tabular 1.6.3, source + n target rows with an is_target column "
            "(BASELINES.md, 3 draws)": {"25": 0.725, "100": 0.750, "all": 0.736},
            "plain scikit-learn logistic regression, pooled source + target "
            "(BASELINES.md)": {"25": 0.724, "50": 0.724, "100": 0.727, "all": 0.731},
            "plain scikit-learn logistic regression, target only (BASELINES.md)":
                {"25": 0.648, "50": 0.689, "100": 0.723, "all": 0.752}}},
    "german": {
        "config": "configs/credit/german_select.yaml", "sizes": ["25", "50", "100", "all"],
        "title": "German Credit (Statlog): home owners -> renters", "metric": "auroc",
        "test": "63 renters (35%, split seed 0)", "all": 116},
    "rent": {
        "config": "configs/credit/select_rent.yaml", "sizes": ["50", "100"],
        "title": "credit_data: home owners -> renters (a check the default rule was not chosen "
                 "on)", "metric": "auroc", "test": "390 renters (40%, split seed 0)"},
    "freelance": {
        "config": "configs/credit/select_freelance.yaml", "sizes": ["50", "100"],
        "title": "credit_data: fixed-job -> freelance applicants (a check the default rule was "
                 "not chosen on)", "metric": "auroc", "test": "410 freelancers (40%, split seed "
                 "0)"},
    "amount": {
        "config": "configs/credit_amount/select.yaml", "sizes": ["25", "50", "100", "all"],
        "title": "credit_data loan Amount (regression): fixed-job -> part-time applicants",
        "metric": "rmse", "test": "181 part-time applicants (40%, split seed 0)",
        "all": 271, "also": "r2"},
    "digits": {
        "config": "configs/digits/select.yaml", "sizes": ["50", "100", "300"],
        "title": "MNIST-5k (28x28 scans) -> scikit-learn digits (8x8, framed)",
        "metric": "accuracy", "test": "719 digits (40%, split seed 0)",
        "external": {"plain scikit-learn logistic regression on raw pixels, target only "
                     "(BASELINES.md, n training images)": {"50": 0.858, "100": 0.888,
                                                           "300": 0.941},
                     "plain PyTorch CNN, conv layers frozen (BASELINES.md)":
                         {"50": 0.911, "100": 0.948, "300": 0.971}}},
    "lite0": {
        "config": "configs/digits/select_lite0.yaml", "sizes": ["50", "100", "300"],
        "title": "ImageNet EfficientNet-Lite0 -> scikit-learn digits (64 px) against raw "
                 "pixels and a small CNN", "metric": "accuracy",
        "test": "719 digits (40%, split seed 0)"},
}
# The reference models of the issue: classic models on the raw table / pixels (target-only,
# source-only, pooled) and the network trained on the target alone.
MAKE = {"credit": "transfer-table"}
REFERENCES = ("target-lr", "target-gb", "source-only-lr", "source-only-gb", "pooled-lr",
              "pooled-gb", "target-net")
LOWER = ("rmse", "mae", "log_loss")


def overrides(n: str, seed: int, root: str, vary_split: bool = False) -> list[str]:
    sets = [f"output.root={root}", f"seed={seed}", f"target.sample_seed={seed}",
            f"select.seed={seed}", "select.research=true"]
    if vary_split:  # a new test split per seed too (the labelled rows are drawn from the rest)
        sets.append(f"target.split.seed={seed}")
    if n == "all":
        return sets + ["target.n_train=null", "target.n_val=null"]
    k = int(n)
    return sets + [f"target.n_train={k - k // 3}", f"target.n_val={k // 3}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=list(CASES), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--sizes", nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--raw", type=Path, default=None, help="also write every run's numbers "
                    "(JSON) here, after each run; runs already in the file are not run again")
    ap.add_argument("--keep", type=Path, default=None, help="also copy every run's "
                    "leaderboard.json and research_predictions.npz (out-of-fold and test "
                    "predictions of every candidate) to KEEP/n-SIZE-seed-SEED/, to study "
                    "choice rules afterwards")
    ap.add_argument("--vary-split", action="store_true", help="draw the target's test split "
                    "anew for every seed (target.split.seed = seed) instead of one fixed test "
                    "split: the means then average over test sets too, so a route that is "
                    "lucky on one test split does not decide the comparison")
    args = ap.parse_args()
    from tltool.select.leaderboard import ENSEMBLE as NAME
    from tltool.select.workflow import select

    assert NAME == ENSEMBLE
    case = CASES[args.case]
    sizes = args.sizes or case["sizes"]
    logging.getLogger("tltool").setLevel(logging.WARNING)
    # --raw doubles as a resume file: runs already in it are kept, the rest are run and
    # appended one by one, so an interrupted table loses at most one run.
    runs = json.loads(args.raw.read_text()) if args.raw and args.raw.exists() else []
    done = {(r["n"], r["seed"]) for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for seed in args.seeds:
                if (n, seed) in done:
                    continue
                cfg = load_config(ROOT / case["config"], overrides(n, seed, tmp, args.vary_split))
                tick = time.time()
                result = select(cfg)
                run = Path(result.run)
                research = json.loads((run / "research.json").read_text())
                metrics = json.loads((run / "metrics.json").read_text())
                board = json.loads((run / "leaderboard.json").read_text())
                runs.append({"n": n, "seed": seed, "seconds": round(time.time() - tick, 1),
                             "leaderboard": board["candidates"], "rule": board["rule"],
                             "chosen": research["chosen"],
                             "best_on_test": research["best_on_test"],
                             "select_test": metrics["test"],
                             "candidates": research["candidates"]})
                if args.keep:
                    dest = args.keep / f"n-{n}-seed-{seed}"
                    dest.mkdir(parents=True, exist_ok=True)
                    for name in ("leaderboard.json", "research_predictions.npz",
                                 "research.json", "metrics.json"):
                        shutil.copyfile(run / name, dest / name)
                print(f"n={n} seed={seed}: chose {research['chosen']} "
                      f"(best on test: {research['best_on_test']}), "
                      f"{time.time() - tick:.0f} s", flush=True)
                if args.raw:
                    part = args.raw.with_suffix(".part")
                    part.write_text(json.dumps(runs, indent=1))
                    part.replace(args.raw)
    runs = [r for r in runs if r["n"] in sizes and r["seed"] in args.seeds]
    table = render(args.case, case, runs, sizes, args.seeds, sum(r["seconds"] for r in runs),
                   args.vary_split)
    print(table)
    if args.out:
        # hand-written notes below the table ("## Reading it" onwards) survive regeneration;
        # they name the numbers they read, so reread them after a new table
        notes = ""
        if args.out.exists():
            old = args.out.read_text()
            if "\n## Reading it" in old:
                notes = "\n" + old[old.index("\n## Reading it") + 1:]
        args.out.write_text(table + notes)


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def render(name: str, case: dict, runs: list[dict], sizes: list[str], seeds: list[int],
           seconds: float, vary_split: bool = False) -> str:
    metric = case["metric"]
    key = f"test_{metric}"
    values: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    chosen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    hits: dict[str, int] = collections.Counter()
    sign = -1 if metric in LOWER else 1
    for r in runs:
        singles = [c for c in r["candidates"] if c["name"] != ENSEMBLE]
        for c in singles:
            values[c["name"]][r["n"]].append(c[key])
        values["select"][r["n"]].append(r["select_test"][metric])
        # the same runs under the single-route rules (what rule one_se / best would have chosen
        # from the same leaderboard; their test scores are the research refits')
        board = [Scored(c["name"], c["complexity"], [math.nan if s is None else s
                                                     for s in c["fold_scores"]], sign)
                 for c in r["leaderboard"] if c["name"] != ENSEMBLE]
        by = {c["name"]: c for c in singles}
        for rule in ("one_se", "best"):
            values[f"select, rule {rule}"][r["n"]].append(by[choose(board, rule)[0].name][key])
        chosen[r["n"]][r["chosen"]] += 1
        hits[r["n"]] += int(r["chosen"] == r["best_on_test"])
    header = "| route | " + " | ".join(_col(case, n) for n in sizes) + " |"
    rule = "|---|" + "---|" * len(sizes)
    refs = [c for c in values if c in REFERENCES]
    routes = [c for c in values if c not in REFERENCES and not c.startswith("select")]
    lines = [f"# {case['title']}", "",
             f"Generated by `python benchmarks/select_table.py --case {name}"
             f"{' --vary-split' if vary_split else ''}` "
             + ("" if vary_split else f"(`make {MAKE.get(name, name + '-table')}`)")
             + f": every number comes from one `tltool select` run per seed and "
             f"n with `select.research: true` (config `{case['config']}`).", "",
             (f"Test {metric} on a new test split per seed (`target.split.seed` = seed, the "
              f"same share of the target's rows as the fixed split: {case['test']}), "
              if vary_split else
              f"Test {metric} on the fixed test split ({case['test']}), ") +
             f"mean ± std over seeds "
             f"{seeds}. n = labelled target rows (two thirds n_train, one third n_val, drawn "
             f"with sample_seed = seed); every route below learnt from the same n rows. "
             f"`select` is what `tltool select` chose by 2x5-fold cross-validation on "
             f"those rows with its default rule (ensemble: the average of every candidate "
             f"within 3 standard errors of the best cross-validation mean), refit on all of "
             f"them; the other rows are each candidate refit the same way, for comparison "
             f"only.", "",
             header, rule,
             "| **select (its choice)** | " + " | ".join(
                 f"**{_cell(values['select'][n])}**" for n in sizes) + " |",
             "| select with rule one_se (same runs: simplest route within one SE) | " +
             " | ".join(_cell(values["select, rule one_se"][n]) for n in sizes) + " |",
             "| select with rule best (same runs: best single mean) | " + " | ".join(
                 _cell(values["select, rule best"][n]) for n in sizes) + " |",
             "| *reference models* |" + " |" * len(sizes)]
    lines += [f"| {c} | " + " | ".join(_cell(values[c][n]) for n in sizes) + " |"
              for c in refs]
    lines.append("| *transfer routes* |" + " |" * len(sizes))
    lines += [f"| {c} | " + " | ".join(_cell(values[c][n]) for n in sizes) + " |"
              for c in routes]
    for label, ext in ({} if vary_split else case.get("external", {})).items():
        lines.append(f"| *external:* {label} | " + " | ".join(
            f"{ext[n]:.3f}" if n in ext else "" for n in sizes) + " |")
    lines += ["", "## The choice", "", header, rule]
    lines.append("| select's choice was the best on test (the ensemble counts as a route) | "
                 + " | ".join(
        f"{hits[n]}/{len([r for r in runs if r['n'] == n])}" for n in sizes) + " |")
    lines.append("| routes chosen | " + " | ".join(
        ", ".join(f"{k} x{v}" for k, v in chosen[n].most_common()) for n in sizes) + " |")
    best_ref = {}
    for n in sizes:
        means = {c: statistics.mean(values[c][n]) for c in refs if values[c][n]}
        if means:
            best_ref[n] = max(means.items(), key=lambda kv: sign * kv[1])
    lines.append("| best reference model (by its test mean) | " + " | ".join(
        f"{best_ref[n][0]} {best_ref[n][1]:.3f}" if n in best_ref else "" for n in sizes) + " |")
    lines.append(f"| select − best reference ({'lower' if sign < 0 else 'higher'} is better) | "
                 + " | ".join(_diff(values["select"][n], best_ref.get(n)) for n in sizes) + " |")
    # the same difference seed by seed (select and that reference on the same rows and test
    # split): its mean and the standard error of that mean over the seeds
    lines.append("| the same, paired by seed: mean ± standard error over seeds | " + " | ".join(
        _paired(values["select"][n], values[best_ref[n][0]][n]) if n in best_ref else ""
        for n in sizes) + " |")
    best_route = {}
    for n in sizes:
        means = {c: statistics.mean(values[c][n]) for c in values
                 if not c.startswith("select") and values[c][n]}
        best_route[n] = max(means.items(), key=lambda kv: sign * kv[1])
    lines.append("| best route on test (known only afterwards) | " + " | ".join(
        f"{best_route[n][0]} {best_route[n][1]:.3f}" for n in sizes) + " |")
    mean_s = statistics.mean(r["seconds"] for r in runs)
    lines += ["", f"One select run (with research refits) took {mean_s:.0f} s on average.",
              machine_line(seconds), ""]
    return "\n".join(lines)


def _col(case: dict, n: str) -> str:
    return f"n={case['all']} (all)" if n == "all" and "all" in case else f"n={n}"


def _paired(ours: list[float], theirs: list[float]) -> str:
    d = [a - b for a, b in zip(ours, theirs, strict=True)]
    if len(d) < 2:
        return ""
    return f"{statistics.mean(d):+.3f} ± {statistics.stdev(d) / math.sqrt(len(d)):.3f}"


def _diff(values: list[float], ref) -> str:
    if not values or ref is None:
        return ""
    d = statistics.mean(values) - ref[1]
    return f"{d:+.3f}" if not math.isnan(d) else ""


if __name__ == "__main__":
    main()
