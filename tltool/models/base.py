"""The types every backbone builder makes: `Backbone` (freezable blocks run in order) and
`BackboneSpec` (how to build one, its options, pretrained weights and input normalisation),
with the small pieces the builders share.

A backbone is an `nn.Module` with `blocks` (an `nn.ModuleList` run in order), `block_names`
(documented names, the unit of `frozen_layers`) and `out_features`. Adding a backbone means
adding one spec to the registry (tltool.models.backbones); freezing, caching and extraction
work on `blocks` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from tltool.errors import ConfigError

HALF = [0.5, 0.5, 0.5]


class Backbone(nn.Module):
    """Blocks applied in order; `forward_blocks(x, n)` stops after the first n."""

    def __init__(self, blocks: list[nn.Module], names: list[str], out_features: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.block_names = list(names)
        self.out_features = out_features
        # Memory layout of each block's 4-d input and weights (None: leave as it comes); set
        # by tltool.runtime (channels-last where it is faster, block by block).
        self.layouts: list[torch.memory_format | None] = [None] * len(self.blocks)

    def set_layout(self, i: int, fmt: torch.memory_format | None) -> None:
        """Run block i in `fmt` (torch.channels_last or torch.contiguous_format)."""
        if fmt is not None:
            self.blocks[i].to(memory_format=fmt)
        self.layouts[i] = fmt

    def laid_out(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x in the layout block i runs in (a no-op when it already is, or x is not 4-d)."""
        fmt = self.layouts[i] if i < len(self.layouts) else None
        return x.contiguous(memory_format=fmt) if fmt is not None and x.dim() == 4 else x

    def forward_blocks(self, x: torch.Tensor, n: int | None = None,
                       pool: bool = True) -> torch.Tensor:
        """Output of the first n blocks (all by default); feature maps are average-pooled to a
        vector when `pool` (what extraction wants), kept as maps otherwise (prefix caching)."""
        for i, block in enumerate(self.blocks[: len(self.blocks) if n is None else n]):
            x = block(self.laid_out(x, i))
        return self.pool(x) if pool else x

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Run blocks[start:] on the output of the first `start` blocks (a cached prefix)."""
        for i, block in enumerate(self.blocks[start:], start=start):
            x = block(self.laid_out(x, i))
        return self.pool(x)

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, C, H, W) -> channel means; token sequences (N, T, D) -> the first
        (class) token; vectors stay as they are."""
        if x.dim() == 4:
            return x.mean(dim=(2, 3))
        if x.dim() == 3:
            return x[:, 0]
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(x)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and, for images, which pretrained weights and input it wants.

    build(args, n_inputs): n_inputs is the feature count for tabular backbones and the input
    channel count (3) for image backbones. load_weights(backbone, name) loads a named pretrained
    set (raising a TLError with what to do when it cannot); norm(name) gives the (mean, std)
    per channel that the named weights expect (name None: no pretrained weights).
    """

    name: str
    input: str  # "tabular" (a feature vector) or "image"
    args: type[BaseModel]
    build: Callable[[Any, int], Backbone]
    description: str
    default_size: int | None = None  # image side the weights were trained at
    weights: tuple[str, ...] = ()  # names accepted by model.weights, e.g. "IMAGENET1K_V1"
    load_weights: Callable[[Backbone, str], None] | None = None
    norm: Callable[[str | None], tuple[list[float], list[float]]] | None = None


class NoArgs(BaseModel):
    """The torchvision CNNs have no options: their architecture is fixed by their weights."""

    model_config = ConfigDict(extra="forbid")


def require_rgb(name: str, n_inputs: int) -> None:
    """Raise ConfigError unless an image backbone gets 3 input channels."""
    if n_inputs != 3:
        raise ConfigError(f"model.backbone {name} takes 3-channel (RGB) images, got "
                          f"{n_inputs} input channels")


def half_norm(name: str | None) -> tuple[list[float], list[float]]:
    """0.5 / 0.5 per channel: inputs scaled to [-1, 1], whatever the weights."""
    return list(HALF), list(HALF)
