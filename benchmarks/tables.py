"""Shared pieces of the transfer-quality benchmarks: collect scores, print a Markdown table."""

from __future__ import annotations

import math
import platform
import statistics
from collections.abc import Iterator
from pathlib import Path


class Scores:
    """method -> column -> one value per seed."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}

    def add(self, method: str, column: str, value: float) -> None:
        self.values.setdefault(method, {}).setdefault(column, []).append(value)

    def markdown(self, columns: list[str], header: str) -> list[str]:
        lines = ["| method | " + " | ".join(header.format(c) for c in columns) + " |",
                 "|---|" + "---|" * len(columns)]
        for method, by_col in self.values.items():
            cells = []
            for c in columns:
                vals = by_col.get(c, [])
                sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}" if vals else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return lines


def machine_line(seconds: float) -> str:
    return (f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python "
            f"{platform.python_version()}; whole table in {seconds:.0f} s.")


def size_sets(common: list[str], seed: int, n: int | None,
              src_run: str) -> tuple[str, list[str]]:
    """Column name and --set overrides for n labelled target rows (None: all of them), with
    ceil(n/2) validation rows and the source run as weights."""
    col = "all" if n is None else str(n)
    n_val = "null" if n is None else str(math.ceil(n / 2))
    return col, common + [f"seed={seed}", f"target.n_train={'null' if n is None else n}",
                          f"target.n_val={n_val}", f"model.weights={src_run}"]


def fine_tune_all(methods: dict[str, tuple[str, list[str]]], configs: Path,
                  sets: list[str]) -> Iterator[tuple[str, dict]]:
    """(method, freeze-finetune result) for each (config file, extra overrides);
    target_only.yaml trains without the source weights."""
    from tltool.config import load_config
    from tltool.workflows.train import freeze_finetune

    for method, (file, extra) in methods.items():
        run_sets = [s for s in sets if not s.startswith("model.weights")] \
            if file == "target_only.yaml" else sets
        yield method, freeze_finetune(load_config(configs / file, run_sets + extra))
