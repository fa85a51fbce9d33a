"""Peak memory of `tltool extract` over a folder of image files as the folder grows.

Fashion-MNIST items (Debian package dataset-fashion-mnist) are written out as PNG files, one
folder per class; `extract` runs in its own process per case (mobilenet_v3_small at 224 px,
weights from a local state-dict file, features for every split, logistic regression head), once
with images decoded once into memory and once decoded batch by batch
(`target.decode_once_max_gb` tiny). Reports peak RSS and wall time.

Usage: python benchmarks/extract_memory.py [--counts 2000 8000] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def one_case(folder: str, weights: str, size: int, lazy: bool, root: str) -> dict:
    import logging

    from tltool.config import validate_config
    from tltool.workflows.extract import extract

    logging.getLogger("tltool").setLevel(logging.WARNING)
    cfg = validate_config({
        "name": "extract-memory", "output": {"root": root},
        "target": {"kind": "image_folder", "path": folder, "image_size": size,
                   "decode_once_max_gb": 1e-6 if lazy else 64},
        "model": {"backbone": "mobilenet_v3_small", "weights": weights},
        "extract": {"heads": ["logistic_regression"]}}, "extract_memory")
    start = time.perf_counter()
    res = extract(cfg)
    return {"seconds": time.perf_counter() - start, "images_per_second": res.rows_per_second,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--counts", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(one_case(**json.loads(args.case))))
        return
    import torch
    import torchvision
    from PIL import Image

    from tltool.datasets.images import FASHION_CLASSES, load_image_set

    print("| images | px | decoding | peak RSS MiB | wall s | backbone img/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "mobilenet_v3_small.pth"
        torch.manual_seed(0)
        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)
        x, y, _, _ = load_image_set("fashion_mnist", {"split": "all", "limit": max(args.counts)})
        for count in args.counts:
            folder = Path(tmp) / f"png{count}"
            for i in range(count):
                sub = folder / FASHION_CLASSES[int(y[i])].replace("/", "-")
                sub.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[i, 0]).save(sub / f"{i:05d}.png")
            for lazy in (False, True):
                case = {"folder": str(folder), "weights": str(weights), "size": args.size,
                        "lazy": lazy, "root": str(Path(tmp) / "runs")}
                out = subprocess.run([sys.executable, str(HERE), "--case", json.dumps(case)],
                                     capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-2000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {count} | {args.size} | {'batch by batch' if lazy else 'once'} | "
                      f"{r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | "
                      f"{r['images_per_second']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
