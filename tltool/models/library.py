"""A library's network (torchvision, EfficientNet-Lite, timm) re-grouped into a Backbone, and
that library's state dicts loaded into it under their original key names.

A backbone made here carries `source_keys` (its state-dict key -> the library model's key) and
`source_dropped` (the library model's tensors it leaves out: its classifier), so that the
library's pretrained files load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from tltool.errors import CheckpointError
from tltool.models.base import Backbone


def library_backbone(source: nn.Module, blocks: list[nn.Module], names: list[str],
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
