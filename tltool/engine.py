"""The one training loop: phases (rounds) of epochs, early stopping, best/last checkpoints.

Freezing is decided per phase by `tltool.freeze.apply_freeze`; the loop itself only sees the
optimiser's parameter groups.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tltool.freeze import FreezePlan, apply_freeze, snapshot_frozen, verify_unchanged
from tltool.metrics import classification_report
from tltool.models import TransferModel


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
    x: torch.Tensor
    y: torch.Tensor


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(x[i:i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).double().numpy()


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
        metrics_csv, log: Callable[[str], None]) -> dict[str, Any]:
    """Train through every phase; restore and return the best weights' summary.

    `save(name, epoch)` writes a checkpoint ("best.pt"/"last.pt"); `metrics_csv` is the path
    of the per-epoch CSV.
    """
    generator = torch.Generator().manual_seed(seed)
    loss_fn = _loss_fn(train.y, len(classes), train_cfg.class_weights)
    monitor = train_cfg.early_stopping.monitor
    patience = train_cfg.early_stopping.patience
    best = {"score": -np.inf, "epoch": 0, "round": 0, "state": copy.deepcopy(model.state_dict())}
    plans: list[FreezePlan] = []
    checks = []
    epoch_total = 0
    fields = ["round", "epoch", "train_loss", "val_loss", "val_accuracy", "val_auroc", "val_f1",
              "lr_head", "lr_backbone", "trainable_params"]
    with open(metrics_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r, phase in enumerate(phases, start=1):
            plan, groups = apply_freeze(model, phase.frozen_layers, phase.strategy, phase.lr,
                                        phase.backbone_lr_mult)
            plans.append(plan)
            snap = snapshot_frozen(model)
            optimizer = _optimizer(groups, train_cfg)
            lrs = {g["name"]: g["lr"] for g in groups}
            log(f"round {r}: {phase.strategy}, {plan.frozen_layers} block(s) frozen, "
                f"{plan.trainable:,}/{plan.total:,} parameters train, up to {phase.epochs} epochs")
            stale = 0
            for _ in range(phase.epochs):
                epoch_total += 1
                train_loss = _train_epoch(model, train, optimizer, loss_fn,
                                          train_cfg.batch_size, generator)
                proba = predict_proba(model, val.x)
                val_loss = float(nn.functional.nll_loss(
                    torch.log(torch.from_numpy(proba).clamp(min=1e-12)), val.y))
                report = classification_report(val.y.numpy(), proba, classes)
                writer.writerow({
                    "round": r, "epoch": epoch_total, "train_loss": round(train_loss, 6),
                    "val_loss": round(val_loss, 6), "val_accuracy": round(report["accuracy"], 6),
                    "val_auroc": None if report["auroc"] is None else round(report["auroc"], 6),
                    "val_f1": round(report["f1"], 6), "lr_head": lrs["head"],
                    "lr_backbone": lrs.get("backbone", 0.0), "trainable_params": plan.trainable})
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
            "plan_text": "\n\n".join(f"round {i}\n{p.as_text()}" for i, p in
                                     enumerate(plans, start=1)),
            "freeze_check": {"frozen_tensors": sum(c["frozen_tensors"] for c in checks),
                             "unchanged": all(c["unchanged"] for c in checks)}}


def _train_epoch(model: nn.Module, data: Tensors, optimizer: torch.optim.Optimizer,
                 loss_fn: nn.Module, batch_size: int, generator: torch.Generator) -> float:
    model.train()
    order = torch.randperm(len(data.y), generator=generator)
    total, seen = 0.0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) == 1 and len(order) > 1:
            continue  # a single row breaks BatchNorm and adds only noise
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(data.x[idx]), data.y[idx])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)
