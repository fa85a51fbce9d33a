"""Loading a trained model: its network rebuilt from the checkpoint's spec, the weights put in
with a strict load whose message names what does not fit, and a classic head's stored trees
and widths checked (a checkpoint is untrusted input)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tltool.errors import CheckpointError
from tltool.models import TransferModel, build_model, prior_width
from tltool.models.classic import CLASSIC_HEADS

if TYPE_CHECKING:
    from tltool.checkpoint import Checkpoint


def load_trained(ckpt: Checkpoint) -> TransferModel:
    """The model of a checkpoint (classic heads' tree indices and values checked)."""
    try:
        model = build_model(ckpt.spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: damaged model spec ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None
    load_state(model, ckpt.state_dict, "checkpoint")
    for name, tensor in ckpt.state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint: tensor {name} holds NaN or infinite values; "
                                  f"the model cannot give meaningful answers (retrain it)")
    _check_head_width(model)
    if any(s.get("head") in CLASSIC_HEADS for s in (ckpt.spec, (ckpt.prior or {}).get(
            "spec") or {})):
        from tltool.models.classic import check_classic_state

        for module in model.modules():
            if hasattr(module, "raw") and hasattr(module, "append"):
                check_classic_state(module)
    return model


def _check_head_width(model: TransferModel) -> None:
    """A classic head's input width must be what the backbone (and an input prior) gives."""
    width = getattr(model.head, "in_features", None)
    if width is None or not hasattr(model.head, "raw"):
        return
    expected = model.backbone.out_features + (
        prior_width(model.spec["prior"]) if model.prior_mode == "input" else 0)
    if width != expected:
        raise CheckpointError(f"checkpoint: damaged model spec (head_shape.in_features {width} "
                              f"but the backbone gives {expected} features)")


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Strict load with a message that lists missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected),
                           ("shape mismatch (checkpoint vs model)", shapes)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{what}: {', '.join(keys[:8])}{more}")
        raise CheckpointError(f"{origin} does not fit this architecture; " + "; ".join(parts))
    module.load_state_dict(state)
