"""Decisions: from probabilities (or predicted values) to answers, with thresholds chosen on
held-out rows only; and the metrics of a split under a saved decision rule."""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


class DamagedDecision(ValueError):
    """A saved decision rule that cannot be applied (a run's thresholds.json)."""


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and bool(np.isfinite(v))


@dataclass(frozen=True)
class Decision:
    """A run's decision rule: how probabilities (or predicted values) become answers.

    The one place that knows the rule kinds: `regression` (the value is the answer), a
    multi-label rule (a threshold per label), a single-label `threshold` on the positive
    class, or `argmax`; and the optional temperature calibration applied first. Saved as the
    plain mapping `to_dict()` returns (thresholds.json, metrics.json "decision")."""

    raw: dict[str, Any]

    @classmethod
    def of(cls, value: Decision | dict[str, Any]) -> Decision:
        """Checked: raises DamagedDecision when the mapping cannot be applied."""
        if isinstance(value, Decision):
            return value
        if not isinstance(value, dict):
            raise DamagedDecision("expected the saved decision rule (a mapping)")
        d = cls(dict(value))
        if d.regression:
            return d
        if "per_label" in value:
            if not isinstance(value["per_label"], list) or \
                    not all(_number(v) and 0 <= v <= 1 for v in value["per_label"]):
                raise DamagedDecision("per-label thresholds must be a list of probabilities "
                                      "(numbers from 0 to 1)")
        elif "threshold" not in value or not (value["threshold"] is None
                                              or _number(value["threshold"])):
            raise DamagedDecision("expected a threshold number or null, or per-label "
                                  "thresholds")
        elif value["threshold"] is not None and not 0 <= value["threshold"] <= 1:
            raise DamagedDecision(f"threshold {value['threshold']} is not a probability "
                                  f"(allowed: 0 to 1)")
        labels = len(value["per_label"]) if "per_label" in value else None
        if not calibration.valid(value.get("calibration"), labels):
            raise DamagedDecision("damaged calibration (expected method temperature with a "
                                  "positive finite temperature"
                                  f"{', one per label' if labels else ''})")
        return d

    def check_fits(self, classes: list[str], multilabel: bool, regression: bool) -> None:
        """The rule must be of the model's kind (a damaged or swapped thresholds.json)."""
        model = "regression" if regression else "multi-label" if multilabel else "single-label"
        rule = "regression" if self.regression else "multi-label" if self.multilabel else \
            "single-label"
        if rule != model:
            raise DamagedDecision(f"a {rule} rule for a {model} model")
        if self.multilabel and len(self.per_label) != len(classes):
            raise DamagedDecision(f"{len(self.per_label)} per-label thresholds for "
                                  f"{len(classes)} labels")
        if self.threshold is not None and len(classes) != 2:
            raise DamagedDecision(f"a threshold rule for {len(classes)} classes (binary only)")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)

    @property
    def rule(self) -> str:
        return str(self.raw.get("rule", "argmax"))

    @property
    def regression(self) -> bool:
        return self.rule == "regression"

    @property
    def multilabel(self) -> bool:
        return "per_label" in self.raw

    @property
    def threshold(self) -> float | None:
        """The binary threshold on the positive class (None: argmax, or not single-label)."""
        return None if self.multilabel or self.regression else self.raw.get("threshold")

    @property
    def per_label(self) -> list[float] | None:
        return self.raw.get("per_label")

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.raw.get("calibration")

    def calibrated(self, proba: np.ndarray) -> np.ndarray:
        """`proba` under the saved calibration (unchanged without one, or for regression)."""
        cal = self.calibration
        if not cal or self.regression:
            return proba
        return calibration.scale(proba, cal["temperature"], self.multilabel)

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """Class indices (single-label), a 0/1 matrix (multi-label), or the values."""
        from tltool.metrics import decide, decide_multilabel

        if self.regression:
            return proba[:, 0]
        proba = self.calibrated(proba)
        if self.multilabel:
            return decide_multilabel(proba, self.per_label)
        return decide(proba, self.threshold)

    def report(self, y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, Any]:
        """The metrics of one split under this rule."""
        if self.regression:
            return regression_report(y, proba[:, 0])
        proba = self.calibrated(proba)
        if self.multilabel:
            return multilabel_report(y, proba, classes, self.per_label)
        return classification_report(y, proba, classes, self.threshold)

    def format(self, report: dict[str, Any], classes: list[str]) -> str:
        from tltool.metrics import format_multilabel, format_regression, format_report

        if self.regression:
            return format_regression(report)
        if self.multilabel:
            return format_multilabel(report)
        return format_report(report, classes)

    def frame(self, ids, proba: np.ndarray, classes: list[str], y: np.ndarray | None = None):
        """One row per input: id, a probability per class/label (calibrated), the decision
        (and the truth); regression: id, the predicted value (and the truth and the error)."""
        import pandas as pd

        cols: dict[str, Any] = {"id": ids}
        if self.regression:
            cols["prediction"] = np.round(proba[:, 0], 6)
            if y is not None:
                cols["label"] = y
                cols["error"] = np.round(proba[:, 0] - y, 6)
            return pd.DataFrame(cols)
        shown = self.calibrated(proba)
        for i, c in enumerate(classes):
            cols[f"p_{c}"] = np.round(shown[:, i], 6)
        names = np.asarray(classes, dtype=object)
        decided = self.decide(proba)
        if self.multilabel:
            cols["prediction"] = ["|".join(names[row.astype(bool)]) for row in decided]
            if y is not None:
                cols["label"] = ["|".join(names[row.astype(bool)])
                                 for row in y.astype(np.int64)]
        else:
            cols["prediction"] = names[decided]
            if y is not None:
                cols["label"] = names[y]
        return pd.DataFrame(cols)


def report(y: np.ndarray, proba: np.ndarray, classes: list[str],
           decision: Decision | dict[str, Any]) -> dict[str, Any]:
    """The metrics of one split under a saved decision rule (and its calibration)."""
    return Decision.of(decision).report(y, proba, classes)


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


def predictions_frame(ids, proba: np.ndarray, classes: list[str],
                      decision: Decision | dict[str, Any], y: np.ndarray | None = None):
    """See Decision.frame."""
    return Decision.of(decision).frame(ids, proba, classes, y)
