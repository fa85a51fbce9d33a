"""The typed decision rule: one object knows every rule kind; damaged ones are refused."""

from __future__ import annotations

import numpy as np
import pytest

from tltool.decision import DamagedDecision, Decision

P = np.array([[0.7, 0.3], [0.4, 0.6], [0.55, 0.45]])


def test_rule_kinds():
    arg = Decision.from_dict({"rule": "argmax", "threshold": None}, ["good", "bad"])
    thr = Decision.from_dict({"rule": "threshold", "threshold": 0.4, "positive": "bad"},
                             ["good", "bad"])
    assert arg.decide(P).tolist() == [0, 1, 0] and thr.decide(P).tolist() == [0, 1, 1]
    assert thr.threshold == 0.4 and not thr.multilabel and not thr.regression
    ml = Decision.from_dict({"rule": "threshold", "threshold": None, "per_label": [0.5, 0.35]},
                            ["a", "b"])
    assert ml.multilabel and ml.threshold is None
    assert ml.decide(P).tolist() == [[1, 0], [0, 1], [1, 1]]
    reg = Decision.from_dict({"rule": "regression", "threshold": None}, ["amount"])
    assert reg.regression and reg.decide(np.array([[2.5], [3.0]])).tolist() == [2.5, 3.0]
    frame = thr.frame(["a", "b", "c"], P, np.array([0, 1, 0]))
    assert frame["prediction"].tolist() == ["good", "bad", "bad"]
    assert frame["label"].tolist() == ["good", "bad", "good"]
    assert thr.to_dict() == {"rule": "threshold", "positive": "bad", "threshold": 0.4,
                             "optimize": None, "validation_score": None, "chosen_on": None}
    assert Decision.from_dict(thr.to_dict(), ["good", "bad"]) == thr


def test_calibration_is_applied_before_the_rule():
    cal = {"method": "temperature", "temperature": 0.5}
    d = Decision.from_dict({"rule": "threshold", "threshold": 0.5, "calibration": cal}, ["x", "y"])
    sharp = d.calibrated(P)
    assert sharp[0, 0] > P[0, 0] and np.allclose(sharp.sum(1), 1)
    assert d.frame(["a", "b", "c"], P)["p_x"].iloc[0] == pytest.approx(
        round(sharp[0, 0], 6))


@pytest.mark.parametrize("bad", [
    None, [], "threshold", {"rule": "threshold"}, {"rule": "threshold", "threshold": "0.5"},
    {"rule": "threshold", "threshold": float("nan")}, {"per_label": [0.5, "x"]},
    {"per_label": 0.5}, {"rule": "argmax", "threshold": None,
                         "calibration": {"method": "temperature", "temperature": -1}},
    {"per_label": [0.5, 0.5], "calibration": {"method": "temperature", "temperature": [1.0]}}])
def test_damaged_rules_are_refused(bad):
    with pytest.raises(DamagedDecision):
        Decision.from_dict(bad, ["a", "b"])
