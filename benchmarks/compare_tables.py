"""Compare two `select_table.py --raw` files run for run: the same leaderboards, choices and
test scores, apart from wall times, temporary paths and time stamps (what a refactor must
leave unchanged: issue 19).

Usage: python benchmarks/compare_tables.py BASE.json NEW.json   (exit 1 when a run differs)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def runs(path: Path) -> dict[tuple[str, int], object]:
    """Each run of a raw file, keyed by (n, seed), without what varies from run to run."""
    out = {}
    for r in json.loads(Path(path).read_text()):
        text = json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
        text = re.sub(r"/tmp/tmp\w+", "TMP", text)
        out[(r["n"], r["seed"])] = json.loads(re.sub(r"\d{8}-\d{6}-", "STAMP-", text))
    return out


def main() -> int:
    base, new = runs(Path(sys.argv[1])), runs(Path(sys.argv[2]))
    common = sorted(set(base) & set(new))
    differ = [k for k in common if base[k] != new[k]]
    print(f"{len(common)} runs in both ({len(base)} in {sys.argv[1]}, {len(new)} in "
          f"{sys.argv[2]}); identical: {len(common) - len(differ)}; differing: {differ}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
