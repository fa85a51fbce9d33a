"""The one training loop: phases (rounds) of epochs, early stopping, best/last checkpoints.

Freezing is decided per phase by `tltool.freeze.apply_freeze`; the loop itself only sees the
optimiser's parameter groups.
"""

from __future__ import annotations

import copy
import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tltool.adapt import Adaptation
from tltool.freeze import FreezePlan, apply_freeze, snapshot_frozen, verify_unchanged
from tltool.metrics import epoch_scores
from tltool.models import TransferModel
from tltool.runtime import Runtime


@dataclass
class Phase:
    """One round: how much is frozen and how long/fast it trains."""

    frozen_layers: int
    strategy: str
    epochs: int
    lr: float
    backbone_lr_mult: float


@dataclass
class Tensors:
    """Inputs and targets of one split. `prepare(x_batch, train)` turns a stored batch into
    model input (images: uint8 -> resized, normalised, augmented only when train=True)."""

    x: torch.Tensor
    y: torch.Tensor
    prepare: Callable[[torch.Tensor, bool], torch.Tensor] | None = None
    augments: bool = False  # prepare(x, train=True) is random: no prefix cache then

    def batch(self, idx: torch.Tensor | slice, train: bool) -> torch.Tensor:
        xb = self.x[idx]
        if hasattr(xb, "materialize"):  # images decoded on demand (tltool.data.images)
            xb = xb.materialize()
        return xb if self.prepare is None else self.prepare(xb, train)


class StandardisedMSE(nn.Module):
    """Mean squared error between the model's standardised output and the label standardised
    with the training mean and standard deviation (computed in float64, so a label of 1e9 + 75
    keeps its 75)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def forward(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = ((y.double() - self.mean) / self.std).to(pred.dtype)
        return ((pred.reshape(-1) - z) ** 2).mean()


@dataclass(frozen=True)
class Task:
    """Single-label (softmax, cross-entropy), multi-label (a sigmoid per label, BCE) or
    regression (one output: the standardised label, MSE; `proba` maps it to the label's
    units)."""

    multilabel: bool = False
    regression: bool = False
    mean: float = 0.0  # regression: the label's training mean and standard deviation
    std: float = 1.0

    @classmethod
    def of(cls, model: nn.Module, multilabel: bool = False) -> Task:
        scale = getattr(model, "target_scale", None)
        if scale is None:
            return cls(multilabel)
        return cls(multilabel, True, float(scale[0]), float(scale[1]))

    def loss(self, y: torch.Tensor, n_outputs: int, class_weights: str) -> nn.Module:
        if self.regression:
            return StandardisedMSE(self.mean, self.std)
        if self.multilabel:
            if class_weights == "balanced":
                pos = y.sum(dim=0).clamp(min=1)
                return nn.BCEWithLogitsLoss(pos_weight=((len(y) - pos) / pos).float())
            return nn.BCEWithLogitsLoss()
        return _loss_fn(y, n_outputs, class_weights)

    def proba(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities; for regression the predicted values themselves (one column)."""
        if self.regression:  # the value in the label's units, float64
            return logits.double() * self.std + self.mean
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def val_loss(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        if self.regression:
            return float(StandardisedMSE(self.mean, self.std)(logits, y))
        if self.multilabel:
            return float(nn.functional.binary_cross_entropy_with_logits(logits, y.float()))
        return float(nn.functional.cross_entropy(logits, y))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def predict_logits(model: nn.Module, data: Tensors, batch_size: int = 512, start: int = 0,
                   rt: Runtime | None = None) -> torch.Tensor:
    """Logits (float32, on the CPU) in inference mode; `start` > 0 means data.x holds cached
    prefix outputs."""
    rt = rt or Runtime()
    model.eval()
    out = []
    for i in range(0, len(data.x), batch_size):
        xb = rt.put(data.batch(slice(i, i + batch_size), train=False))
        with rt.autocast():
            logits = model.forward_from(xb, start) if start else model(xb)
        out.append(logits.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def build_prefix_cache(model: TransferModel, data: Tensors, n_blocks: int, batch_size: int,
                       max_bytes: float, rt: Runtime | None = None,
                       augmented: bool = False) -> Tensors | None:
    """Outputs of the first n (frozen, inference-mode) blocks, computed once and kept on the
    CPU (in bf16 under bf16 autocast); None when the cache would exceed `max_bytes`."""
    rt = rt or Runtime()
    model.eval()
    parts, used = [], 0
    for i in range(0, len(data.x), batch_size):
        xb = rt.put(data.batch(slice(i, i + batch_size), train=augmented))
        with rt.autocast():
            z = model.backbone.forward_blocks(xb, n_blocks, pool=False).cpu()
        used += z.numel() * z.element_size()
        if used / (i + len(z)) * len(data.x) > max_bytes:
            return None
        parts.append(z)
    # Stored in the layout the first uncached block runs in: no conversion per batch.
    return Tensors(model.backbone.laid_out(torch.cat(parts), n_blocks), data.y)


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
                  batch_size: int = 512, rt: Runtime | None = None) -> np.ndarray:
    """Class probabilities (softmax) or per-label probabilities (sigmoid), float64; a
    regression model's predicted values (one column)."""
    if isinstance(data, torch.Tensor):
        data = Tensors(data, torch.empty(0))
    logits = predict_logits(model, data, batch_size, rt=rt)
    return Task.of(model, multilabel).proba(logits).double().numpy()


def _loss_fn(y: torch.Tensor, n_classes: int, class_weights: str) -> nn.Module:
    if class_weights == "balanced":
        counts = torch.bincount(y, minlength=n_classes).double().clamp(min=1)
        weights = (len(y) / (n_classes * counts)).float()
        return nn.CrossEntropyLoss(weight=weights)
    return nn.CrossEntropyLoss()


def _optimizer(groups: list[dict[str, Any]], train_cfg) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=train_cfg.momentum,
                               weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay)


def _score(report: dict[str, Any], val_loss: float, monitor: str) -> float:
    """Higher is better for every monitor."""
    if monitor == "val_loss":
        return -val_loss
    value = report[monitor.removeprefix("val_")]
    return -np.inf if value is None else value


def fit(model: TransferModel, train: Tensors, val: Tensors, phases: list[Phase], train_cfg,
        classes: list[str], seed: int, save: Callable[[str, int], None],
        metrics_csv, log: Callable[[str], None], task: Task = Task(),
        bn_policy: str = "eval", rt: Runtime | None = None,
        adapt: Adaptation | None = None) -> dict[str, Any]:
    """Train through every phase; restore and return the best weights' summary.

    `save(name, epoch)` writes a checkpoint ("best.pt"/"last.pt"); `metrics_csv` is the path
    of the per-epoch CSV. `adapt`: domain adaptation (an alignment loss on the backbone's
    features of source and target rows, see tltool.adapt).
    """
    rt = rt or Runtime()
    rt.setup(model)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = task.loss(train.y, len(classes), train_cfg.class_weights).to(rt.device)
    eval_batch = max(2 * train_cfg.batch_size, 256)
    monitor = train_cfg.early_stopping.monitor
    patience = train_cfg.early_stopping.patience
    best = {"score": -np.inf, "epoch": 0, "round": 0, "state": copy.deepcopy(model.state_dict())}
    plans: list[FreezePlan] = []
    checks, caches = [], []
    # Wall times go to timing.json, never to metrics.json (which must be reproducible).
    timing: dict[str, list[float]] = {"cache_build_seconds": [], "train_epoch_seconds": []}
    epoch_total = 0
    fields = ["round", "epoch", "train_loss", "val_loss", "val_accuracy", "val_auroc", "val_f1",
              "lr_head", "lr_backbone", "trainable_params", "align_loss"]
    if task.regression:
        fields[4:7] = ["val_rmse", "val_r2"]
    total_epochs = max(sum(p.epochs for p in phases), 1)
    with open(metrics_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r, phase in enumerate(phases, start=1):
            plan, groups = apply_freeze(model, phase.frozen_layers, phase.strategy, phase.lr,
                                        phase.backbone_lr_mult, bn_policy=bn_policy,
                                        layer_decay=train_cfg.layer_decay)
            plans.append(plan)
            # auto layout/precision: timed on a sample batch now that the round's frozen blocks
            # are known (a frozen prefix runs once, the rest every step).
            rt.tune(model, train.batch(slice(0, 16), train=False), label=f"round {r}",
                    work=3 * len(train.y) * sum(p.epochs for p in phases[r - 1:]))
            snap = snapshot_frozen(model)
            optimizer = _optimizer(groups, train_cfg)
            lrs = {g["name"]: g["lr"] for g in groups}  # head + one group per block
            critic = adapt.make_critic(model.backbone.out_features, rt.device) if adapt else None
            if critic is not None:  # dann: the domain classifier trains at the head's rate
                optimizer.add_param_group({"params": list(critic.parameters()), "lr": phase.lr,
                                           "name": "critic"})
            start, why = _cache_plan(model, train, plan.frozen_layers, train_cfg, bn_policy)
            va = val
            built = time.perf_counter()
            views: list[Tensors | None] = [train]
            others = {} if adapt is None else {k: t for k, t in (("target", adapt.target),
                                                                  ("source", adapt.source))
                                               if t is not None}
            aux = dict(others)
            if start:
                k = train_cfg.cache_views if train.augments else 1
                limit = train_cfg.cache_max_gb * 2**30 / (k + 1 + len(others))
                views = [build_prefix_cache(model, train, start, eval_batch, limit, rt,
                                            augmented=train.augments) for _ in range(k)]
                va = build_prefix_cache(model, val, start, eval_batch, limit, rt)
                aux = {key: build_prefix_cache(model, t, start, eval_batch, limit, rt)
                       for key, t in others.items()}
                if va is None or any(v is None for v in [*views, *aux.values()]):
                    start, why, views, va = 0, "prefix cache over cache_max_gb", [train], val
                    aux = dict(others)
            caches.append({"round": r, "cached_blocks": start, "reason": why})
            timing["cache_build_seconds"].append(round(time.perf_counter() - built, 4))
            forward = rt.wrap(lambda xb, s=start: model.forward_from(xb, s) if s else model(xb))
            log(f"round {r}: {why}")
            lr_backbone = max((g["lr"] for g in groups if g["name"] != "head"), default=0.0)
            log(f"round {r}: {phase.strategy}, {plan.frozen_layers} block(s) frozen, "
                f"{plan.trainable:,}/{plan.total:,} parameters train, up to {phase.epochs} epochs")
            stale = 0
            for e in range(phase.epochs):
                tr = views[e % len(views)]
                epoch_total += 1
                tick = time.perf_counter()
                if adapt is None:
                    train_loss, align_loss = _train_epoch(
                        model, tr, optimizer, loss_fn, train_cfg.batch_size, generator, start,
                        rt, forward), None
                else:
                    train_loss, align_loss = _adapt_epoch(
                        model, tr, aux, adapt, optimizer, loss_fn, task, train_cfg.batch_size,
                        generator, start, rt, (epoch_total - 1) / total_epochs)
                timing["train_epoch_seconds"].append(round(time.perf_counter() - tick, 4))
                logits = predict_logits(model, va, eval_batch, start, rt)
                val_loss = task.val_loss(logits, val.y)
                report = epoch_scores(val.y.numpy(), task.proba(logits).double().numpy(),
                                      task.multilabel, task.regression)
                writer.writerow({
                    "round": r, "epoch": epoch_total, "train_loss": round(train_loss, 6),
                    "val_loss": round(val_loss, 6),
                    **{f"val_{k}": None if report.get(k) is None else round(report[k], 6)
                       for k in ("accuracy", "auroc", "f1", "rmse", "r2")},
                    "lr_head": lrs["head"],
                    "lr_backbone": lr_backbone, "trainable_params": plan.trainable,
                    "align_loss": None if align_loss is None else round(align_loss, 6)})
                score = _score(report, val_loss, monitor)
                if score > best["score"]:
                    best = {"score": score, "epoch": epoch_total, "round": r,
                            "state": copy.deepcopy(model.state_dict())}
                    stale = 0
                    save("best.pt", epoch_total)
                else:
                    stale += 1
                    if patience is not None and stale >= patience:
                        log(f"round {r}: early stop at epoch {epoch_total} (no {monitor} "
                            f"improvement for {patience} epochs)")
                        break
            checks.append(verify_unchanged(model, snap))
            save("last.pt", epoch_total)
            # The next round (and the final model) starts from the best weights so far.
            model.load_state_dict(best["state"])
    if epoch_total == 0:
        save("best.pt", 0)
    return {"best_epoch": best["epoch"], "best_round": best["round"], "epochs_run": epoch_total,
            "monitor": monitor, "plans": [p.as_dict() for p in plans],
            "cache": caches, "timing": timing,
            "plan_text": "\n\n".join(f"round {i}\n{p.as_text()}" for i, p in
                                     enumerate(plans, start=1)),
            "freeze_check": {"frozen_tensors": sum(c["frozen_tensors"] for c in checks),
                             "unchanged": all(c["unchanged"] for c in checks)}}


def _train_epoch(model: TransferModel, data: Tensors, optimizer: torch.optim.Optimizer,
                 loss_fn: nn.Module, batch_size: int, generator: torch.Generator,
                 start: int, rt: Runtime, forward: Callable) -> float:
    model.train()
    order = torch.randperm(len(data.y), generator=generator)
    total, seen = 0.0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) == 1 and len(order) > 1:
            continue  # a single row breaks BatchNorm and adds only noise
        optimizer.zero_grad(set_to_none=True)
        xb, yb = rt.put(data.batch(idx, train=True)), rt.put(data.y[idx])
        with rt.autocast():
            logits = forward(xb)
        loss = loss_fn(logits.float(), yb)
        rt.backward_step(loss, optimizer)
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


def _adapt_epoch(model: TransferModel, data: Tensors, aux: dict[str, Tensors],
                 adapt: Adaptation, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 task: Task, batch_size: int, generator: torch.Generator, start: int,
                 rt: Runtime, progress: float) -> tuple[float, float]:
    """One epoch over the labelled rows; each step also draws unlabelled target rows (and,
    in freeze-finetune, labelled source rows) and adds the alignment loss. All rows of a step
    go through the network as one batch, so trainable BatchNorm layers see both domains."""
    model.train()
    if adapt.critic is not None:
        adapt.critic.train()
    target, source = aux["target"], aux.get("source")
    source_loss = task.loss(source.y, 0, "none") if source is not None else None
    order = torch.randperm(len(data.y), generator=generator)
    total, aligned, seen, steps = 0.0, 0.0, 0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) == 1 and len(order) > 1:
            continue
        optimizer.zero_grad(set_to_none=True)
        parts = [data.batch(idx, train=True)]
        if source is not None:
            s_idx = torch.randint(len(source.y), (batch_size,), generator=generator)
            parts.append(source.batch(s_idx, train=True))
        t_idx = torch.randint(len(target.y), (batch_size,), generator=generator)
        parts.append(target.batch(t_idx, train=True))
        x = rt.put(torch.cat(parts))
        yb = rt.put(data.y[idx])
        n = len(idx)
        with rt.autocast():
            feats = model.backbone.forward_from(x, start) if start else model.backbone(x)
            logits = model.head(feats[:n])
            extra = (model.head(feats[n:n + batch_size])
                     if source is not None and adapt.source_weight > 0 else None)
        loss = loss_fn(logits.float(), yb)
        if source is not None:
            fs = feats[n:n + batch_size]
            if adapt.source_weight > 0:
                loss = loss + adapt.source_weight * source_loss(extra.float(),
                                                                rt.put(source.y[s_idx]))
        else:
            fs = feats[:n]
        align = adapt.loss(fs, feats[-batch_size:], progress)
        rt.backward_step(loss + align, optimizer)
        total += loss.item() * n
        aligned += align.item()
        seen += n
        steps += 1
    return total / max(seen, 1), aligned / max(steps, 1)
