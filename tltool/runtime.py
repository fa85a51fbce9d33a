"""Where and how the numbers are computed: device, precision, memory layout, compilation.

Decided from the config (`train.device`, `train.precision`, `train.channels_last`,
`train.compile`) and, where the config says `auto`, by timing the model itself on a sample
batch (`Runtime.tune`); recorded in the run folder. The training loop asks this object to move
batches, open an autocast region and scale the loss.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tltool.errors import ConfigError


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (supported is not the same as faster: on some
    AVX512-BF16 machines bf16 is slower than fp32, so `precision: auto` then times the model)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# A layout or precision is taken only when it is clearly faster: timing noise on a busy machine
# must not flip a choice (and with it the last bits of the results) from run to run.
LAYOUT_MARGIN = 1.2
BF16_MARGIN = 1.3
# bf16 timing stops at the first call this many times slower than fp32 (it must be faster by
# BF16_MARGIN to be chosen; a warm-up of new kernels may take about twice a call)
GIVE_UP = 4.0
PROBE_BATCH = 8
# Timing costs about 100-200 forward passes of one sample; a run with less work than this (in
# forward-pass equivalents: a training sample-step counts 3) is not worth it and takes the
# defaults (channels-last, fp32) unless this machine has timed the same blocks before.
PROBE_MIN_WORK = 3000
_LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


class ProbeCache:
    """What the probes found, kept on disk per machine (like an autotuner's cache), so a
    later run on the same machine, torch and thread count reuses the choice instead of timing
    again, and makes the same one. Location: $TLTOOL_CACHE_DIR, else $XDG_CACHE_HOME/tltool or
    ~/.cache/tltool; a cache that cannot be read or written is simply not used."""

    def __init__(self) -> None:
        self._data: dict[str, str] | None = None
        self._from: Path | None = None

    @staticmethod
    def path() -> Path:
        root = os.environ.get("TLTOOL_CACHE_DIR")
        if not root:
            base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            root = str(Path(base) / "tltool")
        return Path(root) / "probes.json"

    def _load(self) -> dict[str, str]:
        if self._data is None or self._from != self.path():
            self._from = self.path()
            try:
                self._data = dict(json.loads(self._from.read_text()))
            except (OSError, ValueError, TypeError):
                self._data = {}
        return self._data

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, value: str) -> None:
        data = self._load()
        data[key] = value
        path = self.path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass


PROBES = ProbeCache()


@functools.lru_cache(maxsize=4)
def _machine(device: str) -> str:
    """torch version, device, CPU model and threads: what a timing result depends on."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"torch {torch.__version__}|{device}|{name}|{torch.get_num_threads()} threads"


def _signature(module: nn.Module) -> str:
    parts = [type(m).__name__ for m in module.modules()]
    parts += [f"{k}:{tuple(v.shape)}" for k, v in module.state_dict().items()]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


@dataclass
class Runtime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None  # autocast dtype; None = fp32
    layout: str = "off"  # image models: auto (measured per block) | on (NHWC) | off (NCHW)
    compile: bool = False
    scaler: Any = None  # torch.amp.GradScaler for fp16 on GPUs
    probe_precision: bool = False  # precision auto on a CPU with bf16: measure on the model
    _time_it: bool = True  # this tune() call may time (not a short run)
    chosen: dict[str, Any] = field(default_factory=dict)  # what the probes measured and chose

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> dict[str, Any]:
        name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                else "cpu")
        return {"device": str(self.device), "device_name": name, "precision": self.precision,
                "channels_last": self.layout, "compile": self.compile,
                "threads": torch.get_num_threads(), **self.chosen}

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (the backbone lays it out block by block). To a GPU the
        batch goes through page-locked (pinned) memory, as a DataLoader with pin_memory does,
        so the copy runs asynchronously."""
        if self.device.type == "cpu":
            return x
        if self.device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def setup(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        backbone = getattr(model, "backbone", None)
        if self.layout == "on" and backbone is not None:
            for i in range(len(backbone.blocks)):
                backbone.set_layout(i, torch.channels_last)
        return model

    def tune(self, model: nn.Module, sample: torch.Tensor, label: str = "",
             work: int | None = None) -> None:
        """Settle `precision: auto` (once) and `channels_last: auto` (each call: what is frozen
        may change between rounds) by timing the model's forward pass on a sample batch, or
        from the probe cache when this machine has timed the same blocks before.

        Inference mode throughout: no BatchNorm statistics, dropout masks or random numbers
        are touched, so probing never changes what training computes. Choices go to
        `chosen` (runtime.json), never to metrics.json."""
        backbone = getattr(model, "backbone", None)
        if backbone is None or sample.dim() != 4 or not (self.probe_precision or
                                                         self.layout == "auto"):
            return
        was_training = model.training
        model.eval()
        x = self.put(sample[:PROBE_BATCH])
        start = time.perf_counter()
        self._time_it = work is None or work >= PROBE_MIN_WORK
        if not self._time_it:
            self.chosen["probe_skipped"] = (f"short run ({work} forward-pass equivalents < "
                                            f"{PROBE_MIN_WORK}): cached choices or defaults")
        try:
            with torch.no_grad():
                if self.probe_precision:
                    self._choose_precision(model, x)
                if self.layout == "auto":
                    picks, timed = self._choose_layouts(backbone, x)
                    self.chosen.setdefault("block_layouts", {})[label or "model"] = picks
                    self.chosen.setdefault("layout_blocks_timed", {})[label or "model"] = timed
        finally:
            model.train(was_training)
        self.chosen["probe_seconds"] = round(self.chosen.get("probe_seconds", 0.0) +
                                             time.perf_counter() - start, 3)
        self.chosen["probe_cache"] = str(PROBES.path())

    def _choose_precision(self, model: nn.Module, x: torch.Tensor) -> None:
        self.probe_precision = False
        key = (f"precision|{_machine(str(self.device))}|{_signature(model)}|"
               f"{tuple(x.shape[1:])}")
        known = PROBES.get(key)
        if known is not None or not self._time_it:
            self.dtype = torch.bfloat16 if known == "bf16" else None
            self.chosen["precision_probe"] = {"chose": self.precision,
                                              "from": "default" if known is None
                                              else "probe cache"}
            return
        times = {}
        for dtype in (None, torch.bfloat16):
            self.dtype = dtype
            # bf16 only has to be timed until it is clearly slower than fp32 (a CPU that
            # emulates it can take 10-30x as long): then it is abandoned after one call
            limit = None if dtype is None else GIVE_UP * times[None]
            times[dtype] = _best_time(lambda: model(x), self.device, self.autocast,
                                      give_up=limit)
        self.dtype = torch.bfloat16 if times[torch.bfloat16] * BF16_MARGIN < times[None] else None
        PROBES.put(key, self.precision)
        self.chosen["precision_probe"] = {
            "fp32_seconds": round(times[None], 5), "bf16_seconds": round(times[torch.bfloat16], 5),
            "chose": self.precision, "rule": f"bf16 when at least {BF16_MARGIN}x faster",
            "from": "timed"}

    def _layout_keys(self, backbone: nn.Module, x: torch.Tensor) -> list[str | None]:
        """Probe-cache key of each block (None: nothing to choose), from one cheap pass."""
        keys: list[str | None] = []
        machine = _machine(str(self.device))
        for i, block in enumerate(backbone.blocks):
            if x.dim() != 4 or not any(p.dim() == 4 for p in block.parameters()):
                keys.append(None)
            else:
                keys.append(f"layout|{machine}|{_signature(block)}|{tuple(x.shape[1:])}|"
                            f"batch {PROBE_BATCH}|{self.precision}")
            with self.autocast():
                x = block(backbone.laid_out(x, i))
        return keys

    def _choose_layouts(self, backbone: nn.Module,
                        x: torch.Tensor) -> tuple[dict[str, str], int]:
        keys = self._layout_keys(backbone, x[:1])
        cached = [None if k is None else PROBES.get(k) for k in keys]
        picks, timed = {}, 0
        for i, (name, block) in enumerate(zip(backbone.block_names, backbone.blocks,
                                              strict=True)):
            if keys[i] is None:
                backbone.set_layout(i, None)
                continue
            pick = cached[i] or (None if self._time_it else "nhwc")
            if pick is None:
                times = {}
                for _ in range(3):  # interleaved; the first round warms both up
                    for layout, fmt in _LAYOUTS.items():
                        block.to(memory_format=fmt)
                        xb = x.contiguous(memory_format=fmt)
                        t = _best_time(lambda b=block, xb=xb: b(xb), self.device,
                                       self.autocast, reps=1, warmup=False)
                        times.setdefault(layout, []).append(t)
                nchw, nhwc = min(times["nchw"][1:]), min(times["nhwc"][1:])
                pick = "nchw" if nchw * LAYOUT_MARGIN < nhwc else "nhwc"
                PROBES.put(keys[i], pick)
                timed += 1
            picks[name] = pick
            backbone.set_layout(i, _LAYOUTS[pick])
            if self._time_it and i + 1 < len(keys) and any(c is None and k is not None
                                         for c, k in zip(cached[i + 1:], keys[i + 1:],
                                                         strict=True)):
                with self.autocast():  # the next block to time needs this one's output
                    x = block(backbone.laid_out(x, i))
        return picks, timed

    def wrap(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """torch.compile the forward function (state-dict keys stay unchanged)."""
        return torch.compile(fn) if self.compile else fn

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      sync: Callable[[torch.optim.Optimizer], None] | None = None) -> None:
        """Backward pass and optimiser step; `sync(optimizer)` runs between the two (under
        torchrun: averaging the gradients over the ranks)."""
        if self.scaler is None:
            loss.backward()
            if sync is not None:
                sync(optimizer)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if sync is not None:
            sync(optimizer)
        self.scaler.step(optimizer)
        self.scaler.update()


def _best_time(fn: Callable[[], Any], device: torch.device, autocast: Callable,
               reps: int = 2, warmup: bool = True, give_up: float | None = None) -> float:
    """Best wall time of fn() under autocast, synchronising a GPU around each call. With
    `give_up` (seconds), a call slower than that ends the timing at once (warm-up included):
    the candidate is clearly slower, its exact time does not matter."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for r in range(reps + int(warmup)):
        sync()
        start = time.perf_counter()
        with autocast():
            fn()
        sync()
        took = time.perf_counter() - start
        if r >= int(warmup) or (give_up is not None and took > give_up):
            best = min(best, took)
        if give_up is not None and took > give_up:
            break
    return best


def make_runtime(train_cfg, image_model: bool) -> Runtime:
    """Resolve `auto` settings for this machine; impossible requests are ConfigErrors."""
    want = train_cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' but no CUDA GPU is visible; use auto or cpu")
    device = torch.device("cuda" if want in ("cuda", "auto") and torch.cuda.is_available()
                          else "cpu")
    precision = train_cfg.precision
    dtype, scaler = None, None
    if precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision: 'fp16' needs a CUDA GPU; use bf16 or auto on "
                              "the CPU")
        dtype, scaler = torch.float16, torch.amp.GradScaler("cuda")
    elif precision == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                dtype = torch.bfloat16
            else:  # older GPUs: fp16 with loss scaling
                dtype, scaler = torch.float16, torch.amp.GradScaler("cuda")
    probe = (precision == "auto" and device.type == "cpu" and image_model
             and cpu_supports_bf16())
    layout = train_cfg.channels_last if image_model else "off"
    return Runtime(device, dtype, layout, train_cfg.compile, scaler, probe_precision=probe)


def inference_runtime(train_cfg, image_model: bool, model: nn.Module, data) -> Runtime:
    """The runtime a trained run's model predicts with in evaluate / predict / ensemble: the
    run's own device, precision and memory layouts (train.*), so a GPU run predicts on the GPU
    and an image model in the layouts its training chose (read from this machine's probe
    cache, or the defaults for a short pass). What this machine cannot do falls back: a CUDA
    run on a machine without a GPU predicts on the CPU in fp32 (fp16 needs a GPU)."""
    t = train_cfg
    if not torch.cuda.is_available():
        t = t.model_copy(update={"device": "cpu" if t.device == "cuda" else t.device,
                                 "precision": "fp32" if t.precision == "fp16" else t.precision})
    rt = make_runtime(t, image_model)
    rt.setup(model)
    if image_model and len(data):
        rt.tune(model, data.batch(slice(0, 16), train=False), label="inference", work=len(data))
    return rt


def seed_everything(seed: int) -> None:
    """Seed torch's and numpy's global generators; deterministic kernels where torch has them."""
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
