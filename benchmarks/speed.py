"""tltool's training loop against a plain reference loop, side by side in one invocation.

The reference is what torchvision's classification reference script and timm do: a DataLoader
over the data, `model.train()`, forward through the whole network every batch of every epoch
(frozen layers included), backward, optimiser step, and an evaluation pass per epoch. It runs
twice, in NCHW (torchvision's script) and in channels-last (timm's --channels-last), and the
faster of the two is the one compared. tltool runs the same model, data, epochs, batch size and
optimiser through its own engine (`tltool.engine.fit`: freeze plan, frozen-prefix cache,
runtime precision, `channels_last: auto`).

Cases: resnet18 on fixed synthetic images at 64 and 224 px — full fine-tune, first 3 of 4
stages frozen (stem + layer1..3), linear probe — plus the MLP on credit_data. Each case runs
in its own process so peak memory (max RSS) is its own. Also measured in the same run: a
2048x2048 matmul (the machine's practical peak, fp32 and bf16) and, for the frozen cases, a
hand-written cache (prefix once, then suffix epochs, in both layouts) that gives the bound
E*T_ref / (T_build + E*T_suffix), with T_ref the faster reference and T_build, T_suffix each
the faster of the two layouts.

Usage: python benchmarks/speed.py [--quick] [--out docs/SPEED.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve()
BATCH = 64


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def synthetic(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def forward_flops(module: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() / len(x)


# ---------------------------------------------------------------- one case, in a subprocess


def resnet_case(mode: str, size: int, n: int, epochs: int, who: str, precision: str,
                layout: str = "nhwc") -> dict:
    import torchvision

    from tltool.config import TrainConfig
    from tltool.engine.drive import fit
    from tltool.engine.plan import Round, Sink, TrainingData, TrainingPlan
    from tltool.models import HeadSettings, build_model, model_spec
    from tltool.runtime import Runtime
    from tltool.task import Task
    from tltool.tensors import Tensors

    x, y = synthetic(n, size)
    xv, yv = x[:BATCH], y[:BATCH]
    dtype = torch.bfloat16 if precision == "bf16" else None
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    torch.manual_seed(0)
    out: dict = {}
    if who == "reference":
        model = torchvision.models.resnet18(num_classes=10)
        frozen = {"full": [], "frozen3": ["conv1", "bn1", "layer1", "layer2", "layer3"],
                  "probe": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]}[mode]
        for name in frozen:
            for p in getattr(model, name).parameters():
                p.requires_grad_(False)
        model = model.to(memory_format=fmt)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                             batch_size=BATCH, shuffle=True)
        loss_fn = nn.CrossEntropyLoss()
        start = time.perf_counter()
        for _ in range(epochs):
            model.train()
            for xb, yb in loader:
                xb = xb.contiguous(memory_format=fmt)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    loss = loss_fn(model(xb).float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                model(xv.contiguous(memory_format=fmt))
        out["seconds"] = time.perf_counter() - start
        if mode != "full":
            out.update(hand_cache(model, frozen, x, y, min(epochs, 3), dtype, fmt))
        full = torchvision.models.resnet18(num_classes=10).eval()
        out["flops_total"] = forward_flops(full, x[:2])
        out["flops_prefix"] = forward_flops(split_resnet(full, frozen)[0], x[:2]) \
            if frozen else 0.0
    else:
        model = build_model(model_spec("resnet18", {}, 3, HeadSettings("linear", 32, 0.0), 10))
        rnd = {"full": Round(0, "full", epochs, 0.01, 1.0),
               "frozen3": Round(4, "freeze", epochs, 0.01, 1.0),
               "probe": Round(0, "linear_probe", epochs, 0.01, 1.0)}[mode]
        cfg = TrainConfig(epochs=epochs, batch_size=BATCH, lr=0.01, optimizer="sgd",
                          early_stopping={"patience": None})
        from tltool.runtime import cpu_supports_bf16

        rt = Runtime(layout="auto", dtype=dtype,
                     probe_precision=precision == "auto" and cpu_supports_bf16())
        start = time.perf_counter()
        summary = fit(model, TrainingData(Tensors(x, y), Tensors(xv, yv)),
                      TrainingPlan([rnd], cfg, 0, Task(), [str(i) for i in range(10)], rt=rt),
                      Sink(lambda *_: None, log=lambda _: None))
        out["seconds"] = time.perf_counter() - start
        out["cache_build"] = summary.timing["cache_build_seconds"][0]
        out["cached_blocks"] = summary.cache[0]["cached_blocks"]
        out["chosen"] = rt.describe()
    return out


def split_resnet(model: nn.Module, frozen: list[str]) -> tuple[nn.Module, nn.Module]:
    """(frozen prefix, trainable suffix) of a torchvision ResNet, in forward order."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    cut = max(names.index("maxpool") + 1, max(names.index(f) for f in frozen) + 1)
    prefix = nn.Sequential(*[getattr(model, m) for m in names[:cut]])
    suffix = nn.Sequential(*[getattr(model, m) for m in names[cut:]], model.avgpool,
                           nn.Flatten(), model.fc)
    return prefix, suffix


def hand_cache(model: nn.Module, frozen: list[str], x, y, epochs: int, dtype, fmt) -> dict:
    """The bound's ingredients: prefix computed once by hand, then suffix-only epochs."""
    prefix, suffix = split_resnet(model, frozen)
    prefix.to(memory_format=fmt)
    suffix.to(memory_format=fmt)
    prefix.eval()
    auto = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
    t = time.perf_counter()
    with torch.no_grad(), auto:
        z = torch.cat([prefix(x[i:i + 256].contiguous(memory_format=fmt))
                       for i in range(0, len(x), 256)]).contiguous(memory_format=fmt)
    build = time.perf_counter() - t
    opt = torch.optim.SGD([p for p in suffix.parameters() if p.requires_grad], lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    t = time.perf_counter()
    for _ in range(epochs):
        suffix.train()
        order = torch.randperm(len(z))
        for i in range(0, len(z), BATCH):
            idx = order[i:i + BATCH]
            with auto:
                loss = loss_fn(suffix(z[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"hand_build": build, "hand_suffix_epoch": (time.perf_counter() - t) / epochs}


def mlp_case(mode: str, epochs: int, who: str) -> dict:
    from tltool.config import TrainConfig, validate_config
    from tltool.data.tabular import load_tabular
    from tltool.engine.drive import fit
    from tltool.engine.plan import Round, Sink, TrainingData, TrainingPlan
    from tltool.inputs import load_inputs
    from tltool.models import HeadSettings, build_model, model_spec
    from tltool.models.backbones import get_spec
    from tltool.task import Task
    from tltool.weights import Weights

    cfg = validate_config({"source": {"name": "credit_data", "where": {"Job": "fixed"}}}, "b")
    inputs = load_inputs(cfg.source, "source", get_spec("mlp"), Weights("none"))
    del load_tabular
    x, y = inputs.train.x, inputs.train.y
    torch.manual_seed(0)
    model = build_model(model_spec("mlp", {"hidden": [64, 32]}, x.shape[1],
                                   HeadSettings("linear", 32, 0.0), 2))
    start = time.perf_counter()
    if who == "reference":
        if mode == "frozen1":
            for p in model.backbone.blocks[0].parameters():
                p.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                             batch_size=BATCH, shuffle=True)
        for _ in range(epochs):
            model.train()
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                model(inputs.val.x)
    else:
        rnd = Round(1 if mode == "frozen1" else 0, "freeze", epochs, 1e-3, 1.0)
        tcfg = TrainConfig(epochs=epochs, batch_size=BATCH, early_stopping={"patience": None})
        fit(model, TrainingData(inputs.train, inputs.val),
            TrainingPlan([rnd], tcfg, 0, Task(), ["good", "bad"]),
            Sink(lambda *_: None, log=lambda _: None))
    return {"seconds": time.perf_counter() - start, "rows": len(x)}


def run_case(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    if spec["model"] == "mlp":
        out = mlp_case(spec["mode"], spec["epochs"], spec["who"])
    else:
        out = resnet_case(spec["mode"], spec["size"], spec["n"], spec["epochs"], spec["who"],
                          spec["precision"], spec.get("layout", "nhwc"))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ---------------------------------------------------------------- the driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 224],
                    help="image sizes of the resnet18 cases (none: only the MLP cases)")
    ap.add_argument("--modes", nargs="*", default=["full", "frozen3", "probe"],
                    help="resnet18 cases to run")
    ap.add_argument("--no-mlp", action="store_true", help="skip the credit_data MLP cases")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = []
    plan = {64: (2000, 10, 3), 224: (256, 10, 2)}  # images, epochs (frozen/probe), epochs (full)
    for size in args.sizes:
        n, e_frozen, e_full = (128, 2, 1) if args.quick else plan[size]
        for mode, epochs in (("full", e_full), ("frozen3", e_frozen), ("probe", e_frozen)):
            if mode not in args.modes:
                continue
            precisions = ("fp32", "bf16", "auto") if mode == "full" else ("fp32",)
            for precision in precisions:
                base = {"model": "resnet18", "size": size, "n": n, "mode": mode,
                        "epochs": epochs, "precision": precision}
                refs = {lay: _subprocess(base | {"who": "reference", "layout": lay})
                        for lay in ("nchw", "nhwc")}
                ours = _subprocess(base | {"who": "tltool"})
                rows.append(_row(base, _faster(refs), ours, peak))
                print(_fmt(rows[-1]), flush=True)
    for mode in () if args.no_mlp else ("full", "frozen1"):
        base = {"model": "mlp", "mode": mode, "epochs": 5 if args.quick else 50,
                "precision": "fp32", "size": "-", "n": "1683"}
        ref, ours = (_subprocess(base | {"who": w}) for w in ("reference", "tltool"))
        rows.append(_row(base, ref, ours, peak))
        print(_fmt(rows[-1]), flush=True)
    text = _report(rows, peak)
    print(text)
    if args.out:
        args.out.write_text(text)


def _subprocess(spec: dict) -> dict:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        # tltool starts with an empty probe cache: its layout/precision timing is paid here
        env["TLTOOL_CACHE_DIR"] = cache
        res = subprocess.run([sys.executable, str(HERE), "--case", json.dumps(spec)],
                             capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise SystemExit(f"case {spec} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _faster(refs: dict[str, dict]) -> dict:
    """The faster reference layout, with the hand cache's best build and suffix times and
    both layouts' wall times for the report."""
    best = min(refs, key=lambda lay: refs[lay]["seconds"])
    out = dict(refs[best], layout=best,
               both={lay: r["seconds"] for lay, r in refs.items()})
    if all("hand_build" in r for r in refs.values()):
        out["hand_build"] = min(r["hand_build"] for r in refs.values())
        out["hand_suffix_epoch"] = min(r["hand_suffix_epoch"] for r in refs.values())
    return out


def _row(base: dict, ref: dict, ours: dict, peak: dict) -> dict:
    e = base["epochs"]
    row = dict(base, ref_s_epoch=ref["seconds"] / e, tl_s_epoch=ours["seconds"] / e,
               ratio=ref["seconds"] / ours["seconds"], ref_mib=ref["peak_rss_mib"],
               tl_mib=ours["peak_rss_mib"])
    if "both" in ref:
        row["ref_layouts"] = " / ".join(f"{ref['both'][lay] / e:.2f}" for lay in ("nchw", "nhwc"))
        row["ref_layout"] = ref["layout"]
    chosen = ours.get("chosen", {})
    if chosen:
        picks = next(iter(chosen.get("block_layouts", {}).values()), {})
        row["tl_choice"] = (chosen["precision"] + ", " +
                            "".join({"nhwc": "L", "nchw": "N"}[v] for v in picks.values()))
    n = int(base["n"]) if base["model"] == "resnet18" else ref.get("rows", 0)
    row["ref_sps"], row["tl_sps"] = n * e / ref["seconds"], n * e / ours["seconds"]
    if "hand_build" in ref:
        row["bound"] = e * row["ref_s_epoch"] / (ref["hand_build"] + e * ref["hand_suffix_epoch"])
    if "flops_total" in ref:
        # Useful work: frozen prefix forward once per sample per epoch (reference) or once
        # (tltool); trainable part forward + backward (~3x forward) every epoch.
        f_all, f_pre = ref["flops_total"], ref["flops_prefix"]
        train_part = 3 * (f_all - f_pre) if base["mode"] != "full" else 3 * f_all
        ref_work = n * e * (f_pre + train_part)
        top = peak["bf16" if base["precision"] == "bf16" else "fp32"]
        row["ref_peak_frac"] = ref_work / ref["seconds"] / 1e9 / top
        row["tl_peak_frac"] = ref_work / ours["seconds"] / 1e9 / top
    return row


def _fmt(r: dict) -> str:
    bound = f"{r['bound']:.2f}x" if "bound" in r else "-"
    frac = (f"{100 * r['ref_peak_frac']:.0f}% / {100 * r['tl_peak_frac']:.0f}%"
            if "ref_peak_frac" in r else "-")
    return (f"| {r['model']} | {r['size']} | {r['n']} | {r['mode']} | {r['precision']} | "
            f"{r['epochs']} | {r.get('ref_layouts', '-')} | {r['ref_s_epoch']:.2f} | "
            f"{r['tl_s_epoch']:.2f} | {r.get('tl_choice', '-')} | "
            f"{r['ref_sps']:.0f} / {r['tl_sps']:.0f} | **{r['ratio']:.2f}x** | {bound} | "
            f"{r['ref_mib']:.0f} / {r['tl_mib']:.0f} | {frac} |")


def _report(rows: list[dict], peak: dict) -> str:
    head = ("| model | px | samples | mode | precision | epochs | reference s/epoch NCHW / "
            "NHWC | ref s/epoch (faster) | tltool s/epoch | tltool chose (precision, layout "
            "per block: L channels-last, N NCHW) | samples/s ref / tltool | tltool speedup | "
            "cache bound | peak RSS MiB ref / tltool | reference-equivalent GFLOP/s as % of "
            "matmul peak, ref / tltool |")
    sep = "|" + "---|" * 15
    lines = [f"Machine: {platform.machine()} {platform.processor() or ''}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; 2048x2048 matmul "
             f"peak {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} GFLOP/s bf16.", "",
             head, sep, *map(_fmt, rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
