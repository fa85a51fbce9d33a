"""`tltool backbones` answers from static data (tltool/catalog.json): current, and no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tltool import catalog


def test_catalog_is_current():
    """The file matches the backbones as they build now (regenerate: make catalog)."""
    assert catalog.load() == catalog.build(), "tltool/catalog.json is stale: run make catalog"


def test_tabular_counts_scale_with_the_width():
    from tltool.models.backbones import build_backbone

    entry = catalog.load()["mlp"]
    for width in (3, 41):
        net = build_backbone("mlp", {}, width)
        live = [sum(p.numel() for p in m.parameters()) for m in net.blocks]
        assert [catalog.params(b, width) for b in entry["blocks"]] == live


def test_backbones_command_imports_no_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom tltool.cli import app\n"
            "r = CliRunner().invoke(app, ['backbones', '--name', 'resnet18'])\n"
            "assert r.exit_code == 0, r.output\nassert 'layer4' in r.output\n"
            "print(sorted(m for m in ('torch', 'numpy', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("bad", ["resnet19", "nope"])
def test_unknown_backbone_name(cli, bad):
    res = cli("backbones", "--name", bad)
    assert res.code == 2 and "unknown backbone" in res.err
