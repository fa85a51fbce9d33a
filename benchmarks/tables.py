"""Shared pieces of the transfer-quality benchmarks: collect scores, print a Markdown table."""

from __future__ import annotations

import platform
import statistics


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
