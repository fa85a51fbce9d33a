"""The rows a model sees: stored inputs (or cached prefix outputs), targets, and how a stored
batch becomes model input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch


@dataclass
class Tensors:
    """Inputs and targets of one split. `prepare(x_batch, train)` turns a stored batch into
    model input (images: uint8 -> resized, normalised, augmented only when train=True).

    `prior`: the prior model's signal per row (when the model has one). `parent` / `index`: these
    rows are rows `index` of `parent` (cross-validation folds), so caches computed once for the
    parent serve every fold."""

    x: Any
    y: torch.Tensor
    prepare: Callable[[torch.Tensor, bool], torch.Tensor] | None = None
    augments: bool = False  # prepare(x, train=True) is random: no prefix cache then
    prior: torch.Tensor | None = None
    parent: Tensors | None = field(default=None, repr=False)
    index: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor | slice, train: bool) -> torch.Tensor:
        xb = self.x[idx]
        if hasattr(xb, "materialize"):  # images decoded on demand (tltool.data.images)
            xb = xb.materialize()
        return xb if self.prepare is None else self.prepare(xb, train)

    def prior_of(self, idx: torch.Tensor | slice) -> torch.Tensor | None:
        return None if self.prior is None else self.prior[idx]

    def subset(self, idx: torch.Tensor | np.ndarray) -> Tensors:
        """Rows `idx` (a view for caches: they remember the top-level parent and its rows)."""
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        root = self.parent if self.parent is not None else self
        at = idx if self.index is None else self.index[idx]
        return replace(self, x=self.x[idx], y=self.y[idx],
                       prior=None if self.prior is None else self.prior[idx],
                       parent=root, index=at)


def concat_tensors(parts: list[Tensors]) -> Tensors:
    """Rows of several splits of one data set as one Tensors."""
    first = parts[0]
    if hasattr(first.x, "materialize"):  # image files decoded on demand: their file lists
        x = type(first.x)([f for p in parts for f in p.x.files], first.x.size)
    else:
        x = torch.cat([p.x for p in parts])
    return Tensors(x, torch.cat([p.y for p in parts]), first.prepare, first.augments)
