"""Device and precision choices: what `auto` resolves to, and clear errors for impossible ones."""

from __future__ import annotations

import pytest
import torch

from tltool.config import TrainConfig
from tltool.engine import Phase, Tensors, fit
from tltool.errors import ConfigError
from tltool.models import build_model, model_spec
from tltool.runtime import make_runtime


def test_impossible_requests_are_config_errors():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device: 'cuda' but no CUDA GPU"):
            make_runtime(TrainConfig(device="cuda"), image_model=True)
        with pytest.raises(ConfigError, match="'fp16' needs a CUDA GPU"):
            make_runtime(TrainConfig(precision="fp16"), image_model=True)


def test_defaults_and_auto():
    rt = make_runtime(TrainConfig(), image_model=True)
    assert rt.precision == "fp32" and rt.channels_last
    assert not make_runtime(TrainConfig(), image_model=False).channels_last
    assert make_runtime(TrainConfig(precision="bf16"), image_model=False).precision == "bf16"
    auto = make_runtime(TrainConfig(precision="auto"), image_model=False)
    assert auto.precision == ("bf16" if torch.cuda.is_available() else "fp32")


def test_bf16_training_runs_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = build_model(model_spec("small_cnn", {}, 3, "linear", 8, 0.0, 2))
    x, y = torch.randn(32, 3, 28, 28), torch.randint(0, 2, (32,))
    cfg = TrainConfig(epochs=2, batch_size=16, precision="bf16")
    fit(model, Tensors(x, y), Tensors(x[:8], y[:8]), [Phase(1, "freeze", 2, 0.01, 1)], cfg,
        ["a", "b"], 0, save=lambda *_: None, metrics_csv="/dev/null", log=lambda _: None,
        rt=make_runtime(cfg, image_model=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_compiled_forward_trains_like_the_eager_one():
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(model_spec("mlp", {"hidden": [16]}, 8, "linear", 8, 0.0, 2))
        x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
        cfg = TrainConfig(epochs=2, batch_size=16, compile=compiled)
        fit(model, Tensors(x, y), Tensors(x[:16], y[:16]), [Phase(0, "full", 2, 0.01, 1)], cfg,
            ["a", "b"], 0, save=lambda *_: None, metrics_csv="/dev/null", log=lambda _: None,
            rt=make_runtime(cfg, image_model=False))
        results.append(model.state_dict())
    for key, value in results[0].items():
        assert torch.allclose(results[1][key], value, atol=1e-5), key
