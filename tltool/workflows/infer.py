"""evaluate and predict: apply a trained run's model, input encoding and decision rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tltool import distributed, features, plots
from tltool.decision import Decision, predictions_frame, report
from tltool.engine import Tensors, predict_proba
from tltool.errors import DataError, RunError
from tltool.inputs import encode_images, encode_tabular, encoder_from_state, load_inputs
from tltool.models.backbones import get_spec
from tltool.runs import (
    check_output_file,
    write_json,
    write_text,
)
from tltool.workflows.common import (
    experiment_home,
    inference_runtime,
    log,
    new_run,
    trained_on,
)
from tltool.workflows.opening import open_members, state_only


def evaluate(ref: str | Path, on: str | None = None, csv: str | None = None,
             argv: list[str] | None = None, recompute: bool = False) -> dict[str, Any]:
    """Metrics on the test split of the run's data (or of `on`, or a labelled CSV).

    An ensemble run averages its members' probabilities and applies its own decision rule.
    An image model's backbone features stored in its run folder are reused for the same rows
    (tltool.features); `recompute` runs the backbone anyway."""
    run, members, decision = open_members(ref)
    _, cfg, ckpt, _, _ = members[0]
    classes, multilabel = ckpt["classes"], bool(ckpt.get("multilabel"))
    vals: list = []
    hows: list[str] = []

    def load(m):
        test, ids, origin, domain, val = _evaluation_data(m[0], m[1], m[2], on, csv)
        vals.append(val)
        return test, ids, origin, domain, val

    proba, ids, (test, origin, domain, val) = _average(members, multilabel, load, recompute,
                                                       hows)
    y = test.y.numpy()
    metrics = report(y, proba, classes, decision)
    result = {"run": str(run), "on": domain, "origin": str(origin), "split": "test",
              "classes": classes, "multilabel": multilabel, "decision": decision,
              "members": len(members), "test": metrics}
    if val is not None and len(val.y):
        # Every route reports the same validation score (a source-only model evaluated on
        # the target included), so routes can be compared without the test split.
        p_val = np.mean([_proba(m, v, multilabel, recompute, hows)
                         for m, v in zip(members, vals, strict=True)],
                        axis=0)
        result["val"] = report(val.y.numpy(), p_val, classes, decision)
        result["val_note"] = _val_note(members, domain)
    # "stored features": the backbone did not run (its features of these rows were in the run
    # folder); "forward pass": it did
    result["backbone"] = sorted(set(hows))
    rule = Decision.of(decision)
    if rule.threshold is not None:
        result["test_argmax"] = report(y, proba, classes, {"threshold": None})
    table = rule.format(metrics, classes)
    regression = rule.regression
    with new_run(*experiment_home(run), "evaluate", argv, cfg.seed) as out:
        write_json(out.file("metrics.json"), result)
        write_text(out.file("report.txt"), f"{run} on {origin} (test split)\n{table}\n")
        if regression:
            plots.predicted_vs_true(y, proba[:, 0], out.file("plots", "predicted_vs_true.png"),
                                    f"{origin} (test)")
        else:
            if not multilabel:
                cm = pd.DataFrame(metrics["confusion_matrix"], index=classes, columns=classes)
                write_text(out.file("confusion_matrix.csv"),
                           cm.to_csv(index_label="true\\predicted"))
                plots.confusion_matrix(metrics["confusion_matrix"], classes,
                                       out.file("plots", "confusion_matrix.png"),
                                       f"{origin} (test)")
            plots.decision_plots(y, proba, classes, decision, out.file("plots"),
                                 f"{origin} (test)")
        write_text(out.file("test_predictions.csv"),
                   predictions_frame(ids, proba, classes, decision, y).to_csv(index=False))
    return {"run": str(out.path), "metrics": result, "table": table}


def _val_note(members: list, domain: str) -> str:
    from tltool.runs import run_status

    commands = {(run_status(m[0]) or {}).get("command") for m in members}
    if "select" in commands:
        return ("a select run trained on these rows (see its cross-validation scores in "
                "metrics.json select.cv)")
    if domain == trained_on(members[0][2]):
        return "rows that chose the epoch and the threshold (not trained on)"
    return "rows the model never saw (neither trained nor tuned on)"


def _average(members: list, multilabel: bool, load, recompute: bool = False,
             hows: list[str] | None = None):
    """Each member encodes the rows its own way (`load(member)` -> (data, ids, *extra));
    their probabilities (or regression values) are averaged. Returns the mean, the ids and
    the last member's (data, *extra)."""
    probas: list[np.ndarray] = []
    ids: Any = None
    for member in members:
        data, m_ids, *extra = load(member)
        if probas and not np.array_equal(np.asarray(m_ids), np.asarray(ids)):
            raise DataError(f"member {member[0]} kept other rows than the first member; "
                            f"cannot average")
        ids = m_ids
        probas.append(_proba(member, data, multilabel, recompute, hows))
    return np.mean(probas, axis=0), ids, (data, *extra)


def _proba(member, data: Tensors, multilabel: bool, recompute: bool = False,
           hows: list[str] | None = None) -> np.ndarray:
    """A member's probabilities, predicted with its run's runtime (device, precision,
    layouts), set up once per member; how they were computed is appended to `hows`."""
    model = member[3]
    rt = getattr(model, "_tltool_inference_rt", None)
    if rt is None:
        rt = inference_runtime(member[1], member[2], model, data)
        model._tltool_inference_rt = rt
    if recompute:
        proba, how = predict_proba(model, data, multilabel, rt=rt), "forward pass"
    else:
        # an image model's validation and test rows: the backbone features the run stored,
        # when they are of the same rows, weights and precision (tltool.features)
        proba, how = features.predict(model, data, multilabel, rt, 512,
                                      run_path=Path(member[0]))
    if hows is not None:
        hows.append(how)
    return proba


def _evaluation_data(run: Path, cfg, ckpt: dict[str, Any], on: str | None, csv: str | None):
    """The labelled rows to evaluate one model on, encoded with its own input state:
    (rows, their ids, origin, domain)."""
    classes, label, state = ckpt["classes"], ckpt["label"], ckpt["preprocessor"]
    if csv is not None:
        if state.get("kind") == "image":
            raise DataError("--csv evaluates table rows; for an image model use --on with a "
                            "data section of the run's config")
        regression = bool(ckpt["spec"].get("target_scale"))
        test, ids = _labelled_csv(Path(csv), label, classes, state, regression,
                                  getattr(_data_section(cfg, ckpt), "id_column", None))
        return test, ids, csv, "csv", None
    domain = on or trained_on(ckpt)
    data_cfg = getattr(cfg, domain)
    if data_cfg is None:
        raise RunError(f"{run}: its config has no `{domain}` data section to evaluate on")
    data_cfg = data_cfg.model_copy(update={"augment": "none"})
    if state.get("kind") == "image":
        data_cfg = data_cfg.model_copy(update={"image_size": state["size"]})
    inputs = load_inputs(data_cfg, domain, cfg.seed, get_spec(ckpt["spec"]["backbone"]),
                         state_only(ckpt))
    if inputs.classes != classes:
        raise DataError(f"{inputs.data.origin}: classes {inputs.classes} differ from the "
                        f"model's {classes}; evaluate on data with the same label values")
    if domain == trained_on(ckpt):
        _warn_if_changed(run, inputs)
    return inputs.test, inputs.data.test.ids, inputs.data.origin, domain, inputs.val


def _warn_if_changed(run: Path, inputs) -> None:
    """The data the run trained on, re-read now, should split into the same rows."""
    from tltool.inputs import split_digest

    try:
        then = json.loads((run / "metrics.json").read_text())["data"]["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a run from before split digests were saved
    now = split_digest(inputs.data)
    if now["test"] != then["test"] or now["train"]["rows"] != then["train"]["rows"]:
        log.warning("%s: the data changed since %s trained on it (test split %d rows now, %d "
                    "then, %s rows): the test split may now hold rows the model trained on, "
                    "so these metrics are not a clean test", inputs.data.origin, run.name,
                    now["test"]["rows"], then["test"]["rows"],
                    "the same" if now["test"] == then["test"] else "other")


def _labelled_csv(path: Path, label: str, classes: list[str], state: dict,
                  regression: bool = False,
                  id_column: str | None = None) -> tuple[Tensors, np.ndarray]:
    from tltool.data.csv import read_csv
    from tltool.data.preprocess import value_text
    from tltool.data.splits import Split
    from tltool.data.tabular import numeric_label

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
    if regression:
        split = Split(frame, numeric_label(frame[label], label, str(path), training=False),
                      ids)
        return encode_tabular(encoder_from_state(state), split, str(path)), split.ids
    text = frame[label].map(value_text)
    unknown = sorted(set(text) - set(classes))
    if unknown:
        raise DataError(f"{path}: label values {unknown} were not classes of the model "
                        f"({', '.join(classes)})")
    y = text.map(classes.index).to_numpy(np.int64)
    split = Split(frame, y, ids)
    return encode_tabular(encoder_from_state(state), split, str(path)), split.ids


def predict(ref: str | Path, input_path: str, out_csv: str | None = None,
            id_column: str | None = None, argv: list[str] | None = None,
            force: bool = False) -> dict[str, Any]:
    """Probabilities and decisions for new rows (or images: a folder, or a CSV of paths).

    An ensemble run averages its members' probabilities and applies its own decision rule."""
    run, members, decision = open_members(ref)
    _, cfg, ckpt, _, _ = members[0]
    classes, multilabel = ckpt["classes"], bool(ckpt.get("multilabel"))
    out_path = None
    if out_csv is not None and out_csv != "-":
        out_path = check_output_file(out_csv, "--out", force)
        if out_path.exists() and out_path.resolve() == Path(input_path).resolve():
            raise DataError(f"--out {out_csv}: is the input file; write the predictions to "
                            f"another file")
    def load(member):
        _, m_cfg, m_ckpt, _, _ = member
        state = m_ckpt["preprocessor"]
        if state.get("kind") == "image":
            data, m_ids, notes = _new_images(Path(input_path), state, id_column,
                                             _data_section(m_cfg, m_ckpt))
        else:
            data, m_ids, notes = _new_rows(Path(input_path), state, m_cfg, m_ckpt, id_column)
        return data, m_ids, notes

    proba, ids, (_, notes) = _average(members, multilabel, load)
    preds = predictions_frame(ids, proba, classes, decision)
    if Decision.of(decision).regression:
        described = preds["prediction"].describe()
        outcome = {"predicted": {k: float(described[k]) for k in ("mean", "std", "min", "max")}}
    else:
        outcome = {"predicted_counts":
                   preds["prediction"].value_counts().sort_index().to_dict()}
    summary = {"run": str(run), "input": input_path, "rows": len(preds), "decision": decision,
               "members": len(members), **notes, **outcome}
    with new_run(*experiment_home(run), "predict", argv, cfg.seed) as out:
        write_text(out.file("predictions.csv"), preds.to_csv(index=False))
        write_json(out.file("metrics.json"), summary)
        if out_path is not None and distributed.is_main():  # torchrun: rank 0 writes it
            write_text(out_path, preds.to_csv(index=False))
    return {"run": str(out.path), "summary": summary, "out": out_csv,
            "csv": preds.to_csv(index=False) if out_csv == "-" else None}


def _new_rows(path: Path, state, cfg, ckpt, id_column):
    from tltool.data.csv import read_csv

    data_cfg = _data_section(cfg, ckpt)
    frame = read_csv(path, text_columns=[c for c in (id_column, getattr(data_cfg, "id_column",
                                                                        None)) if c])
    pre = encoder_from_state(state)
    x = torch.from_numpy(pre.transform(frame, str(path)))
    unseen = pre.unseen_counts(frame)
    if unseen:
        log.warning("rows with categories not seen in training (encoded as none): %s", unseen)
    if id_column is not None and id_column not in frame.columns:
        raise DataError(f"{path}: --id-column {id_column!r} is not a column "
                        f"(columns: {', '.join(map(str, frame.columns))})")
    id_col = id_column or (data_cfg.id_column if data_cfg is not None else None)
    if id_col and id_col in frame.columns:
        ids = frame[id_col].fillna("").astype(str).to_numpy()
        blank, repeated = int((ids == "").sum()), int(pd.Series(ids).duplicated().sum())
        if blank or repeated:
            log.warning("%s: id column %r has %d empty and %d repeated value(s); predictions "
                        "stay in input order", path, id_col, blank, repeated)
    else:
        if id_col:
            log.warning("%s: no id column %r; rows are identified by their 0-based data row",
                        path, id_col)
        ids = frame.index.astype(str).to_numpy()
    used = set(pre.input_columns) | ({id_col} if id_col else set())
    ignored = [str(c) for c in frame.columns if c not in used]
    if ignored:
        log.info("columns not used by the model: %s", ", ".join(ignored))
    return Tensors(x, torch.empty(0)), ids, {"unseen_categories": unseen,
                                             "ignored_columns": ignored}


def _data_section(cfg, ckpt):
    return getattr(cfg, trained_on(ckpt))


def _new_images(path: Path, state, id_column, data_cfg):
    """A folder of images (searched recursively), one image file, or a CSV of image paths
    (the column and root the run trained with, as for kind image_csv)."""
    from tltool.data.images.decoding import IMAGE_EXTENSIONS, load_image_files
    from tltool.data.images.sources import walk_files

    if not path.exists():
        raise DataError(f"{path}: not found; give a folder of images, an image file or a CSV "
                        f"of image paths")
    if path.is_dir():
        found, broken = walk_files(path)
        if broken:
            log.warning("%s: ignored %d broken symbolic link(s)", path, broken)
        files = [str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise DataError(f"{path}: no image files found (looked for "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        ids = list(files)
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        files = ids = [str(path)]
    elif path.suffix.lower() == ".csv":
        files, ids = _image_paths(path, id_column, data_cfg)
    else:
        raise DataError(f"{path}: expected a folder of images, an image file "
                        f"({', '.join(IMAGE_EXTENSIONS)}) or a CSV of image paths")
    x, kept = load_image_files(files, state["size"], "skip")
    skipped = [files[i] for i in range(len(files)) if i not in set(kept)]
    if skipped:
        log.warning("skipped %d unreadable or missing image(s): %s", len(skipped),
                    ", ".join(skipped[:5]))
    data = encode_images(state | {"augment": "none"}, x, np.zeros(len(x), dtype=np.int64))
    return data, np.asarray([ids[i] for i in kept]), {"skipped_images": skipped}


def _image_paths(path: Path, id_column: str | None, data_cfg) -> tuple[list[str], list[str]]:
    """Image files listed in a CSV, and the id of each row (the path as written, or
    --id-column)."""
    from tltool.data.csv import read_csv

    frame = read_csv(path)
    trained = getattr(data_cfg, "kind", None) == "image_csv"
    column = data_cfg.image_column if trained else "path"
    if column not in frame.columns:
        raise DataError(f"{path}: no column {column!r} with image paths (the column the run "
                        f"trained with; columns: {', '.join(map(str, frame.columns))})")
    if id_column is not None and id_column not in frame.columns:
        raise DataError(f"{path}: --id-column {id_column!r} is not a column "
                        f"(columns: {', '.join(map(str, frame.columns))})")
    root = Path(data_cfg.root) if trained and data_cfg.root else path.parent
    files, ids = [], []
    for i, raw in enumerate(frame[column]):
        if pd.isna(raw) or not str(raw).strip():
            raise DataError(f"{path}: row {i + 2}: empty image path in column {column!r}")
        rel = str(raw).strip()
        files.append(rel if Path(rel).is_absolute() else str(root / rel))
        ids.append(rel if id_column is None else str(frame[id_column].iloc[i]))
    return files, ids


