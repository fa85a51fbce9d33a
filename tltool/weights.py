"""Weights: what `model.weights` (and `model.prior_weights`) name — nothing, a pretrained set
of the backbone, a checkpoint file, a training run folder or NAME_FOLDER/latest — and putting
weights into a network (strict loads with a message that names what does not fit)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tltool.checkpoint import Checkpoint, checkpoint_path, load_weights_file
from tltool.errors import RunError
from tltool.models import TransferModel
from tltool.models.base import BackboneSpec
from tltool.models.loading import load_state
from tltool.runs.opening import TRAINING_COMMANDS, best_checkpoint
from tltool.runs.status import resolve_run


@dataclass
class Weights:
    """What model.weights resolved to: nothing, a named pretrained set, or a checkpoint."""

    ref: str
    name: str | None = None  # a pretrained set of the backbone, e.g. "imagenet"
    path: Path | None = None
    ckpt: Checkpoint | None = None  # a tltool checkpoint (model, input state, classes)
    state: dict[str, torch.Tensor] | None = None  # a plain backbone state dict from a file

    @property
    def preprocessor(self) -> dict | None:
        """The input encoding a tltool checkpoint fixes (None: the data's own)."""
        return None if self.ckpt is None else self.ckpt.preprocessor

    @property
    def none(self) -> bool:
        """No weights at all: the network starts from random values."""
        return self.ckpt is None and self.name is None and self.state is None


def resolve_weights(ref: str, spec: BackboneSpec) -> Weights:
    """`none`, a pretrained set of the backbone (e.g. imagenet), a checkpoint file, a training
    run folder, or NAME_FOLDER/latest."""
    if ref.strip().lower() in ("none", ""):
        return Weights(ref)
    if ref in spec.weights:
        return Weights(ref, name=ref)
    path = Path(ref)
    if path.is_file():
        payload = load_weights_file(path)
        if isinstance(payload, Checkpoint):
            return Weights(ref, path=path, ckpt=payload)
        return Weights(ref, path=path, state=payload)  # e.g. a torchvision .pth file
    if not path.exists() and path.name != "latest":
        named = f", a pretrained set of {spec.name} ({', '.join(spec.weights)})" \
            if spec.weights else ""
        raise RunError(f"model.weights: {ref}: no such run folder or checkpoint file (use a "
                       f"training run folder, NAME_FOLDER/latest, a .pt file{named}, or none)")
    run = resolve_run(path, commands=TRAINING_COMMANDS)
    return Weights(ref, path=checkpoint_path(run), ckpt=best_checkpoint(run))


def trained_checkpoint(ref: str, key: str) -> tuple[Checkpoint, Path]:
    """A tltool checkpoint named by a training run folder, NAME_FOLDER/latest or a .pt file
    (a prior's models), and where it came from."""
    path = Path(ref)
    if path.is_file():
        payload = load_weights_file(path)
        if not isinstance(payload, Checkpoint):
            raise RunError(f"{key}: {ref}: not a tltool checkpoint (a prior must be a model "
                           f"trained by tltool: a run folder or its checkpoints/best.pt)")
        return payload, path
    if not path.exists() and path.name != "latest":
        raise RunError(f"{key}: {ref}: no such run folder or checkpoint file")
    try:
        run = resolve_run(path, commands=TRAINING_COMMANDS)
    except RunError as exc:
        raise RunError(f"{key}: {exc}") from None
    return best_checkpoint(run), run


def load_backbone_weights(model: TransferModel, spec: BackboneSpec, weights: Weights) -> None:
    """Put the chosen pretrained weights into the model's backbone (nothing for `none`)."""
    if weights.name:
        spec.load_weights(model.backbone, weights.name)
    elif weights.ckpt:
        load_state(model.backbone, weights.ckpt.backbone_state(),
                   f"model.weights {weights.ref}")
    elif weights.state is not None:
        if hasattr(model.backbone, "source_keys"):  # a file in the original library's layout
            from tltool.models.library import load_library_state

            load_library_state(model.backbone, weights.state, f"model.weights {weights.ref}")
        else:
            load_state(model.backbone, weights.state, f"model.weights {weights.ref}")
