"""A fitted scikit-learn HistGradientBoosting model copied into a TreeHead (plain tensors).

scikit-learn offers no public API to read a fitted model's trees or its starting raw
prediction, so `_fitted_trees` is the one function of tltool that reads those private
attributes; everything else goes through it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tltool.errors import ConfigError
from tltool.models.classic import MAX_TREE_NODES, MISSING_LOGIT, TreeHead


def _fitted_trees(est: Any) -> tuple[list[tuple[np.ndarray, int]], np.ndarray]:
    """(nodes, output within its iteration) of every tree of a fitted HistGradientBoosting
    model, in order, and its baseline raw prediction (float64, flat).

    No public alternative exists: scikit-learn keeps the fitted TreePredictors (each with its
    structured `nodes` array) in `_predictors`, the starting raw prediction in
    `_baseline_prediction`, and the categorical preprocessing in `_preprocessor`; none has a
    public accessor (predict only gives the sum)."""
    if getattr(est, "_preprocessor", None) is not None:
        raise ValueError("gradient boosting: categorical features are not supported (only "
                         "numeric matrices are passed)")
    trees = [(p.nodes, k) for per_iter in est._predictors for k, p in enumerate(per_iter)]
    base = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)
    return trees, base


def export_boosting(est: Any, task: str, n_classes: int, in_features: int,
                    n_append: int) -> nn.Module:
    """Copy a fitted HistGradientBoosting model's trees into a TreeHead."""
    trees, base = _fitted_trees(est)
    n_nodes = max(nodes.shape[0] for nodes, _ in trees)
    if len(trees) * n_nodes > MAX_TREE_NODES:
        raise ConfigError(f"model.head_args: gradient boosting grew {len(trees)} trees of up "
                          f"to {n_nodes} nodes, over the {MAX_TREE_NODES:,} a checkpoint may "
                          f"hold; lower max_iter or max_leaf_nodes")
    n_outputs = 1 if task == "regression" else n_classes
    head = TreeHead(task, in_features, n_outputs, n_append, len(trees), n_nodes)
    out_index, baseline = _boosting_outputs(est, base, task, n_classes)
    with torch.no_grad():
        for t, (nodes, k) in enumerate(trees):
            head.set_tree(t, nodes, out_index[k])
        head.baseline.copy_(torch.from_numpy(baseline))
    head.fit_info = {"n_iter": int(est.n_iter_)}
    return head


def _boosting_outputs(est: Any, base: np.ndarray, task: str,
                      n_classes: int) -> tuple[list[int], np.ndarray]:
    """The logit each of sklearn's per-iteration outputs adds to, and the logits' baseline
    (base: sklearn's baseline raw prediction)."""
    if task == "regression":
        return [0], base
    classes = np.asarray(est.classes_, dtype=np.int64)
    baseline = np.full(n_classes, MISSING_LOGIT)
    if classes.size == 2:  # one raw score z for the second class: logits [0, z]
        baseline[classes[0]], baseline[classes[1]] = 0.0, base[0]
        return [int(classes[1])], baseline
    baseline[classes] = base
    return [int(c) for c in classes], baseline
