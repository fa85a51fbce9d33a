"""Forward time of resnet18 at 224 px on this CPU: NCHW vs channels-last, fp32 vs bf16 autocast.

Why `train.channels_last: auto` is on for image models and why `precision: auto` measures
before choosing bf16 on a CPU. Usage: python benchmarks/layout_precision.py [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    model = torchvision.models.resnet18().eval()
    x = torch.randn(args.batch, 3, 224, 224)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| layout | precision | s per batch | images/s |")
    print("|---|---|---|---|")
    for layout in ("nchw", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model = model.to(memory_format=fmt)
        xb = x.contiguous(memory_format=fmt)
        for precision in ("fp32", "bf16"):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                 enabled=precision == "bf16"):
                model(xb)
                start = time.perf_counter()
                for _ in range(args.reps):
                    model(xb)
                sec = (time.perf_counter() - start) / args.reps
            print(f"| {layout} | {precision} | {sec:.3f} | {args.batch / sec:.0f} |")


if __name__ == "__main__":
    main()
