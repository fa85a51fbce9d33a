"""Freeze plans: which parameters train, at which learning rate, and a check that frozen ones
did not move.

Decided once before training and written to the run folder; the training loop only sees the
resulting optimiser parameter groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tltool.errors import ConfigError
from tltool.models import TransferModel

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class FreezePlan:
    strategy: str
    frozen_layers: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(r["trainable"] for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r["params"] for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "frozen_layers": self.frozen_layers,
                "trainable_params": self.trainable, "total_params": self.total,
                "blocks": self.rows}

    def as_text(self) -> str:
        lines = [f"strategy={self.strategy} frozen_layers={self.frozen_layers} "
                 f"trainable={self.trainable:,} of {self.total:,} parameters",
                 f"{'block':<12} {'state':<10} {'bn':<6} {'lr':>10} {'params':>10} "
                 f"{'trainable':>10}"]
        for r in self.rows:
            lines.append(f"{r['block']:<12} {r['state']:<10} {r['bn']:<6} {r['lr']:>10.3g} "
                         f"{r['params']:>10,} {r['trainable']:>10,}")
        return "\n".join(lines)


def check_frozen_layers(frozen_layers: int, strategy: str, n_blocks: int, names: list[str],
                        where: str = "model.frozen_layers") -> None:
    if frozen_layers > n_blocks:
        raise ConfigError(f"{where} = {frozen_layers} but the backbone has {n_blocks} blocks "
                          f"({', '.join(names)}); allowed: 0..{n_blocks}")
    if strategy == "full" and frozen_layers:
        raise ConfigError(f"{where} = {frozen_layers} with strategy 'full', which trains every "
                          f"block; set it to 0 or use strategy 'freeze'")


def apply_freeze(model: TransferModel, frozen_layers: int, strategy: str, lr: float,
                 backbone_lr_mult: float) -> tuple[FreezePlan, list[dict[str, Any]]]:
    """Set requires_grad and BN modes; return the plan and the optimiser parameter groups."""
    blocks = model.backbone.blocks
    names = model.backbone.block_names
    check_frozen_layers(frozen_layers, strategy, len(blocks), names)
    n_frozen = len(blocks) if strategy == "linear_probe" else frozen_layers
    plan = FreezePlan(strategy, n_frozen)
    backbone_lr = lr * backbone_lr_mult
    backbone_params: list[nn.Parameter] = []
    model.frozen_norms = []
    for i, (name, block) in enumerate(zip(names, blocks, strict=True)):
        frozen = i < n_frozen or backbone_lr == 0
        for pname, p in block.named_parameters():
            train_it = not frozen and (strategy != "bias_only" or pname.endswith("bias"))
            p.requires_grad_(train_it)
            if train_it:
                backbone_params.append(p)
        norms = [m for m in block.modules() if isinstance(m, _NORMS)]
        if frozen:
            model.frozen_norms.extend(norms)
        state = "frozen" if frozen else ("bias_only" if strategy == "bias_only" else "trainable")
        plan.rows.append(_row(name, block, state, "eval" if frozen and norms else
                              ("train" if norms else "-"), 0.0 if frozen else backbone_lr))
    for p in model.head.parameters():
        p.requires_grad_(True)
    plan.rows.append(_row("head", model.head, "trainable", "-", lr))
    groups = [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": backbone_lr, "name": "backbone"})
    return plan, groups


def _row(name: str, module: nn.Module, state: str, bn: str, lr: float) -> dict[str, Any]:
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"block": name, "state": state, "bn": bn, "lr": lr, "params": params,
            "trainable": trainable}


def snapshot_frozen(model: TransferModel) -> dict[str, torch.Tensor]:
    """Copies of every frozen parameter and of the buffers (BN statistics) of frozen norms."""
    snap = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen_ids = {id(m) for m in model.frozen_norms}
    for mname, module in model.named_modules():
        if id(module) in frozen_ids:
            for bname, buf in module.named_buffers(recurse=False):
                snap[f"{mname}.{bname}"] = buf.detach().clone()
    return snap


def verify_unchanged(model: TransferModel, snap: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Compare against a snapshot; a changed frozen tensor is a bug, so it raises."""
    current = dict(model.named_parameters()) | dict(model.named_buffers())
    changed = [n for n, t in snap.items() if not torch.equal(current[n], t)]
    if changed:
        raise RuntimeError(f"frozen tensors changed during training: {', '.join(changed)}")
    return {"frozen_tensors": len(snap), "unchanged": True}
