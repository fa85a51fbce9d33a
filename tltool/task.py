"""What is learnt: single-label classes (softmax, cross-entropy), labels (a sigmoid each, BCE)
or a number (the standardised label, MSE); the loss and how outputs become probabilities or
values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# What a model predicts: one class per row, any set of labels per row, or a number.
CLASSIFICATION, MULTILABEL, REGRESSION = "classification", "multilabel", "regression"
KINDS = (CLASSIFICATION, MULTILABEL, REGRESSION)


class StandardisedMSE(nn.Module):
    """Mean squared error between the model's standardised output and the label standardised
    with the training mean and standard deviation (computed in float64, so a label of 1e9 + 75
    keeps its 75)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def rows(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = ((y.double() - self.mean) / self.std).to(pred.dtype)
        return (pred.reshape(-1) - z) ** 2

    def forward(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.rows(pred, y).mean()


@dataclass(frozen=True)
class Task:
    """Single-label (softmax, cross-entropy), multi-label (a sigmoid per label, BCE) or
    regression (one output: the standardised label, MSE; `proba` maps it to the label's
    units)."""

    multilabel: bool = False
    regression: bool = False
    mean: float = 0.0  # regression: the label's training mean and standard deviation
    std: float = 1.0

    @property
    def kind(self) -> str:
        return REGRESSION if self.regression else MULTILABEL if self.multilabel \
            else CLASSIFICATION

    @classmethod
    def of(cls, model: nn.Module, multilabel: bool = False) -> Task:
        scale = getattr(model, "target_scale", None)
        if scale is None:
            return cls(multilabel)
        return cls(multilabel, True, float(scale[0]), float(scale[1]))

    def loss(self, y: torch.Tensor, n_outputs: int, class_weights: str) -> nn.Module:
        if self.regression:
            return StandardisedMSE(self.mean, self.std)
        if self.multilabel:
            if class_weights == "balanced":
                pos = y.sum(dim=0).clamp(min=1)
                return nn.BCEWithLogitsLoss(pos_weight=((len(y) - pos) / pos).float())
            return nn.BCEWithLogitsLoss()
        return cross_entropy(y, n_outputs, class_weights)

    def row_loss(self, loss_fn: nn.Module, logits: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row losses and each row's share of the unweighted mean's denominator (the class
        weight of its class under `balanced`, else 1), so that sum(rows) / sum(shares) is the
        loss `loss_fn` would give."""
        ones = torch.ones(len(y), device=logits.device)
        if self.regression:
            return loss_fn.rows(logits, y), ones
        if self.multilabel:
            per = nn.functional.binary_cross_entropy_with_logits(
                logits, y.float(), pos_weight=loss_fn.pos_weight, reduction="none")
            return per.mean(dim=1), ones
        weight = loss_fn.weight
        per = nn.functional.cross_entropy(logits, y, weight=weight, reduction="none")
        return per, (ones if weight is None else weight[y])

    def proba(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities; for regression the predicted values themselves (one column)."""
        if self.regression:  # the value in the label's units, float64
            return logits.double() * self.std + self.mean
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def val_loss(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        if self.regression:
            return float(StandardisedMSE(self.mean, self.std)(logits, y))
        if self.multilabel:
            return float(nn.functional.binary_cross_entropy_with_logits(logits, y.float()))
        return float(nn.functional.cross_entropy(logits, y))


def cross_entropy(y: torch.Tensor, n_classes: int, class_weights: str) -> nn.Module:
    """Cross-entropy; under `balanced` each class weighs rows / (classes x its rows)."""
    if class_weights == "balanced":
        counts = torch.bincount(y, minlength=n_classes).double().clamp(min=1)
        weights = (len(y) / (n_classes * counts)).float()
        return nn.CrossEntropyLoss(weight=weights)
    return nn.CrossEntropyLoss()
