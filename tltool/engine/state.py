"""State around the loop: what a resumed run continues from (`TrainState`, saved in every
last.pt), what training did (`TrainingReport`), and early stopping (`EarlyStopping`, also
driving the lockstep of select's cross-validation folds)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tltool.errors import RunError


class EarlyStopping:
    """Stop a round after `patience` epochs without a better validation score (higher is
    better). The best score carries over rounds; the count of epochs without one restarts with
    each round."""

    def __init__(self, patience: int | None, best: float = -np.inf, stale: int = 0):
        self.patience, self.best, self.stale = patience, best, stale

    def start_round(self, stale: int = 0) -> None:
        self.stale = stale

    def improved(self, score: float) -> bool:
        """Record an epoch's score; True when it beats the best so far."""
        if score > self.best:
            self.best, self.stale = score, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience


# Fields of a saved training state and their types (a last.pt is untrusted input).
_STATE_TYPES = {"round": int, "round_epoch": int, "epoch_total": int, "stale": int,
                "round_done": bool, "best": dict, "optimizer": dict, "layouts": list,
                "precision": str, "plans": list, "checks": list, "caches": list,
                "timing": dict, "watched": dict, "numpy_rng": dict,
                "best_state": (dict, type(None))}
_RNG_TENSORS = ("generator", "torch_rng", "round_rng")


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where an interrupted one was:
    round and epoch, early stopping's count, the best score so far (and its weights when they
    are not the checkpoint's own), the optimiser's and scaler's moments, the critic of an
    adaptation, every random number generator, the memory layouts and precision chosen, and
    the reports of earlier rounds. Plain tensors and primitives only (weights_only loads)."""

    round: int
    round_epoch: int
    epoch_total: int
    stale: int
    round_done: bool
    best: dict[str, Any]  # score, epoch, round
    best_state: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    critic: dict[str, Any] | None
    generator: torch.Tensor
    torch_rng: torch.Tensor
    round_rng: torch.Tensor
    numpy_rng: dict[str, Any]
    layouts: list[str | None]
    precision: str
    plans: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    caches: list[dict[str, Any]]
    timing: dict[str, list[float]]
    watched: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, state: Any, path: Path) -> TrainState:
        """A saved state, its fields' types checked before use."""
        problems = [k for k, kind in _STATE_TYPES.items()
                    if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
        if not problems:
            problems = [k for k in _RNG_TENSORS if not isinstance(state.get(k), torch.Tensor)]
        if not problems and not (1 <= state["round"] and 0 <= state["round_epoch"] <=
                                 state["epoch_total"] <= 1_000_000):
            problems = ["round / epoch counts"]
        if problems:
            raise RunError(f"{path}: damaged training state ({', '.join(problems)}); train "
                           f"again instead")
        return cls(**{k: state.get(k) for k in cls.__dataclass_fields__})


def numpy_rng_state() -> dict[str, Any]:
    """numpy's global generator as plain tensors and numbers."""
    s = np.random.get_state()
    return {"keys": torch.from_numpy(s[1].astype(np.int64)), "pos": int(s[2]),
            "has_gauss": int(s[3]), "cached": float(s[4])}


def set_numpy_rng_state(n: dict[str, Any]) -> None:
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))


@dataclass
class TrainingReport:
    """What training did: the kept epoch and round, the freeze plan of every round, the prefix
    caches, wall times (timing.json, never metrics.json: it must be reproducible), the frozen
    tensors' check, and the target's watched score during an adaptation."""

    best_epoch: int
    best_round: int
    epochs_run: int
    monitor: str | None
    plans: list[dict[str, Any]]
    cache: list[dict[str, Any]]
    timing: dict[str, Any]
    plan_text: str
    freeze_check: dict[str, Any]
    target_watch: dict[str, Any] | None = None

    @classmethod
    def untrained(cls, plan_text: str) -> TrainingReport:
        """Nothing trained by gradient steps (a kept source model, a fitted classic head)."""
        return cls(0, 0, 0, None, [], [], {}, plan_text,
                   {"frozen_tensors": 0, "unchanged": True})

    def metrics(self) -> dict[str, Any]:
        """The part of metrics.json that describes training."""
        out = {"best_epoch": self.best_epoch, "best_round": self.best_round,
               "epochs_run": self.epochs_run, "monitor": self.monitor, "cache": self.cache,
               "freeze_check": self.freeze_check}
        if self.target_watch:
            out["target_watch"] = self.target_watch
        return out

    @property
    def params(self) -> tuple[int, int] | None:
        """(trainable, total) parameters of the last round (None: no round ran)."""
        if not self.plans:
            return None
        return self.plans[-1]["trainable_params"], self.plans[-1]["total_params"]


# A drop of the target's validation score from its best epoch to the kept one larger than this
# (AUROC or accuracy) is worth a warning.
WATCH_MARGIN = 0.02


def watch_verdict(watched: dict[int, float], kept: int) -> dict[str, Any]:
    """Compare the target validation score at the kept epoch with its best and first epochs."""
    finite = {e: v for e, v in watched.items() if v is not None and not math.isnan(v)}
    if not finite:
        return {}
    best_epoch = max(finite, key=lambda e: (finite[e], -e))
    first = finite[min(finite)]
    at_kept = finite.get(kept, finite[max(finite)])
    return {"first_epoch": round(first, 6), "best": round(finite[best_epoch], 6),
            "best_epoch": best_epoch, "kept_epoch": kept, "kept": round(at_kept, 6),
            "warned": finite[best_epoch] - at_kept > WATCH_MARGIN}
