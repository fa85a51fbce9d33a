"""extract: frozen backbone features to .npz files, and classic sklearn heads fitted on them
(their decision rule chosen on the validation rows like any model's, decision.calibrate
included)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tltool import distributed
from tltool.config import ExperimentConfig
from tltool.decision import asks_threshold, choose_decision, threshold_applies
from tltool.errors import ConfigError, DataError
from tltool.features import features_of
from tltool.inputs import Inputs, load_inputs
from tltool.metrics import regression_report
from tltool.models import HeadSettings, build_model, model_spec
from tltool.models.backbones import get_spec, resolve_args
from tltool.models.base import BackboneSpec
from tltool.models.loading import load_trained
from tltool.models.sklearn_heads import (
    CLASSIFIER_HEADS,
    REGRESSOR_HEADS,
    sklearn_head,
    sklearn_regressor,
)
from tltool.routes.checks import check_input_fits
from tltool.runs.files import write_json, writing
from tltool.runs.folder import RunPlace, new_run, pinned_config
from tltool.runs.summary import ExtractionSummary, Result
from tltool.runtime import Runtime, make_runtime
from tltool.task import CLASSIFICATION
from tltool.weights import Weights, load_backbone_weights, resolve_weights

log = logging.getLogger("tltool")


def _heads(cfg: ExperimentConfig, regression: bool, section: str) -> list[str]:
    allowed = REGRESSOR_HEADS if regression else CLASSIFIER_HEADS
    heads = cfg.extract.heads if cfg.extract.heads is not None else list(allowed)
    wrong = [h for h in heads if h not in allowed]
    if wrong:
        task = "regression" if regression else "classification"
        raise ConfigError(f"extract.heads: {wrong} cannot fit {section}'s {task} label; "
                          f"allowed for {task}: {', '.join(allowed)}")
    return heads


def _network(cfg: ExperimentConfig) -> tuple:
    """The trained network whose backbone extracts (its spec and weights)."""
    m = cfg.model
    spec = get_spec(m.backbone)
    weights = resolve_weights(m.weights, spec)
    if weights.none:
        raise ConfigError("model.weights: extract needs trained weights (a pretrain run folder, "
                          "NAME_FOLDER/latest, a checkpoint file, or a pretrained set such as "
                          "imagenet), got 'none'")
    if weights.ckpt is not None:
        return load_trained(weights.ckpt), get_spec(weights.ckpt.backbone), weights
    if spec.input != "image":
        raise ConfigError("model.weights: a tabular backbone's features need a tltool "
                          "checkpoint (its preprocessing is saved there)")
    model = build_model(model_spec(m.backbone, resolve_args(m.backbone, m.backbone_args), 3,
                                   HeadSettings("linear", 1, 0.0), 1))
    load_backbone_weights(model, spec, weights)
    return model, spec, weights


def _sections(cfg: ExperimentConfig, spec: BackboneSpec, weights: Weights) -> dict[str, Inputs]:
    """The data sections whose features are computed, loaded with the model's encoding."""
    domains = {d: getattr(cfg, d) for d in ("source", "target") if getattr(cfg, d) is not None}
    if cfg.extract.fit_on not in domains:
        raise ConfigError(f"extract.fit_on: '{cfg.extract.fit_on}' but the config has no "
                          f"`{cfg.extract.fit_on}` data section")
    if cfg.extract.sections == "auto" and cfg.extract.heads != []:
        skipped = sorted(set(domains) - {cfg.extract.fit_on})
        if skipped:
            log.info("extract: no head fits on the %s data, so its features are not computed "
                     "(extract.sections: both computes them too)", skipped[0])
        domains = {cfg.extract.fit_on: domains[cfg.extract.fit_on]}
    return {d: load_inputs(c.model_copy(update={"augment": "none"}), d, spec, weights)
            for d, c in domains.items()}


def _check(cfg: ExperimentConfig, fit_inputs: Inputs) -> list[str]:
    """The heads to fit (every user error before a run folder exists)."""
    if fit_inputs.multilabel and cfg.extract.heads != []:
        raise ConfigError(f"extract: {cfg.extract.fit_on} is multi-label; the sklearn heads "
                          f"take one label per row (train a multilabel head with "
                          f"freeze-finetune and strategy linear_probe instead, or set "
                          f"extract.heads: [] for the features alone)")
    heads = _heads(cfg, fit_inputs.regression, cfg.extract.fit_on)
    if asks_threshold(cfg.decision) and not threshold_applies(fit_inputs.kind,
                                                              len(fit_inputs.classes)):
        raise ConfigError("decision.rule: 'threshold' needs a binary label (use 'argmax')")
    if cfg.adapt.method != "none":
        log.warning("adapt.method %r is not used by extract (its features come from fixed "
                    "weights); adapt with pretrain or freeze-finetune, then extract from that "
                    "run", cfg.adapt.method)
    return heads


@dataclass
class _Extracted:
    """Every split's features, and how fast they came."""

    feats: dict[tuple[str, str], np.ndarray]
    rows: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def _extract(run, model, loaded: dict[str, Inputs], blocks: int | None,
             rt: Runtime) -> _Extracted:
    """Features of every split of every loaded section, written to features/*.npz."""
    out = _Extracted({})
    run.file("features").mkdir()
    for d, inputs in loaded.items():
        for s in ("train", "val", "test"):
            split, tensors = getattr(inputs.data, s), getattr(inputs, s)
            start = time.perf_counter()
            out.feats[(d, s)] = features_of(model, tensors, blocks, rt,
                                            what=f"extract: {d} {s}").numpy()
            out.seconds += time.perf_counter() - start
            out.rows += len(tensors.x)
            with writing(run.file("features", f"{d}_{s}.npz")):
                np.savez(run.file("features", f"{d}_{s}.npz"), features=out.feats[(d, s)],
                         labels=np.asarray(split.y), ids=np.asarray(split.ids).astype(str),
                         classes=np.asarray(inputs.classes, dtype=str))
    return out


def _runtime(cfg: ExperimentConfig, model, spec: BackboneSpec,
             loaded: dict[str, Inputs]) -> Runtime:
    rt = make_runtime(cfg.train, spec.input == "image")
    rt.setup(model)
    first = next(iter(loaded.values())).train
    rt.tune(model, first.batch(slice(0, 16), train=False), label="extract",
            work=sum(len(getattr(i, s).y) for i in loaded.values() for s in ("train", "val",
                                                                              "test")))
    return rt


def extract(cfg: ExperimentConfig, argv: list[str] | None = None) -> Result:
    """Features of every split of source and target, then sklearn heads on `fit_on`."""
    model, spec, weights = _network(cfg)
    n_blocks = len(model.backbone.blocks)
    blocks = cfg.extract.blocks
    if blocks is not None and blocks > n_blocks:
        raise ConfigError(f"extract.blocks = {blocks} but the backbone has {n_blocks} blocks "
                          f"({', '.join(model.backbone.block_names)})")
    loaded = _sections(cfg, spec, weights)
    fit_inputs = loaded[cfg.extract.fit_on]
    heads_wanted = _check(cfg, fit_inputs)
    for d, inputs in loaded.items():
        check_input_fits(model, inputs, d)
    rt = _runtime(cfg, model, spec, loaded)
    with new_run(RunPlace(cfg.output.root, cfg.name), "extract", argv, cfg.seed,
                 pinned_config(cfg, weights.path)) as run:
        done = _extract(run, model, loaded, blocks, rt)
        d = cfg.extract.fit_on
        main = distributed.is_main()
        distributed.release()  # torchrun: features gathered; the heads are fitted by rank 0
        log.info("features: %d per row, %d rows at %.0f rows/s, written to %s",
                 done.feats[(d, "train")].shape[1], done.rows, done.rate, run.file("features"))
        heads = {kind: _fit(kind, cfg, done.feats, fit_inputs)
                 for kind in (heads_wanted if main else [])}
        summary = ExtractionSummary("extract", cfg.name, cfg.seed, cfg.model.weights,
                                    blocks or n_blocks, int(done.feats[(d, "train")].shape[1]),
                                    d, {k: v.data.summary() for k, v in loaded.items()}, heads)
        summary.write(run.path)
        write_json(run.file("timing.json"), {"images_or_rows": done.rows,
                                             "seconds": done.seconds,
                                             "rows_per_second": done.rate} | rt.describe())
    return Result(run.path, summary, rows_per_second=done.rate)


def _fit(kind: str, cfg: ExperimentConfig, feats, inputs: Inputs) -> dict[str, Any]:
    """One head fitted on the training rows' features, scored on validation and test."""
    if inputs.regression:
        out = _fit_regressor(kind, cfg, feats, inputs.data, cfg.extract.fit_on)
        test = out["test"]
        log.info("%s: test rmse %.4g, r2 %s", kind, test["rmse"],
                 "n/a" if test["r2"] is None else f"{test['r2']:.4f}")
        return out
    out = _fit_head(kind, cfg, feats, inputs.data, cfg.extract.fit_on)
    auroc = out["test"]["auroc"]
    log.info("%s: test accuracy %.4f, auroc %s", kind, out["test"]["accuracy"],
             "n/a" if auroc is None else f"{auroc:.4f}")
    return out


def _fit_regressor(kind: str, cfg: ExperimentConfig, feats, data, d: str) -> dict[str, Any]:
    head = sklearn_regressor(kind, cfg.seed)
    try:
        head.fit(feats[(d, "train")], data.train.y)
    except ValueError as exc:
        raise DataError(f"{data.origin}: cannot fit {kind} on {len(data.train)} rows: "
                        f"{exc}") from None
    return {"val": regression_report(data.val.y, head.predict(feats[(d, "val")])),
            "test": regression_report(data.test.y, head.predict(feats[(d, "test")]))}


def _fit_head(kind: str, cfg: ExperimentConfig, feats, data, d: str) -> dict[str, Any]:
    counts = np.bincount(data.train.y, minlength=len(data.classes))
    if counts.min() < 2:
        rare = [c for c, n in zip(data.classes, counts, strict=True) if n < 2]
        raise DataError(f"{data.origin}: the training rows hold fewer than 2 rows of class(es) "
                        f"{rare}; sklearn heads need at least 2 per class (raise n_train)")
    head = sklearn_head(kind, cfg.seed, cfg.train.class_weights == "balanced",
                        int(counts.min()))
    try:
        head.fit(feats[(d, "train")], data.train.y)
    except ValueError as exc:
        raise DataError(f"{data.origin}: cannot fit {kind} on {len(data.train)} rows: "
                        f"{exc}") from None
    proba_val = head.predict_proba(feats[(d, "val")])
    decision = choose_decision(cfg.decision, data.classes, CLASSIFICATION, proba_val,
                               data.val.y)
    out = {"threshold": decision.threshold,
           "val": decision.report(data.val.y, proba_val),
           "test": decision.report(data.test.y, head.predict_proba(feats[(d, "test")]))}
    if decision.calibration is not None:
        out["calibration"] = decision.calibration
    return out
