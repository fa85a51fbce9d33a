"""L2-penalised logistic regression with a fixed per-row offset of the logits, fitted with
scipy's L-BFGS-B: scikit-learn's LogisticRegression has no offset, and a prior given as an
offset (model.prior: offset) needs one.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import optimize, special
from sklearn.exceptions import ConvergenceWarning


def logistic_weights(y: np.ndarray, classes: np.ndarray, sample_weight: np.ndarray | None,
                     class_weight: str | None) -> np.ndarray:
    """Row weights times class weights, as scikit-learn's LogisticRegression combines them."""
    weight = np.ones(y.shape[0]) if sample_weight is None else sample_weight.copy()
    if class_weight == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        per_class = compute_class_weight("balanced", classes=classes, y=y, sample_weight=weight)
        weight *= per_class[np.searchsorted(classes, y)]
    return weight


def logistic_with_offset(x: np.ndarray, y: np.ndarray, classes: np.ndarray,
                         weight: np.ndarray, offset: np.ndarray,
                         options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """L2-penalised logistic regression with a fixed per-row offset of the logits.

    Minimises sum_i w_i loss_i + ||W||^2 / (2C) (intercepts not penalised), scikit-learn's
    LogisticRegression objective, scaled by 1 / sum(w) as scikit-learn does so that the
    gradient tolerance does not depend on the number of rows. Binary: one coefficient vector
    on the logit z, whose offset is offset[:, b] - offset[:, a]; more classes: multinomial
    with one vector per class. `options`: the checked head_args (C, max_iter, tol). Returns
    (coef, intercept, iterations)."""
    c, max_iter, tol = options["C"], options["max_iter"], options["tol"]
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

