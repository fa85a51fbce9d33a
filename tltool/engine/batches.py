"""What one training step computes, for each kind of batch: the epoch body
(`tltool.engine.loop.Trainer.run_epoch`) draws an order of rows and asks a composer for each
step's loss.

- `PlainBatches`: labelled rows of the training set;
- `PooledBatches`: labelled target rows and labelled source rows in one order, each source row
  weighted, with the source rows' own output offset (pooled training);
- `AdaptedBatches`: labelled rows, plus (freeze-finetune) labelled source rows drawn with
  replacement, plus unlabelled target rows, all through the network as one batch, with the
  alignment loss of the features (tltool.adapt).

Under torchrun every rank draws the same global batch (same generator) and computes its
contiguous share; each rank's loss is its rows' share of the global batch mean times the
number of ranks (the gradients are averaged), so the step is the one-process step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tltool import distributed
from tltool.adapt import Adaptation
from tltool.engine.plan import PooledRows
from tltool.runtime import Runtime
from tltool.task import Task
from tltool.tensors import Tensors


@dataclass
class StepContext:
    """What a step needs of its trainer: the model, the runtime, the trainable part's forward
    (wrapped for torchrun), the loss, the task, how many leading blocks are cached, and the
    batch size (an adapted step draws that many rows of each other domain)."""

    model: Any  # tltool.models.TransferModel
    rt: Runtime
    forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    loss_fn: nn.Module
    task: Task
    start: int
    batch_size: int


@dataclass
class Step:
    """One step's result: `loss` to differentiate (this rank's), `shown` the batch's loss as
    logged (the global mean under torchrun), the alignment loss when adapting, what the finite
    check reads when it is not the loss itself (torchrun), and the gradient sync to run before
    the optimiser step (None: DistributedDataParallel syncs)."""

    loss: torch.Tensor
    shown: float
    align: torch.Tensor | None = None
    check: torch.Tensor | None = None
    sync: Callable[[Any], None] | None = None


def batch_share(ctx: StepContext, idx: torch.Tensor, labels: torch.Tensor) -> float:
    """The denominator of the global batch's mean loss: its rows, or under class_weights
    balanced the sum of their classes' weights (as nn.CrossEntropyLoss(weight=...) divides
    by). `labels`: the labels of the global batch's rows `idx`."""
    weight = getattr(ctx.loss_fn, "weight", None)
    if weight is None or ctx.task.multilabel or ctx.task.regression:
        return float(len(idx))
    return float(weight.cpu()[labels].sum())


class PlainBatches:
    """Labelled rows of one training set."""

    checks_each_step = True  # the loss is checked for NaN / inf at every step

    def __init__(self, ctx: StepContext, data: Tensors):
        self.ctx, self.data = ctx, data

    def begin(self) -> None:
        """Called once at the start of the epoch (after model.train())."""

    def size(self) -> int:
        return len(self.data.y)

    def order(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.size(), generator=generator)

    def step(self, idx: torch.Tensor, generator: torch.Generator) -> Step:
        if distributed.active():
            return self._shared(idx)
        loss = self._loss(idx)
        return Step(loss, loss.item())

    def _loss(self, idx: torch.Tensor) -> torch.Tensor:
        c, data = self.ctx, self.data
        xb, prior = data.batch(idx, train=True), data.prior_of(idx)
        yb = data.y[idx]
        with c.rt.autocast():
            logits = c.forward(c.rt.put(xb), None if prior is None else c.rt.put(prior))
        return c.loss_fn(logits.float(), c.rt.put(yb))

    # -- under torchrun: this rank's share of the global batch
    def _rows(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, data = self.ctx, self.data
        xb, prior = data.batch(mine, train=True), data.prior_of(mine)
        with c.rt.autocast():
            logits = c.forward(c.rt.put(xb), None if prior is None else c.rt.put(prior))
        return c.task.row_loss(c.loss_fn, logits.float(), c.rt.put(data.y[mine]))

    def _labels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data.y[idx]

    def _scale(self) -> float:
        return 1.0

    def _shared(self, idx: torch.Tensor) -> Step:
        """This rank's rows' share of the global batch's mean loss, times the number of ranks
        (DDP averages the ranks' gradients: the sum is the global batch's gradient). The
        value logged and checked is the global mean."""
        c = self.ctx
        rows, _ = self._rows(distributed.share(idx))
        local = rows.sum() / (batch_share(c, idx, self._labels(idx)) * self._scale())
        check = torch.tensor(distributed.total(float(local.detach())))
        return Step(local * distributed.world(), check.item(), check=check)


class PooledBatches(PlainBatches):
    """Target rows (indices < n_t) and source rows (indices >= n_t) in one order: the loss is
    sum(w_i * loss_i) / (rows x the mean weight), an unbiased estimate of the whole weighted
    mean whatever mix of rows a batch holds."""

    def __init__(self, ctx: StepContext, data: Tensors, pooled: PooledRows):
        super().__init__(ctx, data)
        self.source, self.w_src = pooled.rows, pooled.weight
        self.n_t = len(data.y)
        n = self.n_t + len(self.source.y)
        self.mean_w = (self.n_t + self.w_src * (n - self.n_t)) / n

    def size(self) -> int:
        return self.n_t + len(self.source.y)

    def _loss(self, idx: torch.Tensor) -> torch.Tensor:
        weighted, shares = self._rows(idx)
        return weighted.sum() / (self.mean_w * shares.mean() * len(idx))

    def _rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's loss times its weight (1 for target rows, w_src for source rows), and
        each row's share of the unweighted mean's denominator (Task.row_loss)."""
        c, data, source, n_t = self.ctx, self.data, self.source, self.n_t
        t_idx, s_idx = idx[idx < n_t], idx[idx >= n_t] - n_t
        parts = [p for p in (data.batch(t_idx, train=True) if len(t_idx) else None,
                             source.batch(s_idx, train=True) if len(s_idx) else None)
                 if p is not None]
        priors = [p for p in (data.prior_of(t_idx) if len(t_idx) else None,
                              source.prior_of(s_idx) if len(s_idx) else None) if p is not None]
        y = torch.cat([data.y[t_idx], source.y[s_idx]])
        with c.rt.autocast():
            logits = c.forward(c.rt.put(torch.cat(parts)),
                               c.rt.put(torch.cat(priors)) if priors else None).float()
        if c.model.domain_bias is not None:
            # the source rows' offset, as a product with a 0/1 mask so that the bias takes
            # part in every step (a zero gradient when no source row is in the batch): DDP
            # expects every trainable parameter in every backward pass
            is_source = torch.cat([torch.zeros(len(t_idx)), torch.ones(len(s_idx))])
            logits = logits + is_source.to(logits)[:, None] * c.model.domain_bias
        rows, shares = c.task.row_loss(c.loss_fn, logits, c.rt.put(y))
        w = torch.cat([torch.ones(len(t_idx)), torch.full((len(s_idx),), self.w_src)]).to(rows)
        return w * rows, shares

    def _labels(self, idx: torch.Tensor) -> torch.Tensor:
        n_t = self.n_t
        return torch.cat([self.data.y[idx[idx < n_t]], self.source.y[idx[idx >= n_t] - n_t]])

    def _scale(self) -> float:
        return self.mean_w


class AdaptedBatches:
    """Labelled rows; each step also draws unlabelled target rows (and, in freeze-finetune,
    labelled source rows) and adds the alignment loss. All rows of a step go through the
    network as one batch, so trainable BatchNorm layers see both domains. Under torchrun the
    features are gathered (with their gradients) so the alignment loss sees the whole batch,
    and the gradients are averaged before the step (`distributed.average_gradients`)."""

    checks_each_step = False  # the epoch's mean losses are checked at its end

    def __init__(self, ctx: StepContext, data: Tensors, aux: dict[str, Tensors],
                 adapt: Adaptation, progress: float):
        self.ctx, self.data, self.adapt, self.progress = ctx, data, adapt, progress
        self.target, self.source = aux["target"], aux.get("source")
        self.ddp = distributed.active()
        self.mine = distributed.share if self.ddp else (lambda i: i)
        self.world = distributed.world() if self.ddp else 1

    def begin(self) -> None:
        if self.adapt.critic is not None:
            self.adapt.critic.train()
        source = self.source
        self.source_loss = self.ctx.task.loss(source.y, 0, "none") if source is not None \
            else None

    def order(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(len(self.data.y), generator=generator)

    def step(self, idx: torch.Tensor, generator: torch.Generator) -> Step:
        c, data, source, target = self.ctx, self.data, self.source, self.target
        bs = c.batch_size
        s_idx = (torch.randint(len(source.y), (bs,), generator=generator)
                 if source is not None else None)
        t_idx = torch.randint(len(target.y), (bs,), generator=generator)
        m_idx, m_t = self.mine(idx), self.mine(t_idx)
        m_s = None if s_idx is None else self.mine(s_idx)
        parts = [data.batch(m_idx, train=True)]
        if source is not None:
            parts.append(source.batch(m_s, train=True))
        parts.append(target.batch(m_t, train=True))
        x = c.rt.put(torch.cat(parts))
        yb = c.rt.put(data.y[m_idx])
        n, n_s = len(m_idx), 0 if m_s is None else len(m_s)
        with c.rt.autocast():
            feats = c.model.backbone.forward_from(x, c.start) if c.start else \
                c.model.backbone(x)
            logits = c.model.head(feats[:n])
            extra = (c.model.head(feats[n:n + n_s])
                     if source is not None and self.adapt.source_weight > 0 else None)
        loss, shown = self._labelled_loss(logits, yb, idx)
        if source is not None:
            fs = feats[n:n + n_s]
            if self.adapt.source_weight > 0:
                loss, shown = self._with_source(loss, shown, extra, m_s)
        else:
            fs = feats[:n]
        ft = feats[n + n_s:]
        if self.ddp:  # the whole batch's features on every rank, gradients flowing back
            fs = distributed.gather_rows_with_grad(fs, len(idx) if source is None
                                                   else len(s_idx))
            ft = distributed.gather_rows_with_grad(ft, len(t_idx))
        align = self.adapt.loss(fs, ft, self.progress)
        return Step(loss, loss.item() if shown is None else shown, align=align,
                    sync=distributed.average_gradients if self.ddp else None)

    def _labelled_loss(self, logits: torch.Tensor, yb: torch.Tensor,
                       idx: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        c = self.ctx
        if not self.ddp:
            return c.loss_fn(logits.float(), yb), None
        # this rank's rows' share of the global means, times the ranks (averaged)
        rows, _ = c.task.row_loss(c.loss_fn, logits.float(), yb)
        local = rows.sum() / batch_share(c, idx, self.data.y[idx])
        return local * self.world, distributed.total(float(local.detach()))

    def _with_source(self, loss: torch.Tensor, shown: float | None, extra: torch.Tensor,
                     m_s: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        c, w = self.ctx, self.adapt.source_weight
        ys = c.rt.put(self.source.y[m_s])
        if not self.ddp:
            return loss + w * self.source_loss(extra.float(), ys), shown
        rows, _ = c.task.row_loss(self.source_loss, extra.float(), ys)
        s_part = rows.sum() / c.batch_size
        return loss + w * s_part * self.world, shown + w * distributed.total(
            float(s_part.detach()))
