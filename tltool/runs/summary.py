"""What a command's metrics.json holds: one typed summary per kind of run, written (and read
back) here only.

- `TrainedSummary`: pretrain, freeze-finetune and select (one route, or the average of
  several: `AveragedSummary`) — the model's route, data, decision rule, validation and test
  reports, and what training did;
- `EnsembleSummary` (tltool ensemble), `EvaluationSummary` (evaluate),
  `PredictionSummary` (predict), `ExtractionSummary` (extract).

Each knows its file's layout (`to_dict`, keys in a fixed order: a CI job reads them) and offers
the numbers the command line prints as attributes: `val`, `test` (metric reports: metric name
-> value), `heads` (extract's per-head reports), `choice` (select's winner and score),
`prediction` (predict's counts). `StoredSummary` reads a metrics.json back for `tltool runs`,
evaluate's data check and ensemble's checks of select runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tltool.runs.files import write_json

if TYPE_CHECKING:  # (no torch import here: `tltool runs` reads summaries without it)
    from tltool.decision import Decision
    from tltool.engine.state import TrainingReport

METRICS = "metrics.json"
Report = dict[str, Any]  # one split's metrics (tltool.metrics): name -> value


@dataclass
class Summary:
    """The part every summary shares: how the command line reads it."""

    command: str

    @property
    def val(self) -> Report | None:
        return None

    @property
    def test(self) -> Report | None:
        return None

    @property
    def heads(self) -> dict[str, dict[str, Report]] | None:
        return None

    @property
    def choice(self) -> dict[str, Any] | None:
        """select: the winner's name and its cross-validation score."""
        return None

    @property
    def prediction(self) -> dict[str, Any] | None:
        return None

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every kind defines it
        raise NotImplementedError

    def write(self, folder: Path) -> None:
        write_json(Path(folder) / METRICS, self.to_dict())


class SplitScores:
    """`val` and `test` of a summary that keeps them in `scores` (a mapping split -> report)."""

    scores: dict[str, Report | None]

    @property
    def val(self) -> Report | None:
        return self.scores["val"]

    @property
    def test(self) -> Report | None:
        return self.scores["test"]


@dataclass
class TrainedSummary(SplitScores, Summary):
    """pretrain / freeze-finetune / a select run of one route: a trained model."""

    name: str
    seed: int
    weights: str  # model.weights as configured
    weights_file: str | None  # the file it resolved to
    route: dict[str, Any]  # what the route does, in the config's words
    data: dict[str, Any]  # the data section's summary and split digests
    classes: list[str]
    multilabel: bool
    decision: Decision
    scores: dict[str, Report | None]  # "val" (None: no validation rows) and "test"
    training: TrainingReport
    params: tuple[int, int]  # trainable, total
    adapt: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)  # select's choice, notes

    @property
    def choice(self) -> dict[str, Any] | None:
        return self.extra.get("select")

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "name": self.name, "seed": self.seed,
                "weights": self.weights, "weights_file": self.weights_file,
                "route": self.route, "data": self.data, "classes": self.classes,
                "multilabel": self.multilabel, "decision": self.decision.to_dict(),
                "val": self.val, "test": self.test, **self.training.metrics(),
                "trainable_params": self.params[0], "total_params": self.params[1],
                "adapt": self.adapt, **self.extra}


@dataclass
class AveragedSummary(Summary):
    """A select run that averages several routes (select.rule ensemble)."""

    name: str
    seed: int
    members: list[str]  # the candidates averaged (members/NAME)
    classes: list[str]
    multilabel: bool
    decision: Decision
    data: dict[str, Any]
    test_report: Report
    members_test: list[dict[str, Any]]
    select: dict[str, Any]

    @property
    def test(self) -> Report | None:
        return self.test_report

    @property
    def choice(self) -> dict[str, Any] | None:
        return self.select

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "name": self.name, "seed": self.seed,
                "route": {"average_of": self.members}, "classes": self.classes,
                "multilabel": self.multilabel, "decision": self.decision.to_dict(),
                "data": self.data, "val": None, "test": self.test_report,
                "members_test": self.members_test, "select": self.select}


@dataclass
class EnsembleSummary(SplitScores, Summary):
    """tltool ensemble: the average of several runs, its rule chosen on held-out rows."""

    members: list[str]
    domain: str
    classes: list[str]
    multilabel: bool
    decision: Decision
    labelled: dict[str, Any]  # val_rows, labelled_rows_seen, labelled_rows_per_member
    scores: dict[str, Report]  # val, test
    val_from: str
    members_test: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "members": self.members, "domain": self.domain,
                "classes": self.classes, "multilabel": self.multilabel,
                "decision": self.decision.to_dict(), "val_rows": self.labelled["val_rows"],
                "labelled_rows_seen": self.labelled["labelled_rows_seen"],
                "labelled_rows_per_member": self.labelled["labelled_rows_per_member"],
                "val": self.val, "val_from": self.val_from, "test": self.test,
                "members_test": self.members_test}


@dataclass
class EvaluationSummary(Summary):
    """tltool evaluate: a trained run (or an ensemble) scored on a test split."""

    run: str
    on: str  # the data section, or csv
    origin: str
    classes: list[str]
    multilabel: bool
    decision: Decision
    members: int
    test_report: Report
    validation: tuple[Report, str] | None = None  # the validation report and its note
    backbone: list[str] = field(default_factory=list)  # stored features / forward pass
    test_argmax: Report | None = None

    @property
    def val(self) -> Report | None:
        return None if self.validation is None else self.validation[0]

    @property
    def test(self) -> Report | None:
        return self.test_report

    def to_dict(self) -> dict[str, Any]:
        out = {"run": self.run, "on": self.on, "origin": self.origin, "split": "test",
               "classes": self.classes, "multilabel": self.multilabel,
               "decision": self.decision.to_dict(), "members": self.members,
               "test": self.test_report}
        if self.validation is not None:
            out["val"], out["val_note"] = self.validation
        out["backbone"] = self.backbone
        if self.test_argmax is not None:
            out["test_argmax"] = self.test_argmax
        return out


@dataclass
class PredictionSummary(Summary):
    """tltool predict: how many rows, what was predicted."""

    run: str
    input: str
    rows: int
    decision: Decision
    members: int
    notes: dict[str, Any]  # unseen categories, skipped images, ...
    outcome: dict[str, Any]  # predicted_counts, or (regression) the predicted values' summary

    @property
    def prediction(self) -> dict[str, Any] | None:
        return {"rows": self.rows, **self.outcome}

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "input": self.input, "rows": self.rows,
                "decision": self.decision.to_dict(), "members": self.members, **self.notes,
                **self.outcome}


@dataclass
class ExtractionSummary(Summary):
    """tltool extract: the features written and the classic heads fitted on them."""

    name: str
    seed: int
    weights: str
    blocks: int
    feature_dim: int
    fit_on: str
    data: dict[str, Any]
    head_reports: dict[str, dict[str, Any]]

    @property
    def heads(self) -> dict[str, dict[str, Report]] | None:
        return self.head_reports

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "name": self.name, "seed": self.seed,
                "weights": self.weights, "blocks": self.blocks,
                "feature_dim": self.feature_dim, "fit_on": self.fit_on, "data": self.data,
                "heads": self.head_reports}


@dataclass
class StoredSummary:
    """A run's metrics.json read back (a damaged or missing file reads as empty)."""

    content: dict[str, Any]

    @classmethod
    def read(cls, run: Path) -> StoredSummary:
        try:
            content = json.loads((Path(run) / METRICS).read_text())
        except (OSError, ValueError):
            content = {}
        return cls(content if isinstance(content, dict) else {})

    def _part(self, key: str) -> dict[str, Any] | None:
        value = self.content.get(key)
        return value if isinstance(value, dict) else None

    @property
    def val(self) -> Report | None:
        return self._part("val")

    @property
    def test(self) -> Report | None:
        return self._part("test")

    @property
    def route(self) -> dict[str, Any]:
        return self._part("route") or {}

    @property
    def split_digests(self) -> dict[str, Any] | None:
        """The row counts and id hashes of the splits the run trained on."""
        data = self._part("data") or {}
        splits = data.get("splits")
        return splits if isinstance(splits, dict) else None

    @property
    def without_target_labels(self) -> bool:
        """A select run made without target labels (select.target_labels false)."""
        return (self._part("select") or {}).get("target_labels") is False

    def scores(self) -> dict[str, Any]:
        """The val and test reports (for `tltool runs diff`)."""
        return {k: v for k, v in self.content.items() if k in ("val", "test")}


@dataclass
class Result:
    """What a command returns: its run folder and summary, and what the command line prints
    besides (a report table, select's leaderboard, predict's CSV for `--out -`)."""

    run: Path
    summary: Summary
    table: str | None = None  # evaluate / ensemble: the test report as printed
    leaderboard: list[dict[str, Any]] | None = None  # select: one row per candidate
    unsupervised: bool = False  # select without target labels (its criterion, not a cv score)
    csv: str | None = None  # predict --out -: the predictions
    rows_per_second: float | None = None  # extract
