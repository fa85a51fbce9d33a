"""The options of the classic heads (config key model.head_args), checked and completed with
their defaults, and which classic heads can be fitted for which task.
"""

from __future__ import annotations

import math
from typing import Any

from tltool.errors import ConfigError
from tltool.models.classic import CLASSIC_HEADS, TASK_HEADS

CLASSIC_ARGS: dict[str, dict[str, Any]] = {
    "logistic_regression": {"C": 1.0, "max_iter": 5000, "tol": 1e-4},
    "ridge": {"alpha": "auto"},
    "gradient_boosting": {"learning_rate": 0.1, "max_iter": 100, "max_leaf_nodes": 31,
                          "min_samples_leaf": 20, "l2_regularization": 0.0, "max_depth": None},
}

# Gradient tolerance of both logistic regression fits (scikit-learn's, and ours with an
# offset; same objective scaling) is model.head_args.tol, default scikit-learn's 1e-4: about
# 4e-3 from the optimum's probabilities on standardised breast-cancer data, and ten times
# faster than 1e-8 on raw pixels (MNIST: 216 against 2,224 L-BFGS iterations). 1e-8 gets
# within ~1e-6, so a fit with a zero offset and one without agree (the parity tests use it).
LOGISTIC_TOL = 1e-8


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
    if task not in TASK_HEADS:
        raise ConfigError(f"task {task!r}: classic heads need 'classification' or 'regression'")
    if kind not in TASK_HEADS[task]:
        raise ConfigError(f"model.head: {kind!r} cannot be fitted for {task}; classic heads "
                          f"for {task}: {', '.join(TASK_HEADS[task])}")

