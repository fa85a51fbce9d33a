"""Work done once: the outputs of frozen leading blocks (prefix caches) and a prior model's
signal per row, shared by every round, fold and candidate that uses the same weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tltool import distributed, progress
from tltool.models import TransferModel
from tltool.runtime import Runtime
from tltool.tensors import Tensors


@dataclass(frozen=True)
class Budget:
    """How a prefix cache is built: rows per batch, and the most bytes it may hold (a cache
    that would exceed them is not built: the blocks run every step instead)."""

    batch_size: int
    max_bytes: float


@torch.no_grad()
def build_prefix_cache(model: TransferModel, data: Tensors, n_blocks: int, budget: Budget,
                       rt: Runtime | None = None,
                       augmented: bool = False) -> Tensors | None:
    """Outputs of the first n (frozen, inference-mode) blocks, computed once and kept on the
    CPU (in bf16 under bf16 autocast); None when the cache would exceed `max_bytes`.

    Under torchrun each rank computes its contiguous share of the rows and the shares are
    gathered, so every rank holds the whole cache (a global batch draws rows from anywhere)
    after 1/N of the work. Randomly augmented views are the exception: every rank computes all
    rows, so the random draws do not depend on the number of processes."""
    rt = rt or Runtime()
    batch_size, max_bytes = budget.batch_size, budget.max_bytes
    model.eval()
    n = len(data.x)
    sharded = not augmented and distributed.sharded_inference(n)
    lo, hi = distributed.rows_of_rank(n) if sharded else (0, n)
    parts, used = [], 0
    with progress.current().steps(f"prefix cache: {n_blocks} frozen block(s)",
                                  total=hi - lo) as advance:
        for i in range(lo, hi, batch_size):
            xb = rt.put(data.batch(slice(i, min(i + batch_size, hi)), train=augmented))
            with rt.autocast():
                z = model.backbone.forward_blocks(xb, n_blocks, pool=False).cpu()
            used += z.numel() * z.element_size()
            # bytes per row times all rows: the same verdict on every rank (same shapes)
            if used / (i - lo + len(z)) * n > max_bytes:
                return None
            parts.append(z)
            advance(len(z))
    x = torch.cat(parts)
    if sharded:
        x = distributed.gather_rows(x, n)
    # Stored in the layout the first uncached block runs in: no conversion per batch.
    return Tensors(model.backbone.laid_out(x, n_blocks), data.y, prior=data.prior)


@torch.no_grad()
def prior_signal(model: TransferModel, data: Tensors, batch_size: int = 512,
                 rt: Runtime | None = None) -> torch.Tensor | None:
    """The model's prior signal for every row of `data` (None without a prior), computed once:
    the prior is a fixed function, and cached prefix outputs no longer hold the raw input."""
    if model.prior is None:
        return None
    rt = rt or Runtime()
    parts = []
    for i in range(0, len(data.x), batch_size):
        xb = rt.put(data.batch(slice(i, i + batch_size), train=False))
        with rt.autocast():
            parts.append(model.prior(xb).float().cpu())
    return torch.cat(parts)


class PrefixStore:
    """Prefix caches keyed by what they depend on: the frozen blocks' weights, how many there
    are, the runtime, and the rows. Rows of a fold (`Tensors.subset`) are served from the cache
    of their parent, computed once for every fold and candidate that shares those blocks. The
    prior's signal per row is kept the same way (keyed by the prior's weights)."""

    def __init__(self) -> None:
        self._caches: dict[tuple, Any] = {}

    def with_prior(self, model: TransferModel, data: Tensors, rt: Runtime) -> Tensors:
        """`data` with the model's prior signal per row (unchanged without a prior)."""
        if model.prior is None:
            return data
        root = data.parent if data.parent is not None else data
        key = ("prior", id(root), module_digest(model.prior))
        if key not in self._caches:
            self._caches[key] = prior_signal(model, root, rt=rt)
            self._caches[key + ("root",)] = root
        signal = self._caches[key]
        if data.parent is None:  # stay a view of `data`, so its caches are shared too
            return replace(data, prior=signal, parent=data, index=torch.arange(len(data)))
        return replace(data, prior=signal[data.index])

    def get(self, model: TransferModel, data: Tensors, start: int, budget: Budget,
            rt: Runtime, view: int = 0) -> Tensors | None:
        """The prefix cache of `data` (None: over budget); `view`: which augmented view."""
        root = data.parent if data.parent is not None else data
        key = (id(root), start, view if data.augments else 0, _prefix_digest(model, start),
               rt.precision, str(rt.device))
        if key not in self._caches:
            self._caches[key] = build_prefix_cache(model, root, start, budget, rt,
                                                   augmented=data.augments)
            self._caches[key + ("root",)] = root  # keeps id(root) from being reused
        cached = self._caches[key]
        if cached is None:
            return None
        x = cached.x if data.parent is None else cached.x[data.index]
        return Tensors(model.backbone.laid_out(x, start), data.y, prior=data.prior)


def _prefix_digest(model: TransferModel, start: int) -> str:
    return "|".join(module_digest(b) for b in model.backbone.blocks[:start])


def module_digest(module: nn.Module) -> str:
    """A hash of a module's type and every tensor of its state (weights and buffers)."""
    h = hashlib.sha1(type(module).__name__.encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
