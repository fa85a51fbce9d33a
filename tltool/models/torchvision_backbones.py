"""torchvision backbones: torchvision's ImageNet networks re-grouped into freezable blocks, and
their pretrained weights (torchvision's weight names, read through torch's hub cache).

Every network is built by torchvision (weights=None) and its module objects are re-grouped,
not re-implemented, into an ordered list of blocks: the unit of `frozen_layers: N` (the first N
are frozen). The last block always ends with global pooling (+ the net's own final norm where
it has one) and flatten, so the backbone returns (N, out_features). Resolution is given as the
stride of a block's output relative to the input (/4 = a quarter of the side).

| backbone           | blocks (in order)                                                  | out  |
|--------------------|--------------------------------------------------------------------|------|
| resnet18/34/50     | stem (conv1 bn1 relu maxpool, /4), layer1 (/4), layer2 (/8),       | 512/ |
|                    | layer3 (/16), layer4 (/32) + avgpool                               | 512/ |
|                    |                                                                    | 2048 |
| mobilenet_v3_small | stem (features[0], /2), stage1 (features[1], /4), stage2 ([2:4],   | 576  |
|                    | /8), stage3 ([4:9], /16), stage4 ([9:12] + last conv [12], /32)    |      |
|                    | + avgpool                                                          |      |
| mobilenet_v3_large | stem (features[0:2], /2), stage1 ([2:4], /4), stage2 ([4:7], /8),  | 960  |
|                    | stage3 ([7:13], /16), stage4 ([13:16] + last conv [16], /32)       |      |
|                    | + avgpool                                                          |      |
| efficientnet_b0    | stem (features[0], /2), stage1..stage7 (features[1..7], the MBConv | 1280 |
|                    | stages: /2 /4 /8 /16 /16 /32 /32), conv_head (conv features[8])    |      |
|                    | + pool                                                             |      |
| convnext_tiny      | stem (4x4 patchify + LayerNorm2d, /4), stage1 (/4), stage2..stage4 | 768  |
|                    | (each = its 2x2 downsampling layer + its ConvNeXt blocks: /8 /16   |      |
|                    | /32); stage4 + avgpool + the classifier's LayerNorm2d              |      |
| vit_b_16           | embed (16x16 patchify conv + class token + position embedding +    | 768  |
|                    | dropout), encoder1..encoder12 (one transformer layer each);        |      |
|                    | encoder12 + final LayerNorm, returns the class token               |      |

Parameters per block (default options, 3 input channels; vit_b_16 at image_size 224):
resnet18 9,536 / 147,968 / 525,568 / 2,099,712 / 8,393,728 (11.2 M);
resnet34 9,536 / 221,952 / 1,116,416 / 6,822,400 / 13,114,368 (21.3 M);
resnet50 9,536 / 215,808 / 1,219,584 / 7,098,368 / 14,964,736 (23.5 M);
mobilenet_v3_small 464 / 744 / 9,280 / 180,032 / 736,488 (0.93 M);
mobilenet_v3_large 928 / 7,880 / 52,312 / 731,368 / 2,179,464 (2.97 M);
efficientnet_b0 928 / 1,448 / 16,714 / 46,640 / 242,930 / 543,148 / 2,026,348 / 717,232 /
412,160 (4.0 M); convnext_tiny 4,896 / 237,888 / 992,256 / 11,112,960 / 15,472,128 (27.8 M);
vit_b_16 742,656 (embed) / 7,087,872 x 11 / 7,089,408 (encoder12 + LayerNorm) (85.8 M).

Pretrained weights (`model.weights` names, spec.weights): the names of torchvision's weight
enum for that model (e.g. DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2), read from torch's hub cache
(`torch.hub.get_dir()/checkpoints/<file>`) and downloaded there when missing. Offline and not
cached -> CheckpointError naming the file, its URL and what to do.

Input normalisation (spec.norm(name) -> (mean, std) per channel): mean/std of the named
weights' own transforms() (the ImageNet statistics [0.485, 0.456, 0.406] / [0.229, 0.224,
0.225] for every set offered here). Without named weights (None, "none", a checkpoint path) the
same ImageNet statistics: harmless for a randomly initialised net, and the scale matches the
one its pretrained weights would want. default_size: 224 for every net (the crop size of its
torchvision weights). vit_b_16 runs only at its `image_size` (default 224, a multiple of 16);
position embeddings of pretrained weights are interpolated when it differs from theirs.

torchvision is imported only when an image backbone is built or loaded, so that tabular
commands do not pay its import time.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tltool.config.scalars import Int
from tltool.errors import CheckpointError, ConfigError
from tltool.models.base import Backbone, BackboneSpec, NoArgs, require_rgb
from tltool.models.library import library_backbone, load_library_state

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# torchvision's weight names per model ("DEFAULT" is an alias of the recommended set). Kept
# literal so that listing backbones does not import torchvision; a test checks them against
# torchvision.models.get_model_weights.
TORCHVISION_WEIGHTS: dict[str, tuple[str, ...]] = {
    "resnet18": ("DEFAULT", "IMAGENET1K_V1"),
    "resnet34": ("DEFAULT", "IMAGENET1K_V1"),
    "resnet50": ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"),
    "mobilenet_v3_small": ("DEFAULT", "IMAGENET1K_V1"),
    "mobilenet_v3_large": ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"),
    "efficientnet_b0": ("DEFAULT", "IMAGENET1K_V1"),
    "convnext_tiny": ("DEFAULT", "IMAGENET1K_V1"),
    "vit_b_16": ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_SWAG_E2E_V1",
                 "IMAGENET1K_SWAG_LINEAR_V1"),
}


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


# --------------------------------------------------------------------------------------------
# torchvision networks -> blocks


def _resnet(m: nn.Module) -> tuple[list[nn.Module], list[str], int]:
    blocks = [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2, m.layer3,
              nn.Sequential(m.layer4, _pool())]
    return blocks, ["stem", "layer1", "layer2", "layer3", "layer4"], m.fc.in_features


# Index in `features` where stage1..stage4 start: each stage starts at a stride-2 block, and
# the stride-1 block of mobilenet_v3_large at /2 joins the stem.
_MOBILENET_STAGES = {"mobilenet_v3_small": (1, 2, 4, 9), "mobilenet_v3_large": (2, 4, 7, 13)}


def _mobilenet(starts: tuple[int, ...]) -> Callable[[nn.Module], Any]:
    def regroup(m: nn.Module) -> tuple[list[nn.Module], list[str], int]:
        f = m.features
        blocks: list[nn.Module] = [nn.Sequential(*f[a:b])
                                   for a, b in pairwise((0, *starts, len(f)))]
        blocks[-1] = nn.Sequential(*blocks[-1], _pool())  # ends with the 1x1 conv to 576/960
        names = ["stem"] + [f"stage{i}" for i in range(1, len(blocks))]
        return blocks, names, m.classifier[0].in_features

    return regroup


def _efficientnet(m: nn.Module) -> tuple[list[nn.Module], list[str], int]:
    f = m.features
    blocks = [f[0], *f[1:8], nn.Sequential(f[8], _pool())]
    names = ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["conv_head"]
    return blocks, names, m.classifier[1].in_features


def _convnext(m: nn.Module) -> tuple[list[nn.Module], list[str], int]:
    f, norm, flatten, linear = m.features, m.classifier[0], m.classifier[1], m.classifier[2]
    # A downsampling layer opens the stage at its new resolution (as in the ConvNeXt paper);
    # the classifier's LayerNorm2d belongs to the features, only its Linear is dropped.
    blocks = [f[0], f[1], nn.Sequential(f[2], f[3]), nn.Sequential(f[4], f[5]),
              nn.Sequential(f[6], f[7], m.avgpool, norm, flatten)]
    return blocks, ["stem", "stage1", "stage2", "stage3", "stage4"], linear.in_features


class ViTEmbed(nn.Module):
    """torchvision ViT input stage: patchify, prepend the class token, add position embeddings.

    Holds the ViT's own conv_proj, class_token, encoder.pos_embedding and encoder.dropout.
    Output: (N, 1 + patches, hidden) tokens.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.image_size = vit.image_size
        self.patch_size = vit.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"vit_b_16 was built for {self.image_size}x{self.image_size} images "
                             f"(backbone_args.image_size), got {x.shape[-2]}x{x.shape[-1]}")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, hidden, h, w) -> (N, h*w, hidden)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTLast(nn.Module):
    """The last encoder layer, the encoder's final LayerNorm, then the class token (N, hidden)."""

    def __init__(self, layer: nn.Module, norm: nn.Module):
        super().__init__()
        self.layer = layer
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layer(x))[:, 0]


def _vit(m: nn.Module) -> tuple[list[nn.Module], list[str], int]:
    layers = list(m.encoder.layers)
    blocks = [ViTEmbed(m), *layers[:-1], ViTLast(layers[-1], m.encoder.ln)]
    names = ["embed"] + [f"encoder{i}" for i in range(1, len(layers) + 1)]
    return blocks, names, m.hidden_dim


_REGROUP: dict[str, Callable[[nn.Module], tuple[list[nn.Module], list[str], int]]] = {
    "resnet18": _resnet, "resnet34": _resnet, "resnet50": _resnet,
    "mobilenet_v3_small": _mobilenet(_MOBILENET_STAGES["mobilenet_v3_small"]),
    "mobilenet_v3_large": _mobilenet(_MOBILENET_STAGES["mobilenet_v3_large"]),
    "efficientnet_b0": _efficientnet, "convnext_tiny": _convnext, "vit_b_16": _vit,
}


def from_torchvision(arch: str, model: nn.Module) -> Backbone:
    """Re-group a torchvision classifier (built or loaded elsewhere) into a Backbone that shares
    its modules; only the final Linear classifier is left out."""
    blocks, names, out_features = _REGROUP[arch](model)
    return library_backbone(model, blocks, names, out_features)


# --------------------------------------------------------------------------------------------
# torchvision pretrained weights


def _torchvision_weights(arch: str, name: str) -> Any:
    allowed = TORCHVISION_WEIGHTS[arch]
    if name not in allowed:
        raise ConfigError(f"model.weights: {arch} has no pretrained weights {name!r}; allowed: "
                          f"{', '.join(allowed)} (or none, a run folder, a checkpoint file)")
    from torchvision.models import get_model_weights

    return get_model_weights(arch)[name]


def hub_state_dict(url: str, what: str) -> dict[str, torch.Tensor]:
    """The state dict at `url`, from torch's hub cache or downloaded into it (hash checked).

    Any failure becomes a one-line CheckpointError: which file was expected where, the URL, and
    what to do, so that an offline machine gets instructions instead of a network traceback.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    cached = path.is_file()
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=str(path.parent),
                                                  map_location="cpu", progress=False,
                                                  check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, OSError, hash mismatch, unreadable file
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        if cached:
            raise CheckpointError(f"{what}: cannot read the cached weights file {path} "
                                  f"({reason}); delete it so that it is downloaded again from "
                                  f"{url}, or copy a good copy there") from None
        raise CheckpointError(
            f"{what}: the weights file {path} is not in the torch hub cache and downloading it "
            f"from {url} failed ({reason}); download it on a machine with network access and "
            f"copy it to {path} (the folder follows $TORCH_HOME), or set model.weights to a "
            f"local checkpoint file, or to none") from None


def _fit_vit_positions(state: dict[str, torch.Tensor], backbone: Backbone) -> dict:
    """Interpolate a ViT's position embeddings to the backbone's image_size when they differ
    (e.g. SWAG E2E weights, trained at 384 px, into a 224 px model)."""
    embed = backbone.blocks[0]
    if state["encoder.pos_embedding"].shape == embed.pos_embedding.shape:
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    return interpolate_embeddings(embed.image_size, embed.patch_size, state)


def _torchvision_loader(arch: str) -> Callable[[Backbone, str], None]:
    def load_weights(backbone: Backbone, name: str) -> None:
        """Load torchvision's named ImageNet weights (via the hub cache) into the backbone."""
        weights = _torchvision_weights(arch, name)
        what = f"model.weights {name} of {arch}"
        state = hub_state_dict(weights.url, what)
        if arch == "vit_b_16":
            state = _fit_vit_positions(state, backbone)
        load_library_state(backbone, state, what)

    return load_weights


def _torchvision_norm(arch: str) -> Callable[[str | None], tuple[list[float], list[float]]]:
    def norm(name: str | None) -> tuple[list[float], list[float]]:
        """mean/std of the named weights' transforms; ImageNet statistics otherwise."""
        if name not in TORCHVISION_WEIGHTS[arch]:
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        transform = _torchvision_weights(arch, name).transforms()
        return [float(v) for v in transform.mean], [float(v) for v in transform.std]

    return norm


# --------------------------------------------------------------------------------------------
# torchvision builders and their options


class ViTArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: Int = Field(224, ge=16, multiple_of=16, description="input side in pixels "
                            "(a multiple of the 16 px patch); pretrained position embeddings "
                            "are interpolated to it")


def _torchvision_builder(arch: str) -> Callable[[BaseModel, int], Backbone]:
    def build(args: BaseModel, n_inputs: int = 3) -> Backbone:
        """Randomly initialised torchvision `arch`, re-grouped into blocks."""
        require_rgb(arch, n_inputs)
        from torchvision.models import get_model

        return from_torchvision(arch, get_model(arch, weights=None, **args.model_dump()))

    return build


# --------------------------------------------------------------------------------------------
# Registry


_TORCHVISION_DESCRIPTIONS = {
    "resnet18": "ResNet-18 (torchvision); blocks: stem (conv1 bn1 relu maxpool, /4), layer1 "
                "(/4), layer2 (/8), layer3 (/16), layer4 (/32) + avgpool -> 512",
    "resnet34": "ResNet-34 (torchvision); blocks: stem (conv1 bn1 relu maxpool, /4), layer1 "
                "(/4), layer2 (/8), layer3 (/16), layer4 (/32) + avgpool -> 512",
    "resnet50": "ResNet-50 (torchvision); blocks: stem (conv1 bn1 relu maxpool, /4), layer1 "
                "(/4), layer2 (/8), layer3 (/16), layer4 (/32) + avgpool -> 2048",
    "mobilenet_v3_small": "MobileNetV3-Small (torchvision); blocks by resolution: stem "
                          "(features[0], /2), stage1 ([1], /4), stage2 ([2:4], /8), stage3 "
                          "([4:9], /16), stage4 ([9:13] incl. the last 1x1 conv, /32) + "
                          "avgpool -> 576",
    "mobilenet_v3_large": "MobileNetV3-Large (torchvision); blocks by resolution: stem "
                          "(features[0:2], /2), stage1 ([2:4], /4), stage2 ([4:7], /8), stage3 "
                          "([7:13], /16), stage4 ([13:17] incl. the last 1x1 conv, /32) + "
                          "avgpool -> 960",
    "efficientnet_b0": "EfficientNet-B0 (torchvision); blocks: stem (/2), stage1..stage7 (the "
                       "MBConv stages features[1..7]), conv_head (1x1 conv features[8]) + avgpool "
                       "-> 1280",
    "convnext_tiny": "ConvNeXt-Tiny (torchvision); blocks: stem (patchify, /4), stage1 (/4), "
                     "stage2..stage4 (downsampling layer + ConvNeXt blocks, /8 /16 /32); stage4 "
                     "ends with avgpool + the classifier's LayerNorm2d -> 768",
    "vit_b_16": "ViT-B/16 (torchvision); blocks: embed (patchify + class token + position "
                "embedding), encoder1..encoder12 (one transformer layer each); encoder12 ends "
                "with the final LayerNorm and returns the class token -> 768; fixed input side "
                "image_size (default 224)",
}


def _torchvision_spec(arch: str) -> BackboneSpec:
    return BackboneSpec(
        name=arch, input="image", args=ViTArgs if arch == "vit_b_16" else NoArgs,
        build=_torchvision_builder(arch), description=_TORCHVISION_DESCRIPTIONS[arch],
        default_size=224, weights=TORCHVISION_WEIGHTS[arch],
        load_weights=_torchvision_loader(arch), norm=_torchvision_norm(arch))


TORCHVISION_BACKBONES: dict[str, BackboneSpec] = {arch: _torchvision_spec(arch)
                                                  for arch in TORCHVISION_WEIGHTS}
