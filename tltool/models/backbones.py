"""Backbone registry: name -> BackboneSpec (a builder and an ordered list of freezable blocks),
for the built-in backbones and any timm model (`timm:NAME`).

The specs live with their builders: tabular (tltool.models.tabular_backbones), torchvision
(tltool.models.torchvision_backbones), EfficientNet-Lite0 (tltool.models.efficientnet_lite),
small image backbones (tltool.models.small_images) and timm (tltool.models.timm_backbones).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from tltool.config.scalars import STRICT_TYPE
from tltool.errors import ConfigError
from tltool.models.base import Backbone, BackboneSpec
from tltool.models.efficientnet_lite import LITE0_SPEC
from tltool.models.small_images import SMALL_IMAGE_BACKBONES
from tltool.models.tabular_backbones import TABULAR_BACKBONES
from tltool.models.timm_backbones import is_timm, timm_spec
from tltool.models.torchvision_backbones import TORCHVISION_BACKBONES
from tltool.suggest import did_you_mean

# Image backbones (torchvision, EfficientNet-Lite0, a small CNN, pixels), in this order.
IMAGE_BACKBONES: dict[str, BackboneSpec] = {**TORCHVISION_BACKBONES,
                                            "efficientnet_lite0": LITE0_SPEC,
                                            **SMALL_IMAGE_BACKBONES}
BACKBONES: dict[str, BackboneSpec] = {**TABULAR_BACKBONES, **IMAGE_BACKBONES}


def get_spec(name: str) -> BackboneSpec:
    """The spec of backbone `name` (a built-in name or timm:NAME); ConfigError naming the
    choices otherwise."""
    if is_timm(name):
        return timm_spec(name)
    if name not in BACKBONES:
        hint = did_you_mean(name, BACKBONES, around=("", " "))
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
            elif err["type"] == STRICT_TYPE:  # its message names the value given
                problems.append(f"model.backbone_args.{key}: {err['msg']}")
            else:
                problems.append(f"model.backbone_args.{key}: {err['msg'].lower()}; "
                                f"got {err.get('input')!r}")
        raise ConfigError("\n".join(problems)) from None


def build_backbone(name: str, args: dict[str, Any], in_features: int) -> Backbone:
    """A freshly initialised backbone `name` with options `args` for `in_features` inputs."""
    spec = get_spec(name)
    return spec.build(spec.args.model_validate(args), in_features)
