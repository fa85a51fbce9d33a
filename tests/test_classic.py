"""Classic heads (tltool.models.classic): parity with scikit-learn, offsets, the domain column,
weights-only checkpoints and the checks on untrusted shapes and states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.preprocessing import StandardScaler

from tltool.checkpoint import Checkpoint, load_weights_file
from tltool.errors import CheckpointError, ConfigError, RunError
from tltool.models.classic import (
    CLASSIC_HEADS,
    build_classic_head,
    check_classic_state,
    classic_shape,
    load_classic_head,
)
from tltool.models.classic_args import CLASSIC_ARGS, LOGISTIC_TOL, classic_args
from tltool.models.classic_fit import (
    RIDGE_ALPHAS,
    ClassicRows,
    ClassicSettings,
    fit_classic_head,
)

# scikit-learn's default tolerance (1e-4) stops short of the optimum; parity tests need 1e-8.
TIGHT = {"tol": LOGISTIC_TOL}
FAST_GB = {"max_iter": 30}  # multiclass boosting grows one tree per class and iteration


def fit(kind, x, y, *, task, n_classes, sample_weight=None, offset=None, domain=None,
        **settings):
    """fit_classic_head, its rows and settings given as keywords."""
    return fit_classic_head(ClassicRows(x, y, sample_weight, offset, domain),
                            ClassicSettings(kind, task, n_classes, **settings))


@pytest.fixture(scope="module")
def binary():
    x, y = load_breast_cancer(return_X_y=True)
    return StandardScaler().fit_transform(x), y.astype(np.int64)


@pytest.fixture(scope="module")
def multiclass():
    x, y = load_digits(return_X_y=True)
    return x[:500] / 16.0, y[:500].astype(np.int64)


@pytest.fixture(scope="module")
def regression():
    x, y = load_diabetes(return_X_y=True)
    return StandardScaler().fit_transform(x), (y - y.mean()) / y.std()


def with_nan(x: np.ndarray, seed: int = 0, rate: float = 0.1) -> np.ndarray:
    """A float32 copy of x with a random tenth of its cells missing."""
    out = x.astype(np.float32)
    out[np.random.default_rng(seed).random(out.shape) < rate] = np.nan
    return out


def probs(module, x: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    logits = module.raw(torch.as_tensor(x))
    if offset is not None:
        logits = logits + torch.as_tensor(offset)
    return torch.softmax(logits, dim=1).numpy()


def preds(module, x: np.ndarray) -> np.ndarray:
    return module.raw(torch.as_tensor(x))[:, 0].numpy()


def sk_logistic(x, y, sample_weight=None, **kw) -> LogisticRegression:
    est = LogisticRegression(max_iter=5000, tol=LOGISTIC_TOL, **kw)
    return est.fit(x, y, sample_weight=sample_weight)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("data", ["binary", "multiclass"])
def test_gradient_boosting_classification_matches_sklearn(data, request):
    x, y = request.getfixturevalue(data)
    x = with_nan(x)  # float32 with missing cells, in training and at prediction
    k = int(y.max()) + 1
    head = fit("gradient_boosting", x, y, task="classification", n_classes=k,
               args=FAST_GB, seed=3)
    est = HistGradientBoostingClassifier(**FAST_GB, random_state=3).fit(x, y)
    x_new = with_nan(request.getfixturevalue(data)[0], seed=1)
    for rows in (x, x_new):
        np.testing.assert_allclose(probs(head, rows), est.predict_proba(rows), rtol=0, atol=1e-9)
    out = head(torch.as_tensor(x_new))
    assert out.dtype == torch.float32 and out.shape == (len(x_new), k)
    if k == 2:  # binary: logits [0, z]
        assert torch.all(head.raw(torch.as_tensor(x))[:, 0] == 0)


@pytest.mark.parametrize("data", ["binary", "multiclass"])
def test_fixed_step_tree_traversal_equals_the_adaptive_one(data, request):
    """The export traversal (every cell steps the deepest path's length; no data-dependent
    shapes) reaches the same leaves as the shrinking-list one, missing values included, and
    a trace of it on 3 rows holds for 500 rows."""
    x, y = request.getfixturevalue(data)
    x = with_nan(x)
    head = fit("gradient_boosting", x, y, task="classification",
               n_classes=int(y.max()) + 1, args=FAST_GB, seed=3)
    rows = torch.as_tensor(with_nan(request.getfixturevalue(data)[0], seed=2))
    adaptive = head.raw(rows)
    depth = head.static_traversal()
    assert depth >= 1
    assert torch.equal(head.raw(rows), adaptive)
    traced = torch.jit.trace(head, (rows[:3],), check_trace=False)
    assert torch.equal(traced(rows), head(rows))


def test_gradient_boosting_regression_matches_sklearn(regression):
    x, y = regression
    x = with_nan(x)
    weight = np.random.default_rng(0).uniform(0.2, 2.0, len(y))
    head = fit("gradient_boosting", x, y, task="regression", n_classes=0,
               sample_weight=weight, args={"max_depth": 3, "learning_rate": 0.05})
    est = HistGradientBoostingRegressor(max_depth=3, learning_rate=0.05, random_state=0)
    est.fit(x, y, sample_weight=weight)
    np.testing.assert_allclose(preds(head, x), est.predict(x), rtol=0, atol=1e-9)
    assert head(torch.as_tensor(x)).shape == (len(x), 1)


def test_gradient_boosting_weights_match_sklearn(binary):
    # Eight features: with weights, sklearn bins each feature in a joblib task (~60 ms each).
    x, y = binary[0][:, :8], binary[1]
    weight = np.random.default_rng(1).uniform(0.5, 3.0, len(y))
    head = fit("gradient_boosting", x, y, task="classification", n_classes=2,
               sample_weight=weight, class_weight="balanced", args=FAST_GB)
    est = HistGradientBoostingClassifier(**FAST_GB, random_state=0, class_weight="balanced")
    est.fit(x, y, sample_weight=weight)
    np.testing.assert_allclose(probs(head, x), est.predict_proba(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("data", ["binary", "multiclass"])
@pytest.mark.parametrize("variant", ["plain", "float32", "sample_weight", "balanced"])
def test_logistic_regression_matches_sklearn(data, variant, request):
    x, y = request.getfixturevalue(data)
    k = int(y.max()) + 1
    weight = np.random.default_rng(2).uniform(0.5, 2.0, len(y))
    kw = {"sample_weight": weight} if variant == "sample_weight" else {}
    cw = "balanced" if variant == "balanced" else None
    x_in = x.astype(np.float32) if variant == "float32" else x
    head = fit("logistic_regression", x_in, y, task="classification", n_classes=k,
               args={"C": 0.5, **TIGHT}, class_weight=cw, **kw)
    # Linear heads are fitted in float64 whatever the input dtype.
    est = sk_logistic(x_in.astype(np.float64), y, C=0.5, class_weight=cw, **kw)
    np.testing.assert_allclose(probs(head, x_in), est.predict_proba(x_in), rtol=0, atol=1e-6)


def test_logistic_regression_unseen_class_gets_no_probability(multiclass):
    x, y = multiclass
    keep = y < 3
    head = fit("logistic_regression", x[keep], y[keep], task="classification",
               n_classes=5, args=TIGHT)
    p = probs(head, x)
    np.testing.assert_allclose(p[:, :3], sk_logistic(x[keep], y[keep]).predict_proba(x),
                               rtol=0, atol=1e-6)
    assert np.all(p[:, 3:] == 0)


@pytest.mark.parametrize("alpha", ["auto", 0.5])
def test_ridge_matches_sklearn(regression, alpha):
    x, y = regression
    weight = np.random.default_rng(3).uniform(0.5, 2.0, len(y))
    head = fit("ridge", x, y, task="regression", n_classes=0, sample_weight=weight,
               args={"alpha": alpha})
    est = RidgeCV(alphas=RIDGE_ALPHAS) if alpha == "auto" else Ridge(alpha=alpha)
    est.fit(x, y, sample_weight=weight)
    np.testing.assert_allclose(preds(head, x), est.predict(x), rtol=0, atol=1e-6)
    assert head.fit_info["alpha"] == pytest.approx(getattr(est, "alpha_", alpha))


# --------------------------------------------------------------------------- domain column


@pytest.mark.parametrize("kind", CLASSIC_HEADS)
def test_domain_column_predicts_target_rows(kind, binary, regression):
    task = "regression" if kind == "ridge" else "classification"
    x, y = regression if task == "regression" else binary
    domain = (np.random.default_rng(4).random(len(y)) < 0.4).astype(np.int64)
    head = fit(kind, x, y, task=task, n_classes=2, domain=domain, args=(
        FAST_GB if kind == "gradient_boosting" else TIGHT if kind == "logistic_regression"
        else None))
    x_dom = np.hstack([x, domain[:, None]])
    x_target = np.hstack([x, np.ones((len(x), 1))])
    shape = classic_shape(head)
    assert shape["domain_column"] and shape["in_features"] == x.shape[1]
    if kind == "gradient_boosting":
        est = HistGradientBoostingClassifier(**FAST_GB, random_state=0).fit(x_dom, y)
        expected, tol = est.predict_proba(x_target), 1e-9
    elif kind == "ridge":
        expected, tol = RidgeCV(alphas=RIDGE_ALPHAS).fit(x_dom, y).predict(x_target), 1e-6
    else:
        expected, tol = sk_logistic(x_dom, y).predict_proba(x_target), 1e-6
    got = preds(head, x) if task == "regression" else probs(head, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)


# --------------------------------------------------------------------------- offsets


@pytest.mark.parametrize("data", ["binary", "multiclass"])
def test_logistic_regression_zero_offset_is_sklearn(data, request):
    x, y = request.getfixturevalue(data)
    k = int(y.max()) + 1
    head = fit("logistic_regression", x, y, task="classification", n_classes=k,
               offset=np.zeros((len(y), k)), args=TIGHT)
    np.testing.assert_allclose(probs(head, x), sk_logistic(x, y).predict_proba(x), rtol=0,
                               atol=1e-4)


def test_logistic_regression_constant_offset_is_absorbed_by_intercepts(multiclass):
    # An offset equal on every row only shifts the (unpenalised) intercepts: same probabilities.
    x, y = multiclass
    offset = np.tile(np.log(np.linspace(0.05, 0.2, 10)), (len(y), 1))
    head = fit("logistic_regression", x, y, task="classification", n_classes=10,
               offset=offset, args=TIGHT)
    np.testing.assert_allclose(probs(head, x, offset), sk_logistic(x, y).predict_proba(x),
                               rtol=0, atol=1e-4)


def source_log_probs(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """A prior: log-probabilities of a weak model fitted on the first four features."""
    est = LogisticRegression(C=0.01, max_iter=1000).fit(x[:, :4], y)
    out = np.full((len(y), k), -30.0)
    out[:, est.classes_] = est.predict_log_proba(x[:, :4])
    return out


@pytest.mark.parametrize("data", ["binary", "multiclass"])
def test_logistic_regression_offset_reaches_the_optimum(data, request):
    """The gradient of sum_i w_i CE(module(x_i) + offset_i) + ||W||^2 / (2C), computed here by
    autograd independently of the fit, vanishes at the fitted coefficients."""
    x, y = request.getfixturevalue(data)
    k, c = int(y.max()) + 1, 2.0
    weight = np.random.default_rng(5).uniform(0.5, 2.0, len(y))
    offset = source_log_probs(x, y, k)
    head = fit("logistic_regression", x, y, task="classification", n_classes=k,
               offset=offset, sample_weight=weight, args={"C": c, **TIGHT})
    w = head.weight.clone().requires_grad_(True)
    b = head.bias.clone().requires_grad_(True)
    logits = torch.as_tensor(x) @ w.T + b + torch.as_tensor(offset)
    losses = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y), reduction="none")
    objective = (torch.as_tensor(weight) * losses).sum() + (w * w).sum() / (2 * c)
    objective.backward()
    free = slice(1, 2) if k == 2 else slice(None)  # binary: class 0's logit is fixed at 0
    scale = weight.sum()
    assert w.grad[free].abs().max() / scale < 1e-6 and b.grad[free].abs().max() / scale < 1e-6
    plain = fit("logistic_regression", x, y, task="classification", n_classes=k,
                sample_weight=weight, args={"C": c, **TIGHT})
    assert not torch.allclose(head.weight, plain.weight, atol=1e-3)  # the prior mattered


@pytest.mark.parametrize("alpha", ["auto", 0.5])
def test_ridge_offset_fits_the_residual(regression, alpha):
    x, y = regression
    offset = 0.5 * x[:, 2] - 0.1
    head = fit("ridge", x, y, task="regression", n_classes=0,
               offset=offset[:, None], args={"alpha": alpha})
    est = RidgeCV(alphas=RIDGE_ALPHAS) if alpha == "auto" else Ridge(alpha=alpha)
    np.testing.assert_allclose(preds(head, x), est.fit(x, y - offset).predict(x), rtol=0,
                               atol=1e-6)


def test_gradient_boosting_refuses_an_offset(binary):
    x, y = binary
    with pytest.raises(ConfigError, match=r"model\.prior: input"):
        fit("gradient_boosting", x, y, task="classification", n_classes=2,
            offset=np.zeros((len(y), 2)))


# --------------------------------------------------------------------------- checkpoints


def fitted(name: str, binary, multiclass, regression):
    if name == "lr_binary":
        return fit("logistic_regression", *binary, task="classification",
                   n_classes=2), binary[0]
    if name == "lr_multi_domain":
        x, y = multiclass
        return fit("logistic_regression", x, y, task="classification",
                   n_classes=10, domain=np.arange(len(y)) % 2), x
    if name == "ridge":
        return fit("ridge", *regression, task="regression", n_classes=0), \
            regression[0]
    if name == "gb_regression":
        x = with_nan(regression[0])
        return fit("gradient_boosting", x, regression[1], task="regression",
                   n_classes=0, args=FAST_GB), x
    x = with_nan(multiclass[0])
    return fit("gradient_boosting", x, multiclass[1], task="classification",
               n_classes=10, args=FAST_GB, domain=np.arange(len(x)) % 2), x


@pytest.mark.parametrize("name", ["lr_binary", "lr_multi_domain", "ridge", "gb_regression",
                                  "gb_multi_domain"])
def test_weights_only_round_trip(name, binary, multiclass, regression, tmp_path):
    head, x = fitted(name, binary, multiclass, regression)
    path = tmp_path / "head.pt"
    torch.save({"shape": classic_shape(head), "state": head.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    assert json.loads(json.dumps(saved["shape"])) == classic_shape(head)
    loaded = build_classic_head(saved["shape"])
    loaded.load_state_dict(saved["state"])
    check_classic_state(loaded)
    xt = torch.as_tensor(x)
    assert torch.equal(loaded.raw(xt), head.raw(xt)) and torch.equal(loaded(xt), head(xt))
    again = load_classic_head(saved["shape"], saved["state"])
    assert torch.equal(again.raw(xt), head.raw(xt))


@pytest.fixture(scope="module")
def small_trees(binary):
    head = fit("gradient_boosting", *binary, task="classification", n_classes=2,
               args={"max_iter": 5})
    return classic_shape(head), head.state_dict()


@pytest.mark.parametrize(("field", "value"), [
    ("n_trees", 10**12), ("n_nodes", -1), ("n_nodes", "31"), ("in_features", 0),
    ("in_features", 10**9), ("n_outputs", 2.0), ("kind", "random_forest"), ("task", "ranking"),
    ("domain_column", "yes"), ("extra", 1),
])
def test_untrusted_shape_is_refused(small_trees, field, value):
    shape = dict(small_trees[0], **{field: value})
    with pytest.raises(CheckpointError, match=field):
        build_classic_head(shape)


def test_shape_missing_field_or_not_a_mapping(small_trees):
    shape = dict(small_trees[0])
    del shape["n_nodes"]
    with pytest.raises(CheckpointError, match="n_nodes"):
        build_classic_head(shape)
    with pytest.raises(CheckpointError, match="mapping"):
        build_classic_head(["gradient_boosting"])
    huge_linear = {"kind": "ridge", "task": "regression", "in_features": 10**7, "n_outputs": 1,
                   "domain_column": False}
    assert build_classic_head(dict(huge_linear, in_features=5)).weight.shape == (1, 5)
    with pytest.raises(CheckpointError, match="in_features"):  # 10**7 x 100 weights
        build_classic_head(dict(huge_linear, task="classification", kind="logistic_regression",
                                n_outputs=100))


def corrupt(state: dict, name: str, value) -> dict:
    state = {k: v.clone() for k, v in state.items()}
    state[name][0, 0] = value  # the root of the first tree (a split)
    return state


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("left", 10**6, "outside its tree"), ("right", -1, "outside its tree"),
    ("left", 0, "not after its parent"), ("feature", 31, "feature index"),
    ("threshold", float("nan"), "NaN threshold"),
])
def test_crafted_tree_state_is_refused(small_trees, name, value, problem):
    shape, state = small_trees
    assert not state["is_leaf"][0, 0]
    bad = corrupt(state, name, value)
    head = build_classic_head(shape)
    head.load_state_dict(bad)
    with pytest.raises(CheckpointError, match=problem):
        check_classic_state(head)
    with pytest.raises(CheckpointError, match=problem):
        load_classic_head(shape, bad)


def test_crafted_state_other_problems(small_trees):
    shape, state = small_trees
    bad = {k: v.clone() for k, v in state.items()}
    bad["value"][0, 1] = float("inf")
    with pytest.raises(CheckpointError, match="leaf value"):
        load_classic_head(shape, bad)
    bad = {k: v.clone() for k, v in state.items()}
    bad["tree_output"][0] = 7
    with pytest.raises(CheckpointError, match="output index"):
        load_classic_head(shape, bad)
    with pytest.raises(CheckpointError, match="does not fit"):  # wrong size
        load_classic_head(dict(shape, n_nodes=shape["n_nodes"] + 1), state)
    # Unchecked, a cycle still cannot loop forever: traversal stops after n_nodes steps.
    head = build_classic_head(shape)
    head.load_state_dict(corrupt(state, "left", 0))
    assert head.raw(torch.zeros(3, shape["in_features"])).shape == (3, 2)


def touch(path: str) -> None:
    with open(path, "w") as f:
        f.write("ran")


class Payload:
    """An object whose unpickling would run code: touch(marker)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return touch, (self.marker,)


@pytest.mark.parametrize("load", [load_weights_file, Checkpoint.load])
def test_a_pickled_object_in_a_checkpoint_is_refused_unrun(tmp_path, load):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": "tltool-checkpoint", "spec": {"head": "ridge"},
                "state_dict": {"head.weight": torch.zeros(1, 2)},
                "head_shape": Payload(str(marker))}, path)
    with pytest.raises(RunError, match="holds pickled Python objects"):
        load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the full unpickler would have run it
    assert marker.exists()


# --------------------------------------------------------------------------- head_args


def test_classic_args_defaults_and_numbers():
    assert classic_args("gradient_boosting", None) == CLASSIC_ARGS["gradient_boosting"]
    assert classic_args("logistic_regression", {"C": "1e-3"}) == {"C": 1e-3, "max_iter": 5000,
                                                                  "tol": 1e-4}
    assert classic_args("ridge", {"alpha": 2})["alpha"] == 2.0


@pytest.mark.parametrize(("kind", "args", "key"), [
    ("logistic_regression", {"C": -1.0}, "C"), ("logistic_regression", {"C": "big"}, "C"),
    ("logistic_regression", {"max_iter": 2.5}, "max_iter"),
    ("logistic_regression", {"max_iter": True}, "max_iter"),
    ("logistic_regression", {"alpha": 1.0}, "alpha"), ("ridge", {"alpha": 0}, "alpha"),
    ("ridge", {"alpha": "automatic"}, "alpha"), ("gradient_boosting", {"gamma": 1}, "gamma"),
    ("gradient_boosting", {"max_depth": "deep"}, "max_depth"),
    ("gradient_boosting", {"l2_regularization": -0.1}, "l2_regularization"),
])
def test_bad_head_args(kind, args, key):
    with pytest.raises(ConfigError, match=rf"model\.head_args\.{key}\b") as info:
        classic_args(kind, args)
    message = str(info.value)
    assert "\n" not in message and repr(args[key]) in message
    assert all(allowed in message for allowed in CLASSIC_ARGS[kind])


def test_head_args_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"model\.head_args"):
        classic_args("ridge", ["alpha", 1])


@pytest.mark.parametrize(("kind", "task", "allowed"), [
    ("ridge", "classification", "logistic_regression, gradient_boosting"),
    ("logistic_regression", "regression", "ridge, gradient_boosting"),
    ("svm", "classification", "logistic_regression"),
])
def test_wrong_head_for_task(kind, task, allowed, regression):
    x, y = regression
    with pytest.raises(ConfigError, match=r"model\.head") as info:
        fit(kind, x, y, task=task, n_classes=2)
    assert kind in str(info.value) and allowed in str(info.value)
