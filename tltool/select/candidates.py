"""The candidates of `tltool select`: the default grid of routes (what the config and data
offer), the source models it needs, each candidate's full config, and its complexity."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tltool.config import ExperimentConfig, candidate_raw, validate_config
from tltool.errors import ConfigError
from tltool.inputs import is_image_data
from tltool.models.backbones import get_spec
from tltool.models.classic import CLASSIC_HEADS
from tltool.routes.route import InputCache, Route
from tltool.task import MULTILABEL, REGRESSION
from tltool.weights import Weights, trained_checkpoint

SOURCE_REF = "source:"
# A correction of a prior's answer is penalised harder than a model learnt from scratch:
# with few rows it should stay close to the prior (C = 0.1: ten times scikit-learn's default
# penalty on the coefficients, alpha 10 for ridge; the intercept, which absorbs a shift of
# the class balance between the populations, stays free).
_CORRECTION = {"classification": {"C": 0.1}, "regression": {"alpha": 10.0}}


@dataclass
class Candidate:
    name: str
    raw: dict[str, Any]  # the full config as a raw dict (source:NAME refs unresolved)
    complexity: int | None
    default: bool  # from the default grid: dropped with a note when it does not apply


@dataclass
class Facts:
    """What the default grid depends on: data kind and task, whether source and target share
    classes, whether unlabelled target rows exist, and the network the config names."""

    image: bool
    task: str  # classification | multilabel | regression
    classes: list[str]
    pool: bool  # unlabelled target rows exist (adaptation can use them)
    source: bool  # the config has a source section
    same_classes: bool  # the source predicts what the target asks
    net_weights: str | None  # model.weights (None: none)
    net_is_run: bool  # ... names a trained run, not a pretrained set of the backbone


def facts(cfg: ExperimentConfig, cache: InputCache) -> Facts:
    """The facts of a select config's data and network."""
    spec = get_spec(cfg.model.backbone)
    target = cache.load(cfg.target, "target", spec, Weights("none"))
    same = False
    if cfg.source is not None:
        source = cache.load(cfg.source, "source", spec, Weights("none"))
        same = source.classes == target.classes and source.kind == target.kind
    ref = cfg.model.weights.strip()
    net = None if ref.lower() in ("none", "") else ref
    return Facts(image=is_image_data(cfg.target), task=target.kind, classes=target.classes,
                 pool=target.data.unlabeled is not None and len(target.data.unlabeled) > 0,
                 source=cfg.source is not None, same_classes=same, net_weights=net,
                 net_is_run=bool(net) and ref not in spec.weights)


def source_plan(cfg: ExperimentConfig, facts: Facts) -> dict[str, dict[str, Any]]:
    """Source models to pretrain: name -> config changes (on the base config)."""
    if cfg.select.sources is not None:
        return dict(cfg.select.sources)
    if not facts.source:
        return {}
    plain = {"model.keep_head": False, "model.prior": "none", "model.prior_weights": None,
             "train.source_weight": 0.0, "adapt.method": "none", "train.l2sp.alpha": 0.0,
             "train.l2sp.beta": 0.0, "train.rounds": []}
    raw_backbone = "pixels" if facts.image else "raw"
    linear = "ridge" if facts.task == REGRESSION else "logistic_regression"
    out: dict[str, dict[str, Any]] = {}
    if not facts.net_is_run:
        out["net"] = {**plain, "model.frozen_layers": 0, "model.strategy": "full"}
    if facts.task != MULTILABEL:
        classic = {**plain, "model.backbone": raw_backbone, "model.backbone_args": {},
                   "model.weights": "none"}
        out["lr"] = {**classic, "model.head": linear}
        if not facts.image:
            out["gb"] = {**classic, "model.head": "gradient_boosting"}
    return out


# Every candidate starts from these settings (the config's own route options cleared).
_PLAIN = {"model.keep_head": False, "model.prior": "none", "model.prior_weights": None,
          "train.source_weight": 0.0, "adapt.method": "none", "train.rounds": [],
          "train.l2sp.alpha": 0.0, "train.l2sp.beta": 0.0}


@dataclass
class _Grid:
    """What the default grid's families share."""

    facts: Facts
    sources: dict[str, Any]  # the source models select pretrains (source:NAME)
    classic: dict[str, Any]  # a classic head on the raw table / pixels
    linear: str  # the linear classic head of the task
    net: str | None  # the source network (a run, or source:net)
    have_net: bool
    depths: list[int]  # frozen-block counts of the partial fine-tunes

    @property
    def same(self) -> bool:
        return self.facts.same_classes

    @property
    def classic_ok(self) -> bool:
        return self.facts.task != MULTILABEL

    @property
    def own_net(self) -> bool:
        """The source network is the source's own model (a run, or pretrained here)."""
        return self.facts.net_is_run or "net" in self.sources


def _grid(cfg: ExperimentConfig, facts: Facts, sources: dict[str, Any], spec) -> _Grid:
    net = (facts.net_weights if facts.net_is_run or "net" not in sources
           else "source:net")
    have_net = net is not None and (facts.net_is_run or "net" in sources
                                    or facts.net_weights is not None)
    n_blocks = len(_blocks_of(cfg, spec))
    # Freeze all blocks but the last (the usual transfer of a small network), and half of a
    # deeper one's blocks; the config's own frozen_layers too, when it names another count.
    depths = sorted({d for d in (n_blocks - 1, n_blocks // 2 if n_blocks >= 4 else 0,
                                 cfg.model.frozen_layers) if 0 < d < n_blocks})
    classic = {**_PLAIN, "model.backbone": "pixels" if facts.image else "raw",
               "model.backbone_args": {}, "model.weights": "none"}
    linear = "ridge" if facts.task == REGRESSION else "logistic_regression"
    return _Grid(facts, sources, classic, linear, net, have_net, depths)


def _reference_grid(g: _Grid) -> list[tuple[str, dict[str, Any]]]:
    """Classic heads on the raw table or pixels: source-only, target-only, pooled, and the
    source models as priors that a penalised linear model corrects."""
    classic, linear, image, sources = g.classic, g.linear, g.facts.image, g.sources
    grid: list[tuple[str, dict[str, Any]]] = []
    if g.same and "lr" in sources:
        grid.append(("source-only-lr", {**classic, "model.weights": "source:lr",
                                        "model.keep_head": True, "train.epochs": 0}))
    if g.same and "gb" in sources:
        grid.append(("source-only-gb", {**classic, "model.weights": "source:gb",
                                        "model.keep_head": True, "train.epochs": 0}))
    grid.append(("target-lr", {**classic, "model.head": linear}))
    if not image:
        grid.append(("target-gb", {**classic, "model.head": "gradient_boosting"}))
    if g.same and g.facts.source:
        grid.append(("pooled-lr", {**classic, "model.head": linear,
                                   "train.source_weight": 1.0}))
        if not image:
            grid.append(("pooled-gb", {**classic, "model.head": "gradient_boosting",
                                       "train.source_weight": 1.0}))
    for name in ("lr", "gb"):
        if g.same and name in sources:
            grid.append((f"prior-{name}", {**classic, "model.head": linear,
                                          "model.prior": "offset",
                                          "model.prior_weights": f"source:{name}",
                                          "model.head_args": _CORRECTION[g.facts.task]}))
    return grid


def _average_grid(g: _Grid) -> list[tuple[str, dict[str, Any]]]:
    """Ensembles of the source models (all that predict the target's classes): their mean
    log-probabilities, recalibrated by an intercept only (source-avg; what learning the
    target's class balance gives, like a threshold) or corrected by a penalised linear model
    (prior-avg). Averaging guards against a source model that a few labels cannot tell
    apart from a better one."""
    members = [f"source:{n}" for n in ("lr", "gb") if n in g.sources]
    if g.have_net and g.same and g.own_net:
        members.insert(0, g.net)
    if not (g.classic_ok and g.same and len(members) > 1):
        return []
    task = g.facts.task
    intercept_only = ({"alpha": 1e6} if task == REGRESSION else {"C": 1e-6})
    average = {**g.classic, "model.head": g.linear, "model.prior": "offset",
               "model.prior_weights": members}
    return [("source-avg", {**average, "model.head_args": intercept_only}),
            ("prior-avg", {**average, "model.head_args": _CORRECTION[task]})]


def _network_grid(g: _Grid) -> list[tuple[str, dict[str, Any]]]:
    """The source network as it is, as a prior, under a classic head, and fine-tuned several
    ways (linear probe, bias-only, partial, full, L2-SP, pooled, adapted)."""
    tuned = {**_PLAIN, "model.weights": g.net, "model.backbone_args": {}}
    frozen = g.depths[-1] if g.depths else 0
    grid: list[tuple[str, dict[str, Any]]] = []
    if g.same and g.own_net:
        grid.append(("source-only", {**tuned, "model.keep_head": True, "train.epochs": 0}))
        if g.classic_ok:
            grid.append(("prior-net", {**g.classic, "model.head": g.linear,
                                       "model.prior": "offset", "model.prior_weights": g.net,
                                       "model.head_args": _CORRECTION[g.facts.task]}))
    if g.classic_ok:
        grid.append(("extract-lr", {**tuned, "model.head": g.linear}))
    grid += [
        ("linear-probe", {**tuned, "model.strategy": "linear_probe", "model.frozen_layers": 0}),
        ("bias-only", {**tuned, "model.strategy": "bias_only", "model.frozen_layers": 0}),
        *[(f"finetune-freeze{d}", {**tuned, "model.strategy": "freeze",
                                   "model.frozen_layers": d}) for d in g.depths],
        ("finetune-full", {**tuned, "model.strategy": "full", "model.frozen_layers": 0}),
        ("l2sp", {**tuned, "model.strategy": "full", "model.frozen_layers": 0,
                  "train.weight_decay": 0.0, "train.l2sp.alpha": 0.01,
                  "train.l2sp.beta": 0.01}),
    ]
    if g.same and g.facts.source and not g.facts.image:
        # (images: the adapt-* candidates train the source rows alongside)
        grid.append(("pooled-net", {**tuned, "model.strategy": "freeze",
                                    "model.frozen_layers": frozen,
                                    "train.source_weight": 1.0}))
    return grid


def default_grid(cfg: ExperimentConfig, facts: Facts,
                 sources: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The default candidates: reference models (classic heads on the raw table or pixels:
    target-only, source-only, pooled) and transfer routes (the source model as is, as a prior,
    fine-tuned several ways, its features under a classic head, adapted)."""
    spec = get_spec(cfg.model.backbone)
    g = _grid(cfg, facts, sources, spec)
    grid = (_reference_grid(g) if g.classic_ok else []) + _average_grid(g)
    target_net = ("target-net", {**_PLAIN, "model.weights": _target_weights(facts, spec),
                                 "model.strategy": "full", "model.frozen_layers": 0})
    if not g.have_net:
        # no source network: the config's own network on the target rows, unless it is a
        # classic head on raw inputs (already among the reference models)
        if spec.name not in ("raw", "pixels") and cfg.model.head not in CLASSIC_HEADS:
            grid.append(target_net)
        return grid
    grid += _network_grid(g) + [target_net]
    if facts.pool and facts.source:
        frozen = g.depths[-1] if g.depths else 0
        tuned = {**_PLAIN, "model.weights": g.net, "model.backbone_args": {}}
        for method in ("coral", "mmd", "dann"):
            grid.append((f"adapt-{method}", {**tuned, "model.strategy": "freeze",
                                             "model.frozen_layers": frozen,
                                             "adapt.method": method}))
    return grid


def _intercept_only(m) -> bool:
    """A linear correction so penalised that only its (free) intercept moves."""
    args = m.head_args or {}
    return float(args.get("C", 1.0)) <= 1e-4 if m.head == "logistic_regression" else \
        float(args.get("alpha", 0) if args.get("alpha") != "auto" else 0) >= 1e4


def _target_weights(facts: Facts, spec) -> str:
    """Target-only network: no source run; a named pretrained set (e.g. imagenet) stays, as
    it is not the source data."""
    ref = facts.net_weights
    return ref if ref and ref in spec.weights else "none"


def _blocks_of(cfg: ExperimentConfig, spec) -> list[str]:
    """The blocks of the config's network (of the source run's, when model.weights names
    one: its options shape the network)."""
    from tltool.models.backbones import build_backbone, resolve_args

    try:
        args = resolve_args(cfg.model.backbone, cfg.model.backbone_args)
        ref = cfg.model.weights.strip()
        if ref.lower() not in ("none", "") and ref not in spec.weights:
            args = trained_checkpoint(ref, "model.weights")[0].spec["backbone_args"]
        return build_backbone(cfg.model.backbone, args, 8 if spec.input == "tabular"
                              else 3).block_names
    except Exception:  # noqa: BLE001 - a source run's args may differ; a guess is enough
        return ["block"] * 2

# Keys of the target section a candidate may change: how rows are encoded or augmented, never
# which rows there are (every candidate is scored on the same labelled rows and test split).
TARGET_MAY_DIFFER = {"image_size", "augment", "decode_once_max_gb", "on_bad_image", "features",
                     "categorical", "drop"}


def candidate_list(cfg: ExperimentConfig, facts: Facts,
                   sources: dict[str, Any]) -> list[Candidate]:
    """Every candidate's full config, validated: all problems in one ConfigError."""
    given = cfg.select.candidates
    pairs = ([(c.name, c.set, c.complexity, False) for c in given] if given is not None else
             [(n, s, None, True) for n, s in default_grid(cfg, facts, sources)])
    names = [p[0] for p in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"select.candidates: name(s) {', '.join(dup)} given twice; each "
                          f"candidate needs its own name")
    if not pairs:
        raise ConfigError("select.candidates: no candidate to compare")
    base_target = cfg.target.model_dump(mode="json")
    out, problems = [], []
    for i, (name, changes, complexity, default) in enumerate(pairs):
        where = f"select.candidates.{i} ({name})"
        try:
            own = [k for k in changes if k.split(".")[0] in ("select", "output", "name")]
            if own:
                raise ConfigError(f"{where}: {', '.join(own)}: the select run's own settings; "
                                  f"a candidate changes the model, training and decision")
            raw = candidate_raw(cfg, changes, where)
            validate_config(raw, origin=where)
            changed = sorted(k for k, v in (raw.get("target") or {}).items()
                             if k not in TARGET_MAY_DIFFER and base_target.get(k) != v)
            if changed:
                raise ConfigError(f"{where}: target.{', target.'.join(changed)}: a candidate "
                                  f"may not change the target's rows or labels (every candidate "
                                  f"is scored on the same labelled rows and test split); "
                                  f"allowed: target.{', target.'.join(sorted(TARGET_MAY_DIFFER))}")
            for ref in source_refs(raw):
                if ref not in sources:
                    raise ConfigError(f"{where}: 'source:{ref}' names no source model; "
                                      f"sources: {', '.join(sources) or 'none'} "
                                      f"(select.sources)")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        out.append(Candidate(name, raw, complexity, default))
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def source_refs(raw: dict[str, Any]) -> list[str]:
    """The source models (`source:NAME`) a candidate's config names."""
    out = []
    for key in ("weights", "prior_weights"):
        refs = raw["model"].get(key)
        for ref in refs if isinstance(refs, list) else [refs]:
            if isinstance(ref, str) and ref.startswith(SOURCE_REF):
                out.append(ref[len(SOURCE_REF):])
    return out


def grid_notes(cfg: ExperimentConfig, facts: Facts) -> list[str]:
    """Why families of the default grid are missing (metrics.json select.notes)."""
    if cfg.select.candidates is not None:
        return []
    notes = []
    if not facts.source:
        notes.append("no source section: no source model is pretrained (no source-only, "
                     "prior, pooled or source-avg candidates)" + (
                         "" if facts.net_weights else "; no model.weights: no fine-tuning"))
    elif not facts.same_classes:
        notes.append("the source's classes (or task) differ from the target's: no source-only, "
                     "prior offset, pooled or source-avg candidates")
    if facts.task == MULTILABEL:
        notes.append("multi-label target: no classic-head candidates (one label per row)")
    if facts.source and not facts.pool:
        notes.append("no unlabelled target rows: no adapt candidates")
    return notes


def complexity_of(route: Route) -> int:
    """Rank for the one-standard-error rule: how much a route learns from the target labels.

    0 the source models averaged (nothing learnt but the class balance, an intercept);
    1 one source model as it is (choosing one among several is a choice the labels make);
    2 a penalised correction of a prior, or only a head / the biases on frozen features;
    3 a linear model on the raw inputs; 4 part of a network, or all of it pulled towards the
    pretrained weights (L2-SP); 5 a whole network, boosted trees, or a network trained with
    other rows (pooled, adapted)."""
    m, t = route.cfg.model, route.cfg.train
    if route.source_only:
        return 1
    if route.classic and route.prior is not None and m.prior == "offset" and \
            m.head != "gradient_boosting" and _intercept_only(m):
        return 0 if len(route.prior) > 1 else 1
    if route.classic:
        if m.head == "gradient_boosting":
            return 5
        return 2 if route.prior is not None or route.spec.name not in ("raw", "pixels") else 3
    if route.adaptation is not None or route.pooled is not None:
        return 5
    if m.strategy in ("linear_probe", "bias_only") or route.prior is not None:
        return 2
    if route.weights.path is None and route.weights.name is None:
        return 5  # target-only network
    if (m.strategy == "freeze" and m.frozen_layers > 0) or t.l2sp.alpha or t.l2sp.beta:
        return 4
    return 5


def resolve_sources(raw: dict[str, Any], source_runs: dict[str, Path]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)

    def resolved(ref):
        if isinstance(ref, str) and ref.startswith(SOURCE_REF):
            return str(source_runs[ref[len(SOURCE_REF):]])
        return ref

    for key in ("weights", "prior_weights"):
        ref = raw["model"].get(key)
        raw["model"][key] = [resolved(r) for r in ref] if isinstance(ref, list) else \
            resolved(ref)
    return raw
