"""Backbone features of a trained image model's validation and test rows, kept in its run
folder (`features/`), so that `evaluate` on the same rows runs only the head.

A trained run predicts its validation and test rows through its backbone's pooled features and
then its head (the same logits as a forward pass: the model is backbone -> pool -> head). The
features are written beside the checkpoint with a key that fixes everything they depend on:

- the rows: a SHA-1 of the stored input tensor (decoded uint8 pixels, shape and dtype) and of
  how a batch becomes network input (image size, channels, mean / std);
- the backbone: a SHA-1 of every weight and buffer of it (a fine-tuned backbone's own);
- the runtime: precision (fp32 / bf16 / fp16) and device type.

`evaluate` computes the key of the rows it is asked about with the run's model; an equal key
means the stored features are the ones a forward pass would give (up to the memory layout the
backbone ran in), and only the head runs. The index also keeps each file's SHA-1: a file that
is not the one written (damaged, replaced, another shape) is ignored and the backbone runs.
Any other rows (another data set, a changed file), weights or precision: another key, a
forward pass. `--recompute` always runs the backbone.

Not stored: tabular models (their forward pass costs less than reading a file), models with
a prior (its signal needs the raw input), images decoded batch by batch (the key would read
every file), and features over `MAX_BYTES` in all.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tltool import distributed, progress
from tltool.runtime import Runtime
from tltool.task import Task
from tltool.tensors import Tensors

MAX_BYTES = 512 * 2**20
FOLDER = "features"


def usable(model: torch.nn.Module, data: Tensors) -> bool:
    """Whether this model's predictions on `data` may go through stored features."""
    return (hasattr(model, "from_features") and getattr(model, "prior", None) is None
            and not getattr(model, "classic", False) and isinstance(data.x, torch.Tensor)
            and data.x.dim() == 4
            and (data.prepare is None or type(data.prepare).__repr__ is not object.__repr__))


def key(model, data: Tensors, rt: Runtime) -> str:
    from tltool.cache import module_digest

    prepare = data.prepare
    if prepare is not None and type(prepare).__repr__ is object.__repr__:
        raise ValueError("features.key: the rows' prepare step has no stable description")
    h = hashlib.sha1(f"{tuple(data.x.shape)}|{data.x.dtype}|{prepare!r}".encode())
    x = data.x.detach().cpu().contiguous()
    h.update(memoryview(x.view(torch.uint8).numpy()).cast("B") if x.numel() else b"")
    h.update(f"|{module_digest(model.backbone)}|{rt.precision}|{rt.device.type}".encode())
    return h.hexdigest()


@torch.no_grad()
def features_of(model, data: Tensors, blocks: int | None, rt: Runtime,
                batch_size: int = 256, what: str = "extract") -> torch.Tensor:
    """Pooled output (float32, CPU) of the first `blocks` backbone blocks (all: None) for every
    row, batch by batch. Under torchrun each rank computes its contiguous share and the shares
    are gathered in row order."""
    model.eval()
    n = len(data.x)
    sharded = distributed.sharded_inference(n)
    lo, hi = distributed.rows_of_rank(n) if sharded else (0, n)
    parts = [torch.empty(0)]
    with progress.current().steps(what, total=hi - lo) as advance:
        for i in range(lo, hi, batch_size):
            xb = rt.put(data.batch(slice(i, min(i + batch_size, hi)), train=False))
            with rt.autocast():
                parts.append(model.backbone.forward_blocks(xb, blocks).float().cpu())
            advance(len(parts[-1]))
    out = torch.cat(parts[1:]) if len(parts) > 1 else torch.empty(0)
    if sharded:
        out = distributed.gather_rows(out, n)
    return out


@torch.no_grad()
def head_proba(model, feats: torch.Tensor, multilabel: bool, rt: Runtime,
               batch_size: int = 4096) -> np.ndarray:
    """The model's probabilities (regression: values) from its backbone's pooled features."""
    model.eval()
    out = []
    for i in range(0, len(feats), batch_size):
        with rt.autocast():
            out.append(model.from_features(rt.put(feats[i:i + batch_size]), None).float().cpu())
    logits = torch.cat(out) if out else torch.empty(0)
    return Task.of(model, multilabel).proba(logits).double().numpy()


def _index(folder: Path) -> dict[str, Any]:
    try:
        index = json.loads((folder / "index.json").read_text())
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}


def _digest(feats: torch.Tensor) -> str:
    return hashlib.sha1(f"{tuple(feats.shape)}|{feats.dtype}|".encode() + memoryview(
        feats.contiguous().view(torch.uint8).numpy()).cast("B")).hexdigest()


def load(run: Path, k: str) -> torch.Tensor | None:
    """Stored features with key `k` in a run folder, or None: also when the file is not the
    one written under that key (its SHA-1 differs: damaged or replaced), so a changed file
    means a forward pass, never other scores."""
    folder = Path(run) / FOLDER
    entry = _index(folder).get(k)
    if not isinstance(entry, dict):
        return None
    name, digest = entry.get("file"), entry.get("sha1")
    if not isinstance(name, str) or not isinstance(digest, str) or "/" in name or \
            "\\" in name or name.startswith("."):
        return None
    path = folder / name
    try:  # a regular file of a plausible size only (a FIFO or device would block a read)
        if not path.is_file() or path.stat().st_size > MAX_BYTES + 2**20:
            return None
        feats = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        return None
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or \
            feats.dtype != torch.float32 or _digest(feats) != digest:
        return None
    return feats


def save(run, name: str, k: str, feats: torch.Tensor) -> bool:
    """Keep `feats` in the run folder under key `k` (False when too large to be worth it)."""
    folder = Path(run.file(FOLDER))
    index = _index(folder)
    files = {e.get("file") for e in index.values() if isinstance(e, dict)}
    used = sum((folder / f).stat().st_size for f in files
               if isinstance(f, str) and (folder / f).is_file())
    if used + feats.numel() * feats.element_size() > MAX_BYTES:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    feats = feats.contiguous().float()
    torch.save(feats, folder / f"{name}.pt")
    index[k] = {"file": f"{name}.pt", "sha1": _digest(feats)}
    (folder / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return True


@dataclass(frozen=True)
class Pass:
    """One prediction pass: the model's kind of output (multi-label: a sigmoid per label),
    rows per batch, and what progress reports call it."""

    multilabel: bool = False
    batch_size: int = 512
    what: str = "predict"


@dataclass(frozen=True)
class Kept:
    """Where a trained run keeps its backbone features: read from the run folder `read`
    (evaluate), or written into the run folder `write` (a RunFolder) under `name` (training)."""

    read: Path | None = None
    write: Any = None
    name: str | None = None


def predict(model, data: Tensors, rt: Runtime, step: Pass,
            kept: Kept = Kept()) -> tuple[np.ndarray, str]:
    """Probabilities for `data`: through features stored in `kept.read` when their key
    matches (how: "stored features"), else through the backbone ("forward pass"), keeping the
    features in `kept.write` when given. Falls back to a plain forward pass for models that
    `usable` rules out (how: "forward pass")."""
    from tltool.engine.predict import predict_proba

    if not usable(model, data):
        return predict_proba(model, data, step.multilabel, step.batch_size, rt,
                             what=step.what), "forward pass"
    k = key(model, data, rt)
    if kept.read is not None:
        feats = load(kept.read, k)
        if feats is not None and len(feats) == len(data.x):
            return head_proba(model, feats, step.multilabel, rt), "stored features"
    feats = features_of(model, data, None, rt, step.batch_size, what=step.what)
    if kept.write is not None and kept.name is not None and distributed.is_main():
        save(kept.write, kept.name, k, feats)
    return head_proba(model, feats, step.multilabel, rt), "forward pass"
