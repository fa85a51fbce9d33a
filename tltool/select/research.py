"""select.research: every candidate refit on all labelled rows and scored on the test split,
after the choice was made, for research (how often the choice was the best on test); the
choice never reads what is written here (research.json, research_predictions.npz)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tltool.engine.predict import predict_proba
from tltool.runs.files import write_json
from tltool.select.leaderboard import ENSEMBLE
from tltool.select.refit import HEADLINE, oof_decision, refit
from tltool.select.rules import Scored
from tltool.select.scoring import LOWER_IS_BETTER, score


@dataclass
class Outcome:
    """A select run's result: every candidate's score and out-of-fold predictions, the winner
    and how the rule chose it, the models refit already (an average's members: name ->
    (model, runtime)) and the chosen model's summary."""

    results: dict[str, Scored]
    oofs: dict[str, np.ndarray]
    winner: Scored
    how: dict[str, Any]
    refitted: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    summary: Any = None  # TrainedSummary or AveragedSummary


def research(run, cv, routes: list, outcome: Outcome) -> None:
    """Every candidate of `routes` ((candidate, route) pairs) refit and scored on test."""
    results, oofs, winner = outcome.results, outcome.oofs, outcome.winner
    metric, y_labelled = cv.metric, cv.labelled.y
    out, arrays = [], {"y_labelled": np.asarray(y_labelled)}
    for cand, route in routes:
        r: Scored = results[cand.name]
        if cand.name in outcome.refitted:  # an average's member: refit already, the same
            model, rt = outcome.refitted[cand.name]
        else:
            model, _, rt, _ = refit(route, r, cv)
        proba = predict_proba(model, route.inputs.test, route.multilabel, rt=rt)
        arrays[f"oof/{cand.name}"] = oofs[cand.name]
        arrays[f"test/{cand.name}"] = np.asarray(proba)
        arrays["y_test"] = route.inputs.test.y.numpy()
        decision = oof_decision(route, oofs[cand.name], y_labelled)
        y = route.inputs.test.y.numpy()
        test = decision.report(y, proba)
        out.append({"name": cand.name, "chosen": cand.name == winner.name,
                    "cv_mean": r.mean, "test_" + metric: score(metric, y, proba,
                                                               decision.threshold),
                    "test": {k: test.get(k) for k in ("accuracy", "auroc", "f1", "map",
                                                      "rmse", "mae", "r2") if k in test}})
    if winner.name == ENSEMBLE:
        summary = outcome.summary
        proba = np.mean([arrays[f"test/{n}"] for n in summary.members], axis=0)
        out.append({"name": ENSEMBLE, "chosen": True, "cv_mean": winner.mean,
                    "test_" + metric: score(metric, arrays["y_test"], proba,
                                            summary.decision.threshold),
                    "test": {k: summary.test.get(k) for k in HEADLINE if k in summary.test}})
    _write(run, metric, winner, out, arrays)


def _write(run, metric: str, winner: Scored, out: list[dict], arrays: dict) -> None:
    sign = -1 if metric in LOWER_IS_BETTER else 1
    best = max(out, key=lambda o: sign * o["test_" + metric])
    write_json(run.file("research.json"), {
        "note": "research only: every candidate refit on all labelled rows and scored on the "
                "test split after the choice was made; the choice never reads this file",
        "metric": metric, "best_on_test": best["name"], "chosen": winner.name,
        "chosen_is_best_on_test": best["name"] == winner.name, "candidates": out,
        "predictions": "research_predictions.npz"})
    # every candidate's out-of-fold and test predictions, to study choice rules afterwards
    with run.file("research_predictions.npz").open("wb") as fh:
        np.savez_compressed(fh, **arrays)
