"""Reading a config: YAML with a safe loader (`extends:` inheritance, `--set` overrides), then
validation with every problem of a file reported in one message (with a "did you mean").
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tltool.config.scalars import STRICT_TYPE, shown
from tltool.config.schema import ExperimentConfig, model_in
from tltool.errors import ConfigError
from tltool.suggest import did_you_mean


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (following `extends:`), apply `--set` overrides, validate."""
    raw = _read_with_extends(Path(path), chain=())
    for item in overrides or []:
        _apply_override(raw, item)
    origin = f"{path} (with --set)" if overrides else str(path)
    return validate_config(raw, origin=origin)


def validate_config(raw: dict[str, Any], origin: str) -> ExperimentConfig:
    """Validate a plain dict; every problem is listed in one ConfigError."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        if len(problems) == 1:
            raise ConfigError(f"{origin}: {problems[0]}") from None
        head = f"{origin}: {len(problems)} problems in the config"
        raise ConfigError(head + "\n" + "\n".join(f"  - {p}" for p in problems)) from None


MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML where a key given twice in one mapping is an error (plain YAML keeps the
    last one silently, so a second `train:` section would quietly replace the first).

    YAML 1.1 merge keys (`<<: *base`, `<<: [*a, *b]`) work as in yaml.safe_load: the mapping's
    own keys win over the merged ones (overriding a merged key is their point, not a
    duplicate)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            # the merge key has no constructor of its own: the safe loader's flatten_mapping
            # (in the super call) replaces it by the merged pairs
            key = "<<" if key_node.tag == MERGE_TAG else \
                self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {type(key).__name__} used as a mapping key (line {line}); "
                    f"keys must be plain names", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {seen[key]} and {line}); give "
                    f"each key once", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


# A config is a few hundred values; YAML aliases could make it expand to billions (each alias
# re-uses a node): anything past this many values, or nested deeper, is refused.
MAX_VALUES = 100_000
MAX_DEPTH = 64
MAX_EXTENDS = 32  # files in one `extends` chain


def _expanded_size(data: Any, where: Path | str) -> int:
    """How many values `data` holds once every alias is expanded (memoised: linear in the
    distinct nodes); a self-referencing alias is an error."""
    sizes: dict[int, int] = {}

    def walk(node: Any, depth: int, stack: frozenset) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in stack:
            raise ConfigError(f"{where}: a YAML alias refers to itself (an endless value)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: values nested more than {MAX_DEPTH} levels deep")
        if id(node) not in sizes:
            children = node.values() if isinstance(node, dict) else node
            total = 1
            for child in children:
                total += walk(child, depth + 1, stack | {id(node)})
                if total > MAX_VALUES:
                    break
            sizes[id(node)] = total
        return sizes[id(node)]

    total = walk(data, 0, frozenset())
    if total > MAX_VALUES:
        raise ConfigError(f"{where}: the config expands to more than {MAX_VALUES:,} values "
                          f"(YAML aliases repeating a large value?); a config is far smaller")
    return total


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        path.resolve(strict=False)
        path.stat()
    except RuntimeError:
        raise ConfigError(f"{path}: a symbolic link loop; give a config file") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise ConfigError(f"{path}: a symbolic link loop; give a config file") from None
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give a YAML config file (e.g. "
                          f"configs/credit/pretrain.yaml)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected UTF-8 YAML)") from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply to be a config") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got a "
                          f"{type(data).__name__}")
    _expanded_size(data, path)
    return _unshared(data)


def _unshared(data: Any) -> Any:
    """`data` as a tree: a value repeated by a YAML alias (or merge key) becomes a copy of its
    own, so that `--set target.split.val=0.3` changes the target only, not the source it was
    copied from. Bounded: `_expanded_size` has checked the expanded size first."""
    if isinstance(data, dict):
        return {key: _unshared(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_unshared(value) for value in data]
    return data


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):
        raise ConfigError(f"{path}: a symbolic link loop; give a config file") from None
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"{path}: `extends` forms a cycle: {cycle}")
    if len(chain) >= MAX_EXTENDS:
        raise ConfigError(f"{path}: `extends` chain longer than {MAX_EXTENDS} files "
                          f"(starting at {chain[0]})")
    data = _read_yaml(path)
    if chain:
        # A file reached through `extends` must look like a config before any of its values
        # can appear in a message (it may be any file the parent names, e.g. a system file).
        unknown = [k for k in data if k not in ExperimentConfig.model_fields and
                   k != "extends"]
        if unknown:
            raise ConfigError(f"{path}: not a tltool config (named by `extends` in "
                              f"{chain[-1]}): {len(unknown)} of its top-level keys are not "
                              f"config sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: `extends` must be a path to another config, got "
                          f"{type(parent).__name__}")
    # A parent path is relative to the file that names it, so configs can move together; for
    # a config given through a symbolic link, the real file (as the OS resolves a link's
    # folders too): a link to a shared config finds that config's own parent.
    folder = resolved.parent if path.is_symlink() else path.parent
    base = _read_with_extends(folder / parent, chain=(*chain, resolved))
    return _deep_merge(base, data)


def _deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Child wins key by key; a mapping merges into the parent's, except an empty one ({}),
    which replaces it (e.g. `backbone_args: {}` to inherit the source run's)."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.001")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: keep the text as a string
    if value in ("", None) and text.strip() not in ("", "null", "Null", "NULL", "~"):
        value = text.strip()  # | or > (block markers) or # (a comment) alone: meant as text
    _expanded_size(value, f"--set {key.strip()}")
    set_key(raw, key, _unshared(value), f"--set {item!r}")


def set_key(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set a dotted key (train.lr, train.rounds.0.epochs) in a raw config; a mapping merges
    into the section it names, as `extends` does ({} empties it)."""
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):  # train.rounds.0.epochs: an item of a list
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: {dotted}: no item {part!r} (the list has "
                                  f"{len(node)} item(s), numbered from 0)")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is a value, not a "
                              f"section")
        if last:
            old = node[part] if isinstance(node, list) else node.get(part)
            node[part] = _deep_merge(old, value) if isinstance(old, dict) and \
                isinstance(value, dict) and value else copy.deepcopy(value)
            return
        if isinstance(node, dict) and node.get(part) is None:
            node[part] = {}
        node = node[part]


def candidate_raw(base: ExperimentConfig, changes: dict[str, Any], where: str) -> dict[str, Any]:
    """A select candidate's config as a raw dict: the base config with `changes` (dotted keys
    or nested mappings) applied in order."""
    raw = base.model_dump(mode="json")
    raw.pop("select", None)
    for key, value in changes.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{where}: keys must be config keys such as train.lr, got {key!r}")
        set_key(raw, key, value, where)
    return raw


# ---------------------------------------------------------------- messages


def _describe(err: dict[str, Any]) -> str:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after"))]
    where = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        choices = _fields_at(loc[:-1])
        hint = did_you_mean(loc[-1], choices, show=lambda c: f"'{c}'", around=("", " "))
        return f"{where}: unknown key; {hint}allowed: {', '.join(choices)}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == STRICT_TYPE:  # a boolean for a number, a fraction for a whole number, ...
        ctx = err["ctx"]
        return f"{where}: got {ctx['given']} ({ctx['kind']}); allowed: " \
               f"{ctx['allowed']}{_bounds(loc)}"
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        if isinstance(got, bool):  # `cache: off` unquoted: YAML 1.1 reads it as false
            return (f"{where}: got {shown(got)} (a boolean: YAML reads on/off/yes/no without "
                    f"quotes as true/false); allowed: {allowed}, in quotes")
        return f"{where}: got {got!r}; allowed: {allowed}"
    if kind == "value_error":
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    if kind == "string_pattern_mismatch" and loc == ["name"]:
        return (f"name: got {got!r}; allowed: letters, digits, '.', '_' and '-', starting with "
                f"a letter or digit (it names a folder)")
    msg = err["msg"]
    return f"{where}: {msg[:1].lower() + msg[1:]}; got {got!r}"


def _section_at(loc: list[Any]) -> type[BaseModel]:
    """The config section (model) at `loc` (list indices and dict keys skipped)."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            continue
        annotation = model.model_fields[part].annotation
        nested = model_in(annotation)
        if nested is None:
            break
        model = nested
    return model


def _fields_at(loc: list[Any]) -> list[str]:
    """Field names of the config section at `loc`."""
    return list(_section_at(loc).model_fields)


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds(loc: list[Any]) -> str:
    """The range of the field at `loc`, as ' >= 0 and < 1', and ' (or null)' when it may be
    empty ('' when neither)."""
    field = _section_at(loc[:-1]).model_fields.get(loc[-1]) if loc else None
    if field is None:
        return ""
    limits = [f"{sign} {getattr(rule, name)}" for rule in field.metadata
              for name, sign in _BOUNDS.items() if hasattr(rule, name)]
    nullable = type(None) in getattr(field.annotation, "__args__", ())
    return (" " + " and ".join(limits) if limits else "") + (" (or null)" if nullable else "")
