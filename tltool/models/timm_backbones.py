"""Any timm model as a backbone: `model.backbone: timm:NAME` (pip install timm).

The model is re-grouped into freezable blocks at its feature stages (timm's `feature_info`:
ResNet stem/layer1..4, ConvNeXt stages.0..3, EfficientNet blocks.0..6, ...): each block runs
the model's top-level modules up to the end of one stage, the last block also the modules
between the last stage and the classifier (e.g. EfficientNet's 1x1 head conv). Vision
transformers (timm's VisionTransformer and its relatives) get an `embed` block (patch
embedding, class token, position embedding) and one block per transformer block, the final
norm and the token pooling inside the last.

Every build is checked: the re-grouped blocks must give what the timm model's own
forward_features (+ its pooling for transformers) gives on a small random batch; a family whose
forward is not such a sequence is refused with a clear error instead of being silently wrong.

Weights (`model.weights`): `timm` loads timm's pretrained weights for NAME through its hub cache
(Hugging Face; offline, the same kind of error as for torchvision names, saying where the file
must be); a state-dict file of the timm model loads like a torchvision .pth file; a tltool run
or none as for every backbone. Input size and normalisation come from timm's pretrained
configuration of NAME.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from tltool.errors import CheckpointError, ConfigError
from tltool.models.base import Backbone, BackboneSpec, require_rgb
from tltool.models.library import load_library_state
from tltool.suggest import did_you_mean

PREFIX = "timm:"
# top-level children that belong to the classifier, not to the features
_HEAD_PARTS = {"global_pool", "fc", "classifier", "head", "head_drop", "pre_logits", "fc_norm",
               "head_dist", "attn_pool", "last_linear"}


class TimmArgs(BaseModel):
    """timm models are fixed by their name; no options."""

    model_config = ConfigDict(extra="forbid")


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("model.backbone timm:NAME needs the timm package: pip install "
                          "timm") from None
    return timm


def is_timm(name: str) -> bool:
    """`name` asks for a timm model (timm:NAME)."""
    return isinstance(name, str) and name.startswith(PREFIX)


@lru_cache(maxsize=64)
def timm_spec(name: str) -> BackboneSpec:
    """The BackboneSpec of `timm:NAME` (the model name checked against timm's registry)."""
    timm = _timm()
    arch = name[len(PREFIX):]
    if not arch or not timm.is_model(arch):
        hint = did_you_mean(arch, timm.list_models(), n=3, show=lambda c: f"timm:{c}",
                            around=("; ", ""))
        raise ConfigError(f"model.backbone: {name!r} is not a timm model{hint} (timm.list_models"
                          f"() lists them)")
    cfg = _pretrained_cfg(arch)
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    mean = [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))]
    std = [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))]

    def build(args: BaseModel, n_inputs: int = 3) -> Backbone:
        require_rgb(name, n_inputs)
        return regroup(timm.create_model(arch, pretrained=False), arch, size)

    return BackboneSpec(
        name=name, input="image", args=TimmArgs, build=build,
        description=f"timm model {arch}, re-grouped at its feature stages", default_size=size,
        weights=("timm",), load_weights=lambda backbone, w: _load(backbone, arch),
        norm=lambda w: (list(mean), list(std)))


def _pretrained_cfg(arch: str) -> dict[str, Any]:
    timm = _timm()
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # an unknown tag, an old timm
        cfg = None
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _load(backbone: Backbone, arch: str) -> None:
    """timm's pretrained weights of `arch`, through its hub cache, into `backbone`."""
    timm = _timm()
    try:
        model = timm.create_model(arch, pretrained=True)
    except Exception as exc:  # offline, no cache, a broken file
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise CheckpointError(
            f"model.weights timm of timm:{arch}: timm could not load its pretrained weights "
            f"({reason}); on a machine with network access run python -c \"import timm; "
            f"timm.create_model('{arch}', pretrained=True)\" to fill the Hugging Face cache "
            f"(~/.cache/huggingface, $HF_HOME) and copy it here, or set model.weights to a "
            f"state-dict file of the model, or to none") from None
    load_library_state(backbone, model.state_dict(), f"model.weights timm of timm:{arch}")


class _Seq(nn.Module):
    """Named original modules run in order (their names kept for the key mapping)."""

    def __init__(self, parts: list[tuple[str, nn.Module]]):
        super().__init__()
        self.names = [n for n, _ in parts]
        self.parts = nn.ModuleList([m for _, m in parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.parts:
            x = m(x)
        return x


class _ViTEmbed(nn.Module):
    """Patch embedding, class/register tokens, position embedding: the transformer's model
    object without its blocks, norm and head. Its own public forward_features runs them
    (patch_embed, the position embedding, patch_drop, norm_pre), then the emptied blocks and
    the identity norm left in place by `_regroup_vit`, which pass the tokens through as they
    are."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)


class _TokenPool(nn.Module):
    """The transformer's own pooling of its final tokens into one vector (class token, or the
    mean of the patch tokens), then its fc_norm."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.mode = getattr(vit, "global_pool", "token")
        self.prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.fc_norm = getattr(vit, "fc_norm", None) or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg":
            x = x[:, self.prefix:].mean(dim=1)
        elif self.mode == "avgmax":
            t = x[:, self.prefix:]
            x = 0.5 * (t.mean(dim=1) + t.amax(dim=1))
        elif self.mode == "max":
            x = x[:, self.prefix:].amax(dim=1)
        else:
            x = x[:, 0]
        return self.fc_norm(x)


def regroup(model: nn.Module, arch: str, size: int) -> Backbone:
    """`model` (a timm nn.Module) as a Backbone of freezable blocks; see the module doc."""
    model.eval()
    vit = _is_vit(model)
    if any(t.is_meta for t in model.parameters()):  # a checkpoint check on the meta device:
        return _regroup_vit(model) if vit else _regroup_stages(model, arch)  # structure only
    torch.manual_seed(0)
    x = torch.randn(2, 3, size if vit else max(32, min(size, 64)),
                    size if vit else max(32, min(size, 64)))
    try:
        with torch.no_grad():  # the reference: the intact model's own features
            feats = model.forward_features(x)
            want = (model.forward_head(feats, pre_logits=True) if vit else
                    feats.mean(dim=(2, 3)) if feats.dim() == 4 else feats)
        backbone = _regroup_vit(model) if vit else _regroup_stages(model, arch)
        backbone.eval()
        with torch.no_grad():
            ours = backbone(x)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means: not supported
        raise ConfigError(f"model.backbone timm:{arch}: could not be split into blocks "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if ours.shape != want.shape or not torch.allclose(ours, want, atol=1e-4, rtol=1e-4):
        raise ConfigError(f"model.backbone timm:{arch}: its forward is not a plain sequence of "
                          f"its stages, so tltool cannot split it into freezable blocks; use "
                          f"another timm model or a built-in backbone (tltool backbones)")
    backbone.train()
    return backbone


def _is_vit(model: nn.Module) -> bool:
    # A method named _pos_embed is what marks timm's VisionTransformer family (its relatives
    # with patch_embed, blocks and norm lack it); it is only probed for, never called.
    return all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm")) \
        and isinstance(model.blocks, nn.Sequential)


def _regroup_vit(model: nn.Module) -> Backbone:
    blocks_list = list(model.blocks)
    norm = model.norm
    pool = _TokenPool(model)
    width = int(getattr(model, "num_features", getattr(model, "embed_dim", 0)))
    # strip what the other blocks own, so that each tensor belongs to one block
    model.blocks = nn.Sequential()
    model.norm = nn.Identity()
    if hasattr(model, "fc_norm"):
        model.fc_norm = nn.Identity()
    model.reset_classifier(0)
    blocks: list[nn.Module] = [_ViTEmbed(model)]
    names = ["embed"]
    keys: dict[str, str] = {}
    for k in model.state_dict():
        keys[f"blocks.0.vit.{k}"] = k
    for i, blk in enumerate(blocks_list):
        last = i == len(blocks_list) - 1
        parts = [(f"blocks.{i}", blk)] + ([("norm", norm), ("", pool)] if last else [])
        seq = _Seq(parts)
        for j, (src, mod) in enumerate(parts):
            for k in mod.state_dict():
                mine = f"blocks.{i + 1}.parts.{j}.{k}"
                keys[mine] = f"fc_norm.{k[len('fc_norm.'):]}" if src == "" and \
                    k.startswith("fc_norm.") else f"{src}.{k}"
        blocks.append(seq)
        names.append(f"block{i + 1}")
    backbone = Backbone(blocks, names, width)
    backbone.source_keys = keys
    backbone.source_dropped = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    return backbone


def _regroup_stages(model: nn.Module, arch: str) -> Backbone:
    info = getattr(model, "feature_info", None)
    modules = [f["module"] for f in info] if info else []
    if not modules:
        raise ConfigError(f"model.backbone timm:{arch}: timm gives no feature stages for this "
                          f"model, so it cannot be split into freezable blocks")
    # The model's top-level children in order, a child opened up when a stage lies inside it.
    leaves: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if any(m.startswith(full + ".") for m in modules):
                walk(full + ".", child)
            else:
                leaves.append((full, child))

    walk("", model)
    ends = {m: None for m in modules}
    blocks, names, current = [], [], []
    last_stage = max(i for i, (n, _) in enumerate(leaves) if n in ends)
    for i, (name, module) in enumerate(leaves):
        if i > last_stage and name.split(".")[0] in _HEAD_PARTS:
            break  # the classifier begins (what follows it is the head's own, e.g. MobileNetV3)
        current.append((name, module))
        if name in ends:
            blocks.append(current)
            names.append(_block_name(name, len(names)))
            current = []
    if current:  # modules after the last stage and before the classifier (e.g. a head conv)
        blocks[-1].extend(current)
    width = int(getattr(model, "num_features", 0)) or _width(blocks)
    seqs, keys = [], {}
    for b, parts in enumerate(blocks):
        seqs.append(_Seq(parts))
        for j, (src, mod) in enumerate(parts):
            for k in mod.state_dict():
                keys[f"blocks.{b}.parts.{j}.{k}"] = f"{src}.{k}"
    backbone = Backbone(seqs, names, width)
    backbone.source_keys = keys
    own = set(keys.values())
    backbone.source_dropped = {k for k in model.state_dict() if k not in own}
    return backbone


def _block_name(module: str, i: int) -> str:
    if i == 0 and not module.startswith(("layer", "stages", "blocks", "stage")):
        return "stem"
    return module.replace(".", "")


def _width(blocks) -> int:
    for _, m in reversed(blocks[-1]):
        for p in reversed(list(m.parameters())):
            if p.dim() >= 1:
                return int(p.shape[0])
    return 0
