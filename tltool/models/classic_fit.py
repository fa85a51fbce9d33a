"""Fitting the classic heads with scikit-learn: logistic regression (scipy's L-BFGS with an
offset, tltool.models.logistic_offset), ridge and histogram gradient boosting, each returned as a
module of plain tensors (tltool.models.classic).

`fit_classic_head(rows, settings)`: the rows (`ClassicRows`: features, labels, row weights,
offset, domain column) and what to fit (`ClassicSettings`: kind, task, classes, head_args,
seed, class weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from tltool.errors import ConfigError, DataError
from tltool.models.boosting_export import export_boosting
from tltool.models.classic import MISSING_LOGIT, LinearHead
from tltool.models.classic_args import check_classic_kind, classic_args
from tltool.models.logistic_offset import logistic_weights, logistic_with_offset

RIDGE_ALPHAS = np.logspace(-3, 3, 13)  # the grid of ridge alpha "auto" (RidgeCV)


@dataclass(frozen=True)
class ClassicRows:
    """The rows a classic head is fitted on: features `x` (n, d) and labels `y` (class
    indices, or standardised regression targets).

    sample_weight: per-row weights. domain: 0/1 per row (1 = target row); fitted as an extra
    last input column, and the fitted module appends a constant 1 column itself (it predicts
    target rows). offset: per-row raw output added during fitting (classification:
    (n, n_classes) log-probabilities; regression: (n,) or (n, 1)); the module returns its own
    part only, so the caller's final output is module(x) + offset.
    """

    x: np.ndarray
    y: np.ndarray
    sample_weight: np.ndarray | None = None
    offset: np.ndarray | None = None
    domain: np.ndarray | None = None


@dataclass(frozen=True)
class ClassicSettings:
    """What to fit: classic head `kind` for `task` ("classification" or "regression") with
    `n_classes` classes, its options `args` (model.head_args; None: the defaults), the random
    `seed`, and `class_weight` None or "balanced" (ignored by ridge)."""

    kind: str
    task: str
    n_classes: int
    args: dict | None = None
    seed: int = 0
    class_weight: str | None = None


@dataclass(frozen=True)
class _FitRows:
    """Checked rows: x in float64 with `n_append` domain columns appended, labels, weights."""

    x: np.ndarray
    y: np.ndarray
    sample_weight: np.ndarray | None
    n_append: int


def fit_classic_head(rows: ClassicRows, settings: ClassicSettings) -> nn.Module:
    """Fit the classic head `settings` describes on `rows` and return it as a module of plain
    tensors (see ClassicRows for the offset and the domain column)."""
    kind, task, n_classes = settings.kind, settings.task, settings.n_classes
    check_classic_kind(kind, task)
    options = classic_args(kind, settings.args)
    class_weight = settings.class_weight
    if class_weight not in (None, "balanced"):
        raise ConfigError(f"class_weight: expected None or 'balanced', got {class_weight!r}")
    if kind == "gradient_boosting" and rows.offset is not None:
        raise ConfigError("model.prior: offset cannot be used with model.head "
                          "gradient_boosting; give the prior as an input (model.prior: input)")
    x = _as_matrix(rows.x)
    n = x.shape[0]
    y = _labels(rows.y, n, task, n_classes)
    sample_weight = _row_weights(rows.sample_weight, n)
    x_fit, n_append = _with_domain(x, rows.domain)
    fit = _FitRows(x_fit, y, sample_weight, n_append)
    if kind == "gradient_boosting":
        return _fit_boosting(fit, settings, options)
    _check_finite_inputs(x_fit, kind)
    if kind == "ridge":
        return _fit_ridge(fit, options, _regression_offset(rows.offset, n))
    return _fit_logistic(fit, settings, options, _class_offset(rows.offset, n, n_classes))


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




def _fit_ridge(fit: _FitRows, options: dict, offset: np.ndarray | None) -> nn.Module:
    from sklearn.linear_model import Ridge, RidgeCV

    x, y = fit.x, fit.y
    alpha = options["alpha"]
    est = RidgeCV(alphas=RIDGE_ALPHAS) if alpha == "auto" else Ridge(alpha=alpha)
    # With an offset the ridge fits the residual: final prediction = module(x) + offset.
    target = y if offset is None else y - offset
    est.fit(x, target, sample_weight=fit.sample_weight)
    head = LinearHead("ridge", "regression", x.shape[1] - fit.n_append, 1, fit.n_append)
    head.set_linear(np.reshape(est.coef_, (1, -1)), np.reshape(est.intercept_, (1,)))
    head.fit_info = {"alpha": float(getattr(est, "alpha_", alpha))}
    return head


def _fit_logistic(fit: _FitRows, settings: ClassicSettings, options: dict,
                  offset: np.ndarray | None) -> nn.Module:
    x, y, n_classes = fit.x, fit.y, settings.n_classes
    classes = np.unique(y)
    if offset is None:
        from sklearn.linear_model import LogisticRegression

        est = LogisticRegression(C=options["C"], max_iter=options["max_iter"],
                                 tol=options["tol"], class_weight=settings.class_weight)
        est.fit(x, y, sample_weight=fit.sample_weight)
        coef, intercept, n_iter = est.coef_, est.intercept_, int(np.max(est.n_iter_))
    else:
        weight = logistic_weights(y, classes, fit.sample_weight, settings.class_weight)
        coef, intercept, n_iter = logistic_with_offset(x, y, classes, weight, offset, options)
    head = LinearHead("logistic_regression", "classification", x.shape[1] - fit.n_append,
                      n_classes, fit.n_append)
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



def _fit_boosting(fit: _FitRows, settings: ClassicSettings, options: dict) -> nn.Module:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    if settings.task == "classification":
        est = HistGradientBoostingClassifier(**options, random_state=settings.seed,
                                             class_weight=settings.class_weight)
    else:
        est = HistGradientBoostingRegressor(**options, random_state=settings.seed)
    est.fit(fit.x, fit.y, sample_weight=fit.sample_weight)
    return export_boosting(est, settings.task, settings.n_classes, fit.x.shape[1] - fit.n_append,
                           fit.n_append)
