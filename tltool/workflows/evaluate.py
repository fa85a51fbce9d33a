"""evaluate: a trained run's (or an ensemble's) metrics on a test split — of its own data,
of the other data section (`--on`), or of a labelled CSV (`--csv`) — with its saved input
encoding and decision rule."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tltool import plots
from tltool.decision import Decision
from tltool.errors import DataError, RunError
from tltool.inputs import encode_tabular, encoder_from_state, load_inputs, split_digest
from tltool.models.backbones import get_spec
from tltool.runs.files import write_text
from tltool.runs.folder import experiment_home, new_run
from tltool.runs.opening import TrainedRun, open_members
from tltool.runs.summary import EvaluationSummary, Result, StoredSummary
from tltool.tensors import Tensors
from tltool.weights import Weights
from tltool.workflows.averaging import Average, member_proba

log = logging.getLogger("tltool")


@dataclass
class EvaluationRows:
    """The labelled rows one model is evaluated on, encoded its own way."""

    test: Tensors
    ids: Any
    origin: str
    domain: str  # source, target or csv
    val: Tensors | None


def evaluate(ref: str | Path, on: str | None = None, csv: str | None = None,
             argv: list[str] | None = None, recompute: bool = False) -> Result:
    """Metrics on the test split of the run's data (or of `on`, or a labelled CSV).

    An ensemble run averages its members' probabilities and applies its own decision rule.
    An image model's backbone features stored in its run folder are reused for the same rows
    (tltool.features); `recompute` runs the backbone anyway."""
    opened = open_members(ref)
    first = opened.first
    classes, decision = first.classes, opened.decision
    hows: list[str] = []
    tests, vals = Average(), Average()
    rows: list[EvaluationRows] = []
    for member in opened.runs:
        here = evaluation_rows(member, on, csv)
        rows.append(here)
        tests.add(here.ids, lambda m=member, h=here: member_proba(m, h.test, recompute, hows),
                  lambda m=member: DataError(f"member {m.path} kept other rows than the first "
                                             f"member; cannot average"))
    last = rows[-1]
    y, proba = last.test.y.numpy(), tests.mean
    summary = EvaluationSummary("evaluate", str(opened.path), last.domain, str(last.origin),
                                classes, first.checkpoint.multilabel, decision,
                                len(opened.runs), decision.report(y, proba))
    if last.val is not None and len(last.val.y):
        # Every route reports the same validation score (a source-only model evaluated on
        # the target included), so routes can be compared without the test split.
        for member, here in zip(opened.runs, rows, strict=True):
            vals.add(None, lambda m=member, h=here: member_proba(m, h.val, recompute, hows))
        summary.validation = (decision.report(last.val.y.numpy(), vals.mean),
                              _val_note(opened.runs, last.domain))
    # "stored features": the backbone did not run (its features of these rows were in the run
    # folder); "forward pass": it did
    summary.backbone = sorted(set(hows))
    if decision.threshold is not None:
        summary.test_argmax = Decision.argmax(classes).report(y, proba)
    table = decision.format(summary.test)
    with new_run(experiment_home(opened.path), "evaluate", argv, first.config.seed) as out:
        summary.write(out.path)
        write_text(out.file("report.txt"), f"{opened.path} on {last.origin} (test split)\n"
                                           f"{table}\n")
        _plots(out, (y, proba, last.ids), summary, str(last.origin))
    return Result(out.path, summary, table=table)


def _plots(out, test: tuple, summary: EvaluationSummary, origin: str) -> None:
    """Test predictions, the confusion matrix (single-label classes) and the decision plots."""
    y, proba, ids = test
    decision, classes = summary.decision, summary.classes
    metrics = summary.test
    if decision.regression:
        plots.predicted_vs_true(y, proba[:, 0], out.file("plots", "predicted_vs_true.png"),
                                f"{origin} (test)")
    else:
        if not summary.multilabel:
            cm = pd.DataFrame(metrics["confusion_matrix"], index=classes, columns=classes)
            write_text(out.file("confusion_matrix.csv"),
                       cm.to_csv(index_label="true\\predicted"))
            plots.confusion_matrix(metrics["confusion_matrix"], classes,
                                   out.file("plots", "confusion_matrix.png"),
                                   f"{origin} (test)")
        plots.decision_plots(y, proba, decision, out.file("plots"), f"{origin} (test)")
    write_text(out.file("test_predictions.csv"),
               decision.frame(ids, proba, y).to_csv(index=False))


def _val_note(members: list[TrainedRun], domain: str) -> str:
    if "select" in {m.command for m in members}:
        return ("a select run trained on these rows (see its cross-validation scores in "
                "metrics.json select.cv)")
    if domain == members[0].checkpoint.trained_on:
        return "rows that chose the epoch and the threshold (not trained on)"
    return "rows the model never saw (neither trained nor tuned on)"


def evaluation_rows(member: TrainedRun, on: str | None, csv: str | None) -> EvaluationRows:
    """The labelled rows to evaluate one model on, encoded with its own input state."""
    ckpt = member.checkpoint
    if csv is not None:
        if ckpt.image_input:
            raise DataError("--csv evaluates table rows; for an image model use --on with a "
                            "data section of the run's config")
        test, ids = _labelled_csv(Path(csv), ckpt,
                                  getattr(member.data_section, "id_column", None))
        return EvaluationRows(test, ids, csv, "csv", None)
    domain = on or ckpt.trained_on
    data_cfg = getattr(member.config, domain)
    if data_cfg is None:
        raise RunError(f"{member.path}: its config has no `{domain}` data section to evaluate "
                       f"on")
    data_cfg = data_cfg.model_copy(update={"augment": "none"})
    if ckpt.image_input:
        data_cfg = data_cfg.model_copy(update={"image_size": ckpt.preprocessor["size"]})
    inputs = load_inputs(data_cfg, domain, get_spec(ckpt.backbone), Weights("run", ckpt=ckpt))
    if inputs.classes != ckpt.classes:
        raise DataError(f"{inputs.data.origin}: classes {inputs.classes} differ from the "
                        f"model's {ckpt.classes}; evaluate on data with the same label values")
    if domain == ckpt.trained_on:
        _warn_if_changed(member.path, inputs)
    return EvaluationRows(inputs.test, inputs.data.test.ids, inputs.data.origin, domain,
                          inputs.val)


def _warn_if_changed(run: Path, inputs) -> None:
    """The data the run trained on, re-read now, should split into the same rows."""
    then = StoredSummary.read(run).split_digests
    if then is None:
        return  # a run from before split digests were saved
    now = split_digest(inputs.data)
    try:
        same_test = now["test"] == then["test"]
        changed = not same_test or now["train"]["rows"] != then["train"]["rows"]
        rows_then = then["test"]["rows"]
    except (KeyError, TypeError):
        return
    if changed:
        log.warning("%s: the data changed since %s trained on it (test split %d rows now, %d "
                    "then, %s rows): the test split may now hold rows the model trained on, "
                    "so these metrics are not a clean test", inputs.data.origin, run.name,
                    now["test"]["rows"], rows_then, "the same" if same_test else "other")


def _labelled_csv(path: Path, ckpt, id_column: str | None) -> tuple[Tensors, np.ndarray]:
    """Labelled rows of a CSV, encoded like the model's training rows."""
    from tltool.data.csv import read_csv
    from tltool.data.preprocess import value_text
    from tltool.data.splits import Split
    from tltool.data.tabular import numeric_label

    label, classes = ckpt.label, ckpt.classes
    frame = read_csv(path, text_columns=[id_column] if id_column else [])
    has_ids = id_column is not None and id_column in frame.columns
    if label not in frame.columns:
        raise DataError(f"{path}: label column {label!r} missing; evaluate needs labelled "
                        f"rows (predict does not)")
    frame = frame[frame[label].notna() & (frame[label].astype(str).str.strip() != "")]
    if frame.empty:
        raise DataError(f"{path}: no row has a value in label column {label!r}")
    ids = (frame[id_column].fillna("").astype(str).to_numpy() if has_ids
           else frame.index.astype(str).to_numpy())
    if ckpt.regression:
        y = numeric_label(frame[label], label, str(path), training=False)
    else:
        text = frame[label].map(value_text)
        unknown = sorted(set(text) - set(classes))
        if unknown:
            raise DataError(f"{path}: label values {unknown} were not classes of the model "
                            f"({', '.join(classes)})")
        y = text.map(classes.index).to_numpy(np.int64)
    split = Split(frame, y, ids)
    return encode_tabular(encoder_from_state(ckpt.preprocessor), split, str(path)), split.ids
