"""The one training loop: rounds of epochs, early stopping, best/last checkpoints.

A `Trainer` holds one model's training state (round, optimiser, prefix caches, best weights)
and advances it one epoch at a time; the driver decides when a round stops. `fit` drives one
model with early stopping on its own validation rows; `tltool.workflows.crossval` drives several
fold models in lockstep, so that one epoch count, chosen on their averaged held-out scores,
serves them all. What is computed once (prefix caches, a prior's signal) lives in
`tltool.cache`; the loss and probabilities in `tltool.task`; the rows in `tltool.tensors`.

Freezing is decided per round by `tltool.freeze.apply_freeze`; the loop itself only sees the
optimiser's parameter groups.
"""

from __future__ import annotations

import copy
import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tltool import distributed, progress
from tltool.adapt import Adaptation
from tltool.cache import PrefixStore, build_prefix_cache, prior_signal  # noqa: F401 (API)
from tltool.errors import TrainingDiverged
from tltool.freeze import FreezePlan, apply_freeze, snapshot_frozen, verify_unchanged
from tltool.metrics import epoch_scores
from tltool.models import TransferModel
from tltool.runtime import Runtime
from tltool.task import StandardisedMSE, Task, _loss_fn  # noqa: F401 (API)
from tltool.tensors import Tensors


@dataclass
class Phase:
    """One round: how much is frozen and how long/fast it trains."""

    frozen_layers: int
    strategy: str
    epochs: int
    lr: float
    backbone_lr_mult: float


class _Step(nn.Module):
    """The trainable part of a step (the blocks after the cached prefix, the head) as one
    module, so that DistributedDataParallel registers exactly what trains."""

    def __init__(self, model: TransferModel, start: int):
        super().__init__()
        self.model, self.start = model, start

    def forward(self, xb: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        return _forward(self.model, xb, self.start, prior)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _forward(model: TransferModel, xb: torch.Tensor, start: int,
             prior: torch.Tensor | None) -> torch.Tensor:
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
                logits = _forward(model, xb, start, None if prior is None else rt.put(prior))
            out.append(logits.float().cpu())
            advance(len(logits))
    if sharded:  # every share holds at least one row (n >= ranks)
        return distributed.gather_rows(torch.cat(out), len(data.x))
    return torch.cat(out)


def _cache_plan(model: TransferModel, train: Tensors, n_frozen: int, train_cfg,
                bn_policy: str) -> tuple[int, str]:
    """How many leading blocks to serve from a cache this round, and why."""
    if train_cfg.cache == "off":
        return 0, "cache: off"
    if n_frozen == 0:
        return 0, "no frozen blocks"
    if bn_policy == "train":
        return 0, "bn_policy train: frozen BatchNorm statistics change every batch"
    if train.augments:
        if not train_cfg.cache_views:
            return 0, ("random training augmentation feeds the frozen blocks: computed every "
                       "epoch (set train.cache_views to cache augmented views)")
        return n_frozen, (f"first {n_frozen} frozen block(s) computed once for each of "
                          f"{train_cfg.cache_views} augmented views, cycled over the epochs")
    return n_frozen, f"first {n_frozen} frozen block(s) computed once"


def predict_proba(model: nn.Module, data: Tensors | torch.Tensor, multilabel: bool = False,
                  batch_size: int = 512, rt: Runtime | None = None,
                  what: str = "predict") -> np.ndarray:
    """Class probabilities (softmax) or per-label probabilities (sigmoid), float64; a
    regression model's predicted values (one column)."""
    if isinstance(data, torch.Tensor):
        data = Tensors(data, torch.empty(0))
    logits = predict_logits(model, data, batch_size, rt=rt, what=what)
    return Task.of(model, multilabel).proba(logits).double().numpy()


def _optimizer(groups: list[dict[str, Any]], train_cfg) -> torch.optim.Optimizer:
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


def l2sp_penalty(model: TransferModel, anchor: dict[str, torch.Tensor], alpha: float,
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


@dataclass
class Pooled:
    """Labelled source rows trained alongside the target rows (pooled training): each source
    row's loss weighs `weight` against a target row's 1."""

    rows: Tensors
    weight: float


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
    """One model's training state across rounds and epochs. The driver calls start_round,
    then run_epoch (and keep_best when the validation score improves) until it decides the
    round is over, then end_round."""

    def __init__(self, model: TransferModel, train: Tensors, val: Tensors | None,
                 phases: list[Phase], train_cfg, classes: list[str], seed: int,
                 task: Task = Task(), bn_policy: str = "eval", rt: Runtime | None = None,
                 adapt: Adaptation | None = None, pooled: Pooled | None = None,
                 store: PrefixStore | None = None, log: Callable[[str], None] = lambda m: None):
        self.model, self.train, self.val, self.phases = model, train, val, phases
        self.cfg, self.classes, self.task, self.bn_policy = train_cfg, classes, task, bn_policy
        self.rt = rt or Runtime()
        self.rt.setup(model)
        warning = distributed.sync_batchnorm(model, self.rt.device, train_cfg.sync_batchnorm)
        if warning:
            logging.getLogger("tltool").warning(warning)
        self.adapt, self.pooled, self.log = adapt, pooled, log
        self.store = store or PrefixStore()
        self.generator = torch.Generator().manual_seed(seed)
        self.loss_fn = task.loss(train.y, len(classes), train_cfg.class_weights).to(
            self.rt.device)
        self.eval_batch = max(2 * train_cfg.batch_size, 256)
        reg = train_cfg.l2sp
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
        self.total_epochs = max(sum(p.epochs for p in phases), 1)

    # -- a round
    def start_round(self, r: int, layouts: list[str | None] | None = None) -> None:
        """Freeze per round r (1-based), build its optimiser and prefix caches. `layouts`: the
        memory layout of each block as a resumed run chose it (no timing then)."""
        model, phase, tcfg = self.model, self.phases[r - 1], self.cfg
        self.round = r
        self.round_rng = torch.get_rng_state()  # augmented caches and a critic draw from it
        plan, groups = apply_freeze(model, phase.frozen_layers, phase.strategy, phase.lr,
                                    phase.backbone_lr_mult, bn_policy=self.bn_policy,
                                    layer_decay=tcfg.layer_decay)
        self.plans.append(plan)
        self.plan = plan
        if layouts is None:
            # auto layout/precision: timed on a sample batch now that the round's frozen
            # blocks are known (a frozen prefix runs once, the rest every step).
            self.rt.tune(model, self.train.batch(slice(0, 16), train=False),
                         label=f"round {r}",
                         work=3 * len(self.train.y) * sum(p.epochs for p in self.phases[r - 1:]))
        else:
            for i, name in enumerate(layouts):
                model.backbone.set_layout(i, _FORMATS[name])
        self.layouts = [_format_name(f) for f in model.backbone.layouts]
        self.snap = snapshot_frozen(model)
        self.optimizer = _optimizer(groups, tcfg)
        self.lrs = {g["name"]: g["lr"] for g in groups}  # head + one group per block
        self.lr_backbone = max((g["lr"] for g in groups if g["name"] not in ("head", "domain")),
                               default=0.0)
        critic = (self.adapt.make_critic(model.backbone.out_features, self.rt.device)
                  if self.adapt else None)
        if critic is not None:  # dann: the domain classifier trains at the head's rate
            self.optimizer.add_param_group({"params": list(critic.parameters()),
                                            "lr": phase.lr, "name": "critic"})
        self._build_caches(r, plan)
        self.round_epoch = 0
        self.log(f"round {r}: {self.why}")
        self.log(f"round {r}: {phase.strategy}, {plan.frozen_layers} block(s) frozen, "
                 f"{plan.trainable:,}/{plan.total:,} parameters train, up to {phase.epochs} "
                 f"epochs")

    def _build_caches(self, r: int, plan: FreezePlan) -> None:
        tcfg, train = self.cfg, self.train
        start, why = _cache_plan(self.model, train, plan.frozen_layers, tcfg, self.bn_policy)
        others = {} if self.adapt is None else {k: t for k, t in (("target", self.adapt.target),
                                                                  ("source", self.adapt.source))
                                                if t is not None}
        if self.pooled is not None:
            others["pooled"] = self.pooled.rows
        built = time.perf_counter()
        self.views: list[Tensors] = [train]
        self.va, self.aux = self.val, dict(others)
        if start:
            k = tcfg.cache_views if train.augments else 1
            limit = tcfg.cache_max_gb * 2**30 / (k + 1 + len(others))
            get = self.store.get
            views = [get(self.model, train, start, self.eval_batch, limit, self.rt, view=v)
                     for v in range(k)]
            va = None if self.val is None else get(self.model, self.val, start,
                                                   self.eval_batch, limit, self.rt)
            aux = {key: get(self.model, t, start, self.eval_batch, limit, self.rt)
                   for key, t in others.items()}
            if (self.val is not None and va is None) or any(
                    v is None for v in [*views, *aux.values()]):
                start, why = 0, "prefix cache over cache_max_gb"
            else:
                self.views, self.va, self.aux = views, va, aux
        self.start, self.why = start, why
        self.caches.append({"round": r, "cached_blocks": start, "reason": why})
        self.timing["cache_build_seconds"].append(round(time.perf_counter() - built, 4))
        step = distributed.wrap(_Step(self.model, start), self.rt.device)  # DDP under torchrun
        self.forward = self.rt.wrap(lambda xb, prior: step(xb, prior))

    def run_epoch(self) -> EpochResult:
        """One pass over the training rows; returns the validation logits."""
        tr = self.views[self.round_epoch % len(self.views)]
        r_epoch = self.epoch_total
        self.epoch_total += 1
        self.round_epoch += 1
        tick = time.perf_counter()
        if self.adapt is not None:
            loss, align = _adapt_epoch(self.model, tr, self.aux, self.adapt, self.optimizer,
                                       self.loss_fn, self.task, self.cfg.batch_size,
                                       self.generator, self.start, self.rt,
                                       r_epoch / self.total_epochs)
            if not np.isfinite(loss) or not np.isfinite(align):
                self._check_finite(torch.tensor(float("nan")), 0)
        else:
            loss, align = self._epoch(tr), None
        self.timing["train_epoch_seconds"].append(round(time.perf_counter() - tick, 4))
        logits = (None if self.va is None else
                  predict_logits(self.model, self.va, self.eval_batch, self.start, self.rt,
                                 what="validation"))
        return EpochResult(loss, align, logits, self._watch())

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

    def _epoch(self, data: Tensors) -> float:
        model, rt, bs = self.model, self.rt, self.cfg.batch_size
        model.train()
        source = self.aux.get("pooled")
        n_t = len(data.y)
        n = n_t + (0 if source is None else len(source.y))
        order = torch.randperm(n, generator=self.generator)
        # Pooled rows: the loss is sum(w_i * loss_i) / (rows x the mean weight), an unbiased
        # estimate of the whole weighted mean whatever mix of rows a batch holds.
        w_src = 0.0 if source is None else self.pooled.weight
        mean_w = (n_t + w_src * (n - n_t)) / n
        total, seen = 0.0, 0
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            if len(idx) == 1 and n > 1:
                continue  # a single row breaks BatchNorm and adds only noise
            self.optimizer.zero_grad(set_to_none=True)
            if distributed.active():
                loss = self._shared_loss(data, idx, source, n_t, w_src, mean_w)
            elif source is None:
                xb, prior = data.batch(idx, train=True), data.prior_of(idx)
                yb = data.y[idx]
                with rt.autocast():
                    logits = self.forward(rt.put(xb), None if prior is None else rt.put(prior))
                loss = self.loss_fn(logits.float(), rt.put(yb))
            else:
                loss = self._pooled_loss(data, source, idx, n_t, w_src, mean_w)
            if self.l2sp:
                loss_total = loss + l2sp_penalty(model, self.anchor, *self.l2sp)
            else:
                loss_total = loss
            if distributed.active():  # every rank checks the same (global) number
                shown = torch.tensor(self._global_loss)
                self._check_finite(shown + (loss_total - loss).detach().cpu(), i // bs + 1)
            else:
                shown = loss
                self._check_finite(loss_total, i // bs + 1)
            rt.backward_step(loss_total, self.optimizer)
            total += shown.item() * len(idx)
            seen += len(idx)
        return total / max(seen, 1)

    def _shared_loss(self, data: Tensors, idx: torch.Tensor, source: Tensors | None = None,
                     n_t: int = 0, w_src: float = 0.0, mean_w: float = 1.0) -> torch.Tensor:
        """Under torchrun: this rank's rows' share of the global batch's mean loss, times the
        number of ranks (DDP averages the ranks' gradients: the sum is the global batch's
        gradient). The value returned for logging and the finite check is the global mean.
        Pooled source rows (`source`): the global batch mixes both, each row weighted as in one
        process (`_pooled_rows`), over the whole batch's denominator."""
        rt = self.rt
        mine = distributed.share(idx)
        if source is None:
            xb, prior = data.batch(mine, train=True), data.prior_of(mine)
            with rt.autocast():
                logits = self.forward(rt.put(xb), None if prior is None else rt.put(prior))
            rows, _ = self.task.row_loss(self.loss_fn, logits.float(), rt.put(data.y[mine]))
            y_all = data.y[idx]
        else:
            rows, _ = self._pooled_rows(data, source, mine, n_t, w_src)
            y_all = torch.cat([data.y[idx[idx < n_t]], source.y[idx[idx >= n_t] - n_t]])
        weight = getattr(self.loss_fn, "weight", None)
        shares = float(len(idx)) if weight is None or self.task.multilabel or \
            self.task.regression else float(weight.cpu()[y_all].sum())
        local = rows.sum() / (shares * (1.0 if source is None else mean_w))
        self._global_loss = distributed.total(float(local.detach()))
        return local * distributed.world()

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(
                f"training diverged: the loss became {float(loss.detach())} at round "
                f"{self.round}, epoch {self.epoch_total}, step {step}; lower train.lr (or the "
                f"adapt / l2sp weights), or check the inputs for extreme values")

    def _pooled_loss(self, data: Tensors, source: Tensors, idx: torch.Tensor, n_t: int,
                     w_src: float, mean_w: float) -> torch.Tensor:
        weighted, shares = self._pooled_rows(data, source, idx, n_t, w_src)
        return weighted.sum() / (mean_w * shares.mean() * len(idx))

    def _pooled_rows(self, data: Tensors, source: Tensors, idx: torch.Tensor, n_t: int,
                     w_src: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx` of target + source (indices >= n_t are source rows): each row's loss
        times its weight (1 for target rows, w_src for source rows), and each row's share of
        the unweighted mean's denominator (Task.row_loss)."""
        rt = self.rt
        t_idx, s_idx = idx[idx < n_t], idx[idx >= n_t] - n_t
        parts = [p for p in (data.batch(t_idx, train=True) if len(t_idx) else None,
                             source.batch(s_idx, train=True) if len(s_idx) else None)
                 if p is not None]
        priors = [p for p in (data.prior_of(t_idx) if len(t_idx) else None,
                              source.prior_of(s_idx) if len(s_idx) else None) if p is not None]
        y = torch.cat([data.y[t_idx], source.y[s_idx]])
        with rt.autocast():
            logits = self.forward(rt.put(torch.cat(parts)),
                                  rt.put(torch.cat(priors)) if priors else None).float()
        if self.model.domain_bias is not None:
            # the source rows' offset, as a product with a 0/1 mask so that the bias takes
            # part in every step (a zero gradient when no source row is in the batch): DDP
            # expects every trainable parameter in every backward pass
            is_source = torch.cat([torch.zeros(len(t_idx)), torch.ones(len(s_idx))])
            logits = logits + is_source.to(logits)[:, None] * self.model.domain_bias
        rows, shares = self.task.row_loss(self.loss_fn, logits, rt.put(y))
        w = torch.cat([torch.ones(len(t_idx)), torch.full((len(s_idx),), w_src)]).to(rows)
        return w * rows, shares

    # -- resuming
    def state(self, stale: int, round_done: bool, watched: dict[int, float]) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one is (plain tensors
        and primitives: a checkpoint loads it with weights_only). The best weights are in
        best.pt, the current ones in the checkpoint's state_dict."""
        np_state = np.random.get_state()
        return {
            "round": self.round, "round_epoch": self.round_epoch,
            "epoch_total": self.epoch_total, "stale": stale, "round_done": round_done,
            "best": {"score": float(self.best["score"]), "epoch": self.best["epoch"],
                     "round": self.best["round"]},
            # best.pt may already hold a later epoch's weights when a run is killed between
            # the two writes: the best weights this state refers to travel with it (unless
            # they are the current ones, the checkpoint's own state_dict)
            "best_state": None if self.best["epoch"] == self.epoch_total else {
                k: v.detach().cpu().clone() for k, v in self.best["state"].items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.rt.scaler is None else self.rt.scaler.state_dict(),
            "critic": None if self.adapt is None or self.adapt.critic is None
            else self.adapt.critic.state_dict(),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "round_rng": self.round_rng,
            "numpy_rng": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                          "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                          "cached": float(np_state[4])},
            "layouts": self.layouts, "precision": self.rt.precision,
            "plans": [p.as_dict() for p in self.plans], "checks": self.checks,
            "caches": self.caches, "timing": self.timing,
            "watched": {str(k): v for k, v in watched.items()},
        }

    def resume_round(self, state: dict[str, Any], current: dict[str, torch.Tensor]) -> None:
        """Set up the interrupted round as it was: call instead of start_round(r)."""
        r = state["round"]
        self.epoch_total = state["epoch_total"] - state["round_epoch"]
        self.plans = [FreezePlan.from_dict(d) for d in state["plans"][:-1]]
        self.checks = list(state["checks"])
        self.caches = list(state["caches"][:-1])
        self.timing = {k: list(v) for k, v in state["timing"].items()}
        self.timing["cache_build_seconds"] = self.timing["cache_build_seconds"][:-1]
        if state["precision"] != self.rt.precision:
            self.rt.dtype = {"fp32": None, "bf16": torch.bfloat16,
                             "fp16": torch.float16}[state["precision"]]
        self.rt.probe_precision = False
        torch.set_rng_state(state["round_rng"])
        self.start_round(r, layouts=state["layouts"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None and self.rt.scaler is not None:
            self.rt.scaler.load_state_dict(state["scaler"])
        if state["critic"] is not None:
            self.adapt.critic.load_state_dict(state["critic"])
        self.round_epoch = state["round_epoch"]
        self.epoch_total = state["epoch_total"]
        best = state["best_state"] if state["best_state"] is not None else current
        self.best = {**state["best"], "state": {k: v.clone() for k, v in best.items()}}
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        n = state["numpy_rng"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached"]))

    def mark_best(self) -> None:
        """Remember the current weights as the best (the driver compared the scores)."""
        self.best = {"score": np.inf, "epoch": self.epoch_total, "round": self.round,
                     "state": copy.deepcopy(self.model.state_dict())}

    def keep_best(self, score: float) -> bool:
        """Remember the weights when `score` beats the best so far; True when it did."""
        if score > self.best["score"]:
            self.best = {"score": score, "epoch": self.epoch_total, "round": self.round,
                         "state": copy.deepcopy(self.model.state_dict())}
            return True
        return False

    def end_round(self) -> None:
        """Check the frozen tensors; the next round (and the final model) starts from the best
        weights so far (with no validation rows: from the last ones)."""
        self.checks.append(verify_unchanged(self.model, self.snap))
        if self.val is None:
            self.best = {"score": -np.inf, "epoch": self.epoch_total, "round": self.round,
                         "state": copy.deepcopy(self.model.state_dict())}
        self.model.load_state_dict(self.best["state"])

    def summary(self, monitor: str) -> dict[str, Any]:
        plans = self.plans
        return {"best_epoch": self.best["epoch"], "best_round": self.best["round"],
                "epochs_run": self.epoch_total, "monitor": monitor,
                "plans": [p.as_dict() for p in plans], "cache": self.caches,
                "timing": self.timing,
                "plan_text": "\n\n".join(f"round {i}\n{p.as_text()}" for i, p in
                                         enumerate(plans, start=1)),
                "freeze_check": {"frozen_tensors": sum(c["frozen_tensors"] for c in self.checks),
                                 "unchanged": all(c["unchanged"] for c in self.checks)}}


def fit(model: TransferModel, train: Tensors, val: Tensors | None, phases: list[Phase],
        train_cfg, classes: list[str], seed: int, save: Callable[..., None],
        metrics_csv, log: Callable[[str], None], task: Task = Task(),
        bn_policy: str = "eval", rt: Runtime | None = None,
        adapt: Adaptation | None = None, pooled: Pooled | None = None,
        store: PrefixStore | None = None, resume: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """Train through every round; restore and return the best weights' summary.

    `save(name, epoch, state=None)` writes a checkpoint: "best.pt" when the validation score
    improves, "last.pt" after every epoch with the training `state` a resumed run continues
    from. `metrics_csv` is the path of the per-epoch CSV (appended and flushed every epoch).
    `val` None: no validation rows (a refit on every labelled row): each round runs its full
    epochs and the final weights are kept. `adapt`: domain adaptation (an alignment loss, see
    tltool.adapt); `pooled`: labelled source rows trained alongside. `resume`: {"state": a
    last.pt's training state, "best": the best weights so far, "rows": the metrics.csv rows
    written so far}, to continue an interrupted run exactly.
    """
    tr = Trainer(model, train, val, phases, train_cfg, classes, seed, task, bn_policy, rt,
                 adapt, pooled, store, log)
    monitor = train_cfg.early_stopping.monitor
    patience = train_cfg.early_stopping.patience
    fields = ["round", "epoch", "train_loss", "val_loss", "val_accuracy", "val_auroc", "val_f1",
              "lr_head", "lr_backbone", "trainable_params", "align_loss"]
    if task.regression:
        fields[4:7] = ["val_rmse", "val_r2"]
    watching = adapt is not None and adapt.watch is not None
    if watching:
        fields.append("target_val_score")
    planned = sum(p.epochs for p in phases)
    state = None if resume is None else resume["state"]
    watched: dict[int, float] = {} if state is None else {
        int(k): v for k, v in state["watched"].items()}
    from tltool.runs import writing

    with writing(metrics_csv), open(metrics_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in [] if resume is None else resume["rows"]:
            writer.writerow(row)
        fh.flush()
        for r, phase in enumerate(phases, start=1):
            if state is not None and r < state["round"]:
                continue  # finished before the interruption
            if state is not None and r == state["round"]:
                tr.resume_round(state, resume["weights"])
                stale, left = state["stale"], (0 if state["round_done"]
                                               else phase.epochs - state["round_epoch"])
                state = None
            else:
                tr.start_round(r)
                stale, left = 0, phase.epochs
            done = left == 0
            for i in range(left):
                tick = time.perf_counter()
                res = tr.run_epoch()
                row = {"round": r, "epoch": tr.epoch_total, "train_loss": round(res.train_loss, 6),
                       "lr_head": tr.lrs["head"], "lr_backbone": tr.lr_backbone,
                       "trainable_params": tr.plan.trainable,
                       "align_loss": None if res.align_loss is None else round(res.align_loss, 6)}
                if res.watch is not None:
                    row["target_val_score"] = round(res.watch, 6)
                    watched[tr.epoch_total] = res.watch
                done = i == left - 1
                if res.logits is not None:
                    val_loss = task.val_loss(res.logits, val.y)
                    report = epoch_scores(val.y.numpy(), task.proba(res.logits).double().numpy(),
                                          task.multilabel, task.regression)
                    row |= {"val_loss": round(val_loss, 6),
                            **{f"val_{k}": None if report.get(k) is None else round(report[k], 6)
                               for k in ("accuracy", "auroc", "f1", "rmse", "r2")}}
                    if tr.keep_best(score_of(report, val_loss, monitor)):
                        stale = 0
                        save("best.pt", tr.epoch_total)
                    else:
                        stale += 1
                        if patience is not None and stale >= patience:
                            log(f"round {r}: early stop at epoch {tr.epoch_total} (no "
                                f"{monitor} improvement for {patience} epochs)")
                            done = True
                writer.writerow(row)
                fh.flush()
                save("last.pt", tr.epoch_total, tr.state(stale, done, watched))
                progress.current().epoch(progress.Epoch(
                    round=r, rounds=len(phases), epoch=tr.epoch_total, planned=planned,
                    seconds=time.perf_counter() - tick, metrics=row))
                if done and i < left - 1:
                    break
            tr.end_round()
    progress.current().training_done()
    if val is None or tr.epoch_total == 0:
        save("best.pt", tr.epoch_total)
    summary = tr.summary(monitor)
    if val is not None and tr.epoch_total > 1:
        last = sum(p.epochs for p in phases)
        if summary["best_epoch"] == tr.epoch_total == last:
            log("note: the best epoch is the last one; training may be too short (raise "
                "train.epochs)")
        elif summary["best_epoch"] == 1:
            log("note: the best epoch is the first; later epochs only made the validation "
                "score worse (a lower train.lr, or the starting weights were already best)")
    if watching and watched:
        summary["target_watch"] = _watch_verdict(watched, summary["best_epoch"])
    return summary


# A drop of the target's validation score from its best epoch to the kept one larger than this
# (AUROC or accuracy) is worth a warning.
WATCH_MARGIN = 0.02


def _watch_verdict(watched: dict[int, float], kept: int) -> dict[str, Any]:
    """Compare the target validation score at the kept epoch with its best and first epochs."""
    import math

    finite = {e: v for e, v in watched.items() if v is not None and not math.isnan(v)}
    if not finite:
        return {}
    best_epoch = max(finite, key=lambda e: (finite[e], -e))
    first = finite[min(finite)]
    at_kept = finite.get(kept, finite[max(finite)])
    out = {"first_epoch": round(first, 6), "best": round(finite[best_epoch], 6),
           "best_epoch": best_epoch, "kept_epoch": kept, "kept": round(at_kept, 6),
           "warned": finite[best_epoch] - at_kept > WATCH_MARGIN}
    return out


def _adapt_epoch(model: TransferModel, data: Tensors, aux: dict[str, Tensors],
                 adapt: Adaptation, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 task: Task, batch_size: int, generator: torch.Generator, start: int,
                 rt: Runtime, progress: float) -> tuple[float, float]:
    """One epoch over the labelled rows; each step also draws unlabelled target rows (and,
    in freeze-finetune, labelled source rows) and adds the alignment loss. All rows of a step
    go through the network as one batch, so trainable BatchNorm layers see both domains.

    Under torchrun every rank draws the same global batch (same generator) and runs its
    contiguous share of each of its parts; the features are gathered (with their gradients)
    so the alignment loss sees the whole batch, as in one process; the labelled losses are
    each rank's share of the global mean; gradients are averaged over the ranks before the
    step (`distributed.average_gradients`), which makes the step the one-process step."""
    model.train()
    if adapt.critic is not None:
        adapt.critic.train()
    target, source = aux["target"], aux.get("source")
    source_loss = task.loss(source.y, 0, "none") if source is not None else None
    ddp = distributed.active()
    mine = distributed.share if ddp else (lambda i: i)
    world = distributed.world() if ddp else 1
    order = torch.randperm(len(data.y), generator=generator)
    total, aligned, seen, steps = 0.0, 0.0, 0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) == 1 and len(order) > 1:
            continue
        optimizer.zero_grad(set_to_none=True)
        s_idx = (torch.randint(len(source.y), (batch_size,), generator=generator)
                 if source is not None else None)
        t_idx = torch.randint(len(target.y), (batch_size,), generator=generator)
        m_idx, m_t = mine(idx), mine(t_idx)
        m_s = None if s_idx is None else mine(s_idx)
        parts = [data.batch(m_idx, train=True)]
        if source is not None:
            parts.append(source.batch(m_s, train=True))
        parts.append(target.batch(m_t, train=True))
        x = rt.put(torch.cat(parts))
        yb = rt.put(data.y[m_idx])
        n, n_s = len(m_idx), 0 if m_s is None else len(m_s)
        with rt.autocast():
            feats = model.backbone.forward_from(x, start) if start else model.backbone(x)
            logits = model.head(feats[:n])
            extra = (model.head(feats[n:n + n_s])
                     if source is not None and adapt.source_weight > 0 else None)
        if ddp:  # this rank's rows' share of the global means, times the ranks (averaged)
            rows, _ = task.row_loss(loss_fn, logits.float(), yb)
            weight = getattr(loss_fn, "weight", None)
            denom = float(len(idx)) if weight is None or task.multilabel or task.regression \
                else float(weight.cpu()[data.y[idx]].sum())
            local = rows.sum() / denom
            loss = local * world
            shown = distributed.total(float(local.detach()))
        else:
            loss = loss_fn(logits.float(), yb)
            shown = None
        if source is not None:
            fs = feats[n:n + n_s]
            if adapt.source_weight > 0:
                ys = rt.put(source.y[m_s])
                if ddp:
                    rows, _ = task.row_loss(source_loss, extra.float(), ys)
                    s_part = rows.sum() / len(s_idx)
                    loss = loss + adapt.source_weight * s_part * world
                    shown += adapt.source_weight * distributed.total(float(s_part.detach()))
                else:
                    loss = loss + adapt.source_weight * source_loss(extra.float(), ys)
        else:
            fs = feats[:n]
        ft = feats[n + n_s:]
        if ddp:  # the whole batch's features on every rank, gradients flowing back per rank
            fs = distributed.gather_rows_with_grad(fs, len(idx) if source is None
                                                   else len(s_idx))
            ft = distributed.gather_rows_with_grad(ft, len(t_idx))
        align = adapt.loss(fs, ft, progress)
        rt.backward_step(loss + align, optimizer,
                         sync=distributed.average_gradients if ddp else None)
        total += (loss.item() if shown is None else shown) * len(idx)
        aligned += align.item()
        seen += len(idx)
        steps += 1
    return total / max(seen, 1), aligned / max(steps, 1)
