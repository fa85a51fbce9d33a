"""Device and precision choices: what `auto` resolves to, and clear errors for impossible ones."""

from __future__ import annotations

import time

import pytest
import torch

from tltool.config import TrainConfig
from tltool.engine.drive import fit
from tltool.engine.plan import Round, Sink, TrainingData, TrainingPlan
from tltool.engine.predict import predict_logits
from tltool.errors import ConfigError
from tltool.models import HeadSettings, build_model, model_spec
from tltool.runtime import Runtime, cpu_supports_bf16, make_runtime
from tltool.task import Task
from tltool.tensors import Tensors


def test_impossible_requests_are_config_errors():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device: 'cuda' but no CUDA GPU"):
            make_runtime(TrainConfig(device="cuda"), image_model=True)
        with pytest.raises(ConfigError, match="'fp16' needs a CUDA GPU"):
            make_runtime(TrainConfig(precision="fp16"), image_model=True)


def test_defaults_and_auto():
    rt = make_runtime(TrainConfig(), image_model=True)
    assert rt.precision == "fp32" and rt.layout == "auto" and not rt.probe_precision
    assert make_runtime(TrainConfig(), image_model=False).layout == "off"
    assert make_runtime(TrainConfig(channels_last="on"), image_model=True).layout == "on"
    assert make_runtime(TrainConfig(precision="bf16"), image_model=False).precision == "bf16"
    auto = make_runtime(TrainConfig(precision="auto"), image_model=False)
    assert auto.precision == ("bf16" if torch.cuda.is_available() else "fp32")


def test_bf16_training_runs_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = build_model(model_spec("small_cnn", {}, 3, HeadSettings("linear", 8, 0.0), 2))
    x, y = torch.randn(32, 3, 28, 28), torch.randint(0, 2, (32,))
    cfg = TrainConfig(epochs=2, batch_size=16, precision="bf16")
    fit(model, TrainingData(Tensors(x, y), Tensors(x[:8], y[:8])),
        TrainingPlan([Round(1, "freeze", 2, 0.01, 1)], cfg, 0, Task(), ["a", "b"],
                     rt=make_runtime(cfg, image_model=True)),
        Sink(lambda *_: None, log=lambda _: None))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _resnet(n_classes: int = 3):
    torch.manual_seed(0)
    return build_model(model_spec("resnet18", {}, 3, HeadSettings("linear", 8, 0.0), n_classes))


def test_any_mix_of_block_layouts_computes_the_same_function():
    """What a memory layout guarantees: the same weights give the same outputs up to float
    rounding in any mix of layouts. Training does not promise that much: rounding differences
    flip ReLU units and BatchNorm statistics near their edges and SGD amplifies them, so
    models trained in different layouts differ like models trained on different CPUs (measured
    on an AMD EPYC: logits 0.1 apart after one epoch while forward passes agree to 1e-6). A
    fixed layout trains reproducibly (next test)."""
    model = _resnet().eval()
    x = torch.randn(4, 3, 40, 40)
    with torch.no_grad():
        ref = model(x)
        for pattern in ([torch.channels_last] * 5, [torch.channels_last, None,
                        torch.contiguous_format, torch.channels_last, torch.contiguous_format]):
            for i, fmt in enumerate(pattern):
                model.backbone.set_layout(i, fmt)
            assert torch.allclose(model(x), ref, atol=1e-4)
            z = model.backbone.forward_blocks(x, 3, pool=False)
            assert torch.allclose(model.forward_from(z, 3), ref, atol=1e-4)


def test_tuning_touches_no_state_and_records_its_choices():
    model = _resnet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = torch.randn(20, 3, 48, 48)
    rng = torch.get_rng_state()
    rt = Runtime(layout="auto", probe_precision=cpu_supports_bf16())
    rt.tune(model, sample, label="round 1")
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training  # restored after probing in inference mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    picks = rt.chosen["block_layouts"]["round 1"]
    assert list(picks) == model.backbone.block_names
    assert set(picks.values()) <= {"nchw", "nhwc"}
    assert [{"nchw": torch.contiguous_format, "nhwc": torch.channels_last}[v]
            for v in picks.values()] == model.backbone.layouts
    if rt.chosen.get("precision_probe"):
        assert rt.chosen["precision_probe"]["chose"] == rt.precision
    # tabular models and fixed layouts: nothing to measure
    mlp = build_model(model_spec("mlp", {"hidden": [8]}, 5, HeadSettings("linear", 8, 0.0), 2))
    Runtime(layout="auto").tune(mlp, torch.randn(4, 5))
    off = Runtime(layout="off")
    off.tune(model, torch.randn(4, 3, 32, 32))
    assert off.chosen == {}


def test_probe_results_are_cached_on_disk_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(tmp_path / "cache"))
    sample = torch.randn(8, 3, 40, 40)
    first = Runtime(layout="auto")
    first.tune(_resnet(), sample, label="r")
    assert first.chosen["layout_blocks_timed"]["r"] == 5
    assert (tmp_path / "cache" / "probes.json").is_file()
    again = Runtime(layout="auto")
    again.tune(_resnet(), sample, label="r")
    assert again.chosen["layout_blocks_timed"]["r"] == 0  # nothing timed twice
    assert again.chosen["block_layouts"] == first.chosen["block_layouts"]
    # another input size is another question
    other = Runtime(layout="auto")
    other.tune(_resnet(), torch.randn(8, 3, 24, 24), label="r")
    assert other.chosen["layout_blocks_timed"]["r"] == 5
    # a short run does not pay for timing: cached choices where known, else channels-last
    short = Runtime(layout="auto", probe_precision=True)
    short.tune(_resnet(), torch.randn(8, 3, 128, 128), label="r", work=100)  # new shapes
    assert short.chosen["layout_blocks_timed"]["r"] == 0 and "probe_skipped" in short.chosen
    assert set(short.chosen["block_layouts"]["r"].values()) == {"nhwc"}
    assert short.precision == "fp32"
    # a cache that cannot be written is not an error
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(blocked))
    from tltool import runtime

    monkeypatch.setattr(runtime, "PROBES", runtime.ProbeCache())
    fresh = Runtime(layout="auto")
    fresh.tune(_resnet(), sample, label="r")
    assert fresh.chosen["layout_blocks_timed"]["r"] == 5


@pytest.mark.slow  # trains a ResNet-18 four times; run-to-run reproducibility is also checked
# by test_workflows.py on tables
def test_a_fixed_layout_trains_reproducibly():
    """With the layout fixed (`on` / `off`), the same config and seed train the same weights
    bit for bit on one machine and thread count, whatever the CPU."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 3, (48,), generator=g)
    for layout in ("off", "on"):
        logits = []
        for _ in range(2):
            model = _resnet()
            cfg = TrainConfig(epochs=1, batch_size=16, channels_last=layout, optimizer="sgd")
            fit(model, TrainingData(Tensors(x, y), Tensors(x[:16], y[:16])),
                TrainingPlan([Round(3, "freeze", 1, 0.01, 1)], cfg, 0, Task(), ["a", "b", "c"],
                             rt=make_runtime(cfg, image_model=True)),
                Sink(lambda *_: None, log=lambda _: None))
            logits.append(predict_logits(model, Tensors(x, y)))
        assert torch.equal(logits[0], logits[1]), layout


@pytest.mark.slow
def test_compiled_forward_trains_like_the_eager_one():
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(model_spec("mlp", {"hidden": [16]}, 8,
                                       HeadSettings("linear", 8, 0.0), 2))
        x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
        cfg = TrainConfig(epochs=2, batch_size=16, compile=compiled)
        fit(model, TrainingData(Tensors(x, y), Tensors(x[:16], y[:16])),
            TrainingPlan([Round(0, "full", 2, 0.01, 1)], cfg, 0, Task(), ["a", "b"],
                         rt=make_runtime(cfg, image_model=False)),
            Sink(lambda *_: None, log=lambda _: None))
        results.append(model.state_dict())
    for key, value in results[0].items():
        assert torch.allclose(results[1][key], value, atol=1e-5), key


def test_precision_timing_gives_up_on_bf16_at_its_first_clearly_slower_call(tmp_path,
                                                                            monkeypatch):
    """precision auto: fp32 is timed in full (a warm-up and 2 timed calls); bf16 is abandoned
    at its first call slower than fp32 by far, and fp32 is chosen."""
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(tmp_path))  # nothing known: the probe times
    calls = {"fp32": 0, "bf16": 0}

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Identity()  # what tune() probes: a model with a backbone

        def forward(self, x):
            bf16 = torch.is_autocast_enabled("cpu")
            calls["bf16" if bf16 else "fp32"] += 1
            time.sleep(0.2 if bf16 else 0.001)
            return x

    rt = Runtime(layout="off", probe_precision=True)
    rt.tune(Slow(), torch.zeros(2, 1, 4, 4))
    assert calls == {"fp32": 3, "bf16": 1}
    probe = rt.chosen["precision_probe"]
    assert probe["chose"] == "fp32" == rt.precision and probe["bf16_seconds"] >= 0.2
