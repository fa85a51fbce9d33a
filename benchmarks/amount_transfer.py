"""Regression transfer: credit_data loan Amount, fixed-job applicants -> part-time applicants.

For every seed: pretrain the regression MLP on the source population once, then on the target
(test split fixed: 40% of part-time applicants, split seed 0) train with n_train labelled rows
and n_val = ceil(n_train / 2) validation rows (all 91 for "all"), compare, by test R² and RMSE:
  transfer (first block frozen, backbone lr x0.1)   configs/credit_amount/finetune.yaml
  transfer, nothing frozen                           same, frozen_layers=0, strategy=full
  target-only (same MLP, no source)                  configs/credit_amount/target_only.yaml
  source-only (pretrained model, no target labels)   tltool evaluate PRETRAIN --on target
  extract + ridge / random forest                    configs/credit_amount/extract.yaml
  plain scikit-learn on the raw target rows          RidgeCV / RandomForestRegressor on the same
                                                     training rows, one-hot + standardised

Usage: python benchmarks/amount_transfer.py [--seeds 0 1 2 3 4] [--out docs/TRANSFER_AMOUNT.md]
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

from tables import Scores, machine_line

from tltool.config import load_config
from tltool.data.preprocess import TabularPreprocessor
from tltool.data.tabular import load_tabular
from tltool.metrics import regression_report
from tltool.workflows.extract import extract, sklearn_regressor
from tltool.workflows.infer import evaluate
from tltool.workflows.train import freeze_finetune, pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "credit_amount"
SIZES: list[int | None] = [25, 50, 100, None]
METHODS = {
    "transfer, first block frozen": ("finetune.yaml", []),
    "transfer, nothing frozen": ("finetune.yaml", ["model.frozen_layers=0",
                                                   "model.strategy=full"]),
    "target-only (same MLP, no source)": ("target_only.yaml", []),
}


def _raw_sklearn(cfg, kind: str) -> dict:
    """A plain scikit-learn regressor on the target's own training rows (no source)."""
    data = load_tabular(cfg.target, cfg.seed)
    pre = TabularPreprocessor().fit(data.train.frame, data.feature_columns, data.categorical,
                                    data.origin)
    model = sklearn_regressor(kind, cfg.seed)
    model.fit(pre.transform(data.train.frame, data.origin), data.train.y)
    return regression_report(data.test.y, model.predict(pre.transform(data.test.frame,
                                                                       data.origin)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.getLogger("tltool").setLevel(logging.ERROR)
    start = time.time()
    r2, rmse = Scores(), Scores()

    def add(method: str, col: str, test: dict) -> None:
        r2.add(method, col, test["r2"])
        rmse.add(method, col, test["rmse"])

    with tempfile.TemporaryDirectory() as tmp:
        common = [f"output.root={tmp}"]
        for seed in args.seeds:
            src_run = pretrain(load_config(CONFIGS / "pretrain.yaml",
                                           common + [f"seed={seed}"]))["run"]
            src_only = evaluate(src_run, on="target")["metrics"]["test"]
            for n in SIZES:
                col = "all" if n is None else str(n)
                n_val = "null" if n is None else str(math.ceil(n / 2))
                sets = common + [f"seed={seed}", f"target.n_train={'null' if n is None else n}",
                                 f"target.n_val={n_val}", f"model.weights={src_run}"]
                for method, (file, extra) in METHODS.items():
                    run_sets = [s for s in sets if not s.startswith("model.weights")] \
                        if file == "target_only.yaml" else sets
                    res = freeze_finetune(load_config(CONFIGS / file, run_sets + extra))
                    add(method, col, res["metrics"]["test"])
                ex = extract(load_config(CONFIGS / "extract.yaml",
                                         sets + ["extract.heads=[ridge, random_forest]"]))
                for head in ("ridge", "random_forest"):
                    add(f"extract + {head.replace('_', ' ')}", col,
                        ex["metrics"]["heads"][head]["test"])
                raw_cfg = load_config(CONFIGS / "target_only.yaml", sets[:4])
                for head in ("ridge", "random_forest"):
                    add(f"scikit-learn {head.replace('_', ' ')}, target rows only", col,
                        _raw_sklearn(raw_cfg, head))
                add("source-only (no target labels)", col, src_only)
    table = _table(r2, rmse, args.seeds, time.time() - start)
    print(table)
    if args.out:
        args.out.write_text(table)


def _table(r2: Scores, rmse: Scores, seeds, seconds: float) -> str:
    cols = ["25", "50", "100", "all"]
    return "\n".join([
        "# Regression transfer on credit_data: loan Amount, fixed-job -> part-time applicants",
        "",
        "Generated by `make amount-table` (`python benchmarks/amount_transfer.py`): every number "
        "comes from tltool's own pretrain / freeze-finetune / evaluate / extract code with the "
        "configs in `configs/credit_amount/` (task: regression), except the two scikit-learn "
        "rows, which fit RidgeCV / RandomForestRegressor directly on the same target training "
        "rows (one-hot + standardised, no source data).",
        "",
        f"Test split fixed: 181 part-time applicants (40%, split seed 0); mean ± std over seeds "
        f"{seeds}. n = labelled target training rows; each tltool run also uses ceil(n/2) "
        f"labelled validation rows for early stopping (all 91 for 'all', where n = 180). The "
        f"label's standard deviation on the test split is about 415.",
        "",
        "## Test R² (higher is better)",
        "",
        *r2.markdown(cols, "n={}"),
        "",
        "## Test RMSE (loan amount units; lower is better)",
        "",
        *rmse.markdown(cols, "n={}"),
        "", machine_line(seconds), "",
    ])


if __name__ == "__main__":
    main()
