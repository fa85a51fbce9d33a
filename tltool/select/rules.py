"""The choice among candidates scored by cross-validation: the best mean score; or (rule
one_se) the simplest route whose mean lies within one standard error of the best (Hastie,
Tibshirani & Friedman, The Elements of Statistical Learning, 7.10); or (rule ensemble, the
default) every route within `band` standard errors of the best, averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tltool.errors import DataError


@dataclass
class Scored:
    """One candidate's cross-validation result."""

    name: str
    complexity: int
    scores: list[float]  # per fold, as the metric reads
    sign: int  # +1: higher is better; -1: lower is better
    epochs: list[int] | None = None  # per round, chosen by the mean held-out score
    notes: list[str] = field(default_factory=list)

    @property
    def valid(self) -> list[float]:
        return [s for s in self.scores if not math.isnan(s)]

    @property
    def mean(self) -> float:
        v = self.valid
        return float(np.mean(v)) if v else float("nan")

    @property
    def se(self) -> float:
        v = self.valid
        return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")

    @property
    def rank_value(self) -> float:
        """Higher is better, for every metric."""
        return -math.inf if math.isnan(self.mean) else self.sign * self.mean


def choose(results: list[Scored], rule: str,
           band: float = 3.0) -> tuple[Scored, dict[str, Any]]:
    """The best mean score, or under one_se the simplest candidate within one standard error
    of it (ties: the better mean), or under ensemble the best and the candidates to average
    (how["members"]). Returns the winner and how it was chosen."""
    ranked = [r for r in results if not math.isnan(r.mean)]
    if not ranked:
        raise DataError("select: no candidate got a cross-validation score (every fold was "
                        "undefined: too few labelled rows of some class?)")
    best = max(ranked, key=lambda r: (r.rank_value, -r.complexity))
    if rule == "ensemble":
        # every candidate not clearly worse than the best: mean within `band` standard errors
        # of it (3 ~ a two-sided 95% interval for the difference of two means with the best's
        # standard error each, 2 x sqrt(2) = 2.83); the caller averages them
        se = 0.0 if math.isnan(best.se) else best.se
        bar = best.rank_value - band * se
        members = [r for r in ranked if r.rank_value >= bar - 1e-12]
        members.sort(key=lambda r: (-r.rank_value, r.complexity, r.name))
        return best, {"rule": rule, "best": best.name, "bar": best.sign * bar, "band": band,
                      "members": [r.name for r in members]}
    if rule == "best" or math.isnan(best.se):
        return best, {"rule": rule, "best": best.name, "bar": None}
    bar = best.rank_value - best.se
    within = [r for r in ranked if r.rank_value >= bar - 1e-12]
    winner = min(within, key=lambda r: (r.complexity, -r.rank_value))
    return winner, {"rule": rule, "best": best.name,
                    "bar": best.sign * bar, "within_one_se": [r.name for r in within]}
