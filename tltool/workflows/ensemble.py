"""ensemble: average the probabilities of several trained runs, then decide (the design
document's `avg` rule: several predicted probabilities averaged, a threshold chosen by a sweep
that maximises accuracy — here on validation rows, never on test).

Members must be runs of the same task on the same data section and split (their seeds,
n_train and n_val may differ: the usual case is one config trained with several seeds). The
threshold is chosen on the union of the members' validation rows — rows of the validation
partition, which no member trained on — and the test split is scored once at the end.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from tltool.config import NAME_PATTERN, DecisionConfig
from tltool.decision import decision_rule, report
from tltool.engine import predict_proba
from tltool.errors import RunError
from tltool.inputs import load_inputs
from tltool.metrics import format_any
from tltool.models.backbones import get_spec
from tltool.runs import run_status, write_json, write_text
from tltool.workflows.common import experiment_home, log, new_run, trained_on

# Keys of a data section that may differ between members (what seeds sub-sample).
MAY_DIFFER = {"n_train", "n_val", "sample_seed", "augment", "decode_once_max_gb", "workers",
              "decode_cache", "on_bad_image"}


def _domain(ckpt: dict[str, Any]) -> str:
    return trained_on(ckpt)


def _section(cfg, ckpt, full: bool):
    """The data section a member trained on (its full val partition when `full`)."""
    sec = getattr(cfg, _domain(ckpt)).model_copy(update={"augment": "none"})
    if ckpt["preprocessor"].get("kind") == "image":
        sec = sec.model_copy(update={"image_size": ckpt["preprocessor"]["size"]})
    return sec.model_copy(update={"n_val": None}) if full else sec


def _check_members(members: list) -> None:
    run0, cfg0, ckpt0 = members[0][:3]
    base = getattr(cfg0, _domain(ckpt0)).model_dump()
    seen = {run0.resolve()}
    for run, cfg, ckpt, *_ in members[1:]:
        if run.resolve() in seen:
            raise RunError(f"{run}: given twice; an ensemble needs different runs")
        seen.add(run.resolve())
        if ckpt["classes"] != ckpt0["classes"] or bool(ckpt.get("multilabel")) != \
                bool(ckpt0.get("multilabel")):
            raise RunError(f"{run}: classes {ckpt['classes']} differ from {run0}'s "
                           f"{ckpt0['classes']}; an ensemble averages models of one task")
        if _domain(ckpt) != _domain(ckpt0):
            raise RunError(f"{run}: a {ckpt['command']} run, trained on the "
                           f"{_domain(ckpt)} data; {run0} trained on the {_domain(ckpt0)} data")
        other = getattr(cfg, _domain(ckpt)).model_dump()
        diff = [k for k in base if k not in MAY_DIFFER and base[k] != other.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {other.get(k)!r} vs {base[k]!r}" for k in diff)
            raise RunError(f"{run}: trained on other data than {run0} ({detail}); members "
                           f"must share the data section and split (only n_train / n_val and "
                           f"the seed may differ)")


def ensemble(refs: list[str], name: str | None = None, rule: str = "auto",
             optimize: str | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    from tltool.workflows.opening import open_run, state_only

    if len(refs) < 2:
        raise RunError("ensemble: give at least two trained runs to average")
    if name is not None and not re.match(NAME_PATTERN, name):
        raise RunError(f"--name: got {name!r}; allowed: letters, digits, '.', '_' and '-', "
                       f"starting with a letter or digit (it names a folder under the members' "
                       f"output root)")
    members = [open_run(r) for r in _flatten(refs)]
    _check_members(members)
    run0, cfg0, ckpt0 = members[0][:3]
    classes, multilabel = ckpt0["classes"], bool(ckpt0.get("multilabel"))
    regression = bool(ckpt0["spec"].get("target_scale"))
    if regression and rule not in ("auto", "argmax"):
        raise RunError(f"--rule {rule}: {run0} predicts a number (task regression); its "
                       f"ensemble averages the predicted values (leave --rule auto)")
    if optimize is None:  # what the members chose their own thresholds for
        optimize = cfg0.decision.optimize
    if rule == "auto":
        rule = "threshold" if multilabel or len(classes) == 2 else "argmax"
    if rule == "threshold" and not multilabel and len(classes) != 2:
        raise RunError(f"--rule threshold needs a binary or multi-label task; {run0} has "
                       f"{len(classes)} classes (use --rule argmax)")
    selected = [(run_status(m[0]) or {}).get("command") == "select" for m in members]
    for (run, *_), is_select in zip(members, selected, strict=True):
        if is_select and not (run / "oof_predictions.csv").exists() and \
                _unsupervised(run):
            raise RunError(f"{run}: a select run made without target labels "
                           f"(select.target_labels false) has no out-of-fold predictions on "
                           f"the target to choose an ensemble's threshold with; ensemble the "
                           f"pretrain runs instead")
    if any(selected) and not all(selected):
        raise RunError("ensemble: mix of `select` runs and other runs; a select run trained on "
                       "every labelled row (its validation rows included), so its threshold "
                       "comes from out-of-fold predictions: give only select runs, or none")
    val_ids: set[str] = set()
    labelled: list[set[str]] = []
    p_val, p_test = [], []
    y_val = y_test = full_val_ids = test_ids = None
    for run, cfg, ckpt, model, _ in members:
        spec, state = get_spec(ckpt["spec"]["backbone"]), state_only(ckpt)
        own = load_inputs(_section(cfg, ckpt, full=False), _domain(ckpt), cfg.seed, spec, state)
        full = load_inputs(_section(cfg, ckpt, full=True), _domain(ckpt), cfg.seed, spec, state)
        if full_val_ids is None:
            full_val_ids, test_ids = full.data.val.ids, full.data.test.ids
            y_val, y_test = full.val.y.numpy(), full.test.y.numpy()
        elif not (np.array_equal(full.data.val.ids, full_val_ids)
                  and np.array_equal(full.data.test.ids, test_ids)):
            raise RunError(f"{run}: its validation/test rows differ from {run0}'s")
        val_ids.update(np.asarray(own.data.val.ids).astype(str).tolist())
        labelled.append(set(np.asarray(own.data.train.ids).astype(str).tolist())
                        | set(np.asarray(own.data.val.ids).astype(str).tolist()))
        p_val.append(predict_proba(model, full.val, multilabel))
        p_test.append(predict_proba(model, full.test, multilabel))
    rows = np.isin(np.asarray(full_val_ids).astype(str), sorted(val_ids))
    avg_val = np.mean(p_val, axis=0)[rows]
    y_held = y_val[rows]
    held_from = "validation"
    if all(selected):
        avg_val, y_held, labelled = _out_of_fold(members, classes, multilabel, regression)
        rows = np.ones(len(y_held), dtype=bool)
        held_from = "out-of-fold"
    avg_test = np.mean(p_test, axis=0)
    decision = decision_rule(cfg0.model_copy(update={"decision": DecisionConfig(
        rule=rule, optimize=optimize, calibrate=cfg0.decision.calibrate)}), classes,
        multilabel, avg_val, y_held, regression, chosen_on=held_from)
    decision["averaged"] = len(members)
    metrics = {
        "command": "ensemble", "members": [str(m[0]) for m in members],
        "domain": _domain(ckpt0), "classes": classes, "multilabel": multilabel,
        "decision": decision, "val_rows": int(rows.sum()),
        # How many labels the ensemble as a whole used: members that drew other labelled
        # rows (other sample_seed) together saw more than any one of them.
        "labelled_rows_seen": len(set().union(*labelled)),
        "labelled_rows_per_member": [len(s) for s in labelled],
        "val": report(y_held, avg_val, classes, decision),
        "val_from": held_from,
        "test": report(y_test, avg_test, classes, decision),
        "members_test": [{"run": str(run), **{k: report(y_test, p, classes, dec)[k]
                                              for k in _headline(multilabel, regression)}}
                         for (run, *_, dec), p in zip(members, p_test, strict=True)],
    }
    table = format_any(metrics["test"], classes, decision)
    if metrics["labelled_rows_seen"] > max(metrics["labelled_rows_per_member"]):
        log.warning("ensemble: the members drew different labelled rows (%d distinct in all, "
                    "at most %d per member); compare it with single runs given %d labels, not "
                    "%d", metrics["labelled_rows_seen"], max(metrics["labelled_rows_per_member"]),
                    metrics["labelled_rows_seen"], max(metrics["labelled_rows_per_member"]))
    root, experiment = experiment_home(run0)
    name = name or f"{experiment}-ensemble"
    with new_run(root, name, "ensemble", argv, cfg0.seed) as out:
        write_json(out.file("ensemble.json"), {"members": metrics["members"]})
        write_json(out.file("thresholds.json"), decision)
        write_json(out.file("metrics.json"), metrics)
        write_text(out.file("report.txt"), f"average of {len(members)} runs, test split\n"
                                           f"{table}\n")
        from tltool.decision import predictions_frame

        write_text(out.file("test_predictions.csv"), predictions_frame(
            test_ids, avg_test, classes, decision, y_test).to_csv(index=False))
    if decision.get("chosen_on") == "validation":
        log.info("ensemble of %d runs: threshold chosen on %d validation rows", len(members),
                 int(rows.sum()))
    else:
        log.info("ensemble of %d runs (%s)", len(members), decision["rule"])
    return {"run": str(out.path), "metrics": metrics, "table": table}


def _flatten(refs: list[str]) -> list[str]:
    """A select run that chose an ensemble (select.rule ensemble) stands for its members: an
    ensemble of such runs averages every member of each, equally."""
    from tltool.runs import resolve_run
    from tltool.workflows.common import TRAINING_COMMANDS
    from tltool.workflows.opening import member_runs

    out: list[str] = []
    for ref in refs:
        run = resolve_run(ref, commands=TRAINING_COMMANDS)
        out += member_runs(run) if (run / "ensemble.json").exists() else [str(run)]
    return out


def _out_of_fold(members: list, classes: list[str], multilabel: bool,
                 regression: bool) -> tuple[np.ndarray, np.ndarray, list[set[str]]]:
    """Select runs: the members' out-of-fold predictions on the labelled rows they share
    (averaged), the labels, and each member's labelled rows."""
    import pandas as pd

    frames = []
    for run, *_ in members:
        path = run / "oof_predictions.csv"
        try:
            frames.append(pd.read_csv(path, dtype={"id": str}, keep_default_na=False))
        except (OSError, ValueError):
            raise RunError(f"{path}: missing or unreadable (a select run keeps its "
                           f"out-of-fold predictions there)") from None
    cols = ["prediction"] if regression else [f"p_{c}" for c in classes]
    try:
        labelled = [set(f["id"]) for f in frames]
        common = sorted(set.intersection(*labelled))
        parts = [f.drop_duplicates("id").set_index("id").loc[common] for f in frames]
        avg = np.mean([p[cols].to_numpy(np.float64) for p in parts], axis=0)
        labels = parts[0]["label"]
        if regression:
            y = labels.to_numpy(np.float64)
        elif multilabel:
            y = np.array([[c in str(v).split("|") for c in classes] for v in labels],
                         dtype=np.int64)
        else:
            index = {c: i for i, c in enumerate(classes)}
            y = np.array([index[str(v)] for v in labels], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as exc:
        raise RunError(f"ensemble: a member's oof_predictions.csv is damaged ({type(exc).__name__}"
                       f": {str(exc)[:120]}); expected columns id, {', '.join(cols)}, label "
                       f"with the run's classes") from None
    if not common:
        raise RunError("ensemble: the select runs share no labelled row; their out-of-fold "
                       "predictions cannot choose a common threshold")
    if not np.isfinite(avg).all():
        raise RunError("ensemble: a member's oof_predictions.csv holds non-finite numbers")
    return avg, y, labelled


def _unsupervised(run: Path) -> bool:
    import json

    try:
        m = json.loads((run / "metrics.json").read_text())
        return (m.get("select") or {}).get("target_labels") is False
    except (OSError, ValueError, AttributeError):
        return False


def _headline(multilabel: bool, regression: bool = False) -> tuple[str, ...]:
    if regression:
        return ("rmse", "mae", "r2")
    return ("map", "micro_f1", "exact_match") if multilabel else ("accuracy", "auroc", "f1")


