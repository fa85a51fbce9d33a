"""evaluate and predict: apply a trained run's model, preprocessing and threshold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tltool.data.tabular import Split, load_tabular, read_csv
from tltool.engine import predict_proba
from tltool.errors import DataError, RunError
from tltool.metrics import classification_report, decide, format_report
from tltool.runs import load_checkpoint, resolve_run, write_json, write_text
from tltool.workflows.common import TRAINING_COMMANDS, load_trained, log, new_run, run_config


def _open_run(ref: str | Path):
    run = resolve_run(ref, commands=TRAINING_COMMANDS)
    cfg = run_config(run)
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    model, pre = load_trained(ckpt)
    try:
        decision = json.loads((run / "thresholds.json").read_text())
    except (OSError, ValueError):
        raise RunError(f"{run}: thresholds.json missing or unreadable") from None
    return run, cfg, ckpt, model, pre, decision


def evaluate(ref: str | Path, on: str | None = None, csv: str | None = None,
             argv: list[str] | None = None) -> dict[str, Any]:
    """Metrics on the test split of the run's data (or of `on`, or a labelled CSV)."""
    run, cfg, ckpt, model, pre, decision = _open_run(ref)
    classes, label = ckpt["classes"], ckpt["label"]
    if csv is not None:
        frame = read_csv(Path(csv))
        if label not in frame.columns:
            raise DataError(f"{csv}: label column {label!r} missing; evaluate needs labelled "
                            f"rows (predict does not)")
        text = frame[label].astype(str)
        unknown = sorted(set(text[frame[label].notna()]) - set(classes))
        if unknown:
            raise DataError(f"{csv}: label values {unknown} were not classes of the model "
                            f"({', '.join(classes)})")
        frame = frame[frame[label].notna()]
        test = Split(frame, frame[label].astype(str).map(classes.index).to_numpy(np.int64),
                     frame.index.astype(str).to_numpy())
        origin, domain = csv, "csv"
    else:
        default = "source" if ckpt["command"] == "pretrain" else "target"
        domain = on or default
        data_cfg = getattr(cfg, domain)
        if data_cfg is None:
            raise RunError(f"{run}: its config has no `{domain}` data section to evaluate on")
        data = load_tabular(data_cfg, cfg.seed)
        if data.classes != classes:
            raise DataError(f"{data.origin}: classes {data.classes} differ from the model's "
                            f"{classes}; evaluate on data with the same label values")
        test, origin = data.test, data.origin
    x = torch.from_numpy(pre.transform(test.frame, str(origin)))
    proba = predict_proba(model, x)
    report = classification_report(test.y, proba, classes, decision["threshold"])
    result = {"run": str(run), "on": domain, "origin": str(origin), "split": "test",
              "classes": classes, "decision": decision, "test": report}
    if decision["threshold"] is not None:
        result["test_argmax"] = classification_report(test.y, proba, classes, None)
    with new_run(run.parent.parent, run.parent.name, "evaluate", argv, cfg.seed) as out:
        write_json(out.file("metrics.json"), result)
        table = format_report(report, classes)
        write_text(out.file("report.txt"), f"{run} on {origin} (test split)\n{table}\n")
        cm = pd.DataFrame(report["confusion_matrix"], index=classes, columns=classes)
        cm.to_csv(out.file("confusion_matrix.csv"), index_label="true\\predicted")
        _predictions_frame(test.ids, proba, classes, decision["threshold"], test.y).to_csv(
            out.file("test_predictions.csv"), index=False)
    return {"run": str(out.path), "metrics": result, "table": table}


def predict(ref: str | Path, input_csv: str, out_csv: str | None = None,
            id_column: str | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """Probabilities and decisions for new rows, with the run's preprocessing and threshold."""
    run, cfg, ckpt, model, pre, decision = _open_run(ref)
    classes = ckpt["classes"]
    frame = read_csv(Path(input_csv))
    x = torch.from_numpy(pre.transform(frame, input_csv))
    unseen = pre.unseen_counts(frame)
    if unseen:
        log.warning("rows with categories not seen in training (encoded as none): %s", unseen)
    proba = predict_proba(model, x)
    data_cfg = cfg.target if ckpt["command"] == "freeze-finetune" else cfg.source
    if id_column is not None and id_column not in frame.columns:
        raise DataError(f"{input_csv}: --id-column {id_column!r} is not a column "
                        f"(columns: {', '.join(map(str, frame.columns))})")
    id_col = id_column or (data_cfg.id_column if data_cfg is not None else None)
    ids = (frame[id_col].astype(str).to_numpy() if id_col and id_col in frame.columns
           else frame.index.astype(str).to_numpy())
    preds = _predictions_frame(ids, proba, classes, decision["threshold"])
    if out_csv is not None:
        out_path = Path(out_csv)
        if out_path.is_dir():
            raise DataError(f"--out {out_csv}: is a folder; give a file name")
        if not out_path.parent.exists():
            raise DataError(f"--out {out_csv}: folder {out_path.parent} does not exist")
    summary = {"run": str(run), "input": input_csv, "rows": len(preds),
               "decision": decision, "unseen_categories": unseen,
               "predicted_counts": preds["prediction"].value_counts().sort_index().to_dict()}
    with new_run(run.parent.parent, run.parent.name, "predict", argv, cfg.seed) as out:
        write_text(out.file("predictions.csv"), preds.to_csv(index=False))
        write_json(out.file("metrics.json"), summary)
        if out_csv is not None:
            write_text(Path(out_csv), preds.to_csv(index=False))
    return {"run": str(out.path), "summary": summary, "out": out_csv}


def _predictions_frame(ids, proba: np.ndarray, classes: list[str], threshold: float | None,
                       y: np.ndarray | None = None) -> pd.DataFrame:
    cols: dict[str, Any] = {"id": ids}
    for i, c in enumerate(classes):
        cols[f"p_{c}"] = np.round(proba[:, i], 6)
    cols["prediction"] = np.asarray(classes, dtype=object)[decide(proba, threshold)]
    if y is not None:
        cols["label"] = np.asarray(classes, dtype=object)[y]
    return pd.DataFrame(cols)
