"""Inference: a model's logits and probabilities (or predicted values) for every row, in
batches, in inference mode; under torchrun each rank predicts its share of the rows."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tltool import distributed, progress
from tltool.runtime import Runtime
from tltool.task import Task
from tltool.tensors import Tensors


def forward(model, xb: torch.Tensor, start: int, prior: torch.Tensor | None) -> torch.Tensor:
    """Logits of a batch: from the raw input, or (start > 0) from the cached output of the
    first `start` backbone blocks."""
    return model.forward_from(xb, start, prior) if start else model(xb, prior)


@torch.no_grad()
def predict_logits(model: nn.Module, data: Tensors, batch_size: int = 512, start: int = 0,
                   rt: Runtime | None = None, what: str = "predict") -> torch.Tensor:
    """Logits (float32, on the CPU) in inference mode; `start` > 0 means data.x holds cached
    prefix outputs (and data.prior the prior's signal, when the model has a prior). `what`
    names the step in progress reports (shown only when it is long)."""
    rt = rt or Runtime()
    model.eval()
    out = []
    lo, hi = 0, len(data.x)
    sharded = distributed.sharded_inference(len(data.x))
    if sharded:  # under torchrun: a share each, gathered below
        lo, hi = distributed.rows_of_rank(len(data.x))
    with progress.current().steps(what, total=hi - lo) as advance:
        for i in range(lo, hi, batch_size):
            rows = slice(i, min(i + batch_size, hi))
            xb = rt.put(data.batch(rows, train=False))
            prior = data.prior_of(rows)
            with rt.autocast():
                logits = forward(model, xb, start, None if prior is None else rt.put(prior))
            out.append(logits.float().cpu())
            advance(len(logits))
    if sharded:  # every share holds at least one row (n >= ranks)
        return distributed.gather_rows(torch.cat(out), len(data.x))
    return torch.cat(out)


def predict_proba(model: nn.Module, data: Tensors | torch.Tensor, multilabel: bool = False,
                  batch_size: int = 512, rt: Runtime | None = None,
                  what: str = "predict") -> np.ndarray:
    """Class probabilities (softmax) or per-label probabilities (sigmoid), float64; a
    regression model's predicted values (one column)."""
    if isinstance(data, torch.Tensor):
        data = Tensors(data, torch.empty(0))
    logits = predict_logits(model, data, batch_size, rt=rt, what=what)
    return Task.of(model, multilabel).proba(logits).double().numpy()
