"""Tabular backbones: a multilayer perceptron, a residual MLP, and `raw` (no blocks).

Each takes the encoded table row (standardised numbers, one-hot categories) of `in_features`
values; its blocks are the unit of `frozen_layers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tltool.config.scalars import Bool, Float, Int
from tltool.models.base import Backbone, BackboneSpec

# Widest hidden layer accepted: wider tables models are a typo, not a design (memory).
MAX_WIDTH = 65536


class MLPArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[Annotated[Int, Field(ge=1, le=MAX_WIDTH)]] = Field(
        [64, 32], min_length=1, max_length=64,
        description=f"units of each hidden block (1 to {MAX_WIDTH:,})")
    activation: str = Field("relu", pattern="^(relu|gelu|tanh)$", description="relu|gelu|tanh")
    batch_norm: Bool = Field(False, description="BatchNorm1d after each hidden Linear")
    dropout: Float = Field(0.0, ge=0, lt=1, description="dropout at the end of each block")


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU,
                                                    "tanh": nn.Tanh}


def build_mlp(args: MLPArgs, in_features: int) -> Backbone:
    """hidden1..hiddenK: Linear -> [BatchNorm1d] -> activation -> [Dropout] each."""
    blocks, width = [], in_features
    for units in args.hidden:
        layers: list[nn.Module] = [nn.Linear(width, units)]
        if args.batch_norm:
            layers.append(nn.BatchNorm1d(units))
        layers.append(_ACTIVATIONS[args.activation]())
        if args.dropout:
            layers.append(nn.Dropout(args.dropout))
        blocks.append(nn.Sequential(*layers))
        width = units
    return Backbone(blocks, [f"hidden{i + 1}" for i in range(len(blocks))], width)


class ResMLPArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: Int = Field(64, gt=0, le=MAX_WIDTH, description="units of the stem and every "
                       "residual block")
    depth: Int = Field(2, ge=1, le=256, description="number of residual blocks after the stem")
    dropout: Float = Field(0.0, ge=0, lt=1, description="dropout inside each residual block")


class _Residual(nn.Module):
    """x + f(x), f = LayerNorm -> Linear -> ReLU -> Dropout -> Linear (a tabular ResNet block)."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.f = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(),
                               nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def build_resmlp(args: ResMLPArgs, in_features: int) -> Backbone:
    """stem (Linear -> ReLU), res1..resD (residual blocks); the last ends with LayerNorm ->
    ReLU."""
    blocks: list[nn.Module] = [nn.Sequential(nn.Linear(in_features, args.width), nn.ReLU())]
    blocks += [_Residual(args.width, args.dropout) for _ in range(args.depth)]
    tail = nn.Sequential(nn.LayerNorm(args.width), nn.ReLU())
    blocks[-1] = nn.Sequential(blocks[-1], tail)  # normalise the output the head sees
    names = ["stem"] + [f"res{i + 1}" for i in range(args.depth)]
    return Backbone(blocks, names, args.width)


class RawArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


def build_raw(args: RawArgs, in_features: int) -> Backbone:
    """No blocks: the encoded table row itself is the feature vector (for the classic heads,
    e.g. logistic regression on the raw table)."""
    return Backbone([], [], in_features)


TABULAR_BACKBONES: dict[str, BackboneSpec] = {
    "mlp": BackboneSpec("mlp", "tabular", MLPArgs, build_mlp,
                        "multilayer perceptron; one block per hidden layer"),
    "resmlp": BackboneSpec("resmlp", "tabular", ResMLPArgs, build_resmlp,
                           "residual MLP for tables: a stem, then `depth` residual blocks"),
    "raw": BackboneSpec("raw", "tabular", RawArgs, build_raw,
                        "no blocks: the encoded row (standardised numbers, one-hot categories) "
                        "goes to the head as it is; for classic heads on the raw table"),
}
