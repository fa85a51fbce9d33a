"""Classic heads: scikit-learn models exported as torch modules made of plain tensors.

A classic head is fitted by scikit-learn (or scipy, where scikit-learn lacks a feature: a
logistic regression with a per-row offset) and then copied into an `nn.Module` whose whole
state is tensors (buffers). Saved in a `torch.save` dict and read back with
`torch.load(..., weights_only=True)`, such a model holds no pickled object, so loading a file
can never run code. The module maps an input matrix to logits, like a neural head:

- classification: (N, n_classes) logits whose softmax is scikit-learn's `predict_proba`
  (binary: logits [0, z], so the softmax is sigmoid(z));
- regression: (N, 1), scikit-learn's `predict`.

`classic_shape` describes a module's tensor sizes as a small JSON-able dict (stored in a
checkpoint's spec); `build_classic_head` rebuilds an empty module from it, treating it as
untrusted; `check_classic_state` checks the loaded tensors (tree indices in range, values
finite), so a crafted file is refused instead of crashing or looping.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from scipy import optimize, special
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from tltool.errors import CheckpointError, ConfigError, DataError

CLASSIC_HEADS = ("logistic_regression", "ridge", "gradient_boosting")

_TASK_HEADS = {
    "classification": ("logistic_regression", "gradient_boosting"),
    "regression": ("ridge", "gradient_boosting"),
}

CLASSIC_ARGS: dict[str, dict[str, Any]] = {
    "logistic_regression": {"C": 1.0, "max_iter": 5000, "tol": 1e-4},
    "ridge": {"alpha": "auto"},
    "gradient_boosting": {"learning_rate": 0.1, "max_iter": 100, "max_leaf_nodes": 31,
                          "min_samples_leaf": 20, "l2_regularization": 0.0, "max_depth": None},
}

RIDGE_ALPHAS = np.logspace(-3, 3, 13)  # the grid of ridge alpha "auto" (RidgeCV)

# Gradient tolerance of both logistic regression fits (scikit-learn's, and ours with an
# offset; same objective scaling) is model.head_args.tol, default scikit-learn's 1e-4: about
# 4e-3 from the optimum's probabilities on standardised breast-cancer data, and ten times
# faster than 1e-8 on raw pixels (MNIST: 216 against 2,224 L-BFGS iterations). 1e-8 gets
# within ~1e-6, so a fit with a zero offset and one without agree (the parity tests use it).
LOGISTIC_TOL = 1e-8

# A class absent from the training labels gets this constant logit: the model cannot predict
# it, and a finite value keeps log-probabilities and losses finite (float32 softmax gives 0).
MISSING_LOGIT = -1e9

# Bounds on a shape read from a checkpoint, checked before anything is allocated.
MAX_TREE_NODES = 1_000_000  # trees x nodes per tree
MAX_IN_FEATURES = 10_000_000
MAX_OUTPUTS = 100_000
MAX_LINEAR_WEIGHTS = 50_000_000  # outputs x (input width + 1): 400 MB of float64

# Rows x trees traversed at once: bounds the index tensors of a prediction (~32 MB each).
_TRAVERSAL_CELLS = 1 << 22


# --------------------------------------------------------------------------- head_args


def _number(value: Any, low: float, inclusive: bool) -> float:
    # PyYAML reads `1e-3` as a string (it wants `1.0e-3`), so numeric text is accepted too,
    # as pydantic does for the rest of the config.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError
    if value < low or (value == low and not inclusive):
        raise ValueError
    return float(value)


def _integer(value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError
    return int(value)


def _optional_integer(value: Any, low: int) -> int | None:
    return None if value is None else _integer(value, low)


def _alpha(value: Any) -> float | str:
    return "auto" if value == "auto" else _number(value, 0.0, inclusive=False)


# key -> (checker returning the normalised value or raising ValueError, what it expects)
_ARG_CHECKS = {
    "C": (lambda v: _number(v, 0.0, False), "a number > 0"),
    "tol": (lambda v: _number(v, 0.0, False), "a number > 0"),
    "max_iter": (lambda v: _integer(v, 1), "an integer >= 1"),
    "alpha": (_alpha, "a number > 0 or 'auto'"),
    "learning_rate": (lambda v: _number(v, 0.0, False), "a number > 0"),
    "max_leaf_nodes": (lambda v: _optional_integer(v, 2), "an integer >= 2 or null"),
    "min_samples_leaf": (lambda v: _integer(v, 1), "an integer >= 1"),
    "l2_regularization": (lambda v: _number(v, 0.0, True), "a number >= 0"),
    "max_depth": (lambda v: _optional_integer(v, 1), "an integer >= 1 or null"),
}


def _check_kind(kind: Any) -> None:
    if kind not in CLASSIC_HEADS:
        raise ConfigError(f"model.head: {kind!r} is not a classic head; classic heads: "
                          f"{', '.join(CLASSIC_HEADS)}")


def classic_args(kind: str, args: dict | None) -> dict[str, Any]:
    """The options of classic head `kind`: `args` (config key model.head_args) checked and
    completed with the defaults of CLASSIC_ARGS. Raises ConfigError naming the bad key."""
    _check_kind(kind)
    defaults = CLASSIC_ARGS[kind]
    allowed = ", ".join(defaults)
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ConfigError(f"model.head_args: expected a mapping of options ({allowed}), "
                          f"got {args!r}")
    out = dict(defaults)
    for key, value in args.items():
        if key not in defaults:
            raise ConfigError(f"model.head_args.{key}: not an option of {kind}; allowed: "
                              f"{allowed} (got {key}: {value!r})")
        check, expected = _ARG_CHECKS[key]
        try:
            out[key] = check(value)
        except ValueError:
            raise ConfigError(f"model.head_args.{key}: expected {expected}, got {value!r} "
                              f"(options of {kind}: {allowed})") from None
    return out


def check_classic_kind(kind: str, task: str) -> None:
    """Raise ConfigError unless classic head `kind` can be fitted for `task`."""
    _check_kind(kind)
    if task not in _TASK_HEADS:
        raise ConfigError(f"task {task!r}: classic heads need 'classification' or 'regression'")
    if kind not in _TASK_HEADS[task]:
        raise ConfigError(f"model.head: {kind!r} cannot be fitted for {task}; classic heads "
                          f"for {task}: {', '.join(_TASK_HEADS[task])}")


# --------------------------------------------------------------------------- fitting


def fit_classic_head(kind: str, x: np.ndarray, y: np.ndarray, *, task: str, n_classes: int,
                     args: dict | None = None, seed: int = 0,
                     sample_weight: np.ndarray | None = None,
                     offset: np.ndarray | None = None,
                     domain: np.ndarray | None = None,
                     class_weight: str | None = None) -> nn.Module:
    """Fit classic head `kind` on features `x` (n, d) and labels `y` (class indices, or
    standardised regression targets) and return it as a module of plain tensors.

    sample_weight: per-row weights. class_weight: None or "balanced" (ignored by ridge).
    domain: 0/1 per row (1 = target row); fitted as an extra last input column, and the
    returned module appends a constant 1 column itself (it predicts target rows).
    offset: per-row raw output added during fitting (classification: (n, n_classes)
    log-probabilities; regression: (n,) or (n, 1)); the module returns its own part only, so
    the caller's final output is module(x) + offset.
    """
    check_classic_kind(kind, task)
    options = classic_args(kind, args)
    if class_weight not in (None, "balanced"):
        raise ConfigError(f"class_weight: expected None or 'balanced', got {class_weight!r}")
    if kind == "gradient_boosting" and offset is not None:
        raise ConfigError("model.prior: offset cannot be used with model.head "
                          "gradient_boosting; give the prior as an input (model.prior: input)")
    x = _as_matrix(x)
    n = x.shape[0]
    y = _labels(y, n, task, n_classes)
    sample_weight = _row_weights(sample_weight, n)
    x_fit, n_append = _with_domain(x, domain)
    if kind == "gradient_boosting":
        return _fit_boosting(x_fit, y, task, n_classes, options, seed, sample_weight,
                             class_weight, n_append)
    _check_finite_inputs(x_fit, kind)
    if kind == "ridge":
        return _fit_ridge(x_fit, y, options, sample_weight, _regression_offset(offset, n),
                          n_append)
    return _fit_logistic(x_fit, y, n_classes, options, sample_weight, class_weight,
                         _class_offset(offset, n, n_classes), n_append)


def _as_matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"classic head: expected a non-empty (rows, features) matrix, got "
                        f"shape {x.shape}")
    # Fitted in float64 whatever the input (scikit-learn's trees convert anyway).
    return x.astype(np.float64, copy=False)


def _labels(y: np.ndarray, n: int, task: str, n_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,):
        raise DataError(f"classic head: {n} rows but labels of shape {y.shape}")
    if task == "regression":
        y = y.astype(np.float64)
        if not np.isfinite(y).all():
            raise DataError("classic head: the regression targets contain NaN or infinity")
        return y
    if n_classes < 2 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"classic head: expected integer class indices and n_classes >= 2, "
                        f"got dtype {y.dtype} and n_classes {n_classes}")
    if y.min() < 0 or y.max() >= n_classes:
        raise DataError(f"classic head: class indices must lie in [0, {n_classes})")
    if np.unique(y).size < 2:
        raise DataError("classic head: the training labels hold a single class; a classifier "
                        "needs at least two")
    return y.astype(np.int64)


def _row_weights(weight: np.ndarray | None, n: int) -> np.ndarray | None:
    if weight is None:
        return None
    weight = np.asarray(weight, dtype=np.float64).reshape(-1)
    if weight.shape != (n,) or not np.isfinite(weight).all() or (weight < 0).any() \
            or weight.sum() <= 0:
        raise DataError(f"classic head: sample_weight must be {n} finite weights >= 0, not "
                        f"all zero")
    return weight


def _with_domain(x: np.ndarray, domain: np.ndarray | None) -> tuple[np.ndarray, int]:
    """x with the domain indicator as an extra last column, and the number of columns added."""
    if domain is None:
        return x, 0
    domain = np.asarray(domain, dtype=np.float64).reshape(-1)
    if domain.shape != (x.shape[0],) or not np.isin(domain, (0.0, 1.0)).all():
        raise DataError(f"classic head: domain must be {x.shape[0]} values in {{0, 1}}")
    return np.hstack([x, domain[:, None]]), 1


def _check_finite_inputs(x: np.ndarray, kind: str) -> None:
    if not np.isfinite(x).all():
        raise DataError(f"model.head {kind}: the features contain NaN or infinity; impute "
                        f"them or use gradient_boosting, which handles missing values")


def _regression_offset(offset: np.ndarray | None, n: int) -> np.ndarray | None:
    if offset is None:
        return None
    offset = np.asarray(offset, dtype=np.float64)
    if offset.shape not in ((n,), (n, 1)) or not np.isfinite(offset).all():
        raise DataError(f"classic head: the regression offset must be {n} finite values, "
                        f"got shape {offset.shape}")
    return offset.reshape(-1)


def _class_offset(offset: np.ndarray | None, n: int, n_classes: int) -> np.ndarray | None:
    if offset is None:
        return None
    offset = np.asarray(offset, dtype=np.float64)
    if offset.shape != (n, n_classes) or not np.isfinite(offset).all():
        raise DataError(f"classic head: the offset must be finite log-probabilities of shape "
                        f"({n}, {n_classes}), got shape {offset.shape}")
    return offset


def _fit_ridge(x: np.ndarray, y: np.ndarray, options: dict, sample_weight: np.ndarray | None,
               offset: np.ndarray | None, n_append: int) -> nn.Module:
    from sklearn.linear_model import Ridge, RidgeCV

    alpha = options["alpha"]
    est = RidgeCV(alphas=RIDGE_ALPHAS) if alpha == "auto" else Ridge(alpha=alpha)
    # With an offset the ridge fits the residual: final prediction = module(x) + offset.
    target = y if offset is None else y - offset
    est.fit(x, target, sample_weight=sample_weight)
    head = LinearHead("ridge", "regression", x.shape[1] - n_append, 1, n_append)
    head.set_linear(np.reshape(est.coef_, (1, -1)), np.reshape(est.intercept_, (1,)))
    head.fit_info = {"alpha": float(getattr(est, "alpha_", alpha))}
    return head


def _fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, options: dict,
                  sample_weight: np.ndarray | None, class_weight: str | None,
                  offset: np.ndarray | None, n_append: int) -> nn.Module:
    classes = np.unique(y)
    if offset is None:
        from sklearn.linear_model import LogisticRegression

        est = LogisticRegression(C=options["C"], max_iter=options["max_iter"],
                                 tol=options["tol"], class_weight=class_weight)
        est.fit(x, y, sample_weight=sample_weight)
        coef, intercept, n_iter = est.coef_, est.intercept_, int(np.max(est.n_iter_))
    else:
        weight = _logistic_weights(y, classes, sample_weight, class_weight)
        coef, intercept, n_iter = _logistic_with_offset(x, y, classes, weight, offset,
                                                        options["C"], options["max_iter"],
                                                        options["tol"])
    head = LinearHead("logistic_regression", "classification", x.shape[1] - n_append,
                      n_classes, n_append)
    head.set_linear(*_class_layout(coef, intercept, classes, n_classes))
    head.fit_info = {"n_iter": n_iter}
    return head


def _class_layout(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray,
                  n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights and biases of all n_classes logits from a model of the classes present:
    binary -> [0, z] on those two classes; classes never seen -> MISSING_LOGIT."""
    weight = np.zeros((n_classes, coef.shape[1]))
    bias = np.full(n_classes, MISSING_LOGIT)
    if classes.size == 2:
        bias[classes[0]] = 0.0
        weight[classes[1]], bias[classes[1]] = coef[0], intercept[0]
    else:
        weight[classes], bias[classes] = coef, intercept
    return weight, bias


def _logistic_weights(y: np.ndarray, classes: np.ndarray, sample_weight: np.ndarray | None,
                      class_weight: str | None) -> np.ndarray:
    """Row weights times class weights, as scikit-learn's LogisticRegression combines them."""
    weight = np.ones(y.shape[0]) if sample_weight is None else sample_weight.copy()
    if class_weight == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        per_class = compute_class_weight("balanced", classes=classes, y=y, sample_weight=weight)
        weight *= per_class[np.searchsorted(classes, y)]
    return weight


def _logistic_with_offset(x: np.ndarray, y: np.ndarray, classes: np.ndarray,
                          weight: np.ndarray, offset: np.ndarray, c: float,
                          max_iter: int, tol: float = LOGISTIC_TOL
                          ) -> tuple[np.ndarray, np.ndarray, int]:
    """L2-penalised logistic regression with a fixed per-row offset of the logits.

    Minimises sum_i w_i loss_i + ||W||^2 / (2C) (intercepts not penalised), scikit-learn's
    LogisticRegression objective, scaled by 1 / sum(w) as scikit-learn does so that the
    gradient tolerance does not depend on the number of rows. Binary: one coefficient vector
    on the logit z, whose offset is offset[:, b] - offset[:, a]; more classes: multinomial
    with one vector per class. Returns (coef, intercept, iterations)."""
    binary = classes.size == 2
    if binary:
        target = (y == classes[1]).astype(np.float64)[:, None]
        shift = (offset[:, classes[1]] - offset[:, classes[0]])[:, None]
        loss = _binary_loss
    else:
        target = (y[:, None] == classes[None, :]).astype(np.float64)
        shift = offset[:, classes]
        loss = _multinomial_loss
    n_out, d = target.shape[1], x.shape[1]
    scale = 1.0 / weight.sum()

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        coef, intercept = params[: n_out * d].reshape(n_out, d), params[n_out * d:]
        value, grad_z = loss(x @ coef.T + intercept + shift, target, weight)
        grad_coef = grad_z.T @ x + coef / c
        grad = np.concatenate([grad_coef.ravel(), grad_z.sum(axis=0)])
        return scale * (value + 0.5 / c * float(np.sum(coef * coef))), scale * grad

    start = np.zeros(n_out * (d + 1))
    res = optimize.minimize(objective, start, method="L-BFGS-B", jac=True,
                            options={"maxiter": max_iter, "maxls": 50, "gtol": tol,
                                     "ftol": 64 * np.finfo(float).eps})
    if not res.success and res.nit >= max_iter:
        warnings.warn(f"logistic regression with an offset did not converge in {max_iter} "
                      f"iterations (raise model.head_args.max_iter)", ConvergenceWarning,
                      stacklevel=3)
    return res.x[: n_out * d].reshape(n_out, d), res.x[n_out * d:], int(res.nit)


def _binary_loss(z: np.ndarray, target: np.ndarray,
                 weight: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted log-loss of logits z (n, 1) and its gradient with respect to z."""
    value = float(weight @ (np.logaddexp(0.0, z[:, 0]) - target[:, 0] * z[:, 0]))
    return value, weight[:, None] * (special.expit(z) - target)


def _multinomial_loss(z: np.ndarray, target: np.ndarray,
                      weight: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted softmax cross-entropy of logits z (n, K), one-hot targets, and its gradient."""
    lse = special.logsumexp(z, axis=1)
    value = float(weight @ (lse - np.sum(target * z, axis=1)))
    return value, weight[:, None] * (np.exp(z - lse[:, None]) - target)


def _fit_boosting(x: np.ndarray, y: np.ndarray, task: str, n_classes: int, options: dict,
                  seed: int, sample_weight: np.ndarray | None, class_weight: str | None,
                  n_append: int) -> nn.Module:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    if task == "classification":
        est = HistGradientBoostingClassifier(**options, random_state=seed,
                                             class_weight=class_weight)
    else:
        est = HistGradientBoostingRegressor(**options, random_state=seed)
    est.fit(x, y, sample_weight=sample_weight)
    return _export_boosting(est, task, n_classes, x.shape[1] - n_append, n_append)


# --------------------------------------------------------------------------- export


def _export_boosting(est: Any, task: str, n_classes: int, in_features: int,
                     n_append: int) -> nn.Module:
    """Copy a fitted HistGradientBoosting model's trees into a TreeHead."""
    if getattr(est, "_preprocessor", None) is not None:
        raise ValueError("gradient boosting: categorical features are not supported (only "
                         "numeric matrices are passed)")
    trees = [(p.nodes, k) for per_iter in est._predictors for k, p in enumerate(per_iter)]
    n_nodes = max(nodes.shape[0] for nodes, _ in trees)
    if len(trees) * n_nodes > MAX_TREE_NODES:
        raise ConfigError(f"model.head_args: gradient boosting grew {len(trees)} trees of up "
                          f"to {n_nodes} nodes, over the {MAX_TREE_NODES:,} a checkpoint may "
                          f"hold; lower max_iter or max_leaf_nodes")
    n_outputs = 1 if task == "regression" else n_classes
    head = TreeHead(task, in_features, n_outputs, n_append, len(trees), n_nodes)
    out_index, baseline = _boosting_outputs(est, task, n_classes)
    with torch.no_grad():
        for t, (nodes, k) in enumerate(trees):
            head.set_tree(t, nodes, out_index[k])
        head.baseline.copy_(torch.from_numpy(baseline))
    head.fit_info = {"n_iter": int(est.n_iter_)}
    return head


def _boosting_outputs(est: Any, task: str, n_classes: int) -> tuple[list[int], np.ndarray]:
    """The logit each of sklearn's per-iteration outputs adds to, and the logits' baseline."""
    base = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)
    if task == "regression":
        return [0], base
    classes = np.asarray(est.classes_, dtype=np.int64)
    baseline = np.full(n_classes, MISSING_LOGIT)
    if classes.size == 2:  # one raw score z for the second class: logits [0, z]
        baseline[classes[0]], baseline[classes[1]] = 0.0, base[0]
        return [int(classes[1])], baseline
    baseline[classes] = base
    return [int(c) for c in classes], baseline


class _ClassicHead(nn.Module):
    """Common part: the input width, the outputs, and the appended domain column."""

    kind = ""

    def __init__(self, task: str, in_features: int, n_outputs: int, n_append: int):
        super().__init__()
        self.task = task
        self.in_features = in_features
        self.n_outputs = n_outputs
        self.fit_info: dict[str, Any] = {}
        # The domain indicator's value for the rows this model predicts (target rows: 1).
        self.register_buffer("append", torch.ones(n_append, dtype=torch.float64))

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self.kind} head: expected inputs of shape (N, "
                             f"{self.in_features}), got {tuple(x.shape)}")
        x = x.to(device=self.append.device, dtype=torch.float64)
        if self.append.numel():
            x = torch.cat([x, self.append.expand(x.shape[0], -1)], dim=1)
        return x

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (regression: predictions) in float64."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x).float()

    def shape(self) -> dict[str, Any]:
        """The sizes build_classic_head needs (see classic_shape)."""
        return {"kind": self.kind, "task": self.task, "in_features": self.in_features,
                "n_outputs": self.n_outputs, "domain_column": bool(self.append.numel())}


class LinearHead(_ClassicHead):
    """x @ weight.T + bias in float64: logistic regression or ridge."""

    def __init__(self, kind: str, task: str, in_features: int, n_outputs: int, n_append: int):
        super().__init__(task, in_features, n_outputs, n_append)
        self.kind = kind
        width = in_features + n_append
        self.register_buffer("weight", torch.zeros(n_outputs, width, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(n_outputs, dtype=torch.float64))

    def set_linear(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Copy fitted coefficients (n_outputs, width) and intercepts (n_outputs,)."""
        with torch.no_grad():
            self.weight.copy_(torch.as_tensor(np.asarray(weight, dtype=np.float64)))
            self.bias.copy_(torch.as_tensor(np.asarray(bias, dtype=np.float64)))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (regression: predictions) in float64."""
        return self._inputs(x) @ self.weight.T + self.bias


class TreeHead(_ClassicHead):
    """A sum of regression trees (histogram gradient boosting), all padded to one node count.

    Node j of tree t: a leaf (is_leaf) with `value`, or a split sending a row left when
    x[feature] <= threshold (NaN: left when missing_left), to node left / right. Each tree
    adds its leaf value to logit tree_output; `baseline` starts the logits."""

    kind = "gradient_boosting"

    def __init__(self, task: str, in_features: int, n_outputs: int, n_append: int,
                 n_trees: int, n_nodes: int):
        super().__init__(task, in_features, n_outputs, n_append)
        size = (n_trees, n_nodes)
        for name, dtype in (("feature", torch.int64), ("threshold", torch.float64),
                            ("missing_left", torch.bool), ("left", torch.int64),
                            ("right", torch.int64), ("is_leaf", torch.bool),
                            ("value", torch.float64)):
            self.register_buffer(name, torch.zeros(size, dtype=dtype))
        self.is_leaf.fill_(True)  # padding nodes: unreachable leaves of value 0
        self.register_buffer("tree_output", torch.zeros(n_trees, dtype=torch.int64))
        self.register_buffer("baseline", torch.zeros(n_outputs, dtype=torch.float64))

    def set_tree(self, t: int, nodes: np.ndarray, output: int) -> None:
        """Copy tree t from scikit-learn's predictor nodes (a structured array)."""
        if nodes["is_categorical"].any():
            raise ValueError("gradient boosting: a tree has a categorical split; only numeric "
                             "splits can be exported")
        m = nodes.shape[0]
        fields = {"feature": "feature_idx", "threshold": "num_threshold",
                  "missing_left": "missing_go_to_left", "left": "left", "right": "right",
                  "is_leaf": "is_leaf", "value": "value"}
        for name, field in fields.items():
            buf = getattr(self, name)
            buf[t, :m] = torch.from_numpy(nodes[field].astype(_NUMPY_DTYPES[buf.dtype]))
        self.tree_output[t] = output

    # Set by `static_traversal()` for export: a fixed number of steps, no data-dependent
    # shapes or loops, so tracing (TorchScript, ONNX) records a graph valid for any input.
    fixed_depth: int | None = None

    def static_traversal(self) -> int:
        """Switch to the fixed-step traversal (every cell steps `depth` times, leaves stay
        put); returns the depth: the longest root-to-leaf path of any tree."""
        left, right = self.left.numpy(), self.right.numpy()
        is_leaf = self.is_leaf.numpy()
        depth = 0
        for t in range(left.shape[0]):
            level, frontier = 0, [0]
            while True:
                inner = [n for n in frontier if not is_leaf[t, n]]
                if not inner:
                    break
                level += 1
                frontier = [c for n in inner for c in (left[t, n], right[t, n])]
            depth = max(depth, level)
        self.fixed_depth = depth
        return depth

    def _leaf_values_fixed(self, x: torch.Tensor) -> torch.Tensor:
        n_trees, n_nodes = self.left.shape
        first = torch.arange(n_trees, device=x.device) * n_nodes
        left, right = (self.left + first[:, None]).view(-1), (self.right + first[:, None]).view(-1)
        is_leaf, feature = self.is_leaf.view(-1), self.feature.view(-1)
        threshold, missing_left = self.threshold.view(-1), self.missing_left.view(-1)
        node = first.unsqueeze(0).expand(x.shape[0], -1)  # (rows, trees)
        for _ in range(int(self.fixed_depth or 0)):
            data = torch.gather(x, 1, feature[node])
            nan = torch.isnan(data)  # logical ops, not a boolean `where` (onnxruntime has none)
            go_left = (nan & missing_left[node]) | (~nan & (data <= threshold[node]))
            step = torch.where(go_left, left[node], right[node])
            node = torch.where(is_leaf[node], node, step)
        return self.value.view(-1)[node]

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (regression: predictions) in float64, traversing all trees at once."""
        x = self._inputs(x)
        if self.fixed_depth is not None:
            out = self.baseline.expand(x.shape[0], -1).clone()
            return out.index_add(1, self.tree_output, self._leaf_values_fixed(x))
        step = max(1, _TRAVERSAL_CELLS // self.left.shape[0])
        parts = [self._leaf_sum(x[i:i + step]) for i in range(0, x.shape[0], step)]
        return torch.cat(parts) if parts else self.baseline.new_zeros(0, self.n_outputs)

    def _leaf_sum(self, x: torch.Tensor) -> torch.Tensor:
        leaf_values = self._leaf_values(x)
        out = self.baseline.expand(x.shape[0], -1).clone()
        return out.index_add_(1, self.tree_output, leaf_values)

    def _leaf_values(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, trees): the value of the leaf each row reaches in each tree.

        Cells (row, tree) still inside a tree are kept in a list that shrinks as they reach
        leaves: leaf-wise trees are deep but most paths are short, so this does a fraction
        of the work of stepping every cell to the maximum depth."""
        n_rows, width = x.shape
        n_trees, n_nodes = self.left.shape
        first = torch.arange(n_trees, device=x.device) * n_nodes  # flat index of each root
        left, right = (self.left + first[:, None]).view(-1), (self.right + first[:, None]).view(-1)
        is_leaf, value = self.is_leaf.view(-1), self.value.view(-1)
        cell = torch.arange(n_rows * n_trees, device=x.device)  # row * n_trees + tree
        node = first.repeat(n_rows)  # flat node index of each cell
        leaf_values = torch.zeros(n_rows * n_trees, dtype=torch.float64, device=x.device)
        x_flat = x.reshape(-1)
        # Children come after their parent (check_classic_state), so a path has fewer than
        # n_nodes steps; the bound also holds for a state that was never checked.
        for _ in range(n_nodes):
            done = is_leaf[node]
            finished, live = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
            leaf_values[cell[finished]] = value[node[finished]]
            cell, node = cell[live], node[live]
            if cell.numel() == 0:
                break
            data = x_flat[cell // n_trees * width + self.feature.view(-1)[node]]
            go_left = torch.where(torch.isnan(data), self.missing_left.view(-1)[node],
                                  data <= self.threshold.view(-1)[node])
            node = torch.where(go_left, left[node], right[node])
        return leaf_values.view(n_rows, n_trees)

    def shape(self) -> dict[str, Any]:
        n_trees, n_nodes = self.left.shape
        return {**super().shape(), "n_trees": int(n_trees), "n_nodes": int(n_nodes)}


_NUMPY_DTYPES = {torch.int64: np.int64, torch.float64: np.float64, torch.bool: np.bool_}


# --------------------------------------------------------------------------- checkpoints


def classic_shape(module: nn.Module) -> dict[str, Any]:
    """A JSON-able description of a classic head's architecture (for a checkpoint's spec)."""
    if not isinstance(module, _ClassicHead):
        raise TypeError(f"not a classic head: {type(module).__name__}")
    return module.shape()


_SHAPE_FIELDS = ("kind", "task", "in_features", "n_outputs", "domain_column")
_TREE_FIELDS = ("n_trees", "n_nodes")


def _shape_error(field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint: classic head shape field {field!r} {problem}")


def _shape_int(shape: dict, field: str, high: int) -> int:
    value = shape[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _shape_error(field, f"must be an integer, got {value!r}")
    if not 1 <= value <= high:
        raise _shape_error(field, f"must lie in [1, {high:,}], got {value}")
    return value


def _check_shape(shape: Any) -> dict[str, Any]:
    """The shape's fields, checked for type and bounds (the shape comes from a file)."""
    if not isinstance(shape, dict):
        raise CheckpointError(f"checkpoint: classic head shape must be a mapping, got "
                              f"{type(shape).__name__}")
    kind = shape.get("kind")
    if kind not in CLASSIC_HEADS:
        raise _shape_error("kind", f"must be one of {', '.join(CLASSIC_HEADS)}, got {kind!r}")
    fields = _SHAPE_FIELDS + (_TREE_FIELDS if kind == "gradient_boosting" else ())
    for field in fields:
        if field not in shape:
            raise _shape_error(field, "is missing")
    for field in shape:
        if field not in fields:
            raise _shape_error(field, f"is not a field of a {kind} head")
    task = shape["task"]
    if not isinstance(task, str) or task not in _TASK_HEADS or kind not in _TASK_HEADS[task]:
        raise _shape_error("task", f"does not fit kind {kind!r}, got {task!r}")
    if not isinstance(shape["domain_column"], bool):
        raise _shape_error("domain_column", f"must be true or false, got "
                           f"{shape['domain_column']!r}")
    sizes = {f: _shape_int(shape, f, h) for f, h in
             (("in_features", MAX_IN_FEATURES), ("n_outputs", MAX_OUTPUTS))}
    _check_outputs(task, sizes["n_outputs"])
    if kind == "gradient_boosting":
        trees = _shape_int(shape, "n_trees", MAX_TREE_NODES)
        if trees * _shape_int(shape, "n_nodes", MAX_TREE_NODES) > MAX_TREE_NODES:
            raise _shape_error("n_trees", f"x n_nodes must be at most {MAX_TREE_NODES:,}, got "
                               f"{trees} x {shape['n_nodes']}")
    elif sizes["n_outputs"] * (sizes["in_features"] + 2) > MAX_LINEAR_WEIGHTS:
        raise _shape_error("in_features", f"x n_outputs must be at most "
                           f"{MAX_LINEAR_WEIGHTS:,} weights, got {sizes['in_features']} x "
                           f"{sizes['n_outputs']}")
    return dict(shape)


def _check_outputs(task: str, n_outputs: int) -> None:
    if task == "regression" and n_outputs != 1:
        raise _shape_error("n_outputs", f"must be 1 for regression, got {n_outputs}")
    if task == "classification" and n_outputs < 2:
        raise _shape_error("n_outputs", f"must be at least 2 for classification, got "
                           f"{n_outputs}")


def build_classic_head(shape: dict) -> nn.Module:
    """An empty classic head of the sizes in `shape` (from classic_shape), ready for
    load_state_dict. `shape` is untrusted: it is checked before anything is allocated."""
    s = _check_shape(shape)
    n_append = int(s["domain_column"])
    if s["kind"] == "gradient_boosting":
        return TreeHead(s["task"], s["in_features"], s["n_outputs"], n_append, s["n_trees"],
                        s["n_nodes"])
    return LinearHead(s["kind"], s["task"], s["in_features"], s["n_outputs"], n_append)


def check_classic_state(module: nn.Module) -> None:
    """Check a classic head's loaded tensors: finite values, tree nodes whose children lie
    inside their tree after them, feature and output indices in range. Raises
    CheckpointError naming the first problem."""
    if not isinstance(module, _ClassicHead):
        raise CheckpointError(f"checkpoint: not a classic head ({type(module).__name__})")
    if not torch.isfinite(module.append).all():
        raise CheckpointError("checkpoint: classic head buffer 'append' is not finite")
    if isinstance(module, LinearHead):
        for name in ("weight", "bias"):
            if not torch.isfinite(getattr(module, name)).all():
                raise CheckpointError(f"checkpoint: classic head buffer {name!r} is not finite")
        return
    _check_trees(module)


def _check_trees(head: TreeHead) -> None:
    n_trees, n_nodes = head.left.shape
    width = head.in_features + head.append.numel()
    own = torch.arange(n_nodes, device=head.left.device).expand(n_trees, -1)
    split = ~head.is_leaf
    problems = (
        ("a feature index outside [0, input width)",
         (head.feature < 0) | (head.feature >= width)),
        ("a child index outside its tree",
         (head.left < 0) | (head.left >= n_nodes) | (head.right < 0) | (head.right >= n_nodes)),
        # Children after their parent: every path ends at a leaf (no cycle).
        ("a child index not after its parent", split & ((head.left <= own) | (head.right <= own))),
        ("an output index outside [0, n_outputs)",
         (head.tree_output < 0) | (head.tree_output >= head.n_outputs)),
        ("a NaN threshold", torch.isnan(head.threshold)),  # +inf is a split on NaN alone
        ("a leaf value that is not finite", ~torch.isfinite(head.value)),
        ("a baseline that is not finite", ~torch.isfinite(head.baseline)),
    )
    for what, bad in problems:
        if bool(bad.any()):
            raise CheckpointError(f"checkpoint: gradient boosting head has {what}")


def load_classic_head(shape: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """build_classic_head + load_state_dict + check_classic_state, every failure a
    CheckpointError."""
    head = build_classic_head(shape)
    try:
        head.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else repr(exc)
        raise CheckpointError(f"checkpoint: classic head state does not fit its shape: "
                              f"{first}") from None
    check_classic_state(head)
    return head
