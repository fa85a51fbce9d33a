"""Per-block time on this machine in NCHW vs channels-last, for tltool's image backbones.

Why `train.channels_last: auto` chooses the layout block by block: channels-last pays where
feature maps are large (stems, early stages) and costs where they are small (late stages at
low resolution). Each block is timed on the output of the blocks before it, forward alone
(a frozen block) and forward + backward (a trainable block).

Usage: python benchmarks/block_layout.py [--backbones resnet18 ...] [--sizes 64 224]
"""

from __future__ import annotations

import argparse
import time

import torch

from tltool.models.backbones import build_backbone


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="*",
                    default=["resnet18", "mobilenet_v3_small", "efficientnet_lite0"])
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 224])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}; "
          "seconds per batch, best of", args.reps)
    print("| backbone | px | block | input | fwd NCHW | fwd NHWC | fwd+bwd NCHW | "
          "fwd+bwd NHWC | faster for training |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.backbones:
        backbone = build_backbone(name, {}, 3)
        for size in args.sizes:
            x = torch.randn(args.batch, 3, size, size)
            for block_name, block in zip(backbone.block_names, backbone.blocks, strict=True):
                if x.dim() != 4:
                    break
                row = {}
                for layout, fmt in (("nchw", torch.contiguous_format),
                                    ("nhwc", torch.channels_last)):
                    block.to(memory_format=fmt)
                    xb = x.contiguous(memory_format=fmt)

                    def fwd(b=block, xb=xb):
                        with torch.no_grad():
                            b.eval()(xb)

                    def fwd_bwd(b=block, xb=xb):
                        b.train()
                        b(xb.detach().requires_grad_()).sum().backward()

                    row[layout] = (_best(fwd, args.reps), _best(fwd_bwd, args.reps))
                shape = "x".join(map(str, x.shape[1:]))
                faster = "NCHW" if row["nchw"][1] < row["nhwc"][1] else "NHWC"
                print(f"| {name} | {size} | {block_name} | {shape} | {row['nchw'][0]:.4f} | "
                      f"{row['nhwc'][0]:.4f} | {row['nchw'][1]:.4f} | {row['nhwc'][1]:.4f} | "
                      f"{faster} |", flush=True)
                with torch.no_grad():
                    x = block.eval()(x.contiguous())


if __name__ == "__main__":
    main()
