"""The house's shape, measured: what `make layout` prints (issue 19's goals).

Reads tltool/ as text (ast only: nothing is imported or run) and reports
- import cycles between tltool modules, counting imports inside functions;
- private names (`_x`) imported from another tltool module, and private attributes used on
  something other than `self` / `cls` that the module does not define itself;
- files over MAX_LINES lines, functions over MAX_BODY lines, and functions with more than
  MAX_PARAMS parameters (the CLI's command functions excepted: their options are parameters);
- the run-folder files that have one owner module: which other modules name them.

Exit status 1 when a goal is missed (so CI could hold the line), 0 otherwise.
Usage: python tools/layout.py [--verbose]
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tltool"
MAX_LINES, MAX_BODY, MAX_PARAMS = 400, 60, 6

# Justified exceptions: (module, function) -> why. At most five of each kind.
LONG_OK: dict[tuple[str, str], str] = {}
PARAMS_OK: dict[tuple[str, str], str] = {}
# Private attributes of other libraries' objects that have no public equivalent:
# (module, attribute) -> why. tltool's own private names are never used across modules.
PRIVATE_OK: dict[tuple[str, str], str] = {
    ("tltool.models.boosting_export", "_predictors"):
        "scikit-learn's fitted HistGradientBoosting trees: no public accessor",
    ("tltool.models.boosting_export", "_baseline_prediction"):
        "scikit-learn's fitted HistGradientBoosting initial score: no public accessor",
    ("tltool.runtime", "_is_mkldnn_bf16_supported"):
        "torch's only test of native bfloat16 on a CPU (torch.ops.mkldnn)",
}

# Files of a run folder that exactly one module reads and writes (by their file name).
OWNED = {
    "metrics.json": {"tltool.runs.summary"},
    "thresholds.json": {"tltool.runs.opening"},
    "ensemble.json": {"tltool.runs.opening"},
    "oof_predictions.csv": {"tltool.runs.out_of_fold"},
    "best.pt": {"tltool.checkpoint"},
    "last.pt": {"tltool.checkpoint"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mod: str, tree: ast.AST, known: set[str], is_pkg: bool) -> list[tuple[str, str]]:
    """(imported tltool module, name imported from it or '') for every import, anywhere."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.split(".")[0] == "tltool"]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(mod, node, is_pkg)
            if base.split(".")[0] != "tltool":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, "") if sub in known else (base, a.name))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def parent_package(mod: str, known: set[str]) -> str | None:
    parts = mod.split(".")
    for i in range(len(parts) - 1, 0, -1):
        cand = ".".join(parts[:i])
        if cand in known:
            return cand
    return None


def defined_private(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def n_params(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + (a.vararg is not None) + (a.kwarg is not None)


def is_command(fn: ast.FunctionDef) -> bool:
    """A Typer command function (decorated with app.command / app.callback / sub.command)."""
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr in ("command", "callback"):
            return True
    return False


def measure() -> dict[str, list[str]]:
    mods = modules()
    known = set(mods)
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in mods.items()}
    graph: dict[str, set[str]] = defaultdict(set)
    found: dict[str, list[str]] = defaultdict(list)
    inside = 0
    for mod, tree in trees.items():
        is_pkg = mods[mod].name == "__init__.py"
        for target, name in imports(mod, tree, known, is_pkg):
            if target in known and target != mod:
                # a package's __init__ importing its own submodules is not a cycle edge back
                graph[mod].add(target)
            if name and private(name) and target != mod:
                found["private names imported across modules"].append(
                    f"{mod} imports {target}.{name}")
        for fn in functions(tree):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    inside += 1
    for comp in cycles(graph):
        found["import cycles"].append(" <-> ".join(comp))
    for mod, tree in trees.items():
        own = defined_private(tree)
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                   for a in n.names}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and private(node.attr)):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr in own and not (isinstance(base, ast.Name) and base.id in aliases):
                continue
            if (mod, node.attr) in PRIVATE_OK:
                continue
            found["private attributes used across modules"].append(
                f"{mod}:{node.lineno} .{node.attr}")
    for mod, path in mods.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found["files over 400 lines"].append(f"{mod} ({lines})")
        for fn in functions(trees[mod]):
            body = fn.end_lineno - fn.lineno + 1
            key = (mod, fn.name)
            if body > MAX_BODY and key not in LONG_OK:
                found["functions over 60 lines"].append(f"{mod}.{fn.name} ({body})")
            if n_params(fn) > MAX_PARAMS and key not in PARAMS_OK and not is_command(fn):
                found["functions with more than 6 parameters"].append(
                    f"{mod}.{fn.name} ({n_params(fn)})")
    for mod, path in mods.items():
        text = path.read_text()
        for file, owners in OWNED.items():
            if f'"{file}"' in text and mod not in owners:
                found[f"modules other than the owner naming {file}"].append(mod)
    lines = sum(len(p.read_text().splitlines()) for p in mods.values())
    found["_info"] = [f"{len(mods)} modules, {lines} lines; {inside} imports inside functions"]
    return found


GOALS = ("import cycles", "private names imported across modules",
         "private attributes used across modules", "files over 400 lines",
         "functions over 60 lines", "functions with more than 6 parameters")


def main() -> int:
    verbose = "--verbose" in sys.argv
    found = measure()
    print(f"tltool layout: {found.pop('_info')[0]}")
    missed = 0
    keys = list(GOALS) + sorted(k for k in found if k not in GOALS)
    for key in keys:
        items = found.get(key, [])
        print(f"{len(items):>4}  {key}")
        if items and (verbose or len(items) <= 12):
            for item in items:
                print(f"        {item}")
        missed += bool(items)
    print(f"exceptions: {len(LONG_OK)} long function(s), {len(PARAMS_OK)} with many "
          f"parameters, {len(PRIVATE_OK)} other libraries' private attributes (tools/layout.py "
          f"LONG_OK / PARAMS_OK / PRIVATE_OK, each with its reason)")
    for (mod, name), why in {**LONG_OK, **PARAMS_OK, **PRIVATE_OK}.items():
        print(f"        {mod} {name}: {why}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
