"""scikit-learn heads that `extract` fits on frozen features and reports (never saved as a
model): logistic regression, random forest and SVM classifiers; ridge, random forest and SVR
regressors. (The heads a model is saved with live in tltool.models.classic.)
"""

from __future__ import annotations

import numpy as np

# The heads extract fits for a classification label and for a regression label (extract.heads).
CLASSIFIER_HEADS = ("logistic_regression", "random_forest", "svm")
REGRESSOR_HEADS = ("ridge", "random_forest", "svm")


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


def sklearn_regressor(kind: str, seed: int):
    """A fresh classic regressor; the label is standardised for it and mapped back."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    if kind == "ridge":
        inner = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    elif kind == "random_forest":
        inner = RandomForestRegressor(n_estimators=300, random_state=seed, n_jobs=1)
    elif kind == "svm":
        inner = make_pipeline(StandardScaler(), SVR())
    else:
        raise ValueError(kind)
    return TransformedTargetRegressor(regressor=inner, transformer=StandardScaler())

