"""Models: a backbone (freezable blocks) + a head, rebuilt from a plain-dict spec."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tltool.models.backbones import Backbone, build_backbone


def build_head(kind: str, in_features: int, n_outputs: int, hidden: int,
               dropout: float) -> nn.Module:
    """linear: one Linear layer; mlp: Linear -> ReLU -> Linear; multilabel: one shared Linear
    layer giving a logit per label (the sigmoid lives in the loss and in prediction)."""
    drop = [nn.Dropout(dropout)] if dropout else []
    if kind in ("linear", "multilabel"):
        return nn.Sequential(*drop, nn.Linear(in_features, n_outputs))
    if kind == "mlp":
        return nn.Sequential(*drop, nn.Linear(in_features, hidden), nn.ReLU(),
                             nn.Linear(hidden, n_outputs))
    raise ValueError(f"unknown head {kind!r}")


class TransferModel(nn.Module):
    """backbone -> head. Frozen blocks stay in inference mode in train(): a frozen block is a
    fixed function (no dropout, no BatchNorm statistics updates), so its output can be cached."""

    def __init__(self, backbone: Backbone, head: nn.Module, spec: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        # Regression: the head's output is the standardised label; tltool.engine.Task maps it
        # to the label's units (mean + std x output) in float64. Fixed by the spec.
        self.target_scale = tuple(spec["target_scale"]) if spec.get("target_scale") else None
        # Set by tltool.freeze.apply_freeze: modules kept in eval mode, and BatchNorm layers
        # inside them that should still adapt their statistics (bn_policy "train").
        self.frozen_modules: list[nn.Module] = []
        self.adapting_norms: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_from(self, z: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the cached output of the first `start` backbone blocks."""
        return self.head(self.backbone.forward_from(z, start))

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode:
            for module in self.frozen_modules:
                module.eval()
            for module in self.adapting_norms:
                module.train()
        return self


def model_spec(backbone: str, backbone_args: dict[str, Any], in_features: int, head: str,
               head_hidden: int, dropout: float, n_outputs: int,
               target_scale: tuple[float, float] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild the architecture; stored in every checkpoint."""
    spec = {"backbone": backbone, "backbone_args": backbone_args, "in_features": in_features,
            "head": head, "head_hidden": head_hidden, "dropout": dropout, "n_outputs": n_outputs}
    if target_scale is not None:
        spec["target_scale"] = [float(v) for v in target_scale]
    return spec


def build_model(spec: dict[str, Any]) -> TransferModel:
    backbone = build_backbone(spec["backbone"], spec["backbone_args"], spec["in_features"])
    head = build_head(spec["head"], backbone.out_features, spec["n_outputs"],
                      spec["head_hidden"], spec["dropout"])
    return TransferModel(backbone, head, spec)
