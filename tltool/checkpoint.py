"""Checkpoints: the one reader and writer of a trained model's `.pt` files (a run's
checkpoints/best.pt and last.pt).

A checkpoint holds plain tensors and primitives only, so `torch.load(weights_only=True)` reads
it and no code runs on load. `Checkpoint` is its typed form: what the model predicts (the task
kind, stored since this version; older files have it derived once, here), the classes, the
label, the network's spec, the input encoding and the weights; `last.pt` also carries the
training state that `tltool resume` continues from. Every field is checked before use
(`tltool.models.checks`): a checkpoint is untrusted input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tltool.errors import RunError
from tltool.runs.files import atomic_write
from tltool.task import CLASSIFICATION, KINDS, MULTILABEL, REGRESSION

FORMAT = "tltool-checkpoint"
# A run's checkpoints: the best weights (what evaluate, predict and a later run use) and the
# last epoch's (with the training state `tltool resume` continues from).
FOLDER, BEST, LAST = "checkpoints", "best.pt", "last.pt"
REQUIRED = ("command", "spec", "classes", "label", "preprocessor", "state_dict")
ALLOWED = ("allowed: a tltool checkpoint (a run's checkpoints/best.pt) or a PyTorch state "
           "dict of tensors saved with torch.save(model.state_dict(), path)")


@dataclass(frozen=True)
class Checkpoint:
    """A trained model as saved: checked on load, written atomically."""

    command: str  # the command that trained it: pretrain, freeze-finetune or select
    epoch: int
    spec: dict[str, Any]  # the network's description (tltool.models.build_model)
    classes: list[str]  # class or label names; regression: [the label]
    label: str  # the label column
    kind: str  # classification | multilabel | regression
    preprocessor: dict[str, Any]  # the input encoding (tltool.inputs)
    state_dict: dict[str, torch.Tensor]
    resume: dict[str, Any] | None = None  # last.pt: the training state (TrainState)

    @property
    def multilabel(self) -> bool:
        return self.kind == MULTILABEL

    @property
    def regression(self) -> bool:
        return self.kind == REGRESSION

    @property
    def trained_on(self) -> str:
        """The data section the model was trained on: source (pretrain) or target."""
        return "source" if self.command == "pretrain" else "target"

    @property
    def backbone(self) -> str:
        return self.spec["backbone"]

    @property
    def head(self) -> str:
        return self.spec["head"]

    @property
    def prior(self) -> dict[str, Any] | None:
        """The spec of the model's prior (source models whose answer it starts from)."""
        return self.spec.get("prior")

    @property
    def image_input(self) -> bool:
        return self.preprocessor.get("kind") == "image"

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone's weights, named as the backbone module names them."""
        return {k.removeprefix("backbone."): v for k, v in self.state_dict.items()
                if k.startswith("backbone.")}

    def with_epoch(self, epoch: int, state_dict: dict[str, torch.Tensor] | None = None
                   ) -> Checkpoint:
        """This checkpoint at another epoch (another weights), without a training state."""
        return replace(self, epoch=epoch, resume=None,
                       state_dict=self.state_dict if state_dict is None else state_dict)

    def payload(self) -> dict[str, Any]:
        """What the file holds (plain tensors and primitives)."""
        out = {"format": FORMAT, "version": 1, "command": self.command, "epoch": self.epoch,
               "spec": self.spec, "classes": list(self.classes), "label": self.label,
               "multilabel": self.multilabel, "task": self.kind,
               "preprocessor": self.preprocessor, "state_dict": self.state_dict}
        if self.resume is not None:
            out["resume"] = self.resume
        return out

    def save(self, path: Path) -> Path:
        """Atomic torch.save: a reader never sees half a file."""
        atomic_write(Path(path), lambda fh: torch.save(self.payload(), fh))
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """A tltool checkpoint file, every field checked."""
        payload = read_weights(Path(path))
        if not is_checkpoint(payload):
            raise RunError(f"{path}: not a tltool checkpoint (expected a dict with "
                           f"format '{FORMAT}')")
        return cls.from_payload(payload, str(path))

    @classmethod
    def from_payload(cls, payload: dict[str, Any], origin: str) -> Checkpoint:
        missing = [k for k in REQUIRED if k not in payload]
        if missing:
            raise RunError(f"{origin}: damaged tltool checkpoint (missing {', '.join(missing)})")
        from tltool.models.checks import check_checkpoint

        check_checkpoint(payload, origin)  # every field, before any tensor is allocated
        kind = payload.get("task")
        if kind not in KINDS:  # written before the kind was stored: derived once, here
            kind = (REGRESSION if payload["spec"].get("target_scale") else
                    MULTILABEL if payload.get("multilabel") else CLASSIFICATION)
        epoch = payload.get("epoch")
        return cls(command=str(payload["command"]),
                   epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0,
                   spec=payload["spec"], classes=list(payload["classes"]),
                   label=payload["label"], kind=kind, preprocessor=payload["preprocessor"],
                   state_dict=payload["state_dict"], resume=payload.get("resume"))

    @classmethod
    def of_model(cls, model: torch.nn.Module, like: Checkpoint, epoch: int,
                 resume: dict[str, Any] | None = None) -> Checkpoint:
        """`like` with the current weights of `model` (a copy on the CPU) and its spec."""
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return replace(like, epoch=epoch, spec=model.spec, state_dict=state, resume=resume)


def is_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def read_weights(path: Path) -> dict[str, Any]:
    """A tltool checkpoint's mapping or a plain state dict (name -> tensor), read without
    unpickling arbitrary objects."""
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        if "Unsupported global" in str(exc):
            # a whole pickled object (model, optimizer, ...): never unpickled here, as code in
            # a pickle runs on load
            raise RunError(f"{path}: holds pickled Python objects (e.g. a whole model saved "
                           f"with torch.save(model)), which tltool does not load; save "
                           f"model.state_dict() instead. {ALLOWED}") from None
        raise RunError(f"{path}: not a PyTorch weights file ({type(exc).__name__}); "
                       f"{ALLOWED}") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict) and \
            not is_checkpoint(payload):
        payload = payload["state_dict"]  # the common {"state_dict": ...} wrapper
    plain = isinstance(payload, dict) and payload and all(
        isinstance(v, torch.Tensor) for v in payload.values())
    if not plain and not is_checkpoint(payload):
        raise RunError(f"{path}: neither a tltool checkpoint nor a state dict of tensors; "
                       f"{ALLOWED}")
    return payload


def load_weights_file(path: Path) -> Checkpoint | dict[str, torch.Tensor]:
    """A tltool checkpoint (checked), or a plain state dict (e.g. a torchvision .pth file)."""
    payload = read_weights(Path(path))
    return Checkpoint.from_payload(payload, str(path)) if is_checkpoint(payload) else payload


def checkpoint_path(run: Path, name: str = BEST) -> Path:
    """RUN/checkpoints/NAME."""
    return Path(run) / FOLDER / name


def is_best_checkpoint(path: Path) -> bool:
    """A run's RUN/checkpoints/best.pt (as model.weights may name it)."""
    path = Path(path)
    return path.name == BEST and path.parent.name == FOLDER
