"""Calibration: expected calibration error, and temperature scaling (Guo et al., ICML 2017).

Temperature scaling divides a model's logits by one number T > 0 fitted on held-out rows (the
validation split, or out-of-fold predictions in `tltool select`) by minimising their log loss.
It never changes which class has the highest probability, nor a binary model's AUROC; it
changes how far the probabilities can be trusted as probabilities. Multi-label models get one
T per label (each label is its own sigmoid).

It works on probabilities, so every command applies a run's saved temperature the same way
whatever produced the probabilities (a network, a classic head, an ensemble's average): the
logits are recovered as log-probabilities (softmax; equal up to a per-row constant, which
softmax ignores) or log-odds (sigmoid).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# T is searched in [e^-5, e^5]: far beyond what a trained model needs either way.
LOG_T_BOUNDS = (-5.0, 5.0)
TINY = 1e-300


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, TINY, 1.0))


def _softmax_logits(proba: np.ndarray) -> np.ndarray:
    return _log(proba)


def _sigmoid_logits(p: np.ndarray) -> np.ndarray:
    return _log(p) - _log(1.0 - p)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def scale(proba: np.ndarray, temperature: float | list[float], multilabel: bool) -> np.ndarray:
    """Probabilities with the logits divided by `temperature` (per label when multi-label)."""
    proba = np.asarray(proba, dtype=np.float64)
    if multilabel:
        t = np.asarray(temperature, dtype=np.float64).reshape(1, -1)
        return _sigmoid(_sigmoid_logits(proba) / t)
    return _softmax(_softmax_logits(proba) / float(temperature))


def _nll_softmax(z: np.ndarray, y: np.ndarray, log_t: float) -> float:
    s = z / np.exp(log_t)
    s = s - s.max(axis=1, keepdims=True)
    lse = np.log(np.exp(s).sum(axis=1))
    return float((lse - s[np.arange(len(y)), y]).mean())


def _nll_sigmoid(z: np.ndarray, y: np.ndarray, log_t: float) -> float:
    s = z / np.exp(log_t)
    # -[y log sigma(s) + (1-y) log(1 - sigma(s))] = softplus(s) - y s
    return float((np.logaddexp(0.0, s) - y * s).mean())


def _fit_one(nll, z: np.ndarray, y: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: nll(z, y, lt), bounds=LOG_T_BOUNDS, method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def fit_temperature(proba: np.ndarray, y: np.ndarray, multilabel: bool) -> float | list[float]:
    """The temperature(s) minimising the log loss of (proba, y): held-out rows only."""
    proba = np.asarray(proba, dtype=np.float64)
    if multilabel:
        z, yy = _sigmoid_logits(proba), np.asarray(y, dtype=np.float64)
        return [_fit_one(_nll_sigmoid, z[:, j], yy[:, j]) for j in range(proba.shape[1])]
    return _fit_one(_nll_softmax, _softmax_logits(proba), np.asarray(y, dtype=np.int64))


def log_loss(proba: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    proba = np.asarray(proba, dtype=np.float64)
    if multilabel:
        yy = np.asarray(y, dtype=np.float64)
        return float(-(yy * _log(proba) + (1 - yy) * _log(1 - proba)).mean())
    return float(-_log(proba[np.arange(len(y)), np.asarray(y, dtype=np.int64)]).mean())


def ece(y: np.ndarray, proba: np.ndarray, bins: int = 15, multilabel: bool = False) -> float:
    """Expected calibration error with `bins` equal-width bins.

    Single-label: top-label ECE (Guo et al.): rows binned by their highest probability; the
    gap between that confidence and the bin's accuracy, weighted by the bin's share of rows.
    Multi-label: each label's probability of being present against how often it is, binned
    the same way, averaged over the labels.
    """
    proba = np.asarray(proba, dtype=np.float64)
    if multilabel:
        yy = np.asarray(y, dtype=np.float64)
        return float(np.mean([_binned_gap(proba[:, j], yy[:, j], bins)
                              for j in range(proba.shape[1])]))
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    return _binned_gap(conf, correct, bins)


def _binned_gap(conf: np.ndarray, hit: np.ndarray, bins: int) -> float:
    if len(conf) == 0:
        return float("nan")
    # bin k holds (k/bins, (k+1)/bins]; a confidence of exactly 0 goes to the first bin
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    hit_sum = np.bincount(idx, weights=hit, minlength=bins)
    return float(np.abs(conf_sum - hit_sum).sum() / len(conf))


def reliability(y: np.ndarray, proba: np.ndarray, bins: int = 10,
                multilabel: bool = False) -> dict[str, list[float]]:
    """Per bin: mean confidence, accuracy (or frequency of the label) and row count; for a
    reliability diagram. Multi-label: every label's probabilities pooled."""
    proba = np.asarray(proba, dtype=np.float64)
    if multilabel:
        conf, hit = proba.ravel(), np.asarray(y, dtype=np.float64).ravel()
    else:
        conf = proba.max(axis=1)
        hit = (proba.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / count
        acc = np.bincount(idx, weights=hit, minlength=bins) / count
    return {"confidence": mean_conf.tolist(), "accuracy": acc.tolist(),
            "count": count.tolist()}


def calibrate_rule(proba_val: np.ndarray, y_val: np.ndarray, multilabel: bool,
                   chosen_on: str) -> dict[str, Any]:
    """The saved calibration of a decision rule, with what it did on the rows it was fitted on
    (log loss and ECE before and after)."""
    t = fit_temperature(proba_val, y_val, multilabel)
    after = scale(proba_val, t, multilabel)

    def rnd(v: float) -> float:
        return round(v, 6)

    return {"method": "temperature", "temperature": [rnd(v) for v in t] if multilabel
            else rnd(t), "fitted_on": chosen_on,
            "log_loss": {"before": rnd(log_loss(proba_val, y_val, multilabel)),
                         "after": rnd(log_loss(after, y_val, multilabel))},
            "ece": {"before": rnd(ece(y_val, proba_val, multilabel=multilabel)),
                    "after": rnd(ece(y_val, after, multilabel=multilabel))}}


def valid(cal: Any, n_labels: int | None) -> bool:
    """Whether a saved calibration (from a run's thresholds.json) can be applied."""
    if cal is None:
        return True
    if not isinstance(cal, dict) or cal.get("method") != "temperature":
        return False
    t = cal.get("temperature")
    values = t if isinstance(t, list) else [t]
    if isinstance(t, list) and n_labels is not None and len(t) != n_labels:
        return False
    return all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
               and v > 0 for v in values)
