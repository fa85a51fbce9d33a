"""tltool init (starter configs shipped in the package) and tltool config --schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tltool.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["credit", "images", "multilabel", "adapt"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_is_a_valid_config(name, cli, tmp_path):
    res = cli("init", name)
    assert res.code == 0, res.err
    path = tmp_path / f"{name}.yaml"
    assert res.out.strip() == f"{name}.yaml" and path.read_text().startswith("# tltool starter")
    cfg = load_config(path, [])
    assert cfg.name == f"{name}-starter"
    again = cli("init", name)  # never replaces a file
    assert again.code == 2 and "exists" in again.err


def test_init_to_stdout_and_bad_template(cli):
    res = cli("init", "credit", "--out", "-")
    assert res.code == 0 and "name: credit-starter" in res.out
    bad = cli("init", "audio")
    assert bad.code == 2 and "allowed: credit, images, multilabel, adapt" in bad.err


def test_the_credit_template_runs(cli, tmp_path):
    assert cli("init", "credit").code == 0
    res = cli("pretrain", "credit.yaml", "--set", "train.epochs=2", "--quiet")
    assert res.code == 0, res.err


def test_schema_accepts_every_shipped_config_and_rejects_typos(cli):
    jsonschema = pytest.importorskip("jsonschema")
    res = cli("config", "--schema")
    assert res.code == 0
    schema = json.loads(res.out)
    files = sorted(ROOT.glob("configs/**/*.yaml")) + sorted(ROOT.glob("tltool/templates/*.yaml"))
    assert len(files) > 20
    for f in files:
        jsonschema.validate(yaml.safe_load(f.read_text()), schema)  # raises on a bad file
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": {"frozen_layer": 2}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"train": {"lr": "fast"}}, schema)
