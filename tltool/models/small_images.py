"""Small image backbones for tiny images (e.g. 28x28 digits): a small CNN, and the raw pixels.

| backbone           | blocks (in order)                                                  | out  |
|--------------------|--------------------------------------------------------------------|------|
| small_cnn          | conv1, conv2, ... (conv3x3 [BN] ReLU maxpool2 each, one per entry  | 128  |
|                    | of `channels`), fc (avg-pool to grid x grid, flatten, Linear ReLU) |      |
| pixels             | pixels (average-pool to grid x grid, grey by default, flatten)     | 784  |

Parameters per block (default options, 3 input channels): small_cnn 928 / 18,560 / 401,536
(0.42 M); pixels none. No pretrained weights; input normalisation 0.5 / 0.5; default_size 28.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from tltool.config.scalars import Bool, Int
from tltool.models.base import Backbone, BackboneSpec, half_norm


class SmallCNNArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: list[Int] = Field([32, 64], min_length=1, description="output channels of each "
                                "conv block (conv3x3 -> [BN] -> ReLU -> 2x2 max-pool)")
    hidden: Int = Field(128, gt=0, description="units of the fc block (the output features)")
    batch_norm: Bool = Field(True, description="BatchNorm2d after each conv")
    grid: Int = Field(7, ge=1, description="feature maps are average-pooled to grid x grid "
                      "before the fc block (7: a no-op for 28 px inputs and two conv blocks)")


def build_small_cnn(args: SmallCNNArgs, n_inputs: int = 3) -> Backbone:
    """conv1..convK (one per entry of `channels`), then fc -> (N, hidden)."""
    blocks: list[nn.Module] = []
    width = n_inputs
    for out in args.channels:
        layers: list[nn.Module] = [nn.Conv2d(width, out, 3, padding=1, bias=not args.batch_norm)]
        if args.batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        blocks.append(nn.Sequential(*layers))
        width = out
    # Pooling to a fixed grid keeps the fc size independent of the input size.
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(args.grid), nn.Flatten(),
                                nn.Linear(width * args.grid ** 2, args.hidden), nn.ReLU()))
    names = [f"conv{i}" for i in range(1, len(args.channels) + 1)] + ["fc"]
    return Backbone(blocks, names, args.hidden)


class PixelArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grid: Int = Field(28, ge=1, le=256, description="images are average-pooled to grid x grid "
                      "pixels")
    channels: Int = Field(1, description="1: the mean of the colour channels (grey); 3: each "
                          "channel")

    @field_validator("channels")
    @classmethod
    def _one_or_three(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError(f"must be 1 or 3, got {value}")
        return value


class _Pixels(nn.Module):
    def __init__(self, grid: int, channels: int):
        super().__init__()
        self.grid, self.channels = grid, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, self.grid)
        if self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        return x.flatten(1)


def build_pixels(args: PixelArgs, n_inputs: int = 3) -> Backbone:
    """One parameter-free block: the normalised pixels (pooled to grid x grid) as features,
    for classic heads on raw pixels (e.g. logistic regression)."""
    return Backbone([_Pixels(args.grid, args.channels)], ["pixels"],
                    args.channels * args.grid ** 2)


SMALL_IMAGE_BACKBONES: dict[str, BackboneSpec] = {
    "small_cnn": BackboneSpec(
        name="small_cnn", input="image", args=SmallCNNArgs, build=build_small_cnn,
        description="small CNN for tiny images (e.g. 28x28); blocks: conv1, conv2 (one per "
                    "`channels` entry: conv3x3 BN ReLU maxpool), fc (pool to 7x7, Linear ReLU) -> "
                    "hidden (128); no pretrained weights",
        default_size=28, weights=(), load_weights=None, norm=half_norm),
    "pixels": BackboneSpec(
        name="pixels", input="image", args=PixelArgs, build=build_pixels,
        description="raw pixels: one parameter-free block (average-pool to grid x grid, grey by "
                    "default) -> channels x grid x grid features; for classic heads on raw pixels",
        default_size=28, weights=(), load_weights=None, norm=half_norm),
}
