"""What sharing saves in `tltool select`: wall time with shared work against the same
selection recomputing everything per candidate and fold, and against running the candidates
as separate commands (one `tltool freeze-finetune` process each: one fit per candidate, no
cross-validation, what a user would otherwise script).

Measured side by side in one run, alternating, so both see the same machine load.

Usage: python benchmarks/select_sharing.py [--case lite0|credit] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tltool.config import load_config
from tltool.select.workflow import select

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "lite0": ROOT / "configs/digits/select_lite0.yaml",
    "digits": ROOT / "configs/digits/select.yaml",
    "credit": ROOT / "configs/credit/select.yaml",
}


def timed_select(config: Path, share: bool, root: str) -> tuple[float, dict]:
    cfg = load_config(config, [f"output.root={root}", f"select.share_work={str(share).lower()}"])
    start = time.perf_counter()
    result = select(cfg)
    return time.perf_counter() - start, result


def separate_commands(config: Path, run: Path, root: str) -> float:
    """Each candidate the select run compared, as its own `tltool freeze-finetune` process
    (with the source models the select run pretrained)."""
    from tltool.config import candidate_raw

    board = yaml.safe_load((run / "leaderboard.json").read_text())
    base = load_config(config, [f"output.root={root}"])
    start = time.perf_counter()
    for cand in board["candidates"]:
        # the candidate's config, with the select run's source models, as select trained it
        raw = candidate_raw(base, _candidate_changes(base, cand["name"], run), "bench")
        path = Path(root) / f"{cand['name']}.yaml"
        raw["output"] = {"root": root}
        path.write_text(yaml.safe_dump(raw))
        subprocess.run([sys.executable, "-m", "tltool", "freeze-finetune", str(path)],
                       check=True, capture_output=True)
    return time.perf_counter() - start


def _candidate_changes(base, name: str, run: Path) -> dict:
    from tltool.routes.route import InputCache
    from tltool.select.candidates import default_grid, facts, source_plan

    if base.select.candidates is not None:
        changes = next(c.set for c in base.select.candidates if c.name == name)
    else:
        found = facts(base, InputCache())
        grid = dict((n, s) for n, s in default_grid(base, found, source_plan(base, found)))
        changes = grid[name]
    sources = {p.name: next(iter(sorted(p.iterdir())))
               for p in (run / "sources").iterdir()} if (run / "sources").exists() else {}

    def resolved(v):
        if isinstance(v, str) and v.startswith("source:"):
            return str(sources[v.removeprefix("source:")])
        if isinstance(v, list):
            return [resolved(x) for x in v]
        return v

    return {k: resolved(v) for k, v in changes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=list(CASES), default="lite0")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.getLogger("tltool").setLevel(logging.WARNING)
    times: dict[str, list[float]] = {"shared": [], "unshared": [], "separate": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t, result = timed_select(CASES[args.case], True, tmp)
            times["shared"].append(t)
            times["unshared"].append(timed_select(CASES[args.case], False, tmp)[0])
            times["separate"].append(separate_commands(CASES[args.case],
                                                       Path(result.run), tmp))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"case {args.case}: {len(result.leaderboard)} candidates, 2x5-fold CV + refit")
    for k, v in times.items():
        print(f"  {k:<9} " + ", ".join(f"{x:.1f} s" for x in v) + f"  (median {med[k]:.1f} s)")
    print(f"  select with sharing / without: {med['shared'] / med['unshared']:.2f} "
          f"({med['unshared'] / med['shared']:.2f}x faster)")
    print(f"  select (10 fold fits + refit per candidate) / separate commands (1 fit per "
          f"candidate): {med['shared'] / med['separate']:.2f}")


if __name__ == "__main__":
    main()
