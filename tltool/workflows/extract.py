"""extract: frozen backbone features to .npz files, and classic sklearn heads fitted on them."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tltool import distributed
from tltool.config import ExperimentConfig
from tltool.errors import ConfigError, DataError
from tltool.features import features_of
from tltool.inputs import load_inputs
from tltool.metrics import choose_threshold, classification_report, regression_report
from tltool.models import HeadSettings, build_model, model_spec
from tltool.models.backbones import get_spec, resolve_args
from tltool.models.sklearn_heads import (
    CLASSIFIER_HEADS,
    REGRESSOR_HEADS,
    sklearn_head,
    sklearn_regressor,
)
from tltool.runs import write_json, writing
from tltool.runtime import make_runtime
from tltool.workflows.common import (
    check_input_fits,
    load_backbone_weights,
    load_trained,
    log,
    new_run,
    pin_config,
    resolve_weights,
)


def _heads(cfg: ExperimentConfig, regression: bool, section: str) -> list[str]:
    allowed = REGRESSOR_HEADS if regression else CLASSIFIER_HEADS
    heads = cfg.extract.heads if cfg.extract.heads is not None else list(allowed)
    wrong = [h for h in heads if h not in allowed]
    if wrong:
        task = "regression" if regression else "classification"
        raise ConfigError(f"extract.heads: {wrong} cannot fit {section}'s {task} label; "
                          f"allowed for {task}: {', '.join(allowed)}")
    return heads


def extract(cfg: ExperimentConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Features of every split of source and target, then sklearn heads on `fit_on`."""
    m = cfg.model
    spec = get_spec(m.backbone)
    weights = resolve_weights(m.weights, spec)
    if weights.ckpt is None and weights.name is None and weights.state is None:
        raise ConfigError("model.weights: extract needs trained weights (a pretrain run folder, "
                          "NAME_FOLDER/latest, a checkpoint file, or a pretrained set such as "
                          "imagenet), got 'none'")
    if weights.ckpt is not None:
        model = load_trained(weights.ckpt)
        spec = get_spec(weights.ckpt["spec"]["backbone"])
    else:
        if spec.input != "image":
            raise ConfigError("model.weights: a tabular backbone's features need a tltool "
                              "checkpoint (its preprocessing is saved there)")
        model = build_model(model_spec(m.backbone, resolve_args(m.backbone, m.backbone_args), 3,
                                       HeadSettings("linear", 1, 0.0), 1))
        load_backbone_weights(model, spec, weights)
    n_blocks = len(model.backbone.blocks)
    blocks = cfg.extract.blocks
    if blocks is not None and blocks > n_blocks:
        raise ConfigError(f"extract.blocks = {blocks} but the backbone has {n_blocks} blocks "
                          f"({', '.join(model.backbone.block_names)})")
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
    loaded = {d: load_inputs(c.model_copy(update={"augment": "none"}), d, cfg.seed, spec,
                             weights) for d, c in domains.items()}
    fit_inputs = loaded[cfg.extract.fit_on]
    if fit_inputs.multilabel and cfg.extract.heads != []:
        raise ConfigError(f"extract: {cfg.extract.fit_on} is multi-label; the sklearn heads "
                          f"take one label per row (train a multilabel head with "
                          f"freeze-finetune and strategy linear_probe instead, or set "
                          f"extract.heads: [] for the features alone)")
    regression = fit_inputs.regression
    heads_wanted = _heads(cfg, regression, cfg.extract.fit_on)
    if cfg.decision.rule == "threshold" and (regression or len(fit_inputs.classes) != 2):
        raise ConfigError("decision.rule: 'threshold' needs a binary label (use 'argmax')")
    if cfg.adapt.method != "none":
        log.warning("adapt.method %r is not used by extract (its features come from fixed "
                    "weights); adapt with pretrain or freeze-finetune, then extract from that "
                    "run", cfg.adapt.method)
    if cfg.decision.calibrate != "none":
        log.warning("decision.calibrate is not applied to extract's heads (they are reported, "
                    "not saved); to calibrate a head on frozen features, freeze-finetune with "
                    "strategy linear_probe")
    for d, inputs in loaded.items():
        check_input_fits(model, inputs, d)
    rt = make_runtime(cfg.train, spec.input == "image")
    rt.setup(model)
    first = next(iter(loaded.values())).train
    rt.tune(model, first.batch(slice(0, 16), train=False), label="extract",
            work=sum(len(getattr(i, s).y) for i in loaded.values() for s in ("train", "val",
                                                                              "test")))
    feats: dict[tuple[str, str], np.ndarray] = {}
    timing = {"images_or_rows": 0, "seconds": 0.0}
    with new_run(cfg.output.root, cfg.name, "extract", argv, cfg.seed,
                 pin_config(cfg, weights)) as run:
        run.file("features").mkdir()
        for d, inputs in loaded.items():
            for s in ("train", "val", "test"):
                split, tensors = getattr(inputs.data, s), getattr(inputs, s)
                start = time.perf_counter()
                feats[(d, s)] = features_of(model, tensors, blocks, rt,
                                            what=f"extract: {d} {s}").numpy()
                timing["seconds"] += time.perf_counter() - start
                timing["images_or_rows"] += len(tensors.x)
                with writing(run.file("features", f"{d}_{s}.npz")):
                    np.savez(run.file("features", f"{d}_{s}.npz"), features=feats[(d, s)],
                             labels=np.asarray(split.y), ids=np.asarray(split.ids).astype(str),
                             classes=np.asarray(inputs.classes, dtype=str))
        d = cfg.extract.fit_on
        main = distributed.is_main()
        distributed.release()  # torchrun: features gathered; the heads are fitted by rank 0
        rate = timing["images_or_rows"] / max(timing["seconds"], 1e-9)
        log.info("features: %d per row, %d rows at %.0f rows/s, written to %s",
                 feats[(d, "train")].shape[1], timing["images_or_rows"], rate,
                 run.file("features"))
        heads = {}
        for kind in heads_wanted if main else []:
            if regression:
                heads[kind] = _fit_regressor(kind, cfg, feats, fit_inputs.data, d)
                test = heads[kind]["test"]
                log.info("%s: test rmse %.4g, r2 %s", kind, test["rmse"],
                         "n/a" if test["r2"] is None else f"{test['r2']:.4f}")
                continue
            heads[kind] = _fit_head(kind, cfg, feats, fit_inputs.data, d)
            auroc = heads[kind]["test"]["auroc"]
            log.info("%s: test accuracy %.4f, auroc %s", kind, heads[kind]["test"]["accuracy"],
                     "n/a" if auroc is None else f"{auroc:.4f}")
        metrics = {"command": "extract", "name": cfg.name, "seed": cfg.seed,
                   "weights": m.weights, "blocks": blocks or n_blocks,
                   "feature_dim": int(feats[(d, "train")].shape[1]), "fit_on": d,
                   "data": {k: v.data.summary() for k, v in loaded.items()}, "heads": heads}
        write_json(run.file("metrics.json"), metrics)
        write_json(run.file("timing.json"), timing | {"rows_per_second": rate} |
                   rt.describe())
    return {"run": str(run.path), "metrics": metrics, "rows_per_second": rate}


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
    threshold = None
    if cfg.decision.rule == "threshold":
        threshold = choose_threshold(data.val.y, proba_val[:, 1],
                                     cfg.decision.optimize)["threshold"]
    return {"threshold": threshold,
            "val": classification_report(data.val.y, proba_val, data.classes, threshold),
            "test": classification_report(data.test.y, head.predict_proba(feats[(d, "test")]),
                                          data.classes, threshold)}
