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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FreezePlan:
        """A plan as as_dict wrote it (a resumed run's earlier rounds)."""
        return cls(d["strategy"], d["frozen_layers"], list(d["blocks"]))

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


def apply_freeze(model: TransferModel, rnd, bn_policy: str = "eval",
                 layer_decay: float | None = None) -> tuple[FreezePlan, list[dict[str, Any]]]:
    """Set requires_grad and BN modes for a round (`rnd`: its frozen_layers, strategy, lr and
    backbone_lr_mult, tltool.engine.plan.Round); return the plan and the optimiser parameter
    groups.

    bn_policy "eval": BatchNorm in frozen blocks stays in inference mode (statistics fixed);
    "train": their running statistics keep adapting to the new data while weights stay frozen
    (AdaBN-style domain adaptation). layer_decay d: block i of n trains at
    lr * backbone_lr_mult * d**(n-1-i), so earlier, more generic blocks move less.
    """
    frozen_layers, strategy = rnd.frozen_layers, rnd.strategy
    lr, backbone_lr_mult = rnd.lr, rnd.backbone_lr_mult
    blocks = model.backbone.blocks
    names = model.backbone.block_names
    check_frozen_layers(frozen_layers, strategy, len(blocks), names)
    n_frozen = len(blocks) if strategy == "linear_probe" else frozen_layers
    plan = FreezePlan(strategy, n_frozen)
    groups: list[dict[str, Any]] = []
    model.frozen_modules, model.adapting_norms = [], []
    for i, (name, block) in enumerate(zip(names, blocks, strict=True)):
        block_lr = lr * backbone_lr_mult * (layer_decay or 1.0) ** (len(blocks) - 1 - i)
        frozen = i < n_frozen or block_lr == 0
        params = []
        for pname, p in block.named_parameters():
            train_it = not frozen and (strategy != "bias_only" or pname.endswith("bias"))
            p.requires_grad_(train_it)
            if train_it:
                params.append(p)
        if params:
            groups.append({"params": params, "lr": block_lr, "name": name})
        norms = [m for m in block.modules() if isinstance(m, _NORMS)]
        if frozen:
            model.frozen_modules.append(block)
            if bn_policy == "train":
                model.adapting_norms.extend(norms)
        elif strategy == "bias_only":
            model.frozen_modules.extend(norms)  # bias-only: weights and statistics stay put
        bn = ("eval" if frozen and bn_policy == "eval" or strategy == "bias_only" and
              not frozen else "train") if norms else "-"
        state = "frozen" if frozen else ("bias_only" if strategy == "bias_only" else "trainable")
        plan.rows.append(_row(name, block, state, bn, 0.0 if frozen else block_lr))
    for p in model.head.parameters():
        p.requires_grad_(True)
    plan.rows.append(_row("head", model.head, "trainable", "-", lr))
    groups.insert(0, {"params": list(model.head.parameters()), "lr": lr, "name": "head"})
    bias = getattr(model, "domain_bias", None)
    if bias is not None:  # pooled training: the source rows' own output offset
        bias.requires_grad_(True)
        groups.insert(1, {"params": [bias], "lr": lr, "name": "domain"})
        plan.rows.append({"block": "domain", "state": "trainable", "bn": "-", "lr": lr,
                          "params": bias.numel(), "trainable": bias.numel()})
    return plan, groups


def _row(name: str, module: nn.Module, state: str, bn: str, lr: float) -> dict[str, Any]:
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"block": name, "state": state, "bn": bn, "lr": lr, "params": params,
            "trainable": trainable}


def snapshot_frozen(model: TransferModel) -> dict[str, torch.Tensor]:
    """Copies of every frozen parameter and of the buffers (BN statistics) of frozen modules,
    except the statistics that bn_policy "train" lets adapt."""
    snap = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapting = {id(m) for m in model.adapting_norms}
    frozen = {id(m) for m in model.frozen_modules}
    for mname, module in model.named_modules():
        if id(module) in frozen:
            for sub, child in module.named_modules(prefix=mname):
                if id(child) in adapting:
                    continue
                for bname, buf in child.named_buffers(recurse=False):
                    snap[f"{sub}.{bname}"] = buf.detach().clone()
    return snap


def verify_unchanged(model: TransferModel, snap: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Compare against a snapshot; a changed frozen tensor is a bug, so it raises."""
    current = dict(model.named_parameters()) | dict(model.named_buffers())
    changed = [n for n, t in snap.items() if not torch.equal(current[n], t)]
    if changed:
        raise RuntimeError(f"frozen tensors changed during training: {', '.join(changed)}")
    return {"frozen_tensors": len(snap), "unchanged": True}
