"""Pieces shared by the workflows: weights resolution, checkpoints, tensors, run bookkeeping."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tltool.config import ExperimentConfig, dump_config, validate_config
from tltool.errors import CheckpointError, ConfigError, RunError
from tltool.inputs import Weights
from tltool.models import TransferModel, build_model
from tltool.models.base import BackboneSpec
from tltool.runs import RunFolder, load_checkpoint, load_weights_file, resolve_run, write_text

log = logging.getLogger("tltool")

# Commands whose run folder holds a trained model (checkpoints/best.pt) for evaluate / predict /
# ensemble and as weights of a later run.
TRAINING_COMMANDS = ("pretrain", "freeze-finetune", "select")
CHECKPOINT_FORMAT = "tltool-checkpoint"


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
        if payload.get("format") == CHECKPOINT_FORMAT:
            return Weights(ref, path=path, ckpt=payload)
        return Weights(ref, path=path, state=payload)  # e.g. a torchvision .pth file
    if not path.exists() and path.name != "latest":
        named = f", a pretrained set of {spec.name} ({', '.join(spec.weights)})" \
            if spec.weights else ""
        raise RunError(f"model.weights: {ref}: no such run folder or checkpoint file (use a "
                       f"training run folder, NAME_FOLDER/latest, a .pt file{named}, or none)")
    run = resolve_run(path, commands=TRAINING_COMMANDS)
    ckpt_path = run / "checkpoints" / "best.pt"
    return Weights(ref, path=ckpt_path, ckpt=load_checkpoint(ckpt_path))


def resolve_checkpoint(ref: str, key: str) -> tuple[dict[str, Any], Path]:
    """A tltool checkpoint named by a training run folder, NAME_FOLDER/latest or a .pt file."""
    path = Path(ref)
    if path.is_file():
        payload = load_weights_file(path)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"{key}: {ref}: not a tltool checkpoint (a prior must be a model "
                           f"trained by tltool: a run folder or its checkpoints/best.pt)")
        return load_checkpoint(path), path
    if not path.exists() and path.name != "latest":
        raise RunError(f"{key}: {ref}: no such run folder or checkpoint file")
    try:
        run = resolve_run(path, commands=TRAINING_COMMANDS)
    except RunError as exc:
        raise RunError(f"{key}: {exc}") from None
    return load_checkpoint(run / "checkpoints" / "best.pt"), run


def trained_on(ckpt: dict[str, Any]) -> str:
    """The data section a checkpoint's model was trained on: source (pretrain) or target."""
    return "source" if ckpt["command"] == "pretrain" else "target"


def pin_config(cfg: ExperimentConfig, weights: Weights | None = None,
               prior_path: list[Path] | None = None) -> ExperimentConfig:
    """The config as a run folder keeps it: data paths absolute (evaluate works from any
    folder) and model.weights (and model.prior_weights) the run folder or file actually used
    (not `.../latest`, which moves on as new runs complete)."""
    update: dict[str, Any] = {}
    for section in ("source", "target"):
        data = getattr(cfg, section)
        if data is None:
            continue
        paths = {k: str(Path(v).expanduser().resolve()) for k in ("path", "root")
                 if (v := getattr(data, k))}
        if paths:
            update[section] = data.model_copy(update=paths)
    def pinned(used) -> str:
        used = Path(used)
        if used.name == "best.pt" and used.parent.name == "checkpoints":
            used = used.parent.parent  # the run folder
        return str(used.resolve())

    model: dict[str, Any] = {}
    if weights is not None and weights.path is not None:
        model["weights"] = pinned(weights.path)
    if prior_path:
        model["prior_weights"] = ([pinned(p) for p in prior_path] if len(prior_path) > 1
                                  else pinned(prior_path[0]))
    if model:
        update["model"] = cfg.model.model_copy(update=model)
    return cfg.model_copy(update=update)


def load_backbone_weights(model: TransferModel, spec: BackboneSpec, weights: Weights) -> None:
    """Put the chosen pretrained weights into the model's backbone (nothing for `none`)."""
    if weights.name:
        spec.load_weights(model.backbone, weights.name)
    elif weights.ckpt:
        state = {k.removeprefix("backbone."): v for k, v in weights.ckpt["state_dict"].items()
                 if k.startswith("backbone.")}
        load_state(model.backbone, state, f"model.weights {weights.ref}")
    elif weights.state is not None:
        if hasattr(model.backbone, "source_keys"):  # a file in the original library's layout
            from tltool.models.library import load_library_state

            load_library_state(model.backbone, weights.state, f"model.weights {weights.ref}")
        else:
            load_state(model.backbone, weights.state, f"model.weights {weights.ref}")


def load_trained(ckpt: dict[str, Any]) -> TransferModel:
    """The model of a checkpoint (classic heads' tree indices and values checked)."""
    try:
        model = build_model(ckpt["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: damaged model spec ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None
    load_state(model, ckpt["state_dict"], "checkpoint")
    for name, tensor in ckpt["state_dict"].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint: tensor {name} holds NaN or infinite values; "
                                  f"the model cannot give meaningful answers (retrain it)")
    _check_head_width(model)
    from tltool.models.classic import CLASSIC_HEADS

    if any(s.get("head") in CLASSIC_HEADS for s in (ckpt["spec"],
                                                     (ckpt["spec"].get("prior") or {}).get(
                                                         "spec") or {})):
        from tltool.models.classic import check_classic_state

        for module in model.modules():
            if hasattr(module, "raw") and hasattr(module, "append"):
                check_classic_state(module)
    return model


def _check_head_width(model: TransferModel) -> None:
    """A classic head's input width must be what the backbone (and an input prior) gives."""
    from tltool.models import prior_width

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


def checkpoint_payload(model: TransferModel, input_state: dict[str, Any], classes: list[str],
                       label: str, multilabel: bool, command: str, epoch: int,
                       state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plain tensors and primitives only, so torch.load(weights_only=True) reads it. `state`:
    the training state (last.pt) that `tltool resume` continues from."""
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "command": command, "epoch": epoch,
               "spec": model.spec, "classes": list(classes), "label": label,
               "multilabel": multilabel, "preprocessor": input_state,
               "state_dict": {k: v.detach().cpu().clone()
                              for k, v in model.state_dict().items()}}
    if state is not None:
        payload["resume"] = state
    return payload


def run_config(run: Path) -> ExperimentConfig:
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run}: config.yaml missing; not a complete tltool run")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise RunError(f"{path}: damaged (not valid YAML); this run cannot be reused") from None
    if not isinstance(raw, dict):
        raise RunError(f"{path}: damaged (not a mapping of keys); this run cannot be reused")
    return validate_config(raw, origin=str(path))


def experiment_home(run: Path) -> tuple[Path, str]:
    """(output root, experiment name) that commands reading a run write next to: ROOT/NAME of
    ROOT/NAME/RUN. A member of a select ensemble (RUN/members/CANDIDATE) belongs to its
    ensemble's experiment, so evaluating it never writes inside the ensemble's folder."""
    from tltool.runs import run_status

    run = Path(run).resolve()
    owner = (run_status(run) or {}).get("member_of")
    if isinstance(owner, str):
        up = (run / owner).resolve()
        if up in run.parents:
            run = up
    return run.parent.parent, run.parent.name


def check_output_root(root: str | Path) -> None:
    """output.root must be (or become) a writable folder; said before any data is read."""
    path = Path(root)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output.root: {root} is a file; run folders need a folder there")
    if not probe.is_dir():
        raise ConfigError(f"output.root: {root} cannot be created ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output.root: {root} is not writable ({probe}: permission denied)")


@contextlib.contextmanager
def new_run(cfg_root: str | Path, name: str, command: str, argv: list[str] | None,
            seed: int | None, cfg: ExperimentConfig | None = None,
            note: dict[str, Any] | None = None) -> Iterator[RunFolder]:
    """Create the run folder; mark it complete on success, failed (with the error) otherwise.
    `note`: kept in run.json (e.g. resumed_from)."""
    check_output_root(cfg_root)
    from tltool import distributed

    scratch = None
    if not distributed.is_main():  # under torchrun only rank 0 writes; the others write into
        import tempfile  # a private folder removed at the end

        scratch = cfg_root = tempfile.mkdtemp(prefix=f"tltool-rank{distributed.rank()}-")
    with contextlib.ExitStack() as stack:
        if scratch is not None:
            import shutil

            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        yield from _new_run(cfg_root, name, command, argv, seed, cfg, note)


def _new_run(cfg_root, name: str, command: str, argv: list[str] | None, seed: int | None,
             cfg: ExperimentConfig | None, note: dict[str, Any] | None) -> Iterator[RunFolder]:
    run = RunFolder.create(cfg_root, name, command, argv, seed, note)
    if cfg is not None:
        write_text(run.file("config.yaml"), dump_config(cfg))
    log.info("run folder: %s", run.path)
    try:
        yield run
    except BaseException as exc:
        detail = f": {exc}" if str(exc) else ""
        run.set_status("failed", error=f"{type(exc).__name__}{detail}")
        raise
    run.set_status("complete")


def check_input_fits(model: TransferModel, inputs, section: str) -> None:
    """One image through the network before any run folder exists: an image size the
    backbone cannot take (too small for its downsampling, or not the size a ViT was built
    for) is a config error, not a traceback epochs later."""
    if inputs.state.get("kind") != "image" or len(inputs.train.x) == 0:
        return
    size = inputs.state["size"]
    try:
        with torch.no_grad():
            model.eval()
            # the backbone alone: a classic head is not fitted yet (its input is the
            # backbone's output by construction)
            model.backbone(inputs.train.batch(slice(0, 1), train=False))
    except (RuntimeError, ValueError, AssertionError) as exc:  # timm asserts sizes
        reason = str(exc).splitlines()[0][:200]
        raise ConfigError(f"{section}.image_size: backbone {model.spec['backbone']!r} cannot "
                          f"take {size}x{size} images ({reason}); use an image_size it can take "
                          f"(the backbone's default is what `tltool backbones` lists) or "
                          f"backbone_args that match it") from None


def inference_runtime(cfg: ExperimentConfig, ckpt: dict[str, Any], model: torch.nn.Module,
                      data) -> Any:
    """The runtime a trained run's model predicts with in evaluate / predict / ensemble: the
    run's own device, precision and memory layouts (train.*), so a GPU run predicts on the GPU
    and an image model in the layouts its training chose (read from this machine's probe
    cache, or the defaults for a short pass). What this machine cannot do falls back: a CUDA
    run on a machine without a GPU predicts on the CPU in fp32 (fp16 needs a GPU)."""
    from tltool.runtime import make_runtime

    t = cfg.train
    if not torch.cuda.is_available():
        t = t.model_copy(update={"device": "cpu" if t.device == "cuda" else t.device,
                                 "precision": "fp32" if t.precision == "fp16" else t.precision})
    image = (ckpt.get("preprocessor") or {}).get("kind") == "image"
    rt = make_runtime(t, image)
    rt.setup(model)
    if image and len(data):
        rt.tune(model, data.batch(slice(0, 16), train=False), label="inference", work=len(data))
    return rt
