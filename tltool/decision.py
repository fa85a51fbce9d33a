"""Decisions: from probabilities (or predicted values) to answers.

`Decision` is a run's decision rule with typed fields; it is the one place that knows the rule
kinds — a regression model's value is its answer, a multi-label model has a threshold per
label, a single-label model takes the argmax or a threshold on its positive class — and applies
the optional temperature calibration first. `choose_decision` chooses one on held-out rows only
(the validation split, or out-of-fold predictions in `tltool select`), never on test. A run
keeps its rule in thresholds.json (`Decision.to_dict`, read back with `Decision.from_dict`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tltool import calibration
from tltool.metrics import (
    choose_threshold,
    classification_report,
    decide,
    decide_multilabel,
    format_multilabel,
    format_regression,
    format_report,
    multilabel_report,
    regression_report,
)
from tltool.task import CLASSIFICATION, MULTILABEL, REGRESSION

log = logging.getLogger("tltool")

# The rules a config may ask for (decision.rule); a regression model's rule is "regression".
THRESHOLD, ARGMAX = "threshold", "argmax"


class DamagedDecision(ValueError):
    """A saved decision rule that cannot be applied (a run's thresholds.json)."""


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and bool(np.isfinite(v))


@dataclass(frozen=True)
class Decision:
    """How a run's probabilities (or predicted values) become answers."""

    kind: str  # what the model predicts: classification | multilabel | regression
    rule: str  # threshold | argmax | regression
    classes: tuple[str, ...]  # the class or label names (regression: the label)
    threshold: float | None = None  # single-label, two classes: on the positive class
    per_label: list[float] | None = None  # multi-label: one threshold per label
    positive: str | None = None  # the positive class a threshold applies to
    optimize: str | None = None  # what the threshold maximised on held-out rows
    validation_score: float | list[float] | None = None  # its value there
    chosen_on: str | None = None  # validation | out-of-fold (None: nothing was chosen)
    calibration: dict[str, Any] | None = None  # temperature scaling (tltool.calibration)
    averaged: int | None = None  # an ensemble's rule: how many members it averages

    # ---------------------------------------------------------------- kinds
    @classmethod
    def argmax(cls, classes: list[str]) -> Decision:
        """The most probable class (no threshold, no calibration)."""
        return cls(CLASSIFICATION, ARGMAX, tuple(classes))

    @property
    def temperature(self) -> float | list[float] | None:
        """The calibration's temperature (one per label for multi-label), or None."""
        return None if self.calibration is None else self.calibration["temperature"]

    @property
    def regression(self) -> bool:
        return self.kind == REGRESSION

    @property
    def multilabel(self) -> bool:
        return self.kind == MULTILABEL

    def averaging(self, members: int) -> Decision:
        """This rule as an ensemble's, over `members` averaged models."""
        return replace(self, averaged=members)

    # ---------------------------------------------------------------- saved form
    def to_dict(self) -> dict[str, Any]:
        """The mapping saved in thresholds.json and metrics.json (keys in a fixed order)."""
        if self.regression:
            out: dict[str, Any] = {"rule": "regression", "threshold": None, "chosen_on": None}
        elif self.multilabel:
            out = {"rule": self.rule, "threshold": None}
            if self.rule == THRESHOLD:
                out |= {"optimize": self.optimize, "per_label": list(self.per_label),
                        "validation_score": self.validation_score}
            else:
                out["per_label"] = list(self.per_label)
            out["chosen_on"] = self.chosen_on
        elif self.rule == THRESHOLD:
            out = {"rule": THRESHOLD, "positive": self.positive, "threshold": self.threshold,
                   "optimize": self.optimize, "validation_score": self.validation_score,
                   "chosen_on": self.chosen_on}
        else:
            out = {"rule": ARGMAX, "threshold": None, "chosen_on": None}
        if self.calibration is not None:
            out["calibration"] = self.calibration
        if self.averaged is not None:
            out["averaged"] = self.averaged
        return out

    @classmethod
    def from_dict(cls, value: Any, classes: list[str]) -> Decision:
        """A saved rule of a model of `classes`, checked: DamagedDecision when it cannot be
        applied."""
        if not isinstance(value, dict):
            raise DamagedDecision("expected the saved decision rule (a mapping)")
        rule = str(value.get("rule", ARGMAX))
        averaged = value.get("averaged") if _number(value.get("averaged")) else None
        if rule == "regression":
            return cls(REGRESSION, rule, tuple(classes), averaged=averaged)
        if "per_label" in value:
            per = value["per_label"]
            if not isinstance(per, list) or not all(_number(v) and 0 <= v <= 1 for v in per):
                raise DamagedDecision("per-label thresholds must be a list of probabilities "
                                      "(numbers from 0 to 1)")
            kind, threshold = MULTILABEL, None
        else:
            per, kind, threshold = None, CLASSIFICATION, value.get("threshold", "missing")
            if not (threshold is None or _number(threshold)):
                raise DamagedDecision("expected a threshold number or null, or per-label "
                                      "thresholds")
            if threshold is not None and not 0 <= threshold <= 1:
                raise DamagedDecision(f"threshold {threshold} is not a probability "
                                      f"(allowed: 0 to 1)")
        cal = value.get("calibration")
        if not calibration.valid(cal, len(per) if per is not None else None):
            raise DamagedDecision("damaged calibration (expected method temperature with a "
                                  "positive finite temperature"
                                  f"{', one per label' if per is not None else ''})")
        return cls(kind, rule, tuple(classes), threshold=threshold, per_label=per,
                   positive=value.get("positive"), optimize=value.get("optimize"),
                   validation_score=value.get("validation_score"),
                   chosen_on=value.get("chosen_on"), calibration=cal, averaged=averaged)

    def check_fits(self, kind: str) -> None:
        """The rule must be of the model's kind (a damaged or swapped thresholds.json)."""
        classes = self.classes
        if self.kind != kind:
            raise DamagedDecision(f"a {_KIND_WORDS[self.kind]} rule for a "
                                  f"{_KIND_WORDS[kind]} model")
        if self.multilabel and len(self.per_label) != len(classes):
            raise DamagedDecision(f"{len(self.per_label)} per-label thresholds for "
                                  f"{len(classes)} labels")
        if self.threshold is not None and len(classes) != 2:
            raise DamagedDecision(f"a threshold rule for {len(classes)} classes (binary only)")

    # ---------------------------------------------------------------- applying it
    def calibrated(self, proba: np.ndarray) -> np.ndarray:
        """`proba` under the saved calibration (unchanged without one, or for regression)."""
        if not self.calibration or self.regression:
            return proba
        return calibration.scale(proba, self.calibration["temperature"], self.multilabel)

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """Class indices (single-label), a 0/1 matrix (multi-label), or the values."""
        if self.regression:
            return proba[:, 0]
        proba = self.calibrated(proba)
        if self.multilabel:
            return decide_multilabel(proba, self.per_label)
        return decide(proba, self.threshold)

    def report(self, y: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
        """The metrics of one split under this rule."""
        classes = list(self.classes)
        if self.regression:
            return regression_report(y, proba[:, 0])
        proba = self.calibrated(proba)
        if self.multilabel:
            return multilabel_report(y, proba, classes, self.per_label)
        return classification_report(y, proba, classes, self.threshold)

    def format(self, report: dict[str, Any]) -> str:
        """The readable table of one split's report (report.txt, what evaluate prints)."""
        if self.regression:
            return format_regression(report)
        if self.multilabel:
            return format_multilabel(report)
        return format_report(report, list(self.classes))

    def frame(self, ids, proba: np.ndarray, y: np.ndarray | None = None):
        """One row per input: id, a probability per class/label (calibrated), the decision
        (and the truth); regression: id, the predicted value (and the truth and the error)."""
        import pandas as pd

        classes = list(self.classes)
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


_KIND_WORDS = {REGRESSION: "regression", MULTILABEL: "multi-label",
               CLASSIFICATION: "single-label"}


def choose_decision(settings, classes: list[str], kind: str, proba: np.ndarray,
                    y: np.ndarray, chosen_on: str = "validation") -> Decision:
    """The rule the config's `decision` section asks for (`settings`: rule, optimize,
    calibrate), chosen on held-out rows (`proba`, `y`: the validation split, or out-of-fold
    predictions), never on test.

    Multi-label: one threshold per label (0.5 each under rule argmax). Regression: the
    predicted value is the answer (no threshold)."""
    names = tuple(classes)
    if kind == REGRESSION:
        if settings.calibrate != "none":
            log.warning("decision.calibrate: %s applies to classification only; a regression "
                        "model's predicted values are left as they are", settings.calibrate)
        return Decision(REGRESSION, "regression", names)
    cal = None
    if settings.calibrate == "temperature":
        cal = calibration.calibrate_rule(proba, y, kind == MULTILABEL, chosen_on)
        proba = calibration.scale(proba, cal["temperature"], kind == MULTILABEL)
    if kind == MULTILABEL:
        if settings.rule == ARGMAX:
            return Decision(MULTILABEL, ARGMAX, names, per_label=[0.5] * len(classes),
                            calibration=cal)
        chosen = [choose_threshold(y[:, j].astype(np.int64), proba[:, j], settings.optimize)
                  for j in range(len(classes))]
        return Decision(MULTILABEL, THRESHOLD, names, per_label=[c["threshold"] for c in chosen],
                        optimize=settings.optimize,
                        validation_score=[c["validation_score"] for c in chosen],
                        chosen_on=chosen_on, calibration=cal)
    if settings.rule == ARGMAX:
        return Decision(CLASSIFICATION, ARGMAX, names, calibration=cal)
    chosen = choose_threshold(y, proba[:, 1], settings.optimize)
    return Decision(CLASSIFICATION, THRESHOLD, names, threshold=chosen["threshold"],
                    positive=classes[1], optimize=chosen["optimize"],
                    validation_score=chosen["validation_score"], chosen_on=chosen_on,
                    calibration=cal)


def fold_threshold(settings, kind: str, y: np.ndarray, proba: np.ndarray) -> float | None:
    """The binary threshold the config's rule would choose on these held-out rows (None when
    the rule takes no threshold: argmax, multi-label, regression, more than two classes).
    Cross-validation uses it to score a fold at a threshold chosen on the other folds."""
    if kind != CLASSIFICATION or settings.rule != THRESHOLD or proba.shape[-1] != 2:
        return None
    return choose_threshold(y, proba[:, 1], settings.optimize)["threshold"]


def asks_threshold(settings) -> bool:
    """The config's decision section (or an ensemble's --rule) asks for a threshold rule."""
    return settings.rule == THRESHOLD


def threshold_applies(kind: str, n_classes: int) -> bool:
    """A threshold rule applies to two classes (on the positive one) or to labels (one
    threshold each); not to more classes, nor to a predicted number."""
    return kind == MULTILABEL or (kind == CLASSIFICATION and n_classes == 2)


def default_rule(kind: str, n_classes: int) -> str:
    """An ensemble's rule under --rule auto: a threshold where one applies, else argmax."""
    return THRESHOLD if threshold_applies(kind, n_classes) else ARGMAX
