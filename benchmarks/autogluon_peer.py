"""The AutoML peer of issue 8, on tltool's own splits: AutoGluon-Tabular trained on every
labelled source row plus the n labelled target rows (an `is_target` column tells them apart),
scored on the target's test split, for the seeds and n of `select_table.py`.

The rows are the ones `tltool select` sees for the same case, seed and n (read with tltool's
own loader from the case's config with select_table's overrides), so AutoGluon and select are
compared on the same labelled rows and the same test split, run by run. AutoGluon is not a
tltool dependency: run this with a Python that has it (`pip install
"autogluon.tabular[lightgbm,catboost,xgboost,fastai]"` in a separate virtual environment) and
the project on its path, e.g.

    PYTHONPATH=. /path/to/agvenv/bin/python benchmarks/autogluon_peer.py --case credit \\
        --vary-split --out /tmp/ag-credit.json

Settings as in ../shared/docs/BASELINES.md: presets medium_quality, time_limit 30 s, one CPU,
eval_metric roc_auc (root_mean_squared_error for the regression case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from select_table import CASES, overrides  # noqa: E402

from tltool.config import load_config  # noqa: E402
from tltool.data.tabular import load_tabular  # noqa: E402


def frame(split, label: str, is_target: int) -> pd.DataFrame:
    out = split.frame.reset_index(drop=True).copy()
    out[label] = split.y
    out["is_target"] = is_target
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["credit", "german", "amount", "rent", "freelance"],
                    required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--sizes", nargs="+", default=None)
    ap.add_argument("--vary-split", action="store_true")
    ap.add_argument("--time-limit", type=float, default=30)
    ap.add_argument("--out", type=Path, required=True, help="JSON of every run (resumable)")
    args = ap.parse_args()
    from autogluon.tabular import TabularPredictor
    from sklearn import metrics as skm

    case = CASES[args.case]
    sizes = args.sizes or case["sizes"]
    runs = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["n"], r["seed"]) for r in runs}
    regression = case["metric"] == "rmse"
    for n in sizes:
        for seed in args.seeds:
            if (n, seed) in done:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(ROOT / case["config"],
                                  overrides(n, seed, tmp, args.vary_split))
                src = load_tabular(cfg.source)
                tgt = load_tabular(cfg.target)
                label = "__label__"
                train = pd.concat([frame(s, label, 0) for s in (src.train, src.val, src.test)]
                                  + [frame(s, label, 1) for s in (tgt.train, tgt.val)],
                                  ignore_index=True)
                test = frame(tgt.test, label, 1)
                tick = time.time()
                predictor = TabularPredictor(
                    label=label, path=str(Path(tmp) / "ag"), verbosity=0,
                    problem_type="regression" if regression else "binary",
                    eval_metric="root_mean_squared_error" if regression else "roc_auc").fit(
                    train, presets="medium_quality", time_limit=args.time_limit,
                    num_cpus=1, num_gpus=0)
                if regression:
                    pred = predictor.predict(test.drop(columns=[label])).to_numpy()
                    value = float(((pred - tgt.test.y) ** 2).mean() ** 0.5)
                else:
                    proba = predictor.predict_proba(test.drop(columns=[label]))
                    value = float(skm.roc_auc_score(tgt.test.y, proba[1].to_numpy()))
                runs.append({"n": n, "seed": seed, case["metric"]: value,
                             "labelled_target_rows": len(tgt.train) + len(tgt.val),
                             "test_rows": len(tgt.test), "source_rows": len(train) -
                             len(tgt.train) - len(tgt.val),
                             "models": list(predictor.model_names()),
                             "seconds": round(time.time() - tick, 1)})
            print(f"n={n} seed={seed}: {case['metric']} {value:.4f}", flush=True)
            args.out.write_text(json.dumps(runs, indent=1))
    for n in sizes:
        vals = [r[case["metric"]] for r in runs if r["n"] == n and r["seed"] in args.seeds]
        if vals:
            print(f"n={n}: {statistics.mean(vals):.4f} over {len(vals)} seeds")


if __name__ == "__main__":
    main()
