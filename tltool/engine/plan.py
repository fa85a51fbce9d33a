"""What a training run is given: its rounds (how much is frozen, how long, how fast), its
rows, and where its results go. Everything here is decided before the loop starts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tltool.adapt import Adaptation
from tltool.cache import PrefixStore
from tltool.freeze import check_frozen_layers
from tltool.runtime import Runtime
from tltool.task import Task
from tltool.tensors import Tensors


@dataclass
class Round:
    """One round: how much is frozen and how long/fast it trains."""

    frozen_layers: int
    strategy: str
    epochs: int
    lr: float
    backbone_lr_mult: float


def rounds_of(cfg, n_blocks: int, block_names: list[str]) -> list[Round]:
    """The config's rounds (train.rounds, or one round of model.* and train.*), each checked
    against the network's blocks."""
    m, t = cfg.model, cfg.train
    if not t.rounds:
        rounds = [Round(m.frozen_layers, m.strategy, t.epochs, t.lr, t.backbone_lr_mult)]
    else:
        rounds = [Round(r.frozen_layers if r.frozen_layers is not None else m.frozen_layers,
                        r.strategy or m.strategy, r.epochs, r.lr or t.lr,
                        t.backbone_lr_mult if r.backbone_lr_mult is None else r.backbone_lr_mult)
                  for r in t.rounds]
    for i, r in enumerate(rounds):
        where = f"train.rounds.{i}.frozen_layers" if t.rounds else "model.frozen_layers"
        check_frozen_layers(r.frozen_layers, r.strategy, n_blocks, block_names, where)
    return rounds


@dataclass
class PooledRows:
    """Labelled source rows trained alongside the target rows (pooled training): each source
    row's loss weighs `weight` against a target row's 1."""

    rows: Tensors
    weight: float


@dataclass
class TrainingData:
    """The rows of one training run. `val` None: no validation rows (a refit on every
    labelled row): each round runs its full epochs and the final weights are kept.
    `store`: prefix caches and prior signals shared with other runs on the same rows."""

    train: Tensors
    val: Tensors | None
    pooled: PooledRows | None = None
    adapt: Adaptation | None = None
    store: PrefixStore = field(default_factory=PrefixStore)


@dataclass
class TrainingPlan:
    """How to train: the rounds, the train.* settings, the seed of the data order, what is
    learnt (`task`, over `classes`), frozen BatchNorm's policy and the runtime."""

    rounds: list[Round]
    cfg: Any  # tltool.config.TrainConfig
    seed: int
    task: Task
    classes: list[str]
    bn_policy: str = "eval"
    rt: Runtime = field(default_factory=Runtime)

    @property
    def epochs(self) -> int:
        return sum(r.epochs for r in self.rounds)


@dataclass
class Sink:
    """Where training reports: `save(name, epoch, state=None)` writes a checkpoint (the best
    when the validation score improves, the last after every epoch with the training state a
    resumed run continues from), `metrics_csv` is the per-epoch CSV (appended and flushed
    every epoch), `log` takes information lines (the round plans, early stops)."""

    save: Callable[..., None]
    metrics_csv: Any = "/dev/null"
    log: Callable[[str], None] = logging.getLogger("tltool").info


def cache_plan(train: Tensors, n_frozen: int, train_cfg, bn_policy: str) -> tuple[int, str]:
    """How many leading blocks to serve from a cache this round, and why."""
    if train_cfg.cache == "off":
        return 0, "cache: off"
    if n_frozen == 0:
        return 0, "no frozen blocks"
    if bn_policy == "train":
        return 0, "bn_policy train: frozen BatchNorm statistics change every batch"
    if train.augments:
        if not train_cfg.cache_views:
            return 0, ("random training augmentation feeds the frozen blocks: computed every "
                       "epoch (set train.cache_views to cache augmented views)")
        return n_frozen, (f"first {n_frozen} frozen block(s) computed once for each of "
                          f"{train_cfg.cache_views} augmented views, cycled over the epochs")
    return n_frozen, f"first {n_frozen} frozen block(s) computed once"
