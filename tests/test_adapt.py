"""Domain adaptation: the alignment losses, the unlabelled pool, and adapt end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tltool.adapt import Adaptation, coral, dann_scale, mmd
from tltool.config import TrainConfig, validate_config
from tltool.data.tabular import load_tabular
from tltool.engine.drive import fit
from tltool.engine.plan import Round, Sink, TrainingData, TrainingPlan
from tltool.models import HeadSettings, build_model, model_spec
from tltool.task import Task
from tltool.tensors import Tensors


def _shifted(n: int, shift: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) * (1 + shift) + shift


def test_alignment_losses_are_zero_for_one_domain_and_grow_with_the_shift():
    a, b = _shifted(256, 0.0, 0), _shifted(256, 0.0, 1)
    for loss in (coral, mmd):
        same = float(loss(a, a))
        assert abs(same) < 1e-6, loss.__name__
        gaps = [float(loss(a, _shifted(256, s, 2))) for s in (0.0, 0.5, 1.5)]
        assert gaps[0] < gaps[1] < gaps[2], (loss.__name__, gaps)
        assert float(loss(a, b)) < gaps[1]


def test_coral_matches_its_definition():
    fs, ft = _shifted(50, 0.3, 0), _shifted(70, 1.0, 1)
    cs, ct = np.cov(fs.numpy().T), np.cov(ft.numpy().T)
    expected = ((cs - ct) ** 2).sum() / (4 * 6 * 6)
    assert float(coral(fs, ft)) == pytest.approx(expected, rel=1e-4)


def test_dann_reverses_the_gradient_into_the_features():
    assert dann_scale(0.0) == 0.0 and 0.99 < dann_scale(1.0) < 1.0
    fs = _shifted(32, 0.0, 0).requires_grad_()
    ft = _shifted(32, 2.0, 1)
    adapt = Adaptation("dann", 1.0, target=None)
    critic = adapt.make_critic(6, torch.device("cpu"))
    loss = adapt.loss(fs, ft, progress=1.0)
    loss.backward()
    grad_reversed = fs.grad.clone()
    # The same loss without reversal: the feature gradient has the opposite sign.
    fs2 = fs.detach().clone().requires_grad_()
    side = torch.cat([torch.zeros(32), torch.ones(32)])
    logits = critic.net(torch.cat([fs2, ft])).squeeze(1)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, side).backward()
    assert torch.allclose(grad_reversed, -dann_scale(1.0) * fs2.grad, atol=1e-6)


def test_rows_left_out_by_n_train_and_blank_labels_form_the_unlabelled_pool(tmp_path):
    frame = pd.DataFrame({"x": np.arange(60, dtype=float), "c": ["a", "b"] * 30,
                          "y": ["p", "q", "q"] * 20})
    frame.loc[[3, 7], "y"] = None
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    cfg = validate_config({"source": {"kind": "csv", "path": str(path), "label": "y",
                                      "n_train": 10}}, "t").source
    data = load_tabular(cfg)
    assert len(data.train) == 10
    pool_ids = set(data.unlabeled.ids.tolist())
    assert {"3", "7"} <= pool_ids  # blank labels
    assert not pool_ids & set(data.train.ids.tolist())
    assert not pool_ids & set(data.val.ids.tolist()) and not pool_ids & set(data.test.ids.tolist())
    assert (data.unlabeled.y == -1).all()
    n_labelled = 58
    assert len(data.train) + len(data.val) + len(data.test) + len(data.unlabeled) == \
        n_labelled + 2


def _train_gap(method: str) -> float:
    """Train an MLP on labelled source rows (+ alignment with shifted target rows) and return
    the features' CORAL distance between the two domains afterwards."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(256, 6, generator=g)
    ys = (xs[:, 0] > 0).long()
    xt = torch.randn(256, 6, generator=g) * 2 + 1.5  # shifted target
    model = build_model(model_spec("mlp", {"hidden": [16, 8]}, 6, HeadSettings("linear", 8, 0.0),
                                   2))
    adapt = (None if method == "none" else
             Adaptation(method, 1.0, target=Tensors(xt, torch.full((256,), -1))))
    cfg = TrainConfig(epochs=15, batch_size=64, lr=0.01, early_stopping={"patience": None})
    fit(model, TrainingData(Tensors(xs, ys), Tensors(xs[:64], ys[:64]), adapt=adapt),
        TrainingPlan([Round(0, "full", 15, 0.01, 1.0)], cfg, 0, Task(), ["a", "b"]),
        Sink(lambda *_: None, log=lambda _: None))
    with torch.no_grad():
        model.eval()
        return float(coral(model.backbone(xs), model.backbone(xt)))


def test_adapted_training_narrows_the_domain_gap():
    plain = _train_gap("none")
    for method in ("coral", "mmd", "dann"):
        assert _train_gap(method) < plain, method


def test_pretrain_with_coral_aligns_source_and_target_rows(cli, write_config, tmp_path):
    res = cli("pretrain", write_config("da", {"adapt": {"method": "coral", "weight": 5.0}}))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    metrics = json.loads((run / "metrics.json").read_text())
    info = metrics["adapt"]
    assert info["method"] == "coral" and info["source_rows"] == metrics["data"]["rows"]["train"]
    # 452 part-time applicants: 181 test and 91 val rows held out; the rest is the pool
    # (n_train's 100 labelled rows and the 80 it leaves out)
    assert info["target_rows_aligned"] == 452 - 181 - 91
    epochs = pd.read_csv(run / "metrics.csv")
    assert epochs["align_loss"].notna().all()


def test_finetune_with_dann_trains_on_both_domains(pretrained, cli, write_config, tmp_path):
    cfg = write_config("ft-da", {"model": {"backbone_args": {}, "weights": str(pretrained),
                                           "frozen_layers": 1},
                                 "adapt": {"method": "dann", "unlabeled": "pool"}})
    res = cli("freeze-finetune", cfg)
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["adapt"]["method"] == "dann"
    assert metrics["adapt"]["target_rows_aligned"] > metrics["data"]["rows"]["train"]
    assert metrics["freeze_check"]["unchanged"]
    # the domain critic is not part of the saved model
    state = torch.load(run / "checkpoints/best.pt", weights_only=True)["state_dict"]
    assert not any("critic" in k for k in state)


def test_adapt_needs_the_other_domain_and_matching_classes(cli, write_config, tmp_path):
    no_target = Path(write_config("d1", {"adapt": {"method": "mmd"}}))
    data = yaml.safe_load(no_target.read_text())
    del data["target"]
    no_target.write_text(yaml.safe_dump(data))
    res = cli("pretrain", str(no_target))
    assert res.code == 2 and "needs a `target` data section" in res.err
    assert not (tmp_path / "runs").exists()
    rng = np.random.default_rng(0)
    for name, labels in (("s", ["a", "b"]), ("t", ["a", "c"])):
        pd.DataFrame({"x": rng.normal(size=80), "y": labels * 40}).to_csv(
            tmp_path / f"{name}.csv", index=False)
    tables = {"source": {"kind": "csv", "path": str(tmp_path / "s.csv"), "label": "y"},
              "target": {"kind": "csv", "path": str(tmp_path / "t.csv"), "label": "y"},
              "decision": {"rule": "argmax"}, "train": {"epochs": 1}}
    plain = {"model": {"backbone": "mlp", "backbone_args": {"hidden": [8]}}}
    res = cli("pretrain", write_config("s", tables, base=plain))
    assert res.code == 0, res.err
    cfg = write_config("t", {**tables, "model": {"backbone_args": {},
                                                 "weights": str(tmp_path / res.out.strip())},
                             "adapt": {"method": "coral"}}, base=plain)
    res = cli("freeze-finetune", cfg)
    assert res.code == 2 and "source classes (a, b) differ from the target's (a, c)" in res.err
    assert "adapt.source_weight: 0" in res.err
    res = cli("freeze-finetune", cfg, "--set", "adapt.source_weight=0")
    assert res.code == 0, res.err


def test_image_adaptation_resizes_the_other_domain_to_the_models_size(cli, write_config,
                                                                      tmp_path):
    cfg = write_config("img-adapt", base={
        "source": {"kind": "builtin", "name": "mnist5k", "n_train": 200, "n_val": 50,
                   "image_size": 28},
        "target": {"kind": "builtin", "name": "digits", "image_size": 20},
        "model": {"backbone": "small_cnn", "backbone_args": {"hidden": 8}},
        "train": {"epochs": 1, "batch_size": 64}, "adapt": {"method": "mmd"}})
    res = cli("pretrain", cfg)
    assert res.code == 0, res.err
    m = json.loads((tmp_path / res.out.strip() / "metrics.json").read_text())
    assert m["adapt"]["method"] == "mmd" and m["adapt"]["target_rows_aligned"] > 0


@pytest.mark.parametrize("method, weight", [("coral", 5.0), ("mmd", 5.0), ("dann", 1.0)])
def test_each_alignment_loss_is_logged_and_changes_the_trained_weights(method, weight, cli,
                                                                       write_config, tmp_path):
    """The same pretrain with the alignment weighted and weighted 0 (the same rows drawn, the
    loss counting for nothing): the alignment loss is logged every epoch and moves the
    backbone's weights."""
    runs = {}
    for w in (weight, 0.0):
        res = cli("pretrain", write_config(f"{method}-{w}", {
            "train": {"epochs": 2}, "adapt": {"method": method, "weight": w}}))
        assert res.code == 0, res.err
        runs[w] = tmp_path / res.out.strip()
    epochs = pd.read_csv(runs[weight] / "metrics.csv")
    assert len(epochs) == 2 and (epochs["align_loss"] > 0).all()
    weights = [torch.load(runs[w] / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
               for w in (weight, 0.0)]
    moved = [k for k in weights[0] if k.startswith("backbone.")
             and not torch.allclose(weights[0][k], weights[1][k], atol=1e-6)]
    assert moved, f"{method}: the alignment left every backbone weight as it was"
