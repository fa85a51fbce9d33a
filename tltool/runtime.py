"""Where and how the numbers are computed: device, precision, memory layout, compilation.

Decided once from the config (`train.device`, `train.precision`, `train.channels_last`,
`train.compile`) and recorded in the run folder; the training loop asks this object to move
batches, open an autocast region and scale the loss.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tltool.errors import ConfigError


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether bfloat16 matmuls are clearly faster than fp32 on this CPU, measured (about
    0.1 s): CPU flags say whether bf16 is supported, not whether it pays (on some AVX512-BF16
    machines it is slower than fp32)."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(768, 768, dtype=dtype)
        a @ a
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.bfloat16] * 1.3 < best[torch.float32]


@dataclass
class Runtime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None  # autocast dtype; None = fp32
    channels_last: bool = False
    compile: bool = False
    scaler: Any = None  # torch.amp.GradScaler for fp16 on GPUs

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> dict[str, Any]:
        name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                else "cpu")
        return {"device": str(self.device), "device_name": name, "precision": self.precision,
                "channels_last": self.channels_last, "compile": self.compile,
                "threads": torch.get_num_threads()}

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (image batches in channels-last layout if asked)."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cpu":
            return x
        return x.to(self.device, non_blocking=True)

    def setup(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def wrap(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """torch.compile the forward function (state-dict keys stay unchanged)."""
        return torch.compile(fn) if self.compile else fn

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


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
        elif cpu_has_fast_bf16() and image_model:
            dtype = torch.bfloat16
    channels_last = image_model and train_cfg.channels_last != "off"
    return Runtime(device, dtype, channels_last, train_cfg.compile, scaler)
