"""Property tests: the config loader, the CSV reader and the checkpoint loader on generated
inputs give a result or tltool's own error, never another exception. A few dozen examples
each in the default suite; 1,000 each in the slow one (`make test-slow`)."""

from __future__ import annotations

import io
import string

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tltool.config import ExperimentConfig, load_config
from tltool.errors import TLError

FAST, SLOW = 40, 1000
SECTIONS = list(ExperimentConfig.model_fields)
KEYS = SECTIONS + ["kind", "name", "path", "label", "epochs", "lr", "backbone", "weights",
                   "frozen_layers", "strategy", "head", "n_train", "split", "val", "test",
                   "candidates", "set", "rounds", "extends", "where", "positive"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(alphabet=string.printable, max_size=12), st.sampled_from(
                        ["builtin", "credit_data", "mlp", "csv", "none", "freeze", "linear"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=12)
configs = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                     HealthCheck.too_slow])


def _config_case(tmp_path, data, raw_text, as_text: bool) -> None:
    path = tmp_path / "c.yaml"
    if as_text:
        path.write_bytes(raw_text)
    else:
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        load_config(path)
    except TLError:
        pass


@pytest.mark.parametrize("n", [pytest.param(FAST), pytest.param(SLOW, marks=pytest.mark.slow)])
def test_config_loader_never_raises_anything_else(n, tmp_path):
    @settings(max_examples=n, **SETTINGS)
    @given(configs, st.binary(max_size=200), st.booleans())
    def check(data, raw, as_text):
        _config_case(tmp_path, data, raw, as_text)

    check()


cells = st.one_of(st.just(""), st.text(alphabet=string.printable.replace("\r", ""), max_size=8),
                  st.floats(allow_nan=True, allow_infinity=True).map(str),
                  st.integers(-10**20, 10**20).map(str), st.sampled_from(["inf", "-inf", "nan",
                                                                          "1e308", "NA"]))


def _csv_case(tmp_path, header, rows, sep) -> None:
    from tltool.config import DataConfig
    from tltool.data.tabular import load_tabular

    text = sep.join(header) + "\n" + "\n".join(sep.join(r[:len(header)]) for r in rows) + "\n"
    path = tmp_path / "d.csv"
    path.write_text(text)
    cfg = DataConfig(kind="csv", path=str(path), label=header[0], split={"stratify": False})
    try:
        load_tabular(cfg)
    except TLError:
        pass


@pytest.mark.parametrize("n", [pytest.param(FAST), pytest.param(SLOW, marks=pytest.mark.slow)])
def test_csv_reader_never_raises_anything_else(n, tmp_path):
    @settings(max_examples=n, **SETTINGS)
    @given(st.lists(st.text(alphabet=string.ascii_letters, min_size=1, max_size=4),
                    min_size=1, max_size=4, unique=True),
           st.lists(st.lists(cells, min_size=4, max_size=4), min_size=0, max_size=25),
           st.sampled_from([",", ";", "\t", "|"]))
    def check(header, rows, sep):
        _csv_case(tmp_path, header, rows, sep)

    check()


def _good_checkpoint() -> dict:
    from tltool.checkpoint import Checkpoint
    from tltool.models import HeadSettings, build_model, model_spec

    spec = model_spec("mlp", {"hidden": [4], "activation": "relu", "batch_norm": False,
                              "dropout": 0.0}, 3, HeadSettings("linear", 8, 0.0), 2)
    model = build_model(spec)
    pre = {"kind": "tabular", "numeric": [{"name": c, "median": 0.0, "mean": 0.0, "std": 1.0}
                                          for c in "abc"], "categorical": [], "dropped": []}
    like = Checkpoint("pretrain", 1, spec, ["no", "yes"], "y", "classification", pre, {})
    return Checkpoint.of_model(model, like, 1).payload()


PATHS = [("spec", "backbone"), ("spec", "in_features"), ("spec", "n_outputs"),
         ("spec", "head"), ("spec", "backbone_args"), ("spec", "dropout"), ("classes",),
         ("label",), ("preprocessor", "kind"), ("preprocessor", "numeric"),
         ("state_dict",), ("spec", "target_scale"), ("spec", "prior"), ("spec",)]


@pytest.mark.parametrize("n", [pytest.param(FAST), pytest.param(SLOW, marks=pytest.mark.slow)])
def test_checkpoint_loader_never_raises_anything_else(n, tmp_path):
    from tltool.checkpoint import Checkpoint
    from tltool.models.loading import load_trained

    good = _good_checkpoint()
    replacement = st.one_of(values, st.just(torch.zeros(2, 2)), st.just([10**9, 10**9]))

    @settings(max_examples=n, **SETTINGS)
    @given(st.lists(st.tuples(st.sampled_from(PATHS), replacement), min_size=1, max_size=3))
    def check(edits):
        import copy

        payload = copy.deepcopy(good)
        for path, value in edits:
            node = payload
            for key in path[:-1]:
                node = node[key] if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node[path[-1]] = value
        buf = io.BytesIO()
        torch.save(payload, buf)
        file = tmp_path / "best.pt"
        file.write_bytes(buf.getvalue())
        try:
            load_trained(Checkpoint.load(file))
        except TLError:
            pass

    check()
