"""ensemble: average the probabilities of several trained runs, then decide (the design
document's `avg` rule: several predicted probabilities averaged, a threshold chosen by a sweep
that maximises accuracy — here on validation rows, never on test).

Members must be runs of the same task on the same data section and split (their seeds,
n_train and n_val may differ: the usual case is one config trained with several seeds). The
threshold is chosen on the union of the members' validation rows — rows of the validation
partition, which no member trained on — and the test split is scored once at the end.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tltool.config import NAME_PATTERN, DecisionConfig
from tltool.decision import ARGMAX, asks_threshold, choose_decision, default_rule, threshold_applies
from tltool.engine.predict import predict_proba
from tltool.errors import RunError
from tltool.inputs import load_inputs
from tltool.models.backbones import get_spec
from tltool.runs.folder import RunPlace, experiment_home, new_run
from tltool.runs.opening import TrainedRun, ensemble_members, open_run
from tltool.runs.out_of_fold import has_out_of_fold, read_out_of_fold
from tltool.runs.summary import EnsembleSummary, Result, StoredSummary
from tltool.task import CLASSIFICATION, MULTILABEL, REGRESSION
from tltool.weights import Weights
from tltool.workflows.averaging import Average, AverageRun, write_average

log = logging.getLogger("tltool")

# Keys of a data section that may differ between members (what seeds sub-sample).
MAY_DIFFER = {"n_train", "n_val", "sample_seed", "augment", "decode_once_max_gb", "workers",
              "decode_cache", "on_bad_image"}
HEADLINE = {REGRESSION: ("rmse", "mae", "r2"), MULTILABEL: ("map", "micro_f1", "exact_match"),
            CLASSIFICATION: ("accuracy", "auroc", "f1")}


def _section(member: TrainedRun, full: bool):
    """The data section a member trained on (its full val partition when `full`)."""
    sec = member.data_section.model_copy(update={"augment": "none"})
    if member.checkpoint.image_input:
        sec = sec.model_copy(update={"image_size": member.checkpoint.preprocessor["size"]})
    return sec.model_copy(update={"n_val": None}) if full else sec


def _check_members(members: list[TrainedRun]) -> None:
    first = members[0]
    c0 = first.checkpoint
    base = first.data_section.model_dump()
    seen = {first.path.resolve()}
    for m in members[1:]:
        ckpt = m.checkpoint
        if m.path.resolve() in seen:
            raise RunError(f"{m.path}: given twice; an ensemble needs different runs")
        seen.add(m.path.resolve())
        if ckpt.classes != c0.classes or ckpt.multilabel != c0.multilabel:
            raise RunError(f"{m.path}: classes {ckpt.classes} differ from {first.path}'s "
                           f"{c0.classes}; an ensemble averages models of one task")
        if ckpt.trained_on != c0.trained_on:
            raise RunError(f"{m.path}: a {ckpt.command} run, trained on the {ckpt.trained_on} "
                           f"data; {first.path} trained on the {c0.trained_on} data")
        other = m.data_section.model_dump()
        diff = [k for k in base if k not in MAY_DIFFER and base[k] != other.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {other.get(k)!r} vs {base[k]!r}" for k in diff)
            raise RunError(f"{m.path}: trained on other data than {first.path} ({detail}); "
                           f"members must share the data section and split (only n_train / "
                           f"n_val and the seed may differ)")


def _rule(first: TrainedRun, rule: str, optimize: str | None) -> DecisionConfig:
    """The rule the ensemble's decision follows (`auto`: a threshold for two classes or
    labels, else argmax; `optimize` defaults to what the members chose theirs for)."""
    classes, kind = first.classes, first.kind
    if kind == REGRESSION and rule not in ("auto", ARGMAX):
        raise RunError(f"--rule {rule}: {first.path} predicts a number (task regression); its "
                       f"ensemble averages the predicted values (leave --rule auto)")
    if optimize is None:
        optimize = first.config.decision.optimize
    if rule == "auto":
        rule = default_rule(kind, len(classes))
    settings = DecisionConfig(rule=rule, optimize=optimize,
                              calibrate=first.config.decision.calibrate)
    if asks_threshold(settings) and not threshold_applies(kind, len(classes)):
        raise RunError(f"--rule threshold needs a binary or multi-label task; {first.path} has "
                       f"{len(classes)} classes (use --rule argmax)")
    return settings


def _selected(members: list[TrainedRun]) -> bool:
    """All members are select runs (whose held-out rows are out-of-fold predictions), or
    none is; a select run made without target labels has none."""
    selected = [m.command == "select" for m in members]
    for m, is_select in zip(members, selected, strict=True):
        if is_select and not has_out_of_fold(m.path) and \
                StoredSummary.read(m.path).without_target_labels:
            raise RunError(f"{m.path}: a select run made without target labels "
                           f"(select.target_labels false) has no out-of-fold predictions on "
                           f"the target to choose an ensemble's threshold with; ensemble the "
                           f"pretrain runs instead")
    if any(selected) and not all(selected):
        raise RunError("ensemble: mix of `select` runs and other runs; a select run trained on "
                       "every labelled row (its validation rows included), so its threshold "
                       "comes from out-of-fold predictions: give only select runs, or none")
    return all(selected)


@dataclass
class _Rows:
    """The members' predictions of the full validation partition and the test split, and
    which labelled rows each member used."""

    val: Average = field(default_factory=Average)
    test: Average = field(default_factory=Average)
    y_val: np.ndarray | None = None
    y_test: np.ndarray | None = None
    val_ids: set[str] = field(default_factory=set)
    labelled: list[set[str]] = field(default_factory=list)


def _predictions(members: list[TrainedRun]) -> _Rows:
    rows, first = _Rows(), members[0]
    for m in members:
        spec, state = get_spec(m.checkpoint.backbone), Weights("run", ckpt=m.checkpoint)
        domain = m.checkpoint.trained_on
        own = load_inputs(_section(m, full=False), domain, spec, state)
        full = load_inputs(_section(m, full=True), domain, spec, state)
        if rows.y_val is None:
            rows.y_val, rows.y_test = full.val.y.numpy(), full.test.y.numpy()

        def differs(m: TrainedRun = m) -> RunError:
            return RunError(f"{m.path}: its validation/test rows differ from {first.path}'s")

        if rows.val.predictions and not np.array_equal(full.data.test.ids, rows.test.ids):
            raise differs()
        rows.val_ids.update(np.asarray(own.data.val.ids).astype(str).tolist())
        rows.labelled.append(set(np.asarray(own.data.train.ids).astype(str).tolist())
                             | set(np.asarray(own.data.val.ids).astype(str).tolist()))
        rows.val.add(full.data.val.ids, lambda m=m, f=full: _proba(m, f.val), differs)
        rows.test.add(full.data.test.ids, lambda m=m, f=full: _proba(m, f.test))
    return rows


def _proba(member: TrainedRun, data) -> np.ndarray:
    return predict_proba(member.model, data, member.checkpoint.multilabel)


def ensemble(refs: list[str], name: str | None = None, rule: str = "auto",
             optimize: str | None = None, argv: list[str] | None = None) -> Result:
    """Average the members' probabilities, choose the decision rule on their held-out rows,
    score the test split once, into a new run folder."""
    if len(refs) < 2:
        raise RunError("ensemble: give at least two trained runs to average")
    if name is not None and not re.match(NAME_PATTERN, name):
        raise RunError(f"--name: got {name!r}; allowed: letters, digits, '.', '_' and '-', "
                       f"starting with a letter or digit (it names a folder under the members' "
                       f"output root)")
    members = [open_run(r) for ref in refs for r in ensemble_members(ref)]
    _check_members(members)
    first = members[0]
    settings = _rule(first, rule, optimize)
    selected = _selected(members)
    rows = _predictions(members)
    held = np.isin(np.asarray(rows.val.ids).astype(str), sorted(rows.val_ids))
    avg_val, y_held, labelled, held_from = rows.val.mean[held], rows.y_val[held], \
        rows.labelled, "validation"
    if selected:
        avg_val, y_held, labelled = read_out_of_fold([m.path for m in members], first.classes,
                                                     first.kind)
        held = np.ones(len(y_held), dtype=bool)
        held_from = "out-of-fold"
    decision = choose_decision(settings, first.classes, first.kind, avg_val, y_held,
                               chosen_on=held_from).averaging(len(members))
    summary = _summary(members, decision, (avg_val, y_held, held_from, labelled),
                       (rows, int(held.sum())))
    return _write(members, name, summary, (rows.test.ids, rows.test.mean, rows.y_test), argv)


def _summary(members: list[TrainedRun], decision, held: tuple,
             counted: tuple) -> EnsembleSummary:
    avg_val, y_held, held_from, labelled = held
    rows, n_val = counted
    first, classes = members[0], members[0].classes
    seen = len(set().union(*labelled))
    per_member = [len(s) for s in labelled]
    if seen > max(per_member):
        log.warning("ensemble: the members drew different labelled rows (%d distinct in all, "
                    "at most %d per member); compare it with single runs given %d labels, not "
                    "%d", seen, max(per_member), seen, max(per_member))
    keys = HEADLINE[first.kind]
    members_test = [{"run": str(m.path), **{k: m.decision.report(rows.y_test, p)[k]
                                            for k in keys}}
                    for m, p in zip(members, rows.test.predictions, strict=True)]
    return EnsembleSummary(
        "ensemble", [str(m.path) for m in members], first.checkpoint.trained_on, classes,
        first.checkpoint.multilabel, decision,
        {"val_rows": n_val, "labelled_rows_seen": seen, "labelled_rows_per_member": per_member},
        {"val": decision.report(y_held, avg_val),
         "test": decision.report(rows.y_test, rows.test.mean)},
        held_from, members_test)


def _write(members: list[TrainedRun], name: str | None, summary: EnsembleSummary,
           test: tuple, argv: list[str] | None) -> dict[str, Any]:
    first = members[0]
    home = experiment_home(first.path)
    place = RunPlace(home.root, name or f"{home.name}-ensemble")
    with new_run(place, "ensemble", argv, first.config.seed) as out:
        summary.write(out.path)
        title = f"average of {len(members)} runs, test split"
        table = write_average(out.path, AverageRun(summary.members, summary.decision, title),
                              (*test, summary.test))
    if summary.decision.chosen_on == "validation":
        log.info("ensemble of %d runs: threshold chosen on %d validation rows", len(members),
                 summary.labelled["val_rows"])
    else:
        log.info("ensemble of %d runs (%s)", len(members), summary.decision.rule)
    return Result(out.path, summary, table=table)
