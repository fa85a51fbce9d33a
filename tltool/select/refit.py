"""After the choice: the chosen route (or every route of the chosen average) refit on every
labelled row, for the epochs its cross-validation chose, its decision rule chosen on its
out-of-fold predictions, written as a complete trained run and scored on the test split once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tltool import progress
from tltool.cache import PrefixStore
from tltool.config import ExperimentConfig, dump_config
from tltool.decision import Decision, choose_decision
from tltool.engine.plan import Sink, TrainingData
from tltool.engine.predict import predict_proba
from tltool.errors import DataError
from tltool.inputs import unlabelled_rows
from tltool.routes.route import Route
from tltool.routes.training import build, train_route
from tltool.runs.files import write_text
from tltool.runs.folder import RunFolder, pinned_config
from tltool.runs.out_of_fold import write_out_of_fold
from tltool.runs.summary import AveragedSummary
from tltool.runtime import make_runtime
from tltool.select.crossval import CrossValidation, fold_adaptation
from tltool.select.leaderboard import ENSEMBLE, board_row
from tltool.select.rules import Scored
from tltool.workflows.averaging import Average, AverageRun, write_average
from tltool.workflows.outputs import (
    Scoring,
    TestSplit,
    Trained,
    checkpoint_saver,
    plot_test_split,
    write_outputs,
)

HEADLINE = ("accuracy", "auroc", "f1", "map", "rmse", "mae", "r2")


@dataclass
class Choice:
    """What the choice was made from, for the refit runs' metrics.json: the select config, the
    cross-validation, the leaderboard, the notes and how the rule chose."""

    cfg: ExperimentConfig
    cv: CrossValidation
    board: list[dict]
    notes: list[str]
    how: dict[str, Any]

    def cv_summary(self, mean: float, se: float | None, folds: int,
                   epochs: list[int] | None) -> dict[str, Any]:
        f = self.cv.folds
        return {"metric": self.board[0]["metric"], "mean": mean, "se": se, "folds": folds,
                "repeats": f.repeats, "k": f.k, "labelled_rows": int(len(self.cv.labelled.y)),
                "epochs": epochs}


def _refit_route(route: Route, epochs: list[int] | None) -> Route:
    """The route with the epoch counts the cross-validation chose (no early stopping: the
    refit has no validation rows)."""
    if epochs is None:
        return route
    cfg = route.cfg
    if cfg.train.rounds:
        rounds = [r.model_copy(update={"epochs": max(e, 0)})
                  for r, e in zip(cfg.train.rounds, epochs, strict=True)]
        train = cfg.train.model_copy(update={"rounds": rounds})
    else:
        train = cfg.train.model_copy(update={"epochs": epochs[0]})
    return replace(route, cfg=cfg.model_copy(update={"train": train}))


def refit(route: Route, scored: Scored, cv: CrossValidation, run: RunFolder | None = None):
    """The route trained on every labelled row, for the epochs its cross-validation chose
    (checkpoints and metrics.csv into `run` when given). Returns model, training report,
    runtime and the route as refit."""
    rows = cv.labelled.of(route)
    original, route = route, _refit_route(route, scored.epochs)
    model = build(route, route.cfg.seed)
    rt = make_runtime(route.cfg.train, route.spec.input == "image")
    if route.adaptation is not None:
        route = replace(route, adaptation=fold_adaptation(route, rows,
                                                            unlabelled_rows(route.inputs)))
    sink = Sink(lambda *_: None)
    if run is not None:
        save = checkpoint_saver(run, original, model, "select")
        sink = Sink(lambda name, epoch, state=None: save(name, epoch), run.file("metrics.csv"))
    report = train_route(route, model, TrainingData(rows, None, store=cv.store or PrefixStore()),
                         sink, rt)
    return model, report, rt, route


def oof_decision(route: Route, oof: np.ndarray, y: np.ndarray) -> Decision:
    """The refit model's decision rule, chosen on the out-of-fold predictions of every repeat
    (rows the fold models did not train on)."""
    flat = oof.reshape(-1, oof.shape[-1])
    ys = np.concatenate([y] * oof.shape[0])
    return choose_decision(route.cfg.decision, route.classes, route.kind, flat, ys,
                           chosen_on="out-of-fold")


def _oof_file(run: RunFolder, choice: Choice, route: Route, oof: np.ndarray) -> None:
    rows = choice.cv.labelled
    write_out_of_fold(run.path, rows.ids, rows.y, oof, (route.kind, route.classes))


def refit_and_score(run: RunFolder, choice: Choice, route: Route, winner: Scored,
                    oof: np.ndarray, member: bool = False):
    """The winner (or, `member`, one member of the average) refit on every labelled row and
    written as a complete trained run into `run`. Returns its summary, model and runtime."""
    model, report, rt, refit_route = refit(route, winner, choice.cv, run)
    decision = oof_decision(route, oof, choice.cv.labelled.y)
    write_text(run.file("config.yaml"), dump_config(pinned_config(
        refit_route.cfg, route.weights.path, route.prior_path)))
    _oof_file(run, choice, route, oof)
    cv = choice.cv_summary(winner.mean, None if math.isnan(winner.se) else winner.se,
                           len(winner.valid), winner.epochs)
    extra = {"select": {"winner": winner.name, "rule": choice.how, "cv": cv,
                        "candidates": len(choice.board),
                        "notes": choice.notes + choice.cv.folds.notes,
                        "leaderboard": "leaderboard.csv"}}
    if member:
        extra["select"] = {"member_of_ensemble": "../..", "cv": cv,
                           "leaderboard": "../../leaderboard.csv"}
    summary = write_outputs(run, refit_route, Trained(model, report, rt),
                            Scoring(None, route.inputs.test, decision, extra))
    return summary, model, rt


def _member(run: RunFolder, choice: Choice, route: Route, scored: Scored, oof: np.ndarray):
    """One member of the average as a complete run folder of its own (members/NAME)."""
    path = run.file("members", scored.name)
    path.mkdir(parents=True)
    member = RunFolder(path, "select", {"member_of": "../.."})
    member.set_status("running")
    try:
        with progress.use(progress.Reporter()):
            out = refit_and_score(member, choice, route, scored, oof, member=True)
    except BaseException as exc:
        member.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    member.set_status("complete")
    return out


def refit_average(run: RunFolder, choice: Choice, chosen: list[tuple[Route, Scored]],
                  oofs: dict[str, np.ndarray]):
    """select.rule ensemble: every member refit on all labelled rows into its own complete run
    folder (members/NAME, usable alone); this run is their average (ensemble.json), with the
    decision rule chosen on the averaged out-of-fold predictions. Returns its summary and the
    members' refit models and runtimes."""
    names = [s.name for _, s in chosen]
    first = chosen[0][0]
    test, refitted, members_test = Average(), {}, []
    with progress.current().steps("select: refitting the ensemble's members",
                                  total=len(chosen)) as advance:
        for route, scored in chosen:
            def differs(name: str = scored.name) -> DataError:
                return DataError(f"select.candidates ({name}): tests other target rows than "
                                 f"{names[0]}; an ensemble averages predictions on the same "
                                 f"rows")

            if test.predictions and not np.array_equal(np.asarray(route.inputs.data.test.ids),
                                                       np.asarray(test.ids)):
                raise differs()
            m, model, rt = _member(run, choice, route, scored, oofs[scored.name])
            refitted[scored.name] = (model, rt)
            test.add(route.inputs.data.test.ids, lambda model=model, route=route, rt=rt:
                     predict_proba(model, route.inputs.test, route.multilabel, rt=rt))
            members_test.append({"name": scored.name, "run": f"members/{scored.name}",
                                 **{k: m.test.get(k) for k in HEADLINE if k in m.test}})
            advance(1)
    summary = _average_summary(run, choice, (first, names), (test, oofs[ENSEMBLE]),
                               members_test)
    return summary, refitted


def _average_summary(run: RunFolder, choice: Choice, members: tuple, averaged: tuple,
                     members_test: list[dict]) -> AveragedSummary:
    """The average's decision rule, metrics.json, ensemble files and plots."""
    first, names = members
    test, oof = averaged
    decision = oof_decision(first, oof, choice.cv.labelled.y)
    y_test = first.inputs.test.y.numpy()
    _oof_file(run, choice, first, oof)
    ens = board_row(choice.board, ENSEMBLE)
    cv = choice.cv_summary(ens["mean"], ens["se"], ens["folds"], None)
    summary = AveragedSummary(
        "select", choice.cfg.name, choice.cfg.seed, names, first.classes, first.multilabel,
        decision, first.inputs.data.summary(),
        decision.report(y_test, test.mean), members_test,
        {"winner": ENSEMBLE, "rule": choice.how, "cv": cv, "candidates": len(choice.board),
         "notes": choice.notes + choice.cv.folds.notes, "leaderboard": "leaderboard.csv"})
    summary.write(run.path)
    title = f"average of {len(names)} routes refit on every labelled row, test split"
    write_average(run.path, AverageRun([f"members/{n}" for n in names], decision, title,
                                       "equal"),
                  (first.inputs.data.test.ids, test.mean, y_test, summary.test))
    plot_test_split(run, TestSplit(y_test, test.mean, summary.test, first.classes,
                                   f"{first.label}: ensemble (test split)"), decision)
    return summary

