"""predict: probabilities and decisions for new rows (a CSV of table rows; images: a folder,
one image file, or a CSV of image paths) with a trained run's input encoding and decision
rule; an ensemble run averages its members."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tltool import distributed
from tltool.errors import DataError
from tltool.inputs import encode_images, encoder_from_state
from tltool.runs.files import write_text
from tltool.runs.folder import check_output_file, experiment_home, new_run
from tltool.runs.opening import TrainedRun, open_members
from tltool.runs.summary import PredictionSummary, Result
from tltool.tensors import Tensors
from tltool.workflows.averaging import Average, member_proba

log = logging.getLogger("tltool")


def predict(ref: str | Path, input_path: str, out_csv: str | None = None,
            id_column: str | None = None, argv: list[str] | None = None,
            force: bool = False) -> Result:
    """Probabilities and decisions for new rows (or images: a folder, or a CSV of paths).

    An ensemble run averages its members' probabilities and applies its own decision rule."""
    opened = open_members(ref)
    first, decision = opened.first, opened.decision
    out_path = None
    if out_csv is not None and out_csv != "-":
        out_path = check_output_file(out_csv, "--out", force)
        if out_path.exists() and out_path.resolve() == Path(input_path).resolve():
            raise DataError(f"--out {out_csv}: is the input file; write the predictions to "
                            f"another file")
    average, notes = Average(), {}
    for member in opened.runs:
        data, ids, notes = _new_inputs(member, Path(input_path), id_column)
        average.add(ids, lambda m=member, d=data: member_proba(m, d),
                    lambda m=member: DataError(f"member {m.path} kept other rows than the first "
                                               f"member; cannot average"))
    preds = decision.frame(average.ids, average.mean)
    if decision.regression:
        described = preds["prediction"].describe()
        outcome = {"predicted": {k: float(described[k]) for k in ("mean", "std", "min", "max")}}
    else:
        outcome = {"predicted_counts":
                   preds["prediction"].value_counts().sort_index().to_dict()}
    summary = PredictionSummary("predict", str(opened.path), input_path, len(preds), decision,
                                len(opened.runs), notes, outcome)
    with new_run(experiment_home(opened.path), "predict", argv, first.config.seed) as out:
        write_text(out.file("predictions.csv"), preds.to_csv(index=False))
        summary.write(out.path)
        if out_path is not None and distributed.is_main():  # torchrun: rank 0 writes it
            write_text(out_path, preds.to_csv(index=False))
    return Result(out.path, summary, csv=preds.to_csv(index=False) if out_csv == "-" else None)


def _new_inputs(member: TrainedRun, path: Path, id_column: str | None):
    """The new rows encoded the member's way: (rows, ids, notes for metrics.json)."""
    state = member.checkpoint.preprocessor
    if member.checkpoint.image_input:
        return _new_images(path, state, id_column, member.data_section)
    return _new_rows(path, state, member.data_section, id_column)


def _row_ids(frame: pd.DataFrame, path: Path, id_col: str | None) -> np.ndarray:
    if id_col and id_col in frame.columns:
        ids = frame[id_col].fillna("").astype(str).to_numpy()
        blank, repeated = int((ids == "").sum()), int(pd.Series(ids).duplicated().sum())
        if blank or repeated:
            log.warning("%s: id column %r has %d empty and %d repeated value(s); predictions "
                        "stay in input order", path, id_col, blank, repeated)
        return ids
    if id_col:
        log.warning("%s: no id column %r; rows are identified by their 0-based data row",
                    path, id_col)
    return frame.index.astype(str).to_numpy()


def _new_rows(path: Path, state, data_cfg, id_column):
    from tltool.data.csv import read_csv

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
    ids = _row_ids(frame, path, id_col)
    used = set(pre.input_columns) | ({id_col} if id_col else set())
    ignored = [str(c) for c in frame.columns if c not in used]
    if ignored:
        log.info("columns not used by the model: %s", ", ".join(ignored))
    return Tensors(x, torch.empty(0)), ids, {"unseen_categories": unseen,
                                             "ignored_columns": ignored}


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
    read = set(kept)
    skipped = [files[i] for i in range(len(files)) if i not in read]
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


