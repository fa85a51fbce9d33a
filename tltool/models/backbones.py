"""Backbone registry: name -> spec with a builder and an ordered list of freezable blocks.

A backbone is an `nn.Module` with `blocks` (an `nn.ModuleList` run in order), `block_names`
(documented names, the unit of `frozen_layers`) and `out_features`. Adding a backbone means
adding one spec here; freezing, caching and extraction work on `blocks` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from tltool.errors import ConfigError
from tltool.suggest import did_you_mean


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
        return self._pool(x) if pool else x

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Run blocks[start:] on the output of the first `start` blocks (a cached prefix)."""
        for i, block in enumerate(self.blocks[start:], start=start):
            x = block(self.laid_out(x, i))
        return self._pool(x)

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, C, H, W) -> channel means; token sequences (N, T, D) -> the first
        (class) token; vectors stay as they are."""
        if x.dim() == 4:
            return x.mean(dim=(2, 3))
        if x.dim() == 3:
            return x[:, 0]
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(x)


# Widest hidden layer accepted: wider tables models are a typo, not a design (memory).
MAX_WIDTH = 65536


class MLPArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(
        [64, 32], min_length=1, max_length=64,
        description=f"units of each hidden block (1 to {MAX_WIDTH:,})")
    activation: str = Field("relu", pattern="^(relu|gelu|tanh)$", description="relu|gelu|tanh")
    batch_norm: bool = Field(False, description="BatchNorm1d after each hidden Linear")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout at the end of each block")


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU,
                                                    "tanh": nn.Tanh}


def build_mlp(args: MLPArgs, in_features: int) -> Backbone:
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
    width: int = Field(64, gt=0, le=MAX_WIDTH, description="units of the stem and every "
                       "residual block")
    depth: int = Field(2, ge=1, le=256, description="number of residual blocks after the stem")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout inside each residual block")


class _Residual(nn.Module):
    """x + f(x), f = LayerNorm -> Linear -> ReLU -> Dropout -> Linear (a tabular ResNet block)."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.f = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(),
                               nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def build_resmlp(args: ResMLPArgs, in_features: int) -> Backbone:
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


BACKBONES: dict[str, BackboneSpec] = {
    "mlp": BackboneSpec("mlp", "tabular", MLPArgs, build_mlp,
                        "multilayer perceptron; one block per hidden layer"),
    "resmlp": BackboneSpec("resmlp", "tabular", ResMLPArgs, build_resmlp,
                           "residual MLP for tables: a stem, then `depth` residual blocks"),
    "raw": BackboneSpec("raw", "tabular", RawArgs, build_raw,
                        "no blocks: the encoded row (standardised numbers, one-hot categories) "
                        "goes to the head as it is; for classic heads on the raw table"),
}

# Image backbones (torchvision, EfficientNet-Lite0, a small CNN). vision.py imports Backbone and
# BackboneSpec from this module, so it is imported only here, after both exist.
from tltool.models.vision import IMAGE_BACKBONES  # noqa: E402

BACKBONES.update(IMAGE_BACKBONES)


def get_spec(name: str) -> BackboneSpec:
    if isinstance(name, str) and name.startswith("timm:"):
        from tltool.models.timm_backbones import timm_spec

        return timm_spec(name)
    if name not in BACKBONES:
        hint = did_you_mean(name, BACKBONES, suffix=" ")
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; {hint}"
                          f"available: {', '.join(BACKBONES)}, or timm:NAME (any timm model)")
    return BACKBONES[name]


def resolve_args(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Validate backbone options and fill in their defaults."""
    spec = get_spec(name)
    try:
        return spec.args.model_validate(args).model_dump()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                allowed = (f"allowed: {', '.join(spec.args.model_fields)}"
                           if spec.args.model_fields else f"{name} takes no options "
                           f"(backbone_args: {{}})")
                problems.append(f"model.backbone_args.{key}: unknown option of {name}; "
                                f"{allowed}")
            else:
                problems.append(f"model.backbone_args.{key}: {err['msg'].lower()}; "
                                f"got {err.get('input')!r}")
        raise ConfigError("\n".join(problems)) from None


def build_backbone(name: str, args: dict[str, Any], in_features: int) -> Backbone:
    spec = get_spec(name)
    return spec.build(spec.args.model_validate(args), in_features)
