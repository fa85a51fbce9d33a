"""The training loop: one model's training state across rounds and epochs (`Trainer`).

A driver (`tltool.engine.drive.fit`, or select's cross-validation lockstep) calls
`start_round`, then `run_epoch` (and `remember_best` / `mark_best` when the validation score
improves) until it decides the round is over, then `end_round`. Freezing is decided per round
by `tltool.freeze.apply_freeze`; the loop itself only sees the optimiser's parameter groups.
The epoch body is one: it draws the order of rows and asks a batch composer
(`tltool.engine.batches`: plain, pooled or adapted) for each step's loss.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tltool import distributed
from tltool.cache import Budget
from tltool.engine.batches import AdaptedBatches, PlainBatches, PooledBatches, StepContext
from tltool.engine.plan import PooledRows, TrainingData, TrainingPlan, cache_plan
from tltool.engine.predict import forward as model_forward
from tltool.engine.predict import predict_logits
from tltool.engine.state import TrainingReport, TrainState, numpy_rng_state, set_numpy_rng_state
from tltool.errors import TrainingDiverged
from tltool.freeze import FreezePlan, apply_freeze, snapshot_frozen, verify_unchanged
from tltool.metrics import epoch_scores
from tltool.tensors import Tensors


class _Trainable(nn.Module):
    """The trainable part of a step (the blocks after the cached prefix, the head) as one
    module, so that DistributedDataParallel registers exactly what trains."""

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.model, self.start = model, start

    def forward(self, xb: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        return model_forward(self.model, xb, self.start, prior)


def l2sp_penalty(model: nn.Module, anchor: dict[str, torch.Tensor], alpha: float,
                 beta: float) -> torch.Tensor:
    """L2-SP (Li et al., 2018): alpha/2 * sum ||w - w0||^2 over the backbone's trainable
    weights (w0: their pretrained values, `anchor`) + beta/2 * sum ||w||^2 over the head's."""
    total = torch.zeros((), device=next(model.parameters()).device)
    if alpha:
        for name, p in model.backbone.named_parameters():
            if p.requires_grad:
                total = total + alpha / 2 * (p - anchor[name]).pow(2).sum()
    if beta:
        for p in model.head.parameters():
            if p.requires_grad:
                total = total + beta / 2 * p.pow(2).sum()
    return total


def optimizer_for(groups: list[dict[str, Any]], train_cfg) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=train_cfg.momentum,
                               weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay)


def score_of(report: dict[str, Any], val_loss: float, monitor: str) -> float:
    """The early-stopping score: higher is better for every monitor."""
    if monitor == "val_loss":
        return -val_loss
    value = report[monitor.removeprefix("val_")]
    return -np.inf if value is None else value


@dataclass
class EpochResult:
    train_loss: float
    align_loss: float | None
    logits: torch.Tensor | None  # validation logits (None without validation rows)
    watch: float | None = None  # adaptation: the target validation rows' score


_FORMATS = {None: None, "nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _format_name(fmt: torch.memory_format | None) -> str | None:
    return {torch.contiguous_format: "nchw", torch.channels_last: "nhwc"}.get(fmt)


class Trainer:
    """One model's training state across rounds and epochs."""

    def __init__(self, model: nn.Module, data: TrainingData, plan: TrainingPlan,
                 log: Callable[[str], None] = lambda m: None):
        self.model, self.data, self.plan, self.log = model, data, plan, log
        self.train, self.val, self.cfg, self.task = data.train, data.val, plan.cfg, plan.task
        self.adapt, self.store, self.rt = data.adapt, data.store, plan.rt
        self.rt.setup(model)
        warning = distributed.sync_batchnorm(model, self.rt.device, plan.cfg.sync_batchnorm)
        if warning:
            logging.getLogger("tltool").warning(warning)
        self.generator = torch.Generator().manual_seed(plan.seed)
        self.loss_fn = plan.task.loss(data.train.y, len(plan.classes),
                                      plan.cfg.class_weights).to(self.rt.device)
        self.eval_batch = max(2 * plan.cfg.batch_size, 256)
        reg = plan.cfg.l2sp
        self.l2sp = (reg.alpha, reg.beta) if reg.alpha or reg.beta else None
        self.anchor = ({n: p.detach().clone() for n, p in model.backbone.named_parameters()}
                       if self.l2sp and reg.alpha else {})
        self.best: dict[str, Any] = {"score": -np.inf, "epoch": 0, "round": 0,
                                     "state": copy.deepcopy(model.state_dict())}
        self.plans: list[FreezePlan] = []
        self.checks: list[dict[str, Any]] = []
        self.caches: list[dict[str, Any]] = []
        # Wall times go to timing.json, never to metrics.json (which must be reproducible).
        self.timing: dict[str, list[float]] = {"cache_build_seconds": [],
                                               "train_epoch_seconds": []}
        self.epoch_total = 0
        self.round = 0
        self.total_epochs = max(plan.epochs, 1)

    # -- a round
    def start_round(self, r: int, layouts: list[str | None] | None = None) -> None:
        """Freeze per round r (1-based), build its optimiser and prefix caches. `layouts`: the
        memory layout of each block as a resumed run chose it (no timing then)."""
        model, rnd, tcfg = self.model, self.plan.rounds[r - 1], self.cfg
        self.round = r
        self.round_rng = torch.get_rng_state()  # augmented caches and a critic draw from it
        plan, groups = apply_freeze(model, rnd, bn_policy=self.plan.bn_policy,
                                    layer_decay=tcfg.layer_decay)
        self.plans.append(plan)
        self.freeze = plan
        if layouts is None:
            # auto layout/precision: timed on a sample batch now that the round's frozen
            # blocks are known (a frozen prefix runs once, the rest every step).
            self.rt.tune(model, self.train.batch(slice(0, 16), train=False),
                         label=f"round {r}",
                         work=3 * len(self.train.y) * sum(
                             x.epochs for x in self.plan.rounds[r - 1:]))
        else:
            for i, name in enumerate(layouts):
                model.backbone.set_layout(i, _FORMATS[name])
        self.layouts = [_format_name(f) for f in model.backbone.layouts]
        self.snap = snapshot_frozen(model)
        self.optimizer = optimizer_for(groups, tcfg)
        self.lrs = {g["name"]: g["lr"] for g in groups}  # head + one group per block
        self.lr_backbone = max((g["lr"] for g in groups if g["name"] not in ("head", "domain")),
                               default=0.0)
        critic = (self.adapt.make_critic(model.backbone.out_features, self.rt.device)
                  if self.adapt else None)
        if critic is not None:  # dann: the domain classifier trains at the head's rate
            self.optimizer.add_param_group({"params": list(critic.parameters()),
                                            "lr": rnd.lr, "name": "critic"})
        self._build_caches(r, plan)
        self.round_epoch = 0
        self.log(f"round {r}: {self.why}")
        self.log(f"round {r}: {rnd.strategy}, {plan.frozen_layers} block(s) frozen, "
                 f"{plan.trainable:,}/{plan.total:,} parameters train, up to {rnd.epochs} "
                 f"epochs")

    def _other_rows(self) -> dict[str, Tensors]:
        """Rows besides the training set: the other domain's (adapt), the source's (pooled)."""
        others = {} if self.adapt is None else {k: t for k, t in (("target", self.adapt.target),
                                                                  ("source", self.adapt.source))
                                                if t is not None}
        if self.data.pooled is not None:
            others["pooled"] = self.data.pooled.rows
        return others

    def _build_caches(self, r: int, plan: FreezePlan) -> None:
        tcfg, train = self.cfg, self.train
        start, why = cache_plan(train, plan.frozen_layers, tcfg, self.plan.bn_policy)
        others = self._other_rows()
        built = time.perf_counter()
        self.views: list[Tensors] = [train]
        self.va, self.aux = self.val, dict(others)
        if start:
            k = tcfg.cache_views if train.augments else 1
            limit = tcfg.cache_max_gb * 2**30 / (k + 1 + len(others))
            get, budget = self.store.get, Budget(self.eval_batch, limit)
            views = [get(self.model, train, start, budget, self.rt, view=v) for v in range(k)]
            va = None if self.val is None else get(self.model, self.val, start, budget,
                                                   self.rt)
            aux = {key: get(self.model, t, start, budget, self.rt)
                   for key, t in others.items()}
            if (self.val is not None and va is None) or any(
                    v is None for v in [*views, *aux.values()]):
                start, why = 0, "prefix cache over cache_max_gb"
            else:
                self.views, self.va, self.aux = views, va, aux
        self.start, self.why = start, why
        self.caches.append({"round": r, "cached_blocks": start, "reason": why})
        self.timing["cache_build_seconds"].append(round(time.perf_counter() - built, 4))
        step = distributed.wrap(_Trainable(self.model, start), self.rt.device)  # DDP: torchrun
        self.forward = self.rt.wrap(lambda xb, prior: step(xb, prior))

    # -- an epoch
    def _batches(self, rows: Tensors, progress: float):
        """The batch composer of this epoch's steps."""
        ctx = StepContext(self.model, self.rt, self.forward, self.loss_fn, self.task,
                          self.start, self.cfg.batch_size)
        if self.adapt is not None:
            return AdaptedBatches(ctx, rows, self.aux, self.adapt, progress)
        if "pooled" in self.aux:  # the source rows (their cached prefix, when cached)
            pooled = PooledRows(self.aux["pooled"], self.data.pooled.weight)
            return PooledBatches(ctx, rows, pooled)
        return PlainBatches(ctx, rows)

    def run_epoch(self) -> EpochResult:
        """One pass over the training rows; returns the validation logits."""
        rows = self.views[self.round_epoch % len(self.views)]
        progress = self.epoch_total / self.total_epochs
        self.epoch_total += 1
        self.round_epoch += 1
        tick = time.perf_counter()
        batches = self._batches(rows, progress)
        loss, align = self._epoch(batches)
        if not batches.checks_each_step and (not np.isfinite(loss) or not np.isfinite(align)):
            self._check_finite(torch.tensor(float("nan")), 0)
        self.timing["train_epoch_seconds"].append(round(time.perf_counter() - tick, 4))
        logits = (None if self.va is None else
                  predict_logits(self.model, self.va, self.eval_batch, self.start, self.rt,
                                 what="validation"))
        return EpochResult(loss, align if self.adapt is not None else None, logits,
                           self._watch())

    def _epoch(self, batches) -> tuple[float, float]:
        """The epoch body: the order of rows, then one optimiser step per batch."""
        self.model.train()
        batches.begin()
        order = batches.order(self.generator)
        bs = self.cfg.batch_size
        total, aligned, seen, steps = 0.0, 0.0, 0, 0
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            if len(idx) == 1 and len(order) > 1:
                continue  # a single row breaks BatchNorm and adds only noise
            self.optimizer.zero_grad(set_to_none=True)
            step = batches.step(idx, self.generator)
            loss = step.loss if step.align is None else step.loss + step.align
            if self.l2sp:
                loss = loss + l2sp_penalty(self.model, self.anchor, *self.l2sp)
            if batches.checks_each_step:  # every rank checks the same (global) number
                self._check_finite(loss if step.check is None else
                                   step.check + (loss - step.loss).detach().cpu(), i // bs + 1)
            self.rt.backward_step(loss, self.optimizer, sync=step.sync)
            total += step.shown * len(idx)
            aligned += 0.0 if step.align is None else step.align.item()
            seen += len(idx)
            steps += 1
        return total / max(seen, 1), aligned / max(steps, 1)

    def _watch(self) -> float | None:
        """The target's validation score (AUROC for two classes, else accuracy) while an
        adaptation trains on the source: for a warning only, never for a choice."""
        watch = None if self.adapt is None else self.adapt.watch
        if watch is None or self.task.regression or self.task.multilabel:
            return None
        logits = predict_logits(self.model, watch, self.eval_batch, 0, self.rt)
        proba = self.task.proba(logits).double().numpy()
        scores = epoch_scores(watch.y.numpy(), proba, False, False)
        return scores["auroc"] if proba.shape[1] == 2 else scores["accuracy"]

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(
                f"training diverged: the loss became {float(loss.detach())} at round "
                f"{self.round}, epoch {self.epoch_total}, step {step}; lower train.lr (or the "
                f"adapt / l2sp weights), or check the inputs for extreme values")

    # -- the best weights
    def mark_best(self) -> None:
        """Remember the current weights as the best (the driver compared the scores)."""
        self.best = {"score": np.inf, "epoch": self.epoch_total, "round": self.round,
                     "state": copy.deepcopy(self.model.state_dict())}

    def remember_best(self, score: float) -> None:
        """Remember the current weights as the best, with their validation score (the driver's
        EarlyStopping decided they are)."""
        self.best = {"score": score, "epoch": self.epoch_total, "round": self.round,
                     "state": copy.deepcopy(self.model.state_dict())}

    def end_round(self) -> None:
        """Check the frozen tensors; the next round (and the final model) starts from the best
        weights so far (with no validation rows: from the last ones)."""
        self.checks.append(verify_unchanged(self.model, self.snap))
        if self.val is None:
            self.best = {"score": -np.inf, "epoch": self.epoch_total, "round": self.round,
                         "state": copy.deepcopy(self.model.state_dict())}
        self.model.load_state_dict(self.best["state"])

    def report(self, monitor: str) -> TrainingReport:
        plans = self.plans
        return TrainingReport(
            best_epoch=self.best["epoch"], best_round=self.best["round"],
            epochs_run=self.epoch_total, monitor=monitor, plans=[p.as_dict() for p in plans],
            cache=self.caches, timing=self.timing,
            plan_text="\n\n".join(f"round {i}\n{p.as_text()}"
                                  for i, p in enumerate(plans, start=1)),
            freeze_check={"frozen_tensors": sum(c["frozen_tensors"] for c in self.checks),
                          "unchanged": all(c["unchanged"] for c in self.checks)})

    # -- resuming
    def state(self, stale: int, round_done: bool, watched: dict[int, float]) -> TrainState:
        """Everything a resumed run needs to continue exactly where this one is. The best
        weights are in best.pt, the current ones in the checkpoint's state_dict."""
        return TrainState(
            round=self.round, round_epoch=self.round_epoch, epoch_total=self.epoch_total,
            stale=stale, round_done=round_done,
            best={"score": float(self.best["score"]), "epoch": self.best["epoch"],
                  "round": self.best["round"]},
            # best.pt may already hold a later epoch's weights when a run is killed between
            # the two writes: the best weights this state refers to travel with it (unless
            # they are the current ones, the checkpoint's own state_dict)
            best_state=None if self.best["epoch"] == self.epoch_total else {
                k: v.detach().cpu().clone() for k, v in self.best["state"].items()},
            optimizer=self.optimizer.state_dict(),
            scaler=None if self.rt.scaler is None else self.rt.scaler.state_dict(),
            critic=None if self.adapt is None or self.adapt.critic is None
            else self.adapt.critic.state_dict(),
            generator=self.generator.get_state(), torch_rng=torch.get_rng_state(),
            round_rng=self.round_rng, numpy_rng=numpy_rng_state(), layouts=self.layouts,
            precision=self.rt.precision, plans=[p.as_dict() for p in self.plans],
            checks=self.checks, caches=self.caches, timing=self.timing,
            watched={str(k): v for k, v in watched.items()})

    def resume_round(self, state: TrainState, current: dict[str, torch.Tensor]) -> None:
        """Set up the interrupted round as it was: call instead of start_round(r)."""
        self.epoch_total = state.epoch_total - state.round_epoch
        self.plans = [FreezePlan.from_dict(d) for d in state.plans[:-1]]
        self.checks = list(state.checks)
        self.caches = list(state.caches[:-1])
        self.timing = {k: list(v) for k, v in state.timing.items()}
        self.timing["cache_build_seconds"] = self.timing["cache_build_seconds"][:-1]
        if state.precision != self.rt.precision:
            self.rt.dtype = {"fp32": None, "bf16": torch.bfloat16,
                             "fp16": torch.float16}[state.precision]
        self.rt.probe_precision = False
        torch.set_rng_state(state.round_rng)
        self.start_round(state.round, layouts=state.layouts)
        self.optimizer.load_state_dict(state.optimizer)
        if state.scaler is not None and self.rt.scaler is not None:
            self.rt.scaler.load_state_dict(state.scaler)
        if state.critic is not None:
            self.adapt.critic.load_state_dict(state.critic)
        self.round_epoch = state.round_epoch
        self.epoch_total = state.epoch_total
        best = state.best_state if state.best_state is not None else current
        self.best = {**state.best, "state": {k: v.clone() for k, v in best.items()}}
        self.generator.set_state(state.generator)
        torch.set_rng_state(state.torch_rng)
        set_numpy_rng_state(state.numpy_rng)
