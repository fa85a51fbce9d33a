"""Choosing without target labels.

EnsV (ensemble validation; Hu, Luo, Liang & Foo, NeurIPS 2024): the candidates' predicted
probabilities on the unlabelled target rows are averaged; the ensemble's argmax is a pseudo
label; each candidate scores its agreement (accuracy) with it. The ensemble is at least as good
as the average candidate, so the choice avoids the worst one.

The other two are estimates of a model's target risk from labelled source validation rows,
re-weighted towards the target.

Both need the density ratio w(x) = p_target(x) / p_source(x) on the source validation rows.
It is estimated in the model's own feature space by a domain classifier (logistic regression on
standardised features, source training rows against unlabelled target rows, classes balanced):
w = P(target | x) / P(source | x).

- IWCV (importance-weighted cross-validation; Sugiyama, Krauledat & Mueller, JMLR 2007): the
  mean of w_i * loss_i over the source validation rows.
- DEV (deep embedded validation; You, Wang, Long & Wang, ICML 2019): the same weighted losses
  with a control variate that uses E[w] = 1 to cut the variance: with L_i = w_i * loss_i,
  eta = -Cov(L, w) / Var(w), risk = mean(L) + eta * mean(w) - eta.

Lower is better for both. They are estimates: on domains where the classifier separates
source and target almost perfectly, a few validation rows carry all the weight and the
estimate is noisy (`effective_rows` says how many rows the weights amount to).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Density ratios are clipped to this multiple of their mean: a handful of source rows that look
# exactly like target rows must not carry the whole estimate.
MAX_WEIGHT = 20.0


def density_ratio(source_train: np.ndarray, target: np.ndarray, source_val: np.ndarray,
                  seed: int = 0) -> np.ndarray:
    """w(x) = p_target(x) / p_source(x) on the validation rows, from a balanced logistic
    regression domain classifier fitted on the source training rows and the target rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([source_train, target]).astype(np.float64)
    side = np.concatenate([np.zeros(len(source_train)), np.ones(len(target))])
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit(scaler.transform(x), side)
    p = clf.predict_proba(scaler.transform(source_val.astype(np.float64)))[:, 1]
    p = np.clip(p, 1e-6, 1 - 1e-6)
    w = p / (1 - p)
    w = w / w.mean()
    return np.minimum(w, MAX_WEIGHT)


def iwcv_risk(losses: np.ndarray, weights: np.ndarray) -> float:
    return float(np.mean(weights * losses))


def dev_risk(losses: np.ndarray, weights: np.ndarray) -> float:
    weighted = weights * losses
    var = float(np.var(weights, ddof=1)) if len(weights) > 1 else 0.0
    if var <= 0:
        return float(weighted.mean())
    eta = -float(np.cov(weighted, weights, ddof=1)[0, 1]) / var
    return float(weighted.mean() + eta * weights.mean() - eta)


def estimate(losses: np.ndarray, features: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    """Both risks (and the plain source validation loss) of one model. `features`: its
    backbone's features of source_train, source_val and target rows."""
    w = density_ratio(features["source_train"], features["target"], features["source_val"],
                      seed)
    return {"dev": dev_risk(losses, w), "iwcv": iwcv_risk(losses, w),
            "source_val_loss": float(np.mean(losses)),
            "effective_rows": float(w.sum() ** 2 / (w ** 2).sum())}


def ensv_scores(target_proba: dict[str, np.ndarray]) -> dict[str, float]:
    """Each candidate's agreement with the argmax of the averaged probabilities (higher is
    better; ties in the average go to the lower class index)."""
    pseudo = np.mean(list(target_proba.values()), axis=0).argmax(axis=1)
    return {name: float((p.argmax(axis=1) == pseudo).mean()) for name, p in target_proba.items()}
