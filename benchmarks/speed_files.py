"""From image files: a reference loop that decodes and resizes every PNG every epoch, against
`tltool freeze-finetune` on the same folder (decoded and resized once, frozen prefix cached),
and the same pair in memory, side by side in one run.

Fashion-MNIST test images (Debian package dataset-fashion-mnist) are written out as PNG files,
one folder per class. Both sides train resnet18 (random init; no download) with the first 3 of
4 stages frozen (or a linear probe) for the same epochs, batch size and optimiser; wall time is
end to end, data loading included. Each side runs in its own process. Per size and mode:

- files: the reference with torchvision's ImageFolder and a DataLoader (`--workers`, default 2)
  against tltool's first command on the folder (it decodes the files, with as many threads);
- files, second command: tltool again on the same folder (the decoded-image cache: no decoding);
- memory: the same images already decoded and resized, as one tensor, for both (the reference
  iterates a TensorDataset; tltool reads the built-in fashion_mnist set, the same images).

The ratio files / memory is what reading files costs tltool's advantage.

Usage: python benchmarks/speed_files.py [--images 1000] [--sizes 64 224] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
BATCH = 64


def write_pngs(folder: Path, n: int) -> None:
    from PIL import Image

    from tltool.datasets.images import FASHION_CLASSES, load_image_set

    x, y, _, _ = load_image_set("fashion_mnist", {"split": "test", "limit": n})
    for i, (img, label) in enumerate(zip(x[:, 0], y, strict=True)):
        sub = folder / FASHION_CLASSES[int(label)].replace("/", "-")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:05d}.png")


def reference(folder: Path, size: int, epochs: int, mode: str, workers: int,
              memory: bool = False) -> dict:
    import torch
    import torchvision
    from torchvision import transforms as T

    start = time.perf_counter()
    tf = T.Compose([T.Grayscale(3), T.Resize((size, size)), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = torchvision.datasets.ImageFolder(str(folder), transform=tf)
    n_classes = len(data.classes)
    torch.manual_seed(0)
    # The same share of the images tltool trains on (it holds out 5% val + 5% test).
    keep = torch.randperm(len(data))[: round(0.9 * len(data))].tolist()
    if memory:  # decoded and resized once, before the clock starts: what "in memory" means
        xs, ys = zip(*(data[i] for i in keep), strict=True)
        train = torch.utils.data.TensorDataset(torch.stack(xs), torch.tensor(ys))
        start = time.perf_counter()
        loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True)
    else:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, keep),
                                             batch_size=BATCH, shuffle=True,
                                             num_workers=workers,
                                             persistent_workers=workers > 0)
    model = torchvision.models.resnet18(num_classes=n_classes)  # same init as tltool
    frozen = ["conv1", "bn1", "layer1", "layer2", "layer3"] + (["layer4"] if mode == "probe"
                                                                else [])
    for name in frozen:
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                          momentum=0.9)
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(
                model(xb.contiguous(memory_format=torch.channels_last)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"seconds": time.perf_counter() - start}


def tltool_run(folder: Path, size: int, epochs: int, mode: str, workers: int, root: str,
               memory: bool = False, images: int = 0) -> dict:
    from tltool.config import validate_config
    from tltool.workflows.train import freeze_finetune

    model = {"backbone": "resnet18", "frozen_layers": 4, "strategy": "freeze"} \
        if mode == "frozen3" else {"backbone": "resnet18", "strategy": "linear_probe"}
    target = {"kind": "image_folder", "path": str(folder), "workers": workers}
    if memory:  # the images write_pngs wrote, from the built-in set
        target = {"kind": "builtin", "name": "fashion_mnist",
                  "options": {"split": "test", "limit": images}}
    cfg = validate_config({
        "name": "files", "output": {"root": root},
        "target": {**target, "image_size": size, "split": {"val": 0.05, "test": 0.05}},
        "model": model,
        "train": {"epochs": epochs, "batch_size": BATCH, "optimizer": "sgd", "lr": 0.01,
                  "early_stopping": {"patience": None}}}, "speed_files")
    start = time.perf_counter()
    freeze_finetune(cfg)
    return {"seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["frozen3", "probe"])
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the "
                    "reference and tltool's decoding threads (data.workers)")
    args = ap.parse_args()
    if args.case:
        c = json.loads(args.case)
        memory = c["where"] == "memory"
        if c["who"] == "reference":
            out = reference(Path(c["folder"]), c["size"], c["epochs"], c["mode"], c["workers"],
                            memory)
        else:
            out = tltool_run(Path(c["folder"]), c["size"], c["epochs"], c["mode"],
                             c["workers"], c["root"], memory, c["images"])
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pngs"
        write_pngs(folder, args.images)
        # a private decoded-image cache: the first command on the files really decodes them
        env = dict(os.environ, TLTOOL_CACHE_DIR=str(Path(tmp) / "cache"))
        print(f"{args.images} PNG files, resnet18, {args.epochs} epochs, batch {BATCH}, "
              f"{args.workers} DataLoader workers / decoding threads")
        print("| px | mode | where | reference s | tltool s | speedup | peak RSS MiB ref / "
              "tltool |")
        print("|---|---|---|---|---|---|---|")
        for size in args.sizes:
            for mode in args.modes:
                ratio: dict[str, float] = {}
                last_reference: dict = {}
                for where in ("files", "files, second command", "memory"):
                    res = {}
                    for who in ("reference", "tltool"):
                        if who == "reference" and where == "files, second command":
                            res[who] = last_reference
                            continue
                        case = {"who": who, "folder": str(folder), "size": size, "mode": mode,
                                "epochs": args.epochs, "root": str(Path(tmp) / "runs"),
                                "where": where.split(",")[0], "workers": args.workers,
                                "images": args.images}
                        out = subprocess.run([sys.executable, str(HERE), "--case",
                                              json.dumps(case)], capture_output=True,
                                             text=True, check=False, env=env)
                        if out.returncode != 0:
                            raise SystemExit(out.stderr[-2000:])
                        res[who] = json.loads(out.stdout.strip().splitlines()[-1])
                    last_reference = res["reference"]
                    r, t = res["reference"], res["tltool"]
                    ratio[where] = r["seconds"] / t["seconds"]
                    print(f"| {size} | {mode} | {where} | {r['seconds']:.1f} | "
                          f"{t['seconds']:.1f} | **{ratio[where]:.2f}x** | "
                          f"{r['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} |", flush=True)
                print(f"|  |  | ratio files / memory: {ratio['files'] / ratio['memory']:.2f}; "
                      f"second command / memory: "
                      f"{ratio['files, second command'] / ratio['memory']:.2f} | | | | |",
                      flush=True)


if __name__ == "__main__":
    main()
