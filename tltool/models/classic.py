"""Classic heads as torch modules made of plain tensors, and their shape and state checks.

A classic head (logistic regression, ridge, gradient boosting) is fitted by scikit-learn
(tltool.models.classic_fit) and then copied into an `nn.Module` whose whole state is tensors
(buffers). Saved in a `torch.save` dict and read back with `torch.load(..., weights_only=True)`,
such a model holds no pickled object, so loading a file can never run code. The module maps an
input matrix to logits, like a neural head:

- classification: (N, n_classes) logits whose softmax is scikit-learn's `predict_proba`
  (binary: logits [0, z], so the softmax is sigmoid(z));
- regression: (N, 1), scikit-learn's `predict`.

`classic_shape` describes a module's tensor sizes as a small JSON-able dict (stored in a
checkpoint's spec); `build_classic_head` rebuilds an empty module from it, treating it as
untrusted; `check_classic_state` checks the loaded tensors (tree indices in range, values
finite), so a crafted file is refused instead of crashing or looping.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tltool.errors import CheckpointError

CLASSIC_HEADS = ("logistic_regression", "ridge", "gradient_boosting")

# The classic heads each task can fit.
TASK_HEADS = {
    "classification": ("logistic_regression", "gradient_boosting"),
    "regression": ("ridge", "gradient_boosting"),
}

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
    if not isinstance(task, str) or task not in TASK_HEADS or kind not in TASK_HEADS[task]:
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
