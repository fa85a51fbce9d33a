"""Domain adaptation: a loss that pulls the backbone's source and target features together.

Used by the training loop when `adapt.method` is set. Each step it draws a batch of
unlabelled target rows (and, in freeze-finetune, a batch of labelled source rows), runs them
through the model together with the labelled batch, and adds

- coral: the distance between the two feature covariance matrices, ||C_s - C_t||_F^2 / (4 d^2)
  (Sun & Saenko, Deep CORAL);
- mmd: the squared maximum mean discrepancy under a sum of Gaussian kernels whose widths are
  multiples of the batch's mean squared distance (Long et al., DAN);
- dann: the loss of a small domain classifier that sees the features through a gradient
  reversal layer, so the backbone learns features the classifier cannot tell apart (Ganin &
  Lempitsky); the reversal strength warms up as 2 / (1 + exp(-10 p)) - 1 over training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def coral(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance of the feature covariances, scaled by 1 / (4 d^2)."""
    d = fs.shape[1]
    return ((_cov(fs) - _cov(ft)) ** 2).sum() / (4 * d * d)


def _cov(f: torch.Tensor) -> torch.Tensor:
    centred = f - f.mean(dim=0, keepdim=True)
    return centred.T @ centred / max(len(f) - 1, 1)


def mmd(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Biased squared MMD with a multi-width Gaussian kernel (widths from the batch itself)."""
    x = torch.cat([fs, ft])
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0)
    n = len(x)
    base = (d2.detach().sum() / max(n * (n - 1), 1)).clamp(min=1e-12)
    k = sum(torch.exp(-d2 / (base * s)) for s in MMD_SCALES)
    m = len(fs)
    return k[:m, :m].mean() + k[m:, m:].mean() - 2 * k[:m, m:].mean()


class _Reverse(torch.autograd.Function):
    """Identity forward; gradient multiplied by -scale backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


class DomainCritic(nn.Module):
    """Source-or-target classifier on backbone features, behind a gradient reversal layer."""

    def __init__(self, in_features: int):
        super().__init__()
        hidden = min(256, max(32, in_features))
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, f: torch.Tensor, scale: float) -> torch.Tensor:
        return self.net(_Reverse.apply(f, scale)).squeeze(1)


def dann_scale(progress: float) -> float:
    """Reversal strength: 0 at the start, close to 1 by the end (progress in [0, 1])."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


@dataclass
class Adaptation:
    """What the training loop needs: the method, its weight, the unlabelled target rows and
    (freeze-finetune) the labelled source rows trained alongside the target."""

    method: str
    weight: float
    target: object  # tltool.engine.Tensors: rows aligned with the source (labels unused)
    source: object | None = None  # Tensors of labelled source rows; None: the batch is source
    source_weight: float = 1.0
    critic: DomainCritic | None = None
    # pretrain: the target's labelled validation rows, when it has them. Never trained or
    # early-stopped on; scored each epoch so a run can warn when the alignment lowers what
    # the target's labels would have shown (its own validation rows are source rows).
    watch: object | None = None

    def make_critic(self, in_features: int, device: torch.device) -> DomainCritic | None:
        if self.method == "dann" and self.critic is None:
            self.critic = DomainCritic(in_features).to(device)
        return self.critic

    def loss(self, fs: torch.Tensor, ft: torch.Tensor, progress: float) -> torch.Tensor:
        """Alignment loss of a source and a target feature batch (float32)."""
        fs, ft = fs.float(), ft.float()
        if self.method == "coral":
            return self.weight * coral(fs, ft)
        if self.method == "mmd":
            return self.weight * mmd(fs, ft)
        if self.method == "dann":
            assert self.critic is not None
            logits = self.critic(torch.cat([fs, ft]), self.weight * dann_scale(progress))
            side = torch.cat([torch.zeros(len(fs)), torch.ones(len(ft))]).to(logits.device)
            return nn.functional.binary_cross_entropy_with_logits(logits, side)
        raise ValueError(f"unknown adaptation method {self.method!r}")
