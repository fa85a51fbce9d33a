"""TensorBoard event files in run folders, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def _events(run: Path):
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_run_folder_has_epochs_hparams_and_pr_curves(cli, write_config, tmp_path):
    res = cli("pretrain", write_config("tb", {"train": {"epochs": 3,
                                                        "early_stopping": {"patience": None}}}))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    ea = _events(run)
    tags = ea.Tags()
    rows = pd.read_csv(run / "metrics.csv")
    train = ea.Scalars("loss/train")
    assert [e.step for e in train] == rows["epoch"].tolist() == [1, 2, 3]
    assert [e.value for e in train] == pytest.approx(rows["train_loss"].tolist(), rel=1e-6)
    assert [e.value for e in ea.Scalars("val/auroc")] == pytest.approx(
        rows["val_auroc"].tolist(), rel=1e-6)
    assert "lr/head" in tags["scalars"]
    assert {"pr/val/bad", "pr/test/bad"} <= set(tags["tensors"])
    assert ea.PluginTagToContent("hparams")  # the HParams dashboard's session data
    import json

    test_auroc = json.loads((run / "metrics.json").read_text())["test"]["auroc"]
    assert ea.Scalars("hparam/test_auroc")[0].value == pytest.approx(test_auroc, rel=1e-6)


def test_tensorboard_can_be_switched_off(cli, write_config, tmp_path):
    res = cli("pretrain", write_config("notb", {"train": {"epochs": 1},
                                                "output": {"tensorboard": False}}))
    assert res.code == 0, res.err
    assert not (tmp_path / res.out.strip() / "tensorboard").exists()
