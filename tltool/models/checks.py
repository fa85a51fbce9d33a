"""A checkpoint is untrusted input: every field is checked against what a tltool model spec may
hold before any tensor is allocated, with limits on sizes. Each problem is one CheckpointError
naming the field.

The network's size is measured by building it on PyTorch's `meta` device (shapes without
memory), so a spec asking for billions of parameters is refused, not allocated.
"""

from __future__ import annotations

import math
from typing import Any

from tltool.errors import CheckpointError, ConfigError

MAX_PARAMETERS = 2_000_000_000  # a little above ViT-g; tltool's backbones are far below
MAX_WIDTH = 10_000_000  # input features of a table
MAX_OUTPUTS = 100_000
MAX_IMAGE_SIZE = 4096
MAX_PRIOR_MODELS = 64


def check_checkpoint(payload: dict[str, Any], origin: str) -> None:
    """Raise CheckpointError when a field of a tltool checkpoint is not what it may be."""
    spec = payload["spec"]
    _check_spec(spec, f"{origin}: spec")
    classes = payload["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or \
            not classes or len(classes) > MAX_OUTPUTS:
        raise CheckpointError(f"{origin}: classes: expected a non-empty list of class names")
    if not spec.get("target_scale") and spec["n_outputs"] != len(classes):
        raise CheckpointError(f"{origin}: classes: {len(classes)} names for "
                              f"{spec['n_outputs']} outputs")
    if not isinstance(payload.get("label"), str):
        raise CheckpointError(f"{origin}: label: expected the label column's name")
    _check_preprocessor(payload["preprocessor"], spec, f"{origin}: preprocessor")
    if not isinstance(payload["state_dict"], dict):
        raise CheckpointError(f"{origin}: state_dict: expected a mapping of tensors")


def _fail(where: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: {problem}")


def _int(spec: dict, key: str, where: str, low: int, high: int) -> int:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(f"{where}.{key}", f"expected a whole number from {low} to {high:,}, got "
                    f"{type(value).__name__}")
    return value


def _check_spec(spec: Any, where: str, depth: int = 0) -> None:
    from tltool.models.backbones import BACKBONES
    from tltool.models.classic import CLASSIC_HEADS, build_classic_head

    if not isinstance(spec, dict):
        raise _fail(where, "expected a mapping")
    name = spec.get("backbone")
    if isinstance(name, str) and name.startswith("timm:"):
        from tltool.errors import ConfigError
        from tltool.models.backbones import get_spec

        try:
            get_spec(name)  # timm installed, and the name in its registry
        except ConfigError as exc:
            raise _fail(f"{where}.backbone", str(exc)) from None
    elif not isinstance(name, str) or name not in BACKBONES:
        raise _fail(f"{where}.backbone", "not a known backbone")
    if not isinstance(spec.get("backbone_args"), dict):
        raise _fail(f"{where}.backbone_args", "expected a mapping")
    _int(spec, "in_features", where, 1, MAX_WIDTH)
    _int(spec, "n_outputs", where, 1, MAX_OUTPUTS)
    _int(spec, "head_hidden", where, 1, 1_000_000)
    head = spec.get("head")
    if not isinstance(head, str) or head not in ("linear", "mlp", "multilabel", *CLASSIC_HEADS):
        raise _fail(f"{where}.head", "not a known head")
    dropout = spec.get("dropout")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
            not 0 <= dropout < 1:
        raise _fail(f"{where}.dropout", "expected a number in [0, 1)")
    scale = spec.get("target_scale")
    if scale is not None and not (isinstance(scale, list) and len(scale) == 2 and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in scale) and scale[1] > 0):
        raise _fail(f"{where}.target_scale", "expected [mean, positive standard deviation]")
    if head in CLASSIC_HEADS and spec.get("head_shape") is not None:
        with _meta():
            build_classic_head(spec["head_shape"])  # its own checks, named by field
    prior = spec.get("prior")
    if prior is not None:
        if depth or not isinstance(prior, dict) or not isinstance(prior.get("mode"), str) or \
                prior["mode"] not in ("offset", "input"):
            raise _fail(f"{where}.prior", "expected a prior (mode offset or input) of plain "
                        "source models")
        specs = prior.get("specs") or ([prior["spec"]] if "spec" in prior else [])
        if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_PRIOR_MODELS:
            raise _fail(f"{where}.prior.specs", f"expected 1 to {MAX_PRIOR_MODELS} models")
        for i, sub in enumerate(specs):
            _check_spec(sub, f"{where}.prior.specs.{i}", depth + 1)
    if depth == 0:
        _check_size(spec, where)


def _check_size(spec: dict[str, Any], where: str) -> None:
    """Build the network on the meta device (no memory) and count its parameters."""
    from tltool.models import build_model

    try:
        with _meta():
            model = build_model(spec)
    except (ConfigError, CheckpointError) as exc:
        raise _fail(where, str(exc).replace("\n", "; ")) from None
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        errors = getattr(exc, "errors", None)  # pydantic: name the first bad option
        if callable(errors):
            e = errors()[0]
            key = ".".join(str(x) for x in e.get("loc", ()))
            raise _fail(where, f"does not describe a network (backbone_args.{key}: "
                        f"{str(e.get('msg', '')).lower()})") from None
        raise _fail(where, f"does not describe a network ({type(exc).__name__})") from None
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if n > MAX_PARAMETERS:
        raise _fail(where, f"describes a network of {n:,} values (at most {MAX_PARAMETERS:,})")


def _meta():
    import torch

    return torch.device("meta")


def _check_preprocessor(state: Any, spec: dict[str, Any], where: str) -> None:
    if not isinstance(state, dict) or not isinstance(state.get("kind"), str) or \
            state["kind"] not in ("tabular", "image"):
        raise _fail(where, "expected the saved input encoding (kind tabular or image)")
    if state["kind"] == "image":
        size = state.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or \
                not 1 <= size <= MAX_IMAGE_SIZE:
            raise _fail(f"{where}.size", f"expected an image side from 1 to {MAX_IMAGE_SIZE}")
        for key in ("mean", "std"):
            values = state.get(key)
            if not (isinstance(values, list) and len(values) == 3 and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
                raise _fail(f"{where}.{key}", "expected 3 finite numbers")
        if min(state["std"]) <= 0:
            raise _fail(f"{where}.std", "expected positive numbers")
        return
    from tltool.data.preprocess import TabularPreprocessor

    pre = TabularPreprocessor.from_state(state)  # checks every number and category
    width = len(pre.feature_names)
    if width != spec["in_features"]:
        raise _fail(where, f"encodes {width} features but the model takes "
                    f"{spec['in_features']}")
