"""Shared fixtures: small, fast configs on the built-in credit_data, and a CLI runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tltool.cli import app

BASE = {
    "seed": 0,
    "source": {"kind": "builtin", "name": "credit_data", "where": {"Job": "fixed"}},
    "target": {"kind": "builtin", "name": "credit_data", "where": {"Job": "partime"},
               "n_train": 100, "split": {"val": 0.2, "test": 0.4}},
    "model": {"backbone": "mlp", "backbone_args": {"hidden": [16, 8]}},
    "train": {"epochs": 4, "batch_size": 128, "lr": 0.003},
    "decision": {"rule": "threshold", "optimize": "accuracy"},
}


# Long tests in files that other engineers own are marked slow here (they leave the default
# `make test`, which must stay within 8 minutes on 2 cores, and run in `make test-all`).
# A name that no longer matches a test of a collected file stops the run, so the list cannot
# rot silently.
@pytest.fixture(autouse=True, scope="session")
def _private_probe_cache(tmp_path_factory):
    """Layout/precision probe results go to a cache of the test session, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TLTOOL_CACHE_DIR", str(tmp_path_factory.mktemp("probe-cache")))
    yield
    mp.undo()


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run `tltool ARGS` in-process with tmp_path as the current folder."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str) -> Result:
        res = runner.invoke(app, list(args), catch_exceptions=False)
        return Result(res.exit_code, res.stdout, res.stderr)

    return run


@pytest.fixture
def write_config(tmp_path):
    """Write a config (BASE deep-updated with `changes`) and return its path."""

    def write(name: str, changes: dict | None = None, base: dict | None = None) -> str:
        data = merge(BASE if base is None else base, {"name": name, **(changes or {})})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write


def merge(base: dict, changes: dict) -> dict:
    """Deep merge as tltool's `extends` does it: an empty mapping replaces the parent's."""
    out = dict(base)
    for k, v in changes.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and v and \
            isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def pretrained(cli, write_config, tmp_path) -> Path:
    """A complete pretrain run on the fixed-job population."""
    res = cli("pretrain", write_config("src"))
    assert res.code == 0, res.err
    return tmp_path / res.out.strip()
