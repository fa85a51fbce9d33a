"""Freezing: exact trainable counts, learning-rate groups, BatchNorm stays put, and a check
that frozen tensors are bit-identical after training — for every registered backbone."""

from __future__ import annotations

import pytest
import torch

from tltool.config import TrainConfig
from tltool.engine.drive import fit
from tltool.engine.plan import Round, Sink, TrainingData, TrainingPlan
from tltool.errors import ConfigError
from tltool.freeze import apply_freeze, snapshot_frozen, verify_unchanged
from tltool.models import HeadSettings, build_model, model_spec
from tltool.models.backbones import BACKBONES
from tltool.task import Task
from tltool.tensors import Tensors


def _mlp(batch_norm=False):
    spec = model_spec("mlp", {"hidden": [64, 32], "batch_norm": batch_norm}, 23,
                      HeadSettings("linear", 32, 0.0), 2)
    return build_model(spec)


@pytest.mark.parametrize("strategy, frozen, trainable", [
    ("full", 0, 23 * 64 + 64 + 64 * 32 + 32 + 32 * 2 + 2),
    ("freeze", 1, 64 * 32 + 32 + 66),
    ("freeze", 2, 66),
    ("bias_only", 0, 64 + 32 + 66),
    ("bias_only", 1, 32 + 66),
    ("linear_probe", 0, 66),
])
def test_trainable_parameter_counts(strategy, frozen, trainable):
    model = _mlp()
    plan, groups = apply_freeze(model, Round(frozen, strategy, 1, 1e-3, 0.1))
    assert plan.trainable == trainable
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_backbone_gets_the_lower_learning_rate():
    plan, groups = apply_freeze(_mlp(), Round(1, "freeze", 1, 1e-3, 0.1))
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"head": 1e-3, "hidden2": pytest.approx(1e-4)}
    assert [r["state"] for r in plan.rows] == ["frozen", "trainable", "trainable"]


def test_zero_multiplier_freezes_the_backbone():
    plan, groups = apply_freeze(_mlp(), Round(0, "freeze", 1, 1e-3, 0.0))
    assert plan.trainable == 66 and [g["name"] for g in groups] == ["head"]


@pytest.mark.parametrize("frozen, strategy, message", [
    (3, "freeze", "model.frozen_layers = 3 but the backbone has 2 blocks (hidden1, hidden2); "
                  "allowed: 0..2"),
    (1, "full", "model.frozen_layers = 1 with strategy 'full', which trains every block"),
])
def test_impossible_plans_are_config_errors(frozen, strategy, message):
    with pytest.raises(ConfigError) as exc:
        apply_freeze(_mlp(), Round(frozen, strategy, 1, 1e-3, 1.0))
    assert message in str(exc.value)


def test_frozen_batchnorm_stays_in_inference_mode():
    model = _mlp(batch_norm=True)
    apply_freeze(model, Round(1, "freeze", 1, 1e-3, 1.0))
    model.train()
    bn1 = model.backbone.blocks[0][1]
    bn2 = model.backbone.blocks[1][1]
    assert not bn1.training and bn2.training


def _args_for(name):
    return {"mlp": {"hidden": [16, 8], "batch_norm": True}, "resmlp": {"width": 16},
            "raw": {}}[name]


@pytest.mark.parametrize("name", sorted(n for n, s in BACKBONES.items() if s.input == "tabular"))
@pytest.mark.parametrize("strategy, frozen", [("freeze", 1), ("bias_only", 1),
                                              ("linear_probe", 0)])
def test_frozen_tensors_are_bit_identical_after_training(name, strategy, frozen):
    torch.manual_seed(0)
    model = build_model(model_spec(name, _args_for(name), 10, HeadSettings("linear", 8, 0.0), 3))
    if frozen > len(model.backbone.blocks) or (strategy == "bias_only"
                                               and not model.backbone.blocks):
        pytest.skip(f"{name} has {len(model.backbone.blocks)} blocks")
    x, y = torch.randn(96, 10), torch.randint(0, 3, (96,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    summary = fit(model, TrainingData(Tensors(x, y), Tensors(x[:32], y[:32])),
                  TrainingPlan([Round(frozen, strategy, 3, 0.05, 1.0)], cfg, 0, Task(),
                               ["a", "b", "c"]),
                  Sink(lambda *_: None, log=lambda _: None))
    assert summary.freeze_check["unchanged"]
    after = model.state_dict()
    n_frozen = summary.plans[0]["frozen_layers"]
    frozen_prefixes = [f"backbone.blocks.{i}." for i in range(n_frozen)]
    for key, value in before.items():
        if any(key.startswith(p) for p in frozen_prefixes):
            assert torch.equal(after[key], value), key  # weights and BN statistics alike
        if strategy == "bias_only" and key.startswith("backbone.") and key.endswith("weight"):
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["head.0.weight"], before["head.0.weight"])


def test_verify_catches_a_moved_tensor():
    model = _mlp()
    apply_freeze(model, Round(1, "freeze", 1, 1e-3, 1.0))
    snap = snapshot_frozen(model)
    with torch.no_grad():
        model.backbone.blocks[0][0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="frozen tensors changed"):
        verify_unchanged(model, snap)


def test_balanced_class_weights_are_inverse_frequencies():
    from tltool.task import Task

    y = torch.tensor([0, 0, 0, 1])
    assert torch.allclose(Task().loss(y, 2, "balanced").weight, torch.tensor([4 / 6, 4 / 2]))
    assert Task().loss(y, 2, "none").weight is None


def test_layer_decay_gives_earlier_blocks_smaller_rates():
    spec = model_spec("mlp", {"hidden": [8, 8, 8]}, 5, HeadSettings("linear", 8, 0.0), 2)
    plan, groups = apply_freeze(build_model(spec), Round(0, "full", 1, 1.0, 0.5),
                                layer_decay=0.1)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"head": 1.0, "hidden3": 0.5, "hidden2": pytest.approx(0.05),
                   "hidden1": pytest.approx(0.005)}
    assert [r["lr"] for r in plan.rows] == [lrs["hidden1"], lrs["hidden2"], 0.5, 1.0]


def test_bn_policy_train_lets_frozen_statistics_adapt():
    model = _mlp(batch_norm=True)
    plan, _ = apply_freeze(model, Round(1, "freeze", 1, 1e-3, 1.0), bn_policy="train")
    model.train()
    assert model.backbone.blocks[0][1].training
    assert plan.rows[0]["bn"] == "train" and plan.rows[0]["trainable"] == 0


@pytest.mark.parametrize("strategy, frozen", [("freeze", 1), ("linear_probe", 0)])
def test_prefix_cache_trains_the_same_model(strategy, frozen):
    x, y = torch.randn(200, 10), torch.randint(0, 2, (200,))
    results = {}
    for cache in ("auto", "off"):
        torch.manual_seed(0)
        model = build_model(model_spec("mlp", {"hidden": [16, 8]}, 10,
                                       HeadSettings("linear", 8, 0.0), 2))
        cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, cache=cache)
        summary = fit(model, TrainingData(Tensors(x, y), Tensors(x[:50], y[:50])),
                      TrainingPlan([Round(frozen, strategy, 3, 0.05, 1.0)], cfg, 0, Task(),
                                   ["a", "b"]),
                      Sink(lambda *_: None, log=lambda _: None))
        results[cache] = (model.state_dict(), summary.cache[0]["cached_blocks"])
    assert results["auto"][1] == (2 if strategy == "linear_probe" else 1)
    assert results["off"][1] == 0
    for key, value in results["off"][0].items():
        assert torch.allclose(results["auto"][0][key], value, atol=1e-6), key


def test_bias_only_fine_tuning_moves_the_backbones_biases_and_nothing_else(pretrained, cli,
                                                                           write_config,
                                                                           tmp_path):
    res = cli("freeze-finetune", write_config("bias", {
        "model": {"weights": str(pretrained), "backbone_args": {}, "strategy": "bias_only"},
        "train": {"epochs": 2, "lr": 0.03}}))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    source = torch.load(pretrained / "checkpoints" / "best.pt", weights_only=True)["state_dict"]
    tuned = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    backbone = [k for k in source if k.startswith("backbone.")]
    biases = [k for k in backbone if k.endswith(".bias")]
    assert biases and len(biases) < len(backbone)
    for key in backbone:
        moved = not torch.equal(source[key], tuned[key])
        assert moved == (key in biases), key
    plan = (run / "freeze_plan.txt").read_text()
    assert "bias_only" in plan
