"""From a data section and the chosen weights to model-ready tensors, and back from a checkpoint.

Tabular rows go through a `TabularPreprocessor`; images are stored as uint8 tensors and turned
into model input batch by batch (`tltool.data.images.prepare.make_prepare`). What a trained
model needs to treat new data the same way is the *input state*, a plain dict saved in every
checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tltool.config import DataConfig
from tltool.data.preprocess import TabularPreprocessor
from tltool.datasets import TABLES
from tltool.errors import ConfigError, DataError
from tltool.models.base import BackboneSpec
from tltool.suggest import did_you_mean
from tltool.task import CLASSIFICATION, MULTILABEL, REGRESSION
from tltool.tensors import Tensors
from tltool.weights import Weights

log = logging.getLogger("tltool")


@dataclass
class Inputs:
    data: Any  # TabularData or ImageData
    train: Tensors
    val: Tensors
    test: Tensors
    state: dict[str, Any]
    n_inputs: int
    multilabel: bool
    # Every training-pool row with its label unused (the labelled training rows, those n_train
    # left out and, in tables, rows with an empty label): what domain adaptation aligns.
    # Built only on request (`Encoding(pool=True)`).
    pool: Tensors | None = None
    # Regression: the label's training mean and standard deviation. The model predicts in the
    # label's own units; the loss compares standardised values (see tltool.engine.Task).
    target_scale: tuple[float, float] | None = None

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def regression(self) -> bool:
        return self.target_scale is not None

    @property
    def kind(self) -> str:
        """What is learnt: classification, multilabel or regression."""
        return REGRESSION if self.regression else MULTILABEL if self.multilabel \
            else CLASSIFICATION


def is_image_data(cfg: DataConfig) -> bool:
    """Image folders/CSVs and built-in image sets; an unknown built-in name lists all."""
    from tltool.data.images.dataset import is_image_config
    from tltool.datasets.images import IMAGE_SETS

    if cfg.kind == "builtin" and cfg.name not in TABLES and cfg.name not in IMAGE_SETS:
        names = [*TABLES, *IMAGE_SETS]
        hint = did_you_mean(cfg.name, names, around=("", " "))
        raise DataError(f"unknown built-in data set {cfg.name!r}; {hint}available: "
                        f"{', '.join(names)}")
    return is_image_config(cfg)


@dataclass(frozen=True)
class Encoding:
    """How a data section is encoded besides what the weights fix.

    `like`: an input state to encode with instead (the other domain of a domain adaptation
    run is encoded exactly like the main one). `pool`: also encode the unlabelled pool.
    Tables whose encoding is fitted here (no `like`, no pretrained state): on the training
    split (`fit_rows` "train"), or on training + validation rows ("labelled": tltool select
    learns from both), plus the rows of `also_fit` (a frame: pooled source rows)."""

    like: dict[str, Any] | None = None
    pool: bool = False
    fit_rows: str = "train"
    also_fit: Any = None


def load_inputs(cfg: DataConfig, section: str, spec: BackboneSpec, weights: Weights,
                encoding: Encoding = Encoding()) -> Inputs:
    """Load a data section and encode it the way the model (and its weights) expect."""
    like = encoding.like
    image = is_image_data(cfg)
    if image and cfg.task == "regression":
        raise ConfigError(f"{section}.task: 'regression' is supported for tables (kind csv or "
                          f"a built-in table); {cfg.name or cfg.path} holds images with classes")
    if image != (spec.input == "image"):
        what = "images" if image else "table rows"
        raise ConfigError(f"{section}: holds {what} but backbone {spec.name!r} takes "
                          f"{spec.input} input; pick a matching backbone (`tltool backbones`)")
    source_state = like if like is not None else weights.preprocessor
    inputs = (_image_inputs(cfg, spec, weights, source_state) if image
              else _tabular_inputs(cfg, source_state, encoding))
    for note in inputs.data.notes:  # also in metrics.json; said now so a user sees it
        log.info("%s: %s", section, note)
    if encoding.pool:
        inputs.pool = pool_of(inputs)
    return inputs


def unlabelled_rows(inputs: Inputs) -> Tensors | None:
    """Training-pool rows whose labels are not used (those n_train left out and, in tables,
    rows with an empty label), encoded like the labelled ones; None when there are none."""
    data, train = inputs.data, inputs.train
    rest = data.unlabeled
    if rest is None or len(rest) == 0:
        return None
    if inputs.state["kind"] == "tabular":
        x = torch.from_numpy(encoder_from_state(inputs.state).transform(rest.frame, data.origin))
    elif hasattr(train.x, "materialize"):
        from tltool.data.images.decoding import LazyImages

        x = LazyImages(list(rest.x.files), train.x.size)
    else:
        x = rest.x
    return Tensors(x, torch.full((len(x),), -1, dtype=torch.long), train.prepare, train.augments)


def pool_of(inputs: Inputs) -> Tensors:
    """Labelled training rows + unlabelled ones, encoded the same way; labels set to -1."""
    data, train = inputs.data, inputs.train
    rest = data.unlabeled
    if rest is None or len(rest) == 0:
        x = train.x
    elif inputs.state["kind"] == "tabular":
        x = torch.cat([train.x, torch.from_numpy(
            encoder_from_state(inputs.state).transform(rest.frame, data.origin))])
    elif hasattr(train.x, "materialize"):  # images decoded on demand
        from tltool.data.images.decoding import LazyImages

        x = LazyImages([*train.x.files, *rest.x.files], train.x.size)
    else:
        x = torch.cat([train.x, rest.x])
    return Tensors(x, torch.full((len(x),), -1, dtype=torch.long), train.prepare, train.augments)


def _tabular_inputs(cfg: DataConfig, source_state: dict | None, encoding: Encoding) -> Inputs:
    import pandas as pd

    from tltool.data.tabular import load_tabular

    data = load_tabular(cfg)
    if source_state is None:
        labelled = encoding.fit_rows == "labelled"
        frames = [data.train.frame] + ([data.val.frame] if labelled else [])
        also = encoding.also_fit
        if also is not None:
            frames.append(also[[c for c in data.feature_columns if c in also]])
        pre = TabularPreprocessor().fit(pd.concat(frames), data.feature_columns,
                                        data.categorical, data.origin)
    else:
        # A pretrained first block expects the source's columns, scaling and categories.
        pre = TabularPreprocessor.from_state(source_state)
        if data.label in pre.input_columns:
            raise DataError(f"{data.origin}: the source model takes column {data.label!r} as an "
                            f"input, but here it is the label to predict; leave it out of the "
                            f"source section (drop: [{data.label}]) and pretrain again")
        unseen = pre.unseen_counts(data.train.frame)
        if unseen:
            data.notes.append(f"training rows with categories the source never saw: {unseen}")
    state = {"kind": "tabular", **pre.state_dict()}
    splits = [encode_tabular(pre, getattr(data, s), data.origin) for s in ("train", "val", "test")]
    scale = None
    if data.task == "regression":
        y = np.asarray(data.train.y, dtype=np.float64)
        scale = (float(y.mean()), float(y.std()) or 1.0)
    return Inputs(data, *splits, state, int(splits[0].x.shape[1]), multilabel=False,
                  target_scale=scale)


def encode_tabular(pre: TabularPreprocessor, split, origin: str) -> Tensors:
    x = torch.from_numpy(pre.transform(split.frame, origin))
    y = np.asarray(split.y)
    y = np.array(y, dtype=np.float64 if y.dtype.kind == "f" else np.int64)  # float: regression
    return Tensors(x, torch.from_numpy(y))


def _image_inputs(cfg: DataConfig, spec: BackboneSpec, weights: Weights,
                  source_state: dict | None) -> Inputs:
    from tltool.data.images.dataset import load_images

    if source_state is not None and source_state.get("kind") == "image":
        size = cfg.image_size or source_state["size"]
        mean, std = source_state["mean"], source_state["std"]
    else:
        size = cfg.image_size or spec.default_size
        mean, std = spec.norm(weights.name)
    data = load_images(cfg, size)
    state = {"kind": "image", "size": int(size), "mean": list(mean), "std": list(std),
             "channels": 3, "augment": cfg.augment, "multilabel": bool(data.multilabel)}
    splits = [encode_images(state, getattr(data, s).x, getattr(data, s).y)
              for s in ("train", "val", "test")]
    return Inputs(data, *splits, state, 3, multilabel=data.multilabel)


def encode_images(state: dict[str, Any], x: torch.Tensor, y: np.ndarray) -> Tensors:
    """uint8 images + targets; prepare() resizes, normalises (and augments when training)."""
    from tltool.data.images.prepare import make_prepare

    prepare = make_prepare(state["size"], state["mean"], state["std"], state["channels"],
                           state.get("augment", "none"))
    y = torch.from_numpy(np.asarray(y))
    return Tensors(x, y.float() if y.dim() == 2 else y.long(), prepare,
                   augments=state.get("augment", "none") != "none")


def encoder_from_state(state: dict[str, Any]):
    """The saved input state as an object with the right `encode` for new data."""
    if state.get("kind") == "image":
        return state
    return TabularPreprocessor.from_state(state)


def split_digest(data) -> dict[str, Any]:
    """Row count and a hash of the row ids of each split: saved with a run, so `evaluate`
    can tell when the data behind a config changed since training (a re-split folder or CSV
    could put training rows into the test split)."""
    import hashlib

    out = {}
    for name in ("train", "val", "test"):
        ids = [str(i) for i in np.asarray(getattr(data, name).ids).tolist()]
        out[name] = {"rows": len(ids),
                     "sha1": hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()[:16]}
    return out
