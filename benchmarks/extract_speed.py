"""Images per second of `tltool extract` with EfficientNet-Lite0 (ImageNet weights) on this CPU.

Runs the real extract workflow on Fashion-MNIST subsets (Debian files) or MNIST-5k at two
image sizes and reports the backbone throughput that extract itself measures (timing.json),
the whole command's wall time, and the process's peak resident memory.

Usage: python benchmarks/extract_speed.py [--images 2000] [--sizes 64 224]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import torch

from tltool.config import validate_config
from tltool.workflows.extract import extract


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "mnist5k"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"],
                    help="fp32, bf16 and/or auto (shown as auto -> what it chose)")
    args = ap.parse_args()
    logging.getLogger("tltool").setLevel(logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| data | images | size | precision | backbone img/s | command wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size, precision in [(s, p) for s in args.sizes for p in args.precision]:
            options = {"limit": args.images} if args.data == "fashion_mnist" else {}
            cfg = validate_config({
                "name": "extract-speed", "output": {"root": tmp},
                "target": {"kind": "builtin", "name": args.data, "options": options,
                           "image_size": size, "split": {"val": 0.1, "test": 0.1}},
                "model": {"backbone": "efficientnet_lite0", "weights": "imagenet"},
                "train": {"precision": precision},
                "extract": {"heads": ["logistic_regression"]}}, origin="extract_speed")
            start = time.perf_counter()
            res = extract(cfg)
            wall = time.perf_counter() - start
            timing = json.loads((Path(res.run) / "timing.json").read_text())
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            asked = (precision if precision == timing["precision"]
                     else f"{precision} -> {timing['precision']}")
            print(f"| {args.data} | {timing['images_or_rows']} | {size} | {asked} | "
                  f"{timing['rows_per_second']:.0f} | {wall:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
