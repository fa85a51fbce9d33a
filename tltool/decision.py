"""Decisions: from probabilities (or predicted values) to answers, with thresholds chosen on
held-out rows only; and the metrics of a split under a saved decision rule."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tltool import calibration
from tltool.metrics import (
    choose_threshold,
    classification_report,
    multilabel_report,
    regression_report,
)

log = logging.getLogger("tltool")


def report(y: np.ndarray, proba: np.ndarray, classes: list[str],
           decision: dict[str, Any]) -> dict[str, Any]:
    """The metrics of one split under a saved decision rule (and its calibration)."""
    if decision.get("rule") == "regression":
        return regression_report(y, proba[:, 0])
    proba = calibration.apply(proba, decision)
    if "per_label" in decision:
        return multilabel_report(y, proba, classes, decision["per_label"])
    return classification_report(y, proba, classes, decision["threshold"])


def decision_rule(cfg, classes: list[str], multilabel: bool,
                  proba_val: np.ndarray, y_val: np.ndarray,
                  regression: bool = False, chosen_on: str = "validation") -> dict[str, Any]:
    """Thresholds are chosen on held-out rows only (the validation split, or out-of-fold
    predictions in `tltool select`), never on test.

    Multi-label: one threshold per label (0.5 each under rule argmax). Regression: the
    predicted value is the answer (no threshold).
    """
    if regression:
        if getattr(cfg.decision, "calibrate", "none") != "none":
            log.warning("decision.calibrate: %s applies to classification only; a regression "
                        "model's predicted values are left as they are",
                        cfg.decision.calibrate)
        return {"rule": "regression", "threshold": None, "chosen_on": None}
    rule, optimize = cfg.decision.rule, cfg.decision.optimize
    cal = {}
    if getattr(cfg.decision, "calibrate", "none") == "temperature":
        cal = {"calibration": calibration.calibrate_rule(proba_val, y_val, multilabel,
                                                         chosen_on)}
        proba_val = calibration.scale(proba_val, cal["calibration"]["temperature"], multilabel)
    if multilabel:
        if rule == "argmax":
            return {"rule": "argmax", "threshold": None, "per_label": [0.5] * len(classes),
                    "chosen_on": None, **cal}
        chosen = [choose_threshold(y_val[:, j].astype(np.int64), proba_val[:, j], optimize)
                  for j in range(len(classes))]
        return {"rule": "threshold", "threshold": None, "optimize": optimize,
                "per_label": [c["threshold"] for c in chosen],
                "validation_score": [c["validation_score"] for c in chosen],
                "chosen_on": chosen_on, **cal}
    if rule == "argmax":
        return {"rule": "argmax", "threshold": None, "chosen_on": None, **cal}
    chosen = choose_threshold(y_val, proba_val[:, 1], optimize)
    return {"rule": "threshold", "positive": classes[1], **chosen, "chosen_on": chosen_on,
            **cal}


def predictions_frame(ids, proba: np.ndarray, classes: list[str], decision: dict[str, Any],
                      y: np.ndarray | None = None):
    """One row per input: id, a probability per class/label, the decision (and the truth);
    regression: id, the predicted value (and the truth and the error)."""
    import pandas as pd

    from tltool.metrics import decide, decide_multilabel

    cols: dict[str, Any] = {"id": ids}
    proba = calibration.apply(proba, decision)
    if decision.get("rule") == "regression":
        cols["prediction"] = np.round(proba[:, 0], 6)
        if y is not None:
            cols["label"] = y
            cols["error"] = np.round(proba[:, 0] - y, 6)
        return pd.DataFrame(cols)
    for i, c in enumerate(classes):
        cols[f"p_{c}"] = np.round(proba[:, i], 6)
    names = np.asarray(classes, dtype=object)
    if "per_label" in decision:
        on = decide_multilabel(proba, decision["per_label"])
        cols["prediction"] = ["|".join(names[row.astype(bool)]) for row in on]
        if y is not None:
            cols["label"] = ["|".join(names[row.astype(bool)]) for row in y.astype(np.int64)]
    else:
        cols["prediction"] = names[decide(proba, decision["threshold"])]
        if y is not None:
            cols["label"] = names[y]
    return pd.DataFrame(cols)
