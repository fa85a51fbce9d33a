"""The backbone catalog: every built-in backbone's blocks and parameter counts, as static data
(catalog.json beside this file), so `tltool backbones` answers without importing torch.

Regenerate after changing a backbone: `python -m tltool.catalog` (`make catalog`); a
test builds the backbones and checks the file is current.

Tabular backbones' parameter counts grow linearly with the table's width: each block is stored
as `base + per_input * inputs`, measured at two widths.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

PATH = "catalog.json"


def load() -> dict[str, dict[str, Any]]:
    """name -> entry; no torch import."""
    return json.loads(files("tltool").joinpath(PATH).read_text())


def params(block: dict[str, Any], inputs: int) -> int:
    """Parameters of a catalog block for a table of `inputs` features."""
    return int(block["base"] + block.get("per_input", 0) * inputs)


def build() -> dict[str, dict[str, Any]]:
    """Measure every built-in backbone (builds them: imports torch and torchvision)."""
    from tltool.models.backbones import BACKBONES, build_backbone

    def counts(name: str, n_inputs: int):
        net = build_backbone(name, {}, n_inputs)
        return ([sum(p.numel() for p in m.parameters()) for m in net.blocks], net.block_names,
                net.out_features)

    out = {}
    for name, spec in BACKBONES.items():
        entry: dict[str, Any] = {"input": spec.input, "description": spec.description,
                                 "default_size": spec.default_size,
                                 "weights": list(spec.weights)}
        if spec.input == "tabular":
            one, names, feats1 = counts(name, 1)
            two, _, feats2 = counts(name, 2)
            entry["blocks"] = [{"name": b, "base": 2 * p1 - p2, "per_input": p2 - p1}
                               for b, p1, p2 in zip(names, one, two, strict=True)]
            entry["out_features"] = {"base": 2 * feats1 - feats2,
                                     "per_input": feats2 - feats1}
        else:
            n, names, feats = counts(name, 3)
            entry["blocks"] = [{"name": b, "base": p} for b, p in zip(names, n, strict=True)]
            entry["out_features"] = {"base": feats}
        out[name] = entry
    return out


if __name__ == "__main__":  # pragma: no cover
    from pathlib import Path

    target = Path(__file__).with_name("catalog.json")
    target.write_text(json.dumps(build(), indent=1) + "\n")
    print(target)
