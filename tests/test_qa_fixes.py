"""Inputs a QA sweep of 519 hostile cases found mishandled (2026-12-01), each now a clear
error (exit 2) or handled right."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def test_a_mapping_used_as_a_yaml_key(cli, tmp_path):
    (tmp_path / "k.yaml").write_text("? [a, b]\n: 1\n")
    res = cli("config", "k.yaml")
    assert res.code == 2 and "keys must be plain names" in res.err


@pytest.mark.parametrize("hidden", [[-5], [0], [2_000_000_000]])
def test_impossible_layer_widths(cli, write_config, hidden):
    res = cli("pretrain", write_config("w", {"model": {"backbone_args": {"hidden": hidden}}}))
    assert res.code == 2 and "model.backbone_args.hidden" in res.err


def test_n_train_one_below_the_split_size_draws_a_sample(cli, write_config):
    # the target's training split: 271 part-time applicants minus 40% test, minus 20% val
    res = cli("freeze-finetune", write_config("n", {"target": {"n_train": None}}), "--json")
    rows = json.loads(res.out)
    assert res.code == 0
    run = Path(rows["run"])
    n = json.loads((run / "metrics.json").read_text())["data"]["splits"]["train"]["rows"]
    res = cli("freeze-finetune", write_config("n1", {"target": {"n_train": n - 1}}))
    assert res.code == 0, res.err


@pytest.mark.parametrize("rule, message", [
    ({"rule": "threshold", "threshold": 5, "positive": "bad"}, "not a probability"),
    ({"rule": "regression"}, "a regression rule for a single-label model"),
    ({"rule": "threshold", "threshold": None, "per_label": [0.5, 0.5]}, "multi-label rule"),
])
def test_a_thresholds_file_that_does_not_fit_the_model(cli, pretrained, rule, message):
    (pretrained / "thresholds.json").write_text(json.dumps(rule))
    res = cli("evaluate", str(pretrained))
    assert res.code == 2 and message in res.err


def test_evaluate_on_a_relative_run_path_writes_beside_it(cli, pretrained):
    os.chdir(pretrained)
    res = cli("evaluate", ".")
    assert res.code == 0, res.err
    out = Path(res.out.strip())
    assert out.parent == pretrained.parent and not any(
        p.name.endswith("-evaluate") for p in pretrained.iterdir())


def test_export_out_rules(cli, pretrained, tmp_path, write_config):
    assert cli("export", str(pretrained), "--format", "torchscript", "--out", "-").code == 2
    other = cli("pretrain", write_config("o", {"train": {"epochs": 1}}))
    inside = cli("export", str(pretrained), "--format", "torchscript", "--out",
                 str(tmp_path / other.out.strip() / "exp"))
    assert inside.code == 2 and "never changes another run's files" in inside.err


def test_runs_status_and_table_options(cli, write_config, tmp_path):
    bad = cli("runs", str(tmp_path), "--status", "bogus")
    assert bad.code == 2 and "allowed: complete" in bad.err
    opt = cli("pretrain", write_config("opt", {"source": {"options": {"bogus": 1}}}))
    assert opt.code == 2 and "do not apply to tables" in opt.err


def test_a_fifo_as_data_file(cli, write_config, tmp_path):
    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)
    res = cli("pretrain", write_config("f", {"source": {"kind": "csv", "path": str(fifo),
                                                        "label": "y", "where": None}}))
    assert res.code == 2 and "not a regular file" in res.err


def test_predict_to_stdout_with_json_is_refused(cli, pretrained):
    csv = Path(__file__).parents[1] / "configs/credit/new_applicants.csv"
    res = cli("predict", str(pretrained), str(csv), "--out", "-", "--json")
    assert res.code == 2 and "both would use standard output" in res.err


def test_symlinked_images_keep_one_class(tmp_path):
    import numpy as np
    from PIL import Image

    from tltool.config import DataConfig
    from tltool.data.images.sources import from_folder
    from tltool.errors import DataError

    img = tmp_path / "img"
    for c in ("a", "b"):
        (img / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), i * 40 + (c == "b") * 9, np.uint8)).save(
                img / c / f"{i}.png")
    (img / "a" / "again.png").symlink_to(img / "a" / "0.png")
    notes: list[str] = []
    found = from_folder(DataConfig(kind="image_folder", path=str(img), decode_cache=False),
                        8, notes)
    assert len(found.x) == 6 and any("used once" in n for n in notes)
    (img / "b" / "x.png").symlink_to(img / "a" / "1.png")
    with pytest.raises(DataError, match="an image needs one class"):
        from_folder(DataConfig(kind="image_folder", path=str(img)), 8, [])
    (img / "b" / "x.png").unlink()
    (img / "a" / "loop").symlink_to(img)  # a link back to the top folder
    with pytest.raises(DataError, match="an image needs one class"):
        from_folder(DataConfig(kind="image_folder", path=str(img)), 8, [])
