"""export: a trained run's model as ONNX or TorchScript, for serving without tltool.

The exported model maps the raw input tensor to what `tltool predict` reports:

- images: uint8 pixels, shape (N, C, S, S) with S the run's image size and C 1 or 3 (grey is
  repeated, colour turned grey as tltool does); scaling to [0, 1] and the normalisation are
  inside the model. Resizing is not: resize to S x S first.
- tables: the encoded float32 matrix (N, F); the preprocessing that encodes a CSV row (column
  order, imputation, scaling, one-hot categories) is written beside the model as JSON.

Output: class probabilities (softmax; multi-label: per-label sigmoid) with the run's
temperature calibration inside, or the predicted value for regression. The decision rule
(threshold) is written beside it. Every export is checked against tltool's own predictions
on up to 100 held-out rows (the run's test split) with the runtime a server would use
(onnxruntime, torch.jit.load); the report holds the largest difference.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tltool.decision import Decision
from tltool.engine.predict import predict_proba
from tltool.errors import ConfigError, DataError, RunError
from tltool.runs.files import write_json, write_text
from tltool.runs.opening import TrainedRun, open_run
from tltool.runs.status import STATUS_FILE
from tltool.task import Task
from tltool.workflows.evaluate import evaluation_rows

log = logging.getLogger("tltool")
FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4
PARITY_ROWS = 100


class Served(nn.Module):
    """Raw input -> probabilities (or values), everything tltool does after decoding inside."""

    def __init__(self, model: nn.Module, task: Task, state: dict[str, Any],
                 decision: Decision):
        super().__init__()
        self.model = model.eval()
        self.image = state.get("kind") == "image"
        self.channels = int(state.get("channels", 3))
        self.multilabel, self.regression = task.multilabel, task.regression
        if self.image:
            mean = torch.tensor(state["mean"], dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(state["std"], dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
        cal = decision.calibration
        t = [1.0] if not cal else cal["temperature"]
        t = t if isinstance(t, list) else [t]
        self.register_buffer("temperature", torch.tensor(t, dtype=torch.float32).view(1, -1))
        self.register_buffer("target_mean", torch.tensor(float(task.mean or 0.0)))
        self.register_buffer("target_std", torch.tensor(float(task.std or 1.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image:
            x = x.float() / 255.0
            if x.shape[1] == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 3 and self.channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x * w).sum(dim=1, keepdim=True)
            x = (x - self.mean) / self.std
        logits = self.model(x)
        if self.regression:
            return logits * self.target_std + self.target_mean
        if self.multilabel:
            return torch.sigmoid(logits / self.temperature)
        return torch.softmax(logits / self.temperature, dim=1)


def _folder(trained: TrainedRun, fmt: str, out: str | None, force: bool) -> Path:
    """Where the export goes: `out`, or RUN/export-FMT; never a link, another run's folder, or
    a folder tltool did not write (unless empty)."""
    run = trained.path
    if out == "-":
        raise DataError("--out -: an export is a folder of files, not a stream; give a folder")
    folder = Path(out).expanduser() if out else run / f"export-{fmt}"
    if folder.is_symlink():
        raise DataError(f"--out {folder}: is a symbolic link; give a folder path that is not one")
    if out:
        for above in [folder.parent.resolve(), *folder.parent.resolve().parents]:
            if (above / STATUS_FILE).is_file() and above.resolve() != run.resolve():
                raise DataError(f"--out {folder}: is inside the run folder {above}; tltool "
                                f"never changes another run's files (default: RUN/export-{fmt})")
    if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
        if not force:
            raise DataError(f"{folder}: exists; choose another --out or pass --force to "
                            f"replace it")
        if not folder.is_dir() or folder.is_symlink() or not (folder / "export.json").exists():
            raise DataError(f"{folder}: not an export folder tltool wrote; --force replaces "
                            f"only those")
    return folder


def _served(trained: TrainedRun) -> Served:
    from tltool.models.classic import TreeHead

    model = trained.model
    for module in model.modules():
        if isinstance(module, TreeHead):
            module.static_traversal()  # no data-dependent loop for the tracer to bake in
    task = Task.of(model, trained.checkpoint.multilabel)
    served = Served(model, task, trained.checkpoint.preprocessor, trained.decision).eval()
    for param in served.parameters():
        param.requires_grad_(False)  # a served model needs no gradients
    return served


def _report(trained: TrainedRun, fmt: str, parity: dict[str, Any],
            shapes: tuple) -> dict[str, Any]:
    """export.json: what goes in and comes out, and the parity check."""
    ckpt, decision = trained.checkpoint, trained.decision
    raw_shape, outputs, seconds, name = shapes
    image = ckpt.image_input
    what = ("predicted value" if ckpt.regression else "per-label probabilities"
            if ckpt.multilabel else "class probabilities")
    return {
        "run": str(trained.path), "format": fmt, "file": name,
        "input": {"name": "input", "dtype": "uint8" if image else "float32",
                  "shape": ["N", *list(raw_shape[1:])],
                  "what": ("pixels 0-255 at the run's image size (resize first); "
                           "normalisation inside" if image else
                           "the encoded matrix: see preprocessing.json")},
        "output": {"name": "output", "shape": ["N", outputs],
                   "what": what + (" (temperature-calibrated)" if decision.calibration
                                   else ""),
                   "columns": ckpt.classes if not ckpt.regression else [ckpt.label]},
        "parity": parity, "export_seconds": round(seconds, 3), "torch": torch.__version__,
    }


def _parity(got: np.ndarray, expected: np.ndarray, fmt: str) -> dict[str, Any]:
    gap = np.abs(got.astype(np.float64) - expected)
    rows = len(expected)
    diff = float(gap.max()) if rows else 0.0
    # probabilities: absolute; regression values: relative to the value when above 1
    scaled = float((gap / np.maximum(1.0, np.abs(expected))).max()) if rows else 0.0
    return {"rows": int(rows), "split": "test", "max_abs_diff": diff,
            "max_diff_scaled": scaled, "tolerance": TOLERANCE,
            "rule": "|diff| <= tolerance * max(1, |tltool's value|)",
            "passed": bool(scaled <= TOLERANCE),
            "checked_with": "onnxruntime" if fmt == "onnx" else "torch.jit.load"}


def export(ref: str | Path, fmt: str, out: str | None = None,
           force: bool = False) -> dict[str, Any]:
    """Write RUN's model as `fmt` into `out` (default RUN/export-FMT), with the preprocessing,
    the decision rule and a parity report; returns the report."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    trained = open_run(ref)
    folder = _folder(trained, fmt, out, force)
    rows = _held_out(trained)
    served = _served(trained)
    raw = rows.x[:PARITY_ROWS]
    example = raw[: min(len(raw), 8)]
    expected = trained.decision.calibrated(predict_proba(
        trained.model, rows.subset(np.arange(len(raw))), trained.checkpoint.multilabel))
    with tempfile.TemporaryDirectory(dir=folder.parent if folder.parent.exists() else None) \
            as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        name = "model.onnx" if fmt == "onnx" else "model.pt"
        got = (_onnx if fmt == "onnx" else _torchscript)(served, example, raw, tmp / name)
        parity = _parity(got, expected, fmt)
        report = _report(trained, fmt, parity, (raw.shape, int(expected.shape[1]),
                                                time.perf_counter() - start, name))
        if not parity["passed"]:
            raise RunError(f"export: the {fmt} model differs from tltool's predictions by "
                           f"{parity['max_abs_diff']:.3g} on {len(raw)} test rows (tolerance "
                           f"{TOLERANCE}); nothing written")
        _write(tmp, trained, report)
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(folder))
        tmp.mkdir()  # TemporaryDirectory cleans up a folder of its own name
    report["folder"] = str(folder)
    return report


def _write(tmp: Path, trained: TrainedRun, report: dict[str, Any]) -> None:
    image = trained.checkpoint.image_input
    write_json(tmp / "decision.json", trained.decision.to_dict())
    if not image:
        write_json(tmp / "preprocessing.json", _jsonable(trained.checkpoint.preprocessor))
    write_json(tmp / "export.json", report)
    write_text(tmp / "README.txt", _readme(report, image))


def _held_out(trained: TrainedRun):
    """The run's test split, encoded as the model expects (the rows parity is checked on)."""
    test = evaluation_rows(trained, None, None).test
    if len(test.x) == 0:
        raise DataError(f"{trained.path}: its test split is empty; export checks parity on "
                        f"test rows")
    return test


def _onnx(served: Served, example: torch.Tensor, raw: torch.Tensor, path: Path) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("--format onnx needs onnx, onnxscript and onnxruntime: pip install "
                          "'tltool[export]'") from None
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)  # their optimiser's notes
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(served, (example,), dynamo=True, input_names=["input"],
                                    output_names=["output"],
                                    dynamic_shapes={"x": {0: batch}}, verbose=False)
        program.save(str(path))
    except ImportError as exc:
        raise ConfigError(f"--format onnx needs onnx and onnxscript ({exc}): pip install "
                          f"'tltool[export]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = raw.numpy() if raw.dtype == torch.uint8 else raw.float().numpy()
    return session.run(None, {"input": feed})[0]


def _torchscript(served: Served, example: torch.Tensor, raw: torch.Tensor,
                 path: Path) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's own deprecation notices
        with torch.no_grad():
            traced = torch.jit.trace(served, (example,), check_trace=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            return loaded(raw).numpy()


def _jsonable(state: Any) -> Any:
    if isinstance(state, dict):
        return {str(k): _jsonable(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_jsonable(v) for v in state]
    if isinstance(state, np.generic):
        return state.item()
    if isinstance(state, np.ndarray | torch.Tensor):
        return np.asarray(state).tolist()
    return state


def _readme(report: dict[str, Any], image: bool) -> str:
    p = report["parity"]
    lines = [f"tltool export of {report['run']}",
             f"{report['file']} ({report['format']}): input {report['input']['dtype']} "
             f"{report['input']['shape']} -> output {report['output']['shape']} "
             f"({report['output']['what']}).",
             f"Parity with tltool predict on {p['rows']} test rows: max |diff| "
             f"{p['max_abs_diff']:.2e} (tolerance {p['tolerance']}), {p['checked_with']}.",
             "decision.json: the decision rule (threshold on the probabilities)."]
    if not image:
        lines.append("preprocessing.json: how a CSV row becomes the input matrix (tltool's "
                     "TabularPreprocessor state).")
    return "\n".join(lines) + "\n"


def shown(report: dict[str, Any]) -> str:
    """The report as the CLI prints it."""
    p = report["parity"]
    return (f"{report['format']}: {report['folder']}/{report['file']} — input "
            f"{report['input']['dtype']} {report['input']['shape']}, output "
            f"{report['output']['shape']} {report['output']['what']}; parity on {p['rows']} "
            f"test rows ({p['checked_with']}): max |Δ| {p['max_abs_diff']:.2e} ≤ "
            f"{p['tolerance']}")


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(export(sys.argv[1], sys.argv[2]), indent=1))
