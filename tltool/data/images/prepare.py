"""Preparation of uint8 image batches for a network: `make_prepare` / `Prepare` turn a uint8
batch into the float input of a network (scaling, resizing, channels, training-only
augmentation, normalisation) on the fly, and the augmentation presets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tltool.data.images.decoding import resize_u8

AUGMENT_PRESETS = ("none", "flip", "light", "standard")


class Prepare:
    """prepare(x_uint8, train) -> float32 (B, channels, size, size), normalised.

    Steps: /255; resize to size (antialiased) when the stored size differs; augmentation when
    train is True only; greyscale -> RGB by repeating the channel (RGB -> grey by luminance when
    channels == 1); (x - mean) / std. Random draws come from torch's global CPU generator, so
    torch.manual_seed makes a run reproducible on any device. A class (not a closure) so that it
    pickles into DataLoader workers.
    """

    def __init__(self, size: int, mean: list[float], std: list[float], channels: int = 3,
                 augment: str = "none") -> None:
        if augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment = {augment!r}; allowed: {', '.join(AUGMENT_PRESETS)}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        for what, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise ValueError(f"{what} has {len(values)} values; expected 1 or {channels}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.size, self.channels, self.augment = int(size), int(channels), augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __repr__(self) -> str:
        return (f"Prepare(size={self.size}, channels={self.channels}, "
                f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
                f"augment={self.augment!r})")

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
        side = (self.size, self.size)
        augmenting = train and self.augment != "none" and len(x) > 0
        # Upsampling is left to the augmentation's own resampling (one pass instead of two);
        # otherwise resize first, antialiased when shrinking, in uint8 when the input is uint8.
        resize = tuple(x.shape[-2:]) != side and not (
            augmenting and self.augment != "flip" and max(x.shape[-2:]) < self.size)
        if resize and x.dtype == torch.uint8:
            x, resize = resize_u8(x, self.size), False
        # A fresh float tensor either way, so the in-place steps below never touch the caller's.
        out = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float().clone()
        if resize:
            out = F.interpolate(out, size=side, mode="bilinear",
                                antialias=max(out.shape[-2:]) > self.size, align_corners=False)
        if augmenting:
            out = _augment(out, self.augment, self.size)
        out = _to_channels(out, self.channels)
        mean, std = self.mean.to(out.device), self.std.to(out.device)
        out = out - mean if out.stride(1) == 0 else out.sub_(mean)  # stride 0: grey expanded
        return out.div_(std)


def make_prepare(size: int, mean: list[float], std: list[float], channels: int = 3,
                 augment: str = "none") -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """See `Prepare`; augment presets: none, flip (random horizontal flip), light (flip + a
    random crop of 80-100% of the side, aspect 0.9-1.1, anywhere inside the image), standard
    (light + rotation within +-10 degrees + brightness/contrast/saturation jitter of +-20%)."""
    return Prepare(size, mean, std, channels, augment)


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot turn {have}-channel images into {channels} channels")


def _augment(x: torch.Tensor, preset: str, size: int) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    flip = torch.rand(n) < 0.5
    if preset == "flip":
        return torch.where(flip.to(dev).view(-1, 1, 1, 1), x.flip(-1), x)
    # Random resized crop (+ rotation for standard) as one affine resampling per batch:
    # output coordinates in [-1, 1] map to input coordinates R(angle) diag(sx, sy) p + t.
    u = torch.rand(n, 5)
    side = 0.8 + 0.2 * u[:, 0]
    aspect = torch.exp(math.log(1.1) * (2 * u[:, 1] - 1))
    sx = torch.clamp(side * aspect.sqrt(), max=1.0)
    sy = torch.clamp(side / aspect.sqrt(), max=1.0)
    tx = (1 - sx) * (2 * u[:, 2] - 1)
    ty = (1 - sy) * (2 * u[:, 3] - 1)
    angle = (2 * u[:, 4] - 1) * math.radians(10) if preset == "standard" else torch.zeros(n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    fx = torch.where(flip, -sx, sx)
    theta = torch.stack([torch.stack([cos * fx, -sin * sy, tx], dim=1),
                         torch.stack([sin * fx, cos * sy, ty], dim=1)], dim=1)
    grid = F.affine_grid(theta.to(dev), [n, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    if preset != "standard":
        return out
    # Brightness b, contrast c (around the image's mean grey m) and saturation s (RGB only),
    # applied in sequence, fold into one expression:
    # out = s*b*c*x + (1-s)*b*c*grey(x) + b*m*(1-c).
    b, c, sat = (0.8 + 0.4 * torch.rand(n, 3)).to(dev).unbind(dim=1)
    grey = _to_channels(out, 1) if out.shape[1] == 3 else out
    m = grey.mean(dim=(1, 2, 3))
    gain = (b * c).view(-1, 1, 1, 1)
    offset = (b * m * (1 - c)).view(-1, 1, 1, 1)
    if out.shape[1] == 3:
        sat = sat.view(-1, 1, 1, 1)
        out = torch.addcmul(offset + (1 - sat) * gain * grey, out, sat * gain)
    else:
        out = torch.addcmul(offset, out, gain)
    return out.clamp_(0.0, 1.0)
