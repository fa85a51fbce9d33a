"""The leaderboard of a select run: every candidate's cross-validation score, rank and
complexity (leaderboard.json / .csv / plots/leaderboard.png), and the row of the average of
the candidates the rule keeps (select.rule ensemble)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

from tltool import plots
from tltool.routes.route import describe_route
from tltool.runs.files import write_json, write_text
from tltool.select.candidates import Candidate
from tltool.select.rules import Scored
from tltool.select.scoring import LOWER_IS_BETTER

# The leaderboard row of the averaged candidates (select.rule ensemble): not a valid candidate
# name (NAME_PATTERN has no spaces), so it never collides with one.
ENSEMBLE = "ensemble of candidates"


def ensemble_scored(results: list[Scored], oofs: dict[str, np.ndarray], cv,
                    route) -> tuple[Scored, np.ndarray]:
    """The unweighted average of the candidates in the band, cross-validated like one: its
    out-of-fold predictions are the average of the members' (each row predicted by fold models
    that never trained on it). The members were chosen on the same folds, so its score leans
    optimistic, like the best single candidate's; it is shown, never used to choose. `route`:
    the first member's (its decision section and task kind)."""
    oof = np.mean([oofs[r.name] for r in results], axis=0)
    complexity = max(r.complexity for r in results) + 1
    return Scored(ENSEMBLE, complexity, cv.scores(route, oof), results[0].sign), oof


def leaderboard(results: list[Scored], winner: Scored, how: dict[str, Any], metric: str,
                by_name: dict[str, tuple[Candidate, Any]]) -> list[dict]:
    """One row per candidate (and the average), best first."""
    within = set(how.get("within_one_se") or [])
    ranked = sorted(results, key=lambda r: (-r.rank_value, r.complexity, r.name))
    rows = []
    for rank, r in enumerate(ranked, start=1):
        route = ({"average_of": list(how.get("members") or [])} if r.name == ENSEMBLE
                 else describe_route(by_name[r.name][1]))
        rows.append({
            "rank": rank, "name": r.name, "chosen": r.name == winner.name,
            "complexity": r.complexity, "metric": metric,
            "mean": None if math.isnan(r.mean) else round(r.mean, 6),
            "se": None if math.isnan(r.se) else round(r.se, 6),
            "folds": len(r.valid), "within_one_se": r.name in within,
            "averaged": winner.name == ENSEMBLE and r.name in (how.get("members") or []),
            "epochs": r.epochs, "route": route,
            "fold_scores": [None if math.isnan(s) else round(s, 6) for s in r.scores]})
    return rows


def write_leaderboard(run, board: list[dict], how: dict[str, Any], cfg, folds) -> None:
    """leaderboard.json, leaderboard.csv and plots/leaderboard.png."""
    sel, metric = cfg.select, board[0]["metric"]
    write_json(run.file("leaderboard.json"), {
        "metric": metric, "lower_is_better": metric in LOWER_IS_BETTER,
        "folds": folds.k, "repeats": folds.repeats, "seed": sel.seed, "rule": how,
        "folds_asked": sel.folds, "notes": folds.notes, "candidates": board})
    buf = io.StringIO()
    fields = ["rank", "name", "chosen", "averaged", "complexity", "metric", "mean", "se",
              "folds", "within_one_se", "epochs", "route"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in board:
        writer.writerow(row | {"epochs": "" if row["epochs"] is None else
                               "+".join(map(str, row["epochs"])),
                               "route": _route_words(row["route"])})
    write_text(run.file("leaderboard.csv"), buf.getvalue())
    bar_label = (f"{how['band']:g} standard errors below the best (averaged above)"
                 if how.get("rule") == "ensemble" else "one standard error of the best")
    plots.leaderboard(board, run.file("plots", "leaderboard.png"), metric, how.get("bar"),
                      bar_label,
                      f"{cfg.name}: {len(board)} routes, {folds.repeats}x{folds.k}-fold "
                      f"cross-validation on the labelled target rows")


def _route_words(route: dict[str, Any]) -> str:
    if "average_of" in route:
        return f"average of {len(route['average_of'])} candidates' predictions"
    parts = [route["backbone"], route["head"]]
    if route["source_only"]:
        parts.append("source model as is")
    elif route["strategy"]:
        parts.append(f"{route['strategy']} {route['frozen_layers']}")
    for key in ("prior", "pooled", "l2sp"):
        if route.get(key):
            parts.append(key)
    if route.get("adapt"):
        parts.append(f"adapt {route['adapt']}")
    return " / ".join(str(p) for p in parts)


def board_row(board: list[dict], name: str) -> dict[str, Any]:
    return next(row for row in board if row["name"] == name)
