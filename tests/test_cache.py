"""The frozen-prefix cache computes exactly what the uncached network computes."""

from __future__ import annotations

import pytest
import torch

from tltool.cache import Budget, build_prefix_cache
from tltool.config import TrainConfig
from tltool.engine.drive import fit
from tltool.engine.plan import Round, Sink, TrainingData, TrainingPlan
from tltool.engine.predict import predict_logits
from tltool.models import HeadSettings, build_model, model_spec
from tltool.task import Task
from tltool.tensors import Tensors


@pytest.mark.parametrize("name, n", [("resnet18", 4), ("small_cnn", 2), ("mlp", 1)])
def test_cached_prefix_gives_bit_identical_fp32_logits(name, n):
    torch.manual_seed(0)
    inputs = 3 if name != "mlp" else 12
    model = build_model(model_spec(name, {}, inputs, HeadSettings("linear", 8, 0.0), 5)).eval()
    x = torch.randn(16, 3, 32, 32) if name != "mlp" else torch.randn(16, 12)
    data = Tensors(x, torch.zeros(16, dtype=torch.long))
    cache = build_prefix_cache(model, data, n, Budget(16, 1e9))
    assert cache is not None
    direct = predict_logits(model, data, batch_size=16)
    cached = predict_logits(model, cache, batch_size=16, start=n)
    assert torch.equal(direct, cached)


def test_cache_over_budget_falls_back_and_says_so():
    torch.manual_seed(0)
    model = build_model(model_spec("small_cnn", {}, 3, HeadSettings("linear", 8, 0.0), 2))
    x, y = torch.randn(40, 3, 28, 28), torch.randint(0, 2, (40,))
    cfg = TrainConfig(epochs=1, batch_size=20, cache_max_gb=1e-6)
    summary = fit(model, TrainingData(Tensors(x, y), Tensors(x[:8], y[:8])),
                  TrainingPlan([Round(2, "freeze", 1, 0.01, 1)], cfg, 0, Task(), ["a", "b"]),
                  Sink(lambda *_: None, log=lambda _: None))
    assert summary.cache[0] == {"round": 1, "cached_blocks": 0,
                                   "reason": "prefix cache over cache_max_gb"}


def test_random_augmentation_disables_the_cache():
    torch.manual_seed(0)
    model = build_model(model_spec("small_cnn", {}, 3, HeadSettings("linear", 8, 0.0), 2))
    x, y = torch.randn(20, 3, 28, 28), torch.randint(0, 2, (20,))
    aug = Tensors(x, y, prepare=lambda b, train: b.flip(-1) if train else b, augments=True)
    summary = fit(model, TrainingData(aug, Tensors(x[:8], y[:8])),
                  TrainingPlan([Round(2, "freeze", 1, 0.01, 1)],
                               TrainConfig(epochs=1, batch_size=10), 0, Task(), ["a", "b"]),
                  Sink(lambda *_: None, log=lambda _: None))
    assert summary.cache[0]["cached_blocks"] == 0
    assert "augmentation" in summary.cache[0]["reason"]


def test_augmented_views_are_cached_when_asked():
    torch.manual_seed(0)
    model = build_model(model_spec("small_cnn", {}, 3, HeadSettings("linear", 8, 0.0), 2))
    x, y = torch.randn(20, 3, 28, 28), torch.randint(0, 2, (20,))
    calls = []

    def prepare(b, train):
        calls.append(train)
        return b.flip(-1) if train else b

    aug = Tensors(x, y, prepare=prepare, augments=True)
    summary = fit(model, TrainingData(aug, Tensors(x[:8], y[:8])),
                  TrainingPlan([Round(2, "freeze", 3, 0.01, 1)],
                               TrainConfig(epochs=3, batch_size=10, cache_views=2), 0, Task(),
                               ["a", "b"]),
                  Sink(lambda *_: None, log=lambda _: None))
    assert summary.cache[0]["cached_blocks"] == 2
    assert "2 augmented views" in summary.cache[0]["reason"]
    # Two augmented passes over the 20 training images (batch of eval size), none per epoch.
    assert calls.count(True) == 2
