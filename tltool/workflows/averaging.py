"""Averaging models: the one implementation behind `tltool ensemble`, select's average of
routes, and evaluate / predict on an ensemble run. Several models' predictions of the same
rows are averaged (the mean of the probabilities, or of the predicted values); the average's
decision rule is chosen on held-out rows like any model's (tltool.decision), and an ensemble
run folder keeps its members (ensemble.json), its rule (thresholds.json), its report and its
test predictions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tltool import features
from tltool.decision import Decision
from tltool.engine.predict import predict_proba
from tltool.runs.files import write_text
from tltool.runs.opening import TrainedRun, write_decision, write_ensemble_file
from tltool.tensors import Tensors


@dataclass
class Average:
    """Predictions of the same rows by several models, added one model at a time."""

    ids: np.ndarray | None = None
    predictions: list[np.ndarray] = field(default_factory=list)

    def add(self, ids, predict: Callable[[], np.ndarray],
            differs: Callable[[], Exception] | None = None) -> None:
        """One model's predictions (`predict()`) of rows `ids`; `differs()` is raised, before
        predicting, when they are not the first model's rows (None: not checked)."""
        if differs is not None and self.predictions and \
                not np.array_equal(np.asarray(ids), np.asarray(self.ids)):
            raise differs()
        self.ids = ids
        self.predictions.append(predict())

    @property
    def mean(self) -> np.ndarray:
        return np.mean(self.predictions, axis=0)


@dataclass
class AverageRun:
    """What an ensemble run folder keeps of its average: the members (paths relative to the
    run for a select run's members/NAME), how they are weighted, the decision rule, and the
    first line of report.txt."""

    members: list[str]
    decision: Decision
    title: str
    weights: str | None = None


def write_average(folder, kept: AverageRun, test: tuple) -> str:
    """ensemble.json, thresholds.json, report.txt and test_predictions.csv of an ensemble run
    (`test`: the test split's ids, averaged predictions, labels and report). Returns the
    report's table."""
    ids, proba, y, report = test
    write_ensemble_file(folder, kept.members, kept.weights)
    write_decision(folder, kept.decision)
    table = kept.decision.format(report)
    write_text(folder / "report.txt", f"{kept.title}\n{table}\n")
    write_text(folder / "test_predictions.csv",
               kept.decision.frame(ids, proba, y).to_csv(index=False))
    return table


def member_proba(member: TrainedRun, data: Tensors, recompute: bool = False,
                 hows: list[str] | None = None) -> np.ndarray:
    """A member's probabilities, predicted with its run's runtime (device, precision,
    layouts), set up once per member; how they were computed is appended to `hows`."""
    rt = member.runtime(data)
    multilabel = member.checkpoint.multilabel
    if recompute:
        proba, how = predict_proba(member.model, data, multilabel, rt=rt), "forward pass"
    else:
        # an image model's validation and test rows: the backbone features the run stored,
        # when they are of the same rows, weights and precision (tltool.features)
        proba, how = features.predict(member.model, data, rt, features.Pass(multilabel, 512),
                                      features.Kept(read=member.path))
    if hows is not None:
        hows.append(how)
    return proba
