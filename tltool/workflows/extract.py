"""extract: frozen backbone features to .npz files, and classic sklearn heads fitted on them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tltool.config import ExperimentConfig
from tltool.data.tabular import load_tabular
from tltool.errors import ConfigError, DataError
from tltool.metrics import choose_threshold, classification_report
from tltool.runs import write_json
from tltool.workflows.common import load_trained, log, new_run, resolve_weights


def sklearn_head(kind: str, seed: int, balanced: bool, min_class: int = 5):
    """A fresh classic classifier; standardised features suit the linear and kernel ones."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    weight = "balanced" if balanced else None
    if kind == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000,
                                                                  class_weight=weight))
    if kind == "random_forest":
        return RandomForestClassifier(n_estimators=300, random_state=seed, class_weight=weight,
                                      n_jobs=1)
    if kind == "svm":
        # Platt-scaled probabilities from internal cross-validation (SVC's own
        # `probability=True` is deprecated in recent scikit-learn).
        svc = SVC(random_state=seed, class_weight=weight)
        return make_pipeline(StandardScaler(), CalibratedClassifierCV(
            svc, method="sigmoid", cv=min(5, min_class), ensemble=False))
    raise ValueError(kind)


@torch.no_grad()
def features_of(model, x: torch.Tensor, blocks: int | None, batch_size: int = 2048) -> np.ndarray:
    model.eval()
    parts = [model.backbone.forward_blocks(x[i:i + batch_size], blocks)
             for i in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy()


def extract(cfg: ExperimentConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Features of every split of source and target, then sklearn heads on `fit_on`."""
    weights = resolve_weights(cfg.model.weights)
    if weights is None:
        raise ConfigError("model.weights: extract needs trained weights (a pretrain run folder, "
                          "NAME_FOLDER/latest or a checkpoint file), got 'none'")
    _, ckpt = weights
    model, pre = load_trained(ckpt)
    n_blocks = len(model.backbone.blocks)
    blocks = cfg.extract.blocks
    if blocks is not None and blocks > n_blocks:
        raise ConfigError(f"extract.blocks = {blocks} but the backbone has {n_blocks} blocks "
                          f"({', '.join(model.backbone.block_names)})")
    domains = {d: getattr(cfg, d) for d in ("source", "target") if getattr(cfg, d) is not None}
    if cfg.extract.fit_on not in domains:
        raise ConfigError(f"extract.fit_on: '{cfg.extract.fit_on}' but the config has no "
                          f"`{cfg.extract.fit_on}` data section")
    loaded = {d: load_tabular(c, cfg.seed) for d, c in domains.items()}
    fit_data = loaded[cfg.extract.fit_on]
    if cfg.decision.rule == "threshold" and len(fit_data.classes) != 2:
        raise ConfigError("decision.rule: 'threshold' needs a binary label (use 'argmax')")
    feats: dict[tuple[str, str], np.ndarray] = {}
    with new_run(cfg.output.root, cfg.name, "extract", argv, cfg.seed, cfg) as run:
        run.file("features").mkdir()
        for d, data in loaded.items():
            for s in ("train", "val", "test"):
                split = getattr(data, s)
                x = torch.from_numpy(pre.transform(split.frame, data.origin))
                feats[(d, s)] = features_of(model, x, blocks)
                np.savez(run.file("features", f"{d}_{s}.npz"), features=feats[(d, s)],
                         labels=split.y, ids=split.ids.astype(str),
                         classes=np.asarray(data.classes, dtype=str))
        log.info("features: %d per row, written to %s", feats[(d, "train")].shape[1],
                 run.file("features"))
        heads = {}
        d = cfg.extract.fit_on
        for kind in cfg.extract.heads:
            heads[kind] = _fit_head(kind, cfg, feats, fit_data, d)
            log.info("%s: test accuracy %.4f, auroc %s", kind, heads[kind]["test"]["accuracy"],
                     heads[kind]["test"]["auroc"])
        metrics = {"command": "extract", "name": cfg.name, "seed": cfg.seed,
                   "weights": cfg.model.weights, "blocks": blocks or n_blocks,
                   "feature_dim": int(feats[(d, "train")].shape[1]), "fit_on": d,
                   "data": {k: v.summary() for k, v in loaded.items()}, "heads": heads}
        write_json(run.file("metrics.json"), metrics)
    return {"run": str(run.path), "metrics": metrics}


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
