"""runs: a table of the run folders under an output root, and what differs between two runs.

Reads only run.json, config.yaml and metrics.json (no model is loaded, no torch imported), so
it answers at once however many runs there are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tltool.errors import RunError
from tltool.runs.status import STATUS_FILE, run_status
from tltool.runs.summary import StoredSummary

COLUMNS = ["name", "run", "command", "status", "started", "data", "backbone", "frozen",
           "strategy", "metric", "value", "val_value"]
# The headline number of a run: the first of these its test metrics hold.
HEADLINE = ("auroc", "map", "accuracy", "rmse")


def list_runs(root: str | Path, name: str | None = None, command: str | None = None,
              status: str | None = None) -> list[dict[str, Any]]:
    """One row per run folder under ROOT (ROOT/NAME/RUN), oldest first."""
    base = Path(root)
    if not base.is_dir():
        raise RunError(f"{root}: no such folder (give the output root, e.g. runs)")
    rows = []
    for run in sorted(base.glob(f"*/*/{STATUS_FILE}")):
        folder = run.parent
        info = run_status(folder)
        if info is None:
            continue
        row = _row(folder, info)
        if (name and row["name"] != name) or (command and row["command"] != command) or \
                (status and row["status"] != status):
            continue
        rows.append(row)
    return rows


def _row(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    cfg = _read(folder / "config.yaml", yaml.safe_load)
    stored = StoredSummary.read(folder)
    cfg = cfg if isinstance(cfg, dict) else {}  # a damaged file: listed without it
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    section = "source" if info.get("command") == "pretrain" else "target"
    data = cfg.get(section) if isinstance(cfg.get(section), dict) else {}
    metric, value = _headline(stored.test)
    _, val_value = _headline(stored.val, metric)
    route = stored.route
    if isinstance(route.get("average_of"), list):  # a select ensemble: no one backbone
        route = {"backbone": f"ensemble of {len(route['average_of'])}", "frozen_layers": None,
                 "strategy": None}
    return {"name": folder.parent.name, "run": folder.name, "command": info.get("command"),
            "status": info.get("status"), "started": info.get("started"),
            "data": data.get("name") or (Path(data["path"]).name if data.get("path") else None),
            "backbone": route.get("backbone") or model.get("backbone"),
            "frozen": route.get("frozen_layers", model.get("frozen_layers")),
            "strategy": route.get("strategy", model.get("strategy")),
            "metric": metric, "value": value, "val_value": val_value,
            "path": str(folder)}


def _read(path: Path, parse) -> Any:
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _headline(report: Any, metric: str | None = None) -> tuple[str | None, float | None]:
    if not isinstance(report, dict):
        return metric, None
    for key in ([metric] if metric else HEADLINE):
        if isinstance(report.get(key), (int, float)):
            return key, float(report[key])
    return metric, None


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    shown = [{k: _cell(r.get(k)) for k in COLUMNS} for r in rows]
    widths = {k: max([len(k)] + [len(s[k]) for s in shown]) for k in COLUMNS}
    lines = ["  ".join(k.ljust(widths[k]) for k in COLUMNS)]
    lines += ["  ".join(s[k].ljust(widths[k]) for k in COLUMNS) for s in shown]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def diff_runs(a: str | Path, b: str | Path) -> dict[str, Any]:
    """The config keys that differ between two runs, and how their metrics moved."""
    folders = []
    for ref in (a, b):
        folder = Path(ref)
        if run_status(folder) is None:
            raise RunError(f"{ref}: not a tltool run folder ({STATUS_FILE} missing or damaged)")
        folders.append(folder)
    cfgs = [_flat(_read(f / "config.yaml", yaml.safe_load) or {}) for f in folders]
    mets = [_flat(StoredSummary.read(f).scores()) for f in folders]
    # A key only one run has comes from a newer tltool; the older run ran with its default.
    defaults = _defaults()
    config = {}
    for k in sorted(set(cfgs[0]) | set(cfgs[1])):
        pair = [c.get(k, defaults.get(k, ABSENT)) for c in cfgs]
        if pair[0] != pair[1]:
            config[k] = pair
    metrics = {}
    for k in sorted(set(mets[0]) & set(mets[1])):
        x, y = mets[0][k], mets[1][k]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and \
                not isinstance(x, bool) and x != y and "confusion" not in k:
            metrics[k] = {"a": x, "b": y, "change": y - x}
    return {"a": str(folders[0]), "b": str(folders[1]), "config": config, "metrics": metrics}


ABSENT = "(absent)"


def _defaults() -> dict[str, Any]:
    from tltool.config import ExperimentConfig

    try:
        return _flat(ExperimentConfig().model_dump(mode="json"))
    except Exception:  # noqa: BLE001 - defaults are a convenience here
        return {}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def format_diff(d: dict[str, Any]) -> str:
    lines = [f"a: {d['a']}", f"b: {d['b']}", "config keys that differ:"]
    lines += [f"  {k}: {v[0]!r} -> {v[1]!r}" for k, v in d["config"].items()] or ["  (none)"]
    lines.append("metrics that changed (b - a):")
    lines += [f"  {k}: {m['a']:.4g} -> {m['b']:.4g} ({m['change']:+.4g})"
              for k, m in d["metrics"].items()] or ["  (none)"]
    return "\n".join(lines)
