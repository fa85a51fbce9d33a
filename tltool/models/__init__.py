"""Models: a backbone (freezable blocks) + a head, rebuilt from a plain-dict spec.

Optional parts, each recorded in the spec so a checkpoint rebuilds the same network:
- a classic head (logistic regression, ridge, gradient boosting) fitted by scikit-learn
  (tltool.models.classic_fit) and stored as plain tensors (tltool.models.classic);
- a prior: a frozen source model whose output is added to this model's logits (`offset`) or fed
  to its head as extra inputs (`input`);
- a domain offset: a learned output offset for source rows during pooled training (the saved
  model answers for the target population, so prediction never uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tltool.models.backbones import build_backbone
from tltool.models.base import Backbone
from tltool.models.classic import CLASSIC_HEADS, build_classic_head


def build_head(kind: str, in_features: int, n_outputs: int, hidden: int,
               dropout: float) -> nn.Module:
    """linear: one Linear layer; mlp: Linear -> ReLU -> Linear; multilabel: one shared Linear
    layer giving a logit per label (the sigmoid lives in the loss and in prediction)."""
    drop = [nn.Dropout(dropout)] if dropout else []
    if kind in ("linear", "multilabel"):
        return nn.Sequential(*drop, nn.Linear(in_features, n_outputs))
    if kind == "mlp":
        return nn.Sequential(*drop, nn.Linear(in_features, hidden), nn.ReLU(),
                             nn.Linear(hidden, n_outputs))
    raise ValueError(f"unknown head {kind!r}")


class Prior(nn.Module):
    """Frozen source models used as a prior. The signal of one: log-probabilities for classes
    (the logits themselves for multi-label), or for regression its prediction on the target's
    standardised scale, so it adds directly to this model's standardised output. Several
    models: the mean of their signals (an average of log-probabilities: a geometric mean of
    the probabilities, up to the softmax's normalisation)."""

    def __init__(self, models: list[TransferModel],
                 target_scale: tuple[float, float] | None = None, multilabel: bool = False):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.target_scale = target_scale
        self.multilabel = multilabel
        for p in self.models.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._signal(m, x) for m in self.models]).mean(dim=0)

    def _signal(self, model: TransferModel, x: torch.Tensor) -> torch.Tensor:
        model.eval()
        logits = model(x)
        if model.target_scale is not None:
            mean, std = model.target_scale
            value = logits.double() * std + mean
            t_mean, t_std = self.target_scale or (mean, std)
            return ((value - t_mean) / t_std).float()
        if self.multilabel:
            return logits.float()
        return torch.log_softmax(logits.float(), dim=1)

    def train(self, mode: bool = True) -> Prior:
        return super().train(False)  # a fixed function: never dropout or BN updates


def prior_columns(signal: torch.Tensor, binary: bool) -> torch.Tensor:
    """The prior signal as head inputs: for two classes one column (the log-odds), else as is."""
    return signal[:, 1:2] - signal[:, 0:1] if binary and signal.shape[1] == 2 else signal


class TransferModel(nn.Module):
    """backbone -> head. Frozen blocks stay in inference mode in train(): a frozen block is a
    fixed function (no dropout, no BatchNorm statistics updates), so its output can be cached."""

    def __init__(self, backbone: Backbone, head: nn.Module, spec: dict[str, Any],
                 prior: Prior | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.prior = prior
        self.prior_mode = (spec.get("prior") or {}).get("mode") if prior is not None else None
        # Regression: the head's output is the standardised label; tltool.engine.Task maps it
        # to the label's units (mean + std x output) in float64. Fixed by the spec.
        self.target_scale = tuple(spec["target_scale"]) if spec.get("target_scale") else None
        self.domain_bias = (nn.Parameter(torch.zeros(spec["n_outputs"]))
                            if spec.get("domain_offset") else None)
        # Set by tltool.freeze.apply_freeze: modules kept in eval mode, and BatchNorm layers
        # inside them that should still adapt their statistics (bn_policy "train").
        self.frozen_modules: list[nn.Module] = []
        self.adapting_norms: list[nn.Module] = []

    @property
    def classic(self) -> bool:
        """A head fitted by scikit-learn (not trained by gradient steps)."""
        return self.spec.get("head") in CLASSIC_HEADS

    def prior_signal(self, x: torch.Tensor) -> torch.Tensor | None:
        """The prior's signal for inputs x (None without a prior)."""
        return None if self.prior is None else self.prior(x)

    def from_features(self, f: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """Logits from backbone features and the prior's signal for the same rows."""
        if self.prior_mode == "input":
            f = torch.cat([f, prior_columns(prior, self.binary_prior).to(f.dtype)], dim=1)
        out = self.head(f)
        if self.prior_mode == "offset":
            out = out + prior.to(out.dtype)
        return out

    @property
    def binary_prior(self) -> bool:
        """The prior is a two-class classifier, given to the head as one log-odds column."""
        return bool((self.spec.get("prior") or {}).get("binary"))

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        if self.prior is not None and prior is None:
            prior = self.prior(x)
        return self.from_features(self.backbone(x), prior)

    def forward_from(self, z: torch.Tensor, start: int,
                     prior: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the cached output of the first `start` backbone blocks (with a prior,
        its signal for the same rows must be given: the raw input is not at hand)."""
        if self.prior is not None and prior is None:
            raise ValueError("forward_from needs the prior's signal of the cached rows")
        return self.from_features(self.backbone.forward_from(z, start), prior)

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode:
            for module in self.frozen_modules:
                module.eval()
            for module in self.adapting_norms:
                module.train()
        if self.prior is not None:
            self.prior.eval()
        return self


@dataclass(frozen=True)
class HeadSettings:
    """The head of a model spec: `kind` (model.head: linear, mlp, multilabel or a classic
    head), the hidden units of an mlp head (model.head_hidden) and the dropout before it
    (model.dropout)."""

    kind: str
    hidden: int
    dropout: float


def model_spec(backbone: str, backbone_args: dict[str, Any], in_features: int,
               head: HeadSettings, n_outputs: int,
               target_scale: tuple[float, float] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild the architecture; stored in every checkpoint."""
    spec = {"backbone": backbone, "backbone_args": backbone_args, "in_features": in_features,
            "head": head.kind, "head_hidden": head.hidden, "dropout": head.dropout,
            "n_outputs": n_outputs}
    if target_scale is not None:
        spec["target_scale"] = [float(v) for v in target_scale]
    return spec


def prior_specs(prior_spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The model specs of a prior (one, or several averaged)."""
    return list(prior_spec.get("specs") or [prior_spec["spec"]])


def prior_width(prior_spec: dict[str, Any]) -> int:
    """Head inputs the prior adds in `input` mode."""
    n = int(prior_specs(prior_spec)[0]["n_outputs"])
    return 1 if prior_spec.get("binary") else n


def build_model(spec: dict[str, Any], _depth: int = 0) -> TransferModel:
    """The network a spec describes (weights random or empty: load a state dict next)."""
    backbone = build_backbone(spec["backbone"], spec["backbone_args"], spec["in_features"])
    prior = None
    extra = 0
    if spec.get("prior"):
        if _depth:
            raise ValueError("a prior model may not have a prior of its own")
        p = spec["prior"]
        specs = prior_specs(p)
        if not 1 <= len(specs) <= 64:
            raise ValueError(f"a prior of {len(specs)} models (allowed: 1 to 64)")
        prior = Prior([build_model(s, _depth + 1) for s in specs],
                      tuple(spec["target_scale"]) if spec.get("target_scale") else None,
                      bool(p.get("multilabel")))
        extra = prior_width(p) if p["mode"] == "input" else 0
    if spec["head"] in CLASSIC_HEADS:
        head = build_classic_head(spec["head_shape"]) if spec.get("head_shape") else \
            nn.Identity()  # replaced once fitted
    else:
        head = build_head(spec["head"], backbone.out_features + extra, spec["n_outputs"],
                          spec["head_hidden"], spec["dropout"])
        if spec.get("prior") and spec["prior"]["mode"] == "offset":
            _zero_last_linear(head)  # start exactly at the prior's answer
    return TransferModel(backbone, head, spec, prior)


def _zero_last_linear(head: nn.Module) -> None:
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
