"""A route: a config's way to the target model, loaded and checked before any run folder
exists (`prepare`), and what it does in the config's words (`describe_route`).

A route says which weights and prior, which rows (target only, or pooled with the source's),
which head (trained by gradient steps, or a classic head fitted by scikit-learn). The checks
live in tltool.routes.checks, the other rows and models in tltool.routes.others, building and
training in tltool.routes.training; the commands (tltool.workflows.train) and `tltool select`
(which trains each route on cross-validation folds) share them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tltool.adapt import Adaptation
from tltool.checkpoint import Checkpoint
from tltool.config import DataConfig, ExperimentConfig
from tltool.errors import ConfigError
from tltool.inputs import Encoding, Inputs, is_image_data, load_inputs
from tltool.models.backbones import get_spec, resolve_args
from tltool.models.base import BackboneSpec
from tltool.models.classic import CLASSIC_HEADS
from tltool.routes.checks import (
    check_combinations,
    check_keep_head,
    check_kept_classes,
    check_prior,
    check_task,
    warn_ignored,
)
from tltool.routes.others import adaptation, inherit_args, pooled_rows, prior_checkpoints
from tltool.runs.folder import check_output_root
from tltool.weights import Weights, resolve_weights

log = logging.getLogger("tltool")


@dataclass
class Route:
    """A config's way to the target model, loaded and checked (no run folder yet)."""

    cfg: ExperimentConfig
    command: str
    section: str  # the data section trained on: source (pretrain) or target
    spec: BackboneSpec
    weights: Weights
    args: dict[str, Any]  # backbone options
    inputs: Inputs
    label: str
    prior: list[Checkpoint] | None  # the prior models' checkpoints (model.prior)
    pooled: Inputs | None  # labelled source rows, encoded like the target (train.source_weight)
    adaptation: Adaptation | None
    adapt_info: dict[str, Any] | None
    prior_path: list[Path] | None = None  # where the prior models came from (runs or files)

    @property
    def classes(self) -> list[str]:
        return self.inputs.classes

    @property
    def multilabel(self) -> bool:
        return self.inputs.multilabel

    @property
    def regression(self) -> bool:
        return self.inputs.regression

    @property
    def kind(self) -> str:
        return self.inputs.kind

    @property
    def classic(self) -> bool:
        """The head is fitted by scikit-learn (a kept classic source head counts too)."""
        if self.cfg.model.keep_head and self.weights.ckpt:
            return self.weights.ckpt.head in CLASSIC_HEADS
        return self.cfg.model.head in CLASSIC_HEADS

    @property
    def source_only(self) -> bool:
        """The source model as it is: kept head, nothing trained on the target."""
        return self.cfg.model.keep_head and (self.classic or self.epochs == 0)

    @property
    def epochs(self) -> int:
        t = self.cfg.train
        return sum(r.epochs for r in t.rounds) if t.rounds else t.epochs


class InputCache:
    """Loaded data sections by what they depend on, so routes that read the same data with the
    same encoding share one load (tltool select prepares many routes on one data set).

    `fit_rows`: the rows a table's own encoding is fitted on when no pretrained model fixes it
    ("train": the training split; "labelled": training + validation rows, as tltool select
    learns from both)."""

    def __init__(self, fit_rows: str = "train") -> None:
        self._loaded: dict[str, Any] = {}
        self.fit_rows = fit_rows

    def load(self, data_cfg: DataConfig, section: str, spec: BackboneSpec, weights: Weights,
             encoding: Encoding = Encoding(), also: DataConfig | None = None) -> Inputs:
        """`encoding`: like and pool (the rows it is fitted on are the cache's `fit_rows`);
        `also`: a data section whose every row the encoding is fitted on too (pooled
        training: the encoding must suit the source rows as well)."""
        like = encoding.like
        state = like if like is not None else weights.preprocessor
        key = json.dumps([data_cfg.model_dump(mode="json"), section, spec.name, weights.name,
                          state, encoding.pool, spec.input, self.fit_rows,
                          None if also is None else also.model_dump(mode="json")],
                         sort_keys=True, default=str)
        if key not in self._loaded:
            extra = None if also is None or state is not None else self.frame(also)
            self._loaded[key] = load_inputs(data_cfg, section, spec, weights, Encoding(
                like, encoding.pool, self.fit_rows, extra))
        return self._loaded[key]

    def frame(self, data_cfg: DataConfig):
        """Every labelled row of a table section (its three splits), as read."""
        import pandas as pd

        from tltool.data.tabular import load_tabular

        key = json.dumps(["frame", data_cfg.model_dump(mode="json")], sort_keys=True,
                         default=str)
        if key not in self._loaded:
            data = load_tabular(data_cfg)
            self._loaded[key] = pd.concat([data.train.frame, data.val.frame, data.test.frame])
        return self._loaded[key]


def _no_source_refs(cfg: ExperimentConfig) -> None:
    for key in ("weights", "prior_weights"):
        refs = getattr(cfg.model, key)
        for ref in refs if isinstance(refs, list) else [refs]:
            if isinstance(ref, str) and ref.startswith("source:"):
                raise ConfigError(f"model.{key}: {ref!r} names a source model that `tltool "
                                  f"select` pretrains; it works only in select.candidates of a "
                                  f"select with target labels (elsewhere give a run folder or "
                                  f"a checkpoint file)")


def _prior(cfg: ExperimentConfig, data_cfg: DataConfig, section: str, weights: Weights):
    """The prior's checkpoints and paths, and the input encoding they fix (or Nones)."""
    if cfg.model.prior == "none":
        return None, None, None
    prior, prior_path = prior_checkpoints(cfg)
    like = prior[0].preprocessor
    if (like.get("kind") == "image") != is_image_data(data_cfg):
        kinds = ("images", "table rows") if like.get("kind") == "image" else ("table rows",
                                                                             "images")
        raise ConfigError(f"model.prior_weights: the prior model takes {kinds[0]} but "
                          f"{section} holds {kinds[1]}; a prior must read the same kind of "
                          f"data as the model")
    return prior, prior_path, like


def _weights(cfg: ExperimentConfig, command: str, spec: BackboneSpec) -> Weights:
    m = cfg.model
    weights = resolve_weights(m.weights, spec)
    if command == "freeze-finetune" and weights.path is None and weights.name is None \
            and m.prior == "none" and cfg.train.source_weight == 0 and m.head not in CLASSIC_HEADS:
        log.info("model.weights is none: a target-only network from random weights (no "
                 "transfer; to transfer, name the source run, e.g. model.weights: "
                 "runs/NAME/latest)")
    return weights


def prepare(cfg: ExperimentConfig, command: str, cache: InputCache | None = None) -> Route:
    """Load and check what a route needs: weights, prior, data (and the other domain's rows
    for pooled training or adaptation). Every user error surfaces here, before a run folder."""
    m = cfg.model
    data_cfg = cfg.source if command == "pretrain" else cfg.target
    section = "source" if command == "pretrain" else "target"
    cache = cache or InputCache()
    check_output_root(cfg.output.root)
    _no_source_refs(cfg)
    spec = get_spec(m.backbone)  # unknown backbone: fail before reading data
    check_combinations(cfg, command)
    weights = _weights(cfg, command, spec)
    prior, prior_path, like = _prior(cfg, data_cfg, section, weights)
    warn_ignored(cfg, weights)
    if prior is not None and weights.ckpt is not None and weights.preprocessor != like:
        raise ConfigError("model.prior_weights: the prior encodes its inputs differently from "
                          "model.weights (other columns, scaling or image size); use a prior "
                          "trained on the same source section, or model.weights none")
    if m.keep_head:
        check_keep_head(cfg, weights)
    args = (inherit_args(cfg, weights.ckpt, weights.path) if weights.ckpt
            else resolve_args(m.backbone, m.backbone_args))
    if m.head in CLASSIC_HEADS:
        from tltool.models.classic_args import classic_args

        classic_args(m.head, m.head_args)
    pooled_table = (cfg.train.source_weight > 0 and cfg.source is not None
                    and not is_image_data(cfg.source) and not is_image_data(data_cfg))
    inputs = cache.load(data_cfg, section, spec, weights, Encoding(like=like),
                        also=cfg.source if pooled_table else None)
    label = getattr(inputs.data, "label", None) or data_cfg.label or "label"
    check_task(cfg, section, label, inputs)
    if prior is not None:
        check_prior(cfg, prior, inputs)
    if m.keep_head:
        check_kept_classes(weights.ckpt, inputs)
    pooled = pooled_rows(cfg, inputs, spec, weights, cache)
    adapted, adapt_info = adaptation(cfg, command, inputs, spec, weights)
    return Route(cfg, command, section, spec, weights, args, inputs, label, prior, pooled,
                 adapted, adapt_info, prior_path)


def describe_route(route: Route) -> dict[str, Any]:
    """What this route does, in the config's words (metrics.json `route`)."""
    m, t = route.cfg.model, route.cfg.train
    return {"backbone": m.backbone, "head": (route.weights.ckpt.head
                                            if m.keep_head and route.weights.ckpt else m.head),
            "strategy": None if route.classic else m.strategy,
            "frozen_layers": None if route.classic else m.frozen_layers,
            "keep_head": m.keep_head, "source_only": route.source_only,
            "prior": None if route.prior is None else {
                "mode": m.prior, "weights": [str(p) for p in route.prior_path]},
            "pooled": None if route.pooled is None else {
                "source_weight": t.source_weight, "domain_offset": t.domain_offset,
                "source_rows": int(sum(len(getattr(route.pooled, s))
                                       for s in ("train", "val", "test")))},
            "l2sp": t.l2sp.model_dump() if (t.l2sp.alpha or t.l2sp.beta) else None,
            "adapt": route.cfg.adapt.method if route.cfg.adapt.method != "none" else None}
