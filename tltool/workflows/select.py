"""select: score candidate routes by cross-validation on the target's labelled rows, choose one
with the one-standard-error rule, refit it on every labelled row, score it on test once.

Order of work (the test split is read only after the choice is made):
1. the candidates' configs are built and validated (all problems reported before a run folder);
2. the source models they name (`source:NAME`) are pretrained into the run folder (sources/);
3. every route is prepared on one shared data cache, and cross-validated on the labelled rows
   (training + validation split of the target) with shared prefix/feature caches;
4. the leaderboard is written, the winner refit on all labelled rows (epochs chosen by the
   cross-validation; decision threshold chosen on its out-of-fold predictions) and saved as
   this run's model (evaluate / predict / ensemble take the run folder);
5. the winner is scored on the test split once; with select.research every other candidate is
   refit and scored too, in research.json, which the choice never reads.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tltool import plots
from tltool.config import ExperimentConfig, candidate_raw, dump_config, validate_config
from tltool.cv import (
    LOWER_IS_BETTER,
    Folds,
    Scored,
    choose,
    default_metric,
    fold_scores,
    make_folds,
)
from tltool.engine import (
    Phase,
    Pooled,
    PrefixStore,
    Task,
    Tensors,
    Trainer,
    predict_proba,
    score_of,
)
from tltool.errors import ConfigError, DataError
from tltool.inputs import Weights, is_image_data, unlabelled_rows
from tltool.metrics import epoch_scores
from tltool.models import CLASSIC_HEADS
from tltool.models.backbones import get_spec
from tltool.runs import write_json, write_text
from tltool.runtime import make_runtime
from tltool.workflows.common import (
    check_output_root,
    checkpoint_payload,
    log,
    new_run,
    pin_config,
)
from tltool.workflows.train import (
    InputCache,
    Route,
    backbone_features,
    build,
    check_built,
    concat_tensors,
    decision_rule,
    describe_route,
    fit_classic,
    phases_of,
    pooled_tensors,
    prepare,
    report,
    train_route,
    write_outputs,
)

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


# ---------------------------------------------------------------- candidates


def _facts(cfg: ExperimentConfig, cache: InputCache) -> dict[str, Any]:
    """What the default grid depends on: data kind and task, whether source and target share
    classes, whether unlabelled target rows exist, and the network the config names."""
    from tltool.inputs import load_inputs

    spec = get_spec(cfg.model.backbone)
    image = is_image_data(cfg.target)
    target = cache.load(cfg.target, "target", cfg.seed, spec, Weights("none"))
    task = ("regression" if target.regression else "multilabel" if target.multilabel
            else "classification")
    facts = {"image": image, "task": task, "classes": target.classes,
             "pool": target.data.unlabeled is not None and len(target.data.unlabeled) > 0,
             "source": cfg.source is not None, "same_classes": False}
    if cfg.source is not None:
        source = load_inputs(cfg.source, "source", cfg.seed, spec, Weights("none"))
        facts["same_classes"] = (source.classes == target.classes
                                 and source.multilabel == target.multilabel
                                 and source.regression == target.regression)
    ref = cfg.model.weights.strip()
    facts["net_weights"] = None if ref.lower() in ("none", "") else ref
    facts["net_is_run"] = bool(facts["net_weights"]) and ref not in spec.weights
    return facts


def _source_plan(cfg: ExperimentConfig, facts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Source models to pretrain: name -> config changes (on the base config)."""
    if cfg.select.sources is not None:
        return dict(cfg.select.sources)
    if not facts["source"]:
        return {}
    plain = {"model.keep_head": False, "model.prior": "none", "model.prior_weights": None,
             "train.source_weight": 0.0, "adapt.method": "none", "train.l2sp.alpha": 0.0,
             "train.l2sp.beta": 0.0, "train.rounds": []}
    raw_backbone = "pixels" if facts["image"] else "raw"
    linear = "ridge" if facts["task"] == "regression" else "logistic_regression"
    out: dict[str, dict[str, Any]] = {}
    if not facts["net_is_run"]:
        out["net"] = {**plain, "model.frozen_layers": 0, "model.strategy": "full"}
    if facts["task"] != "multilabel":
        classic = {**plain, "model.backbone": raw_backbone, "model.backbone_args": {},
                   "model.weights": "none"}
        out["lr"] = {**classic, "model.head": linear}
        if not facts["image"]:
            out["gb"] = {**classic, "model.head": "gradient_boosting"}
    return out


def default_grid(cfg: ExperimentConfig, facts: dict[str, Any],
                 sources: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The default candidates: reference models (classic heads on the raw table or pixels:
    target-only, source-only, pooled) and transfer routes (the source model as is, as a prior,
    fine-tuned several ways, its features under a classic head, adapted)."""
    task, image, same = facts["task"], facts["image"], facts["same_classes"]
    raw_backbone = "pixels" if image else "raw"
    linear = "ridge" if task == "regression" else "logistic_regression"
    classic_ok = task != "multilabel"
    net = (facts["net_weights"] if facts["net_is_run"] or "net" not in sources
           else "source:net")
    have_net = net is not None and (facts["net_is_run"] or "net" in sources
                                    or facts["net_weights"] is not None)
    spec = get_spec(cfg.model.backbone)
    n_blocks = len(_blocks_of(cfg, spec))
    # Freeze all blocks but the last (the usual transfer of a small network), and half of a
    # deeper one's blocks; the config's own frozen_layers too, when it names another count.
    depths = sorted({d for d in (n_blocks - 1, n_blocks // 2 if n_blocks >= 4 else 0,
                                 cfg.model.frozen_layers) if 0 < d < n_blocks})
    frozen = depths[-1] if depths else 0
    plain = {"model.keep_head": False, "model.prior": "none", "model.prior_weights": None,
             "train.source_weight": 0.0, "adapt.method": "none", "train.rounds": [],
             "train.l2sp.alpha": 0.0, "train.l2sp.beta": 0.0}
    classic = {**plain, "model.backbone": raw_backbone, "model.backbone_args": {},
               "model.weights": "none"}
    grid: list[tuple[str, dict[str, Any]]] = []
    if classic_ok:
        if same and "lr" in sources:
            grid.append(("source-only-lr", {**classic, "model.weights": "source:lr",
                                            "model.keep_head": True}))
        if same and "gb" in sources:
            grid.append(("source-only-gb", {**classic, "model.weights": "source:gb",
                                            "model.keep_head": True}))
        grid.append(("target-lr", {**classic, "model.head": linear}))
        if not image:
            grid.append(("target-gb", {**classic, "model.head": "gradient_boosting"}))
        if same and facts["source"]:
            grid.append(("pooled-lr", {**classic, "model.head": linear,
                                       "train.source_weight": 1.0}))
            if not image:
                grid.append(("pooled-gb", {**classic, "model.head": "gradient_boosting",
                                           "train.source_weight": 1.0}))
        for name in ("lr", "gb"):
            if same and name in sources:
                grid.append((f"prior-{name}", {**classic, "model.head": linear,
                                              "model.prior": "offset",
                                              "model.prior_weights": f"source:{name}",
                                              "model.head_args": _CORRECTION[task]}))
    # Ensembles of the source models (all that predict the target's classes): their mean
    # log-probabilities, recalibrated by an intercept only (source-avg; what learning the
    # target's class balance gives, like a threshold) or corrected by a penalised linear model
    # (prior-avg). Averaging guards against a source model that a few labels cannot tell
    # apart from a better one.
    members = [f"source:{n}" for n in ("lr", "gb") if n in sources]
    if have_net and same and (facts["net_is_run"] or "net" in sources):
        members.insert(0, net)
    if classic_ok and same and len(members) > 1:
        intercept_only = ({"alpha": 1e6} if task == "regression" else {"C": 1e-6})
        grid.append(("source-avg", {**classic, "model.head": linear, "model.prior": "offset",
                                    "model.prior_weights": members,
                                    "model.head_args": intercept_only}))
        grid.append(("prior-avg", {**classic, "model.head": linear, "model.prior": "offset",
                                   "model.prior_weights": members,
                                   "model.head_args": _CORRECTION[task]}))
    target_net = ("target-net", {**plain, "model.weights": _target_weights(facts, spec),
                                 "model.strategy": "full", "model.frozen_layers": 0})
    if not have_net:
        # no source network: the config's own network on the target rows, unless it is a
        # classic head on raw inputs (already among the reference models)
        if spec.name not in ("raw", "pixels") and cfg.model.head not in CLASSIC_HEADS:
            grid.append(target_net)
        return grid
    tuned = {**plain, "model.weights": net, "model.backbone_args": {}}
    if same and (facts["net_is_run"] or "net" in sources):
        grid.append(("source-only", {**tuned, "model.keep_head": True, "train.epochs": 0}))
        if classic_ok:
            grid.append(("prior-net", {**classic, "model.head": linear, "model.prior": "offset",
                                       "model.prior_weights": net,
                                       "model.head_args": _CORRECTION[task]}))
    if classic_ok:
        grid.append(("extract-lr", {**tuned, "model.head": linear}))
    grid += [
        ("linear-probe", {**tuned, "model.strategy": "linear_probe", "model.frozen_layers": 0}),
        ("bias-only", {**tuned, "model.strategy": "bias_only", "model.frozen_layers": 0}),
        *[(f"finetune-freeze{d}", {**tuned, "model.strategy": "freeze",
                                   "model.frozen_layers": d}) for d in depths],
        ("finetune-full", {**tuned, "model.strategy": "full", "model.frozen_layers": 0}),
        ("l2sp", {**tuned, "model.strategy": "full", "model.frozen_layers": 0,
                  "train.weight_decay": 0.0, "train.l2sp.alpha": 0.01,
                  "train.l2sp.beta": 0.01}),
    ]
    if same and facts["source"] and not image:  # images: adapt-* train source rows alongside
        grid.append(("pooled-net", {**tuned, "model.strategy": "freeze",
                                    "model.frozen_layers": frozen,
                                    "train.source_weight": 1.0}))
    grid.append(target_net)
    if facts["pool"] and facts["source"]:
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


def _target_weights(facts: dict[str, Any], spec) -> str:
    """Target-only network: no source run; a named pretrained set (e.g. imagenet) stays, as
    it is not the source data."""
    ref = facts["net_weights"]
    return ref if ref and ref in spec.weights else "none"


def _blocks_of(cfg: ExperimentConfig, spec) -> list[str]:
    """The blocks of the config's network (of the source run's, when model.weights names
    one: its options shape the network)."""
    from tltool.models.backbones import build_backbone, resolve_args

    try:
        args = resolve_args(cfg.model.backbone, cfg.model.backbone_args)
        ref = cfg.model.weights.strip()
        if ref.lower() not in ("none", "") and ref not in spec.weights:
            from tltool.workflows.common import resolve_checkpoint

            args = resolve_checkpoint(ref, "model.weights")[0]["spec"]["backbone_args"]
        return build_backbone(cfg.model.backbone, args, 8 if spec.input == "tabular"
                              else 3).block_names
    except Exception:  # noqa: BLE001 - a source run's args may differ; a guess is enough
        return ["block"] * 2


def _candidates(cfg: ExperimentConfig, facts: dict[str, Any],
                sources: dict[str, Any]) -> list[Candidate]:
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
    out, problems = [], []
    for i, (name, changes, complexity, default) in enumerate(pairs):
        where = f"select.candidates.{i} ({name})"
        try:
            raw = candidate_raw(cfg, changes, where)
            validate_config(raw, origin=where)
            for key in ("weights", "prior_weights"):
                refs = raw["model"].get(key)
                for ref in refs if isinstance(refs, list) else [refs]:
                    if isinstance(ref, str) and ref.startswith(SOURCE_REF) and \
                            ref[len(SOURCE_REF):] not in sources:
                        raise ConfigError(f"{where}: model.{key}: {ref!r} names no source "
                                          f"model; sources: {', '.join(sources) or 'none'} "
                                          f"(select.sources)")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        out.append(Candidate(name, raw, complexity, default))
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def complexity_of(route: Route) -> int:
    """Rank for the one-standard-error rule: how much a route learns from the target labels.
    0 the source model(s) as they are (at most an intercept learnt: the class balance); 1 a
    correction of a prior, or only a head / the biases; 2 a linear model; 3 part of a network;
    4 a whole network, boosted trees, or a network trained with other rows (pooled,
    adapted)."""
    m, t = route.cfg.model, route.cfg.train
    if route.source_only:
        return 0
    if route.classic and route.prior is not None and m.prior == "offset" and \
            m.head != "gradient_boosting" and _intercept_only(m):
        return 0
    if route.classic:
        if m.head == "gradient_boosting":
            return 4
        return 1 if route.prior is not None or route.spec.name not in ("raw", "pixels") else 2
    if route.adaptation is not None or route.pooled is not None:
        return 4
    if m.strategy in ("linear_probe", "bias_only") or route.prior is not None:
        return 1
    if route.weights.path is None and route.weights.name is None:
        return 4  # target-only network
    if m.strategy == "freeze" and m.frozen_layers > 0:
        return 3
    return 4 if not (t.l2sp.alpha or t.l2sp.beta) else 3


# ---------------------------------------------------------------- the command


def select(cfg: ExperimentConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Choose the route to the target model by cross-validation; see the module docstring."""
    if cfg.target is None:
        raise ConfigError("target: select needs a `target` data section (and, for transfer "
                          "routes, a source section or model.weights)")
    check_output_root(cfg.output.root)
    cache = InputCache(fit_rows="labelled")
    facts = _facts(cfg, cache)
    if not cfg.select.target_labels:
        from tltool.workflows.select_unsupervised import select_unsupervised

        return select_unsupervised(cfg, argv, cache, facts)
    sources = _source_plan(cfg, facts)
    candidates = _candidates(cfg, facts, sources)
    sel = cfg.select
    metric = sel.metric if sel.metric != "auto" else default_metric(facts["task"],
                                                                      len(facts["classes"]))
    _check_metric(metric, facts)
    timing: dict[str, Any] = {"sources": {}, "candidates": {}}
    with new_run(cfg.output.root, cfg.name, "select", argv, cfg.seed, cfg) as run:
        write_text(run.file("select_config.yaml"), dump_config(cfg))
        source_runs = _pretrain_sources(cfg, sources, run, cache, timing)
        routes, notes = _prepare_all(candidates, source_runs, cache if sel.share_work else None)
        rows = _labelled(routes)
        folds = make_folds(rows.y, facts["task"], sel.folds, sel.repeats, sel.seed)
        for note in folds.notes:
            log.info("select: %s", note)
        store = PrefixStore() if sel.share_work else None
        results, oofs = [], {}
        for cand, route in routes:
            start = time.perf_counter()
            scored, oof = cross_validate(route, cand, rows.of(route), folds, store, metric,
                                         sel.seed)
            timing["candidates"][cand.name] = round(time.perf_counter() - start, 3)
            results.append(scored)
            oofs[cand.name] = oof
            log.info("select: %-22s cv %s %.4f ± %.4f (complexity %d, %.1f s)", cand.name,
                     metric, scored.mean, scored.se if not math.isnan(scored.se) else 0.0,
                     scored.complexity, timing["candidates"][cand.name])
        winner, how = choose(results, sel.rule)
        by_name = {c.name: (c, r) for c, r in routes}
        board = _leaderboard(results, winner, how, metric, folds, by_name)
        _write_leaderboard(run, board, metric, how, cfg)
        # ---- the choice is made; from here on the test split may be read
        cand, route = by_name[winner.name]
        start = time.perf_counter()
        metrics = _refit_and_score(run, cfg, route, winner, oofs[winner.name], rows, folds,
                                   store, board, notes, how)
        timing["refit_seconds"] = round(time.perf_counter() - start, 3)
        if sel.research:
            _research(run, routes, results, winner, rows, store, oofs, metric)
        write_json(run.file("timing.json"), timing)
    log.info("select: chose %s (cv %s %.4f); test: %s", winner.name, metric, winner.mean,
             _headline(metrics["test"]))
    return {"run": str(run.path), "metrics": metrics, "leaderboard": board}


def _check_metric(metric: str, facts: dict[str, Any]) -> None:
    task = facts["task"]
    allowed = {"regression": ("rmse", "mae", "r2"), "multilabel": ("map",),
               "classification": ("auroc", "accuracy", "balanced_accuracy", "f1", "log_loss")}
    if metric not in allowed[task]:
        raise ConfigError(f"select.metric: {metric!r} does not apply to a {task} target; "
                          f"allowed: auto, {', '.join(allowed[task])}")


def _pretrain_sources(cfg: ExperimentConfig, sources: dict[str, dict[str, Any]], run,
                      cache: InputCache, timing: dict[str, Any]) -> dict[str, Path]:
    """Pretrain each named source model on the source section, as a run inside this one."""
    from tltool.workflows.train import write_outputs as outputs

    made: dict[str, Path] = {}
    for name, changes in sources.items():
        if cfg.source is None:
            raise ConfigError(f"select.sources.{name}: source models need a `source` section")
        where = f"select.sources.{name}"
        raw = candidate_raw(cfg, changes, where)
        raw["output"] = {"root": str(run.file("sources"))}
        raw["name"] = name
        src_cfg = validate_config(raw, origin=where)
        start = time.perf_counter()
        route = prepare(src_cfg, "pretrain", cache)
        model = build(route, src_cfg.seed)
        check_built(route, model)
        rt = make_runtime(src_cfg.train, route.spec.input == "image")
        with new_run(src_cfg.output.root, name, "pretrain", None, src_cfg.seed,
                     pin_config(src_cfg, route.weights, route.prior_path)) as sub:
            def save(file: str, epoch: int, sub=sub, model=model, route=route) -> None:
                sub.save_checkpoint(file, checkpoint_payload(
                    model, route.inputs.state, route.classes, route.label, route.multilabel,
                    "pretrain", epoch))

            if route.classic:
                # A fitted head needs no validation rows: it learns from every source row
                # (its val/test scores below are then scores on rows it was fitted on).
                rows = concat_tensors([route.inputs.train, route.inputs.val,
                                       route.inputs.test])
                summary = train_route(route, model, rows, None, save, sub.file("metrics.csv"),
                                      rt)
                note = {"fit_on": "every source row (train, val and test splits); its val "
                                  "and test scores are on rows it was fitted on"}
            else:
                summary = train_route(route, model, route.inputs.train, route.inputs.val,
                                      save, sub.file("metrics.csv"), rt)
                note = {"fit_on": "the source training split"}
            write_json(sub.file("runtime.json"), rt.describe())
            outputs(sub, route, model, summary, rt, route.inputs.val, route.inputs.test,
                    extra=note)
        made[name] = sub.path
        timing["sources"][name] = round(time.perf_counter() - start, 3)
        log.info("select: source model %s pretrained (%s)", name, sub.path)
    return made


def _resolve_sources(raw: dict[str, Any], source_runs: dict[str, Path]) -> dict[str, Any]:
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


def _prepare_all(candidates: list[Candidate], source_runs: dict[str, Path],
                 cache: InputCache | None) -> tuple[list[tuple[Candidate, Route]], list[str]]:
    """Each candidate's route; a default candidate that does not apply is left out (noted).
    `cache` None: each candidate loads its data on its own (select.share_work false)."""
    out, notes = [], []
    for cand in candidates:
        cache_here = cache or InputCache(fit_rows="labelled")
        raw = _resolve_sources(cand.raw, source_runs)
        try:
            ccfg = validate_config(raw, origin=f"select.candidates ({cand.name})")
            route = prepare(ccfg, "freeze-finetune", cache_here)
            check_built(route, build(route, ccfg.seed))
        except (ConfigError, DataError) as exc:
            if not cand.default:
                raise
            notes.append(f"{cand.name}: left out ({str(exc).splitlines()[0]})")
            log.info("select: %s left out: %s", cand.name, str(exc).splitlines()[0])
            continue
        cand = replace(cand, raw=raw)
        out.append((cand, route))
    if not out:
        raise ConfigError("select: no candidate applies to this data; " + "; ".join(notes))
    return out, notes


# ---------------------------------------------------------------- labelled rows


@dataclass
class Labelled:
    """The labelled target rows (training + validation split), per input encoding."""

    y: np.ndarray
    ids: np.ndarray
    by_inputs: dict[int, Tensors]
    routes: dict[int, Route]

    def of(self, route: Route) -> Tensors:
        return self.by_inputs[id(route.inputs)]


def _labelled(routes: list[tuple[Candidate, Route]]) -> Labelled:
    """Every route reads the same target rows (maybe encoded differently): one row order."""
    by_inputs: dict[int, Tensors] = {}
    y = ids = None
    for cand, route in routes:
        inputs = route.inputs
        if id(inputs) in by_inputs:
            continue
        these = np.concatenate([np.asarray(inputs.data.train.ids).astype(str),
                                np.asarray(inputs.data.val.ids).astype(str)])
        if ids is None:
            ids = these
            y = np.concatenate([inputs.train.y.numpy(), inputs.val.y.numpy()])
        elif not np.array_equal(ids, these):
            raise ConfigError(f"select.candidates ({cand.name}): reads other target rows than "
                              f"the other candidates; candidates may change the model and "
                              f"training, not the target data's rows (split, n_train, n_val)")
        by_inputs[id(inputs)] = concat_tensors([inputs.train, inputs.val])
    return Labelled(y, ids, by_inputs, {id(r.inputs): r for _, r in routes})


# ---------------------------------------------------------------- cross-validation


def cross_validate(route: Route, cand: Candidate, rows: Tensors, folds: Folds,
                   store: PrefixStore | None, metric: str,
                   seed: int) -> tuple[Scored, np.ndarray]:
    """Out-of-fold predictions of one route (repeats x rows x outputs) and its fold scores.
    `store` None: nothing shared between folds (each computes its own caches)."""
    cfg = route.cfg
    pooled = pooled_tensors(route)
    if route.source_only:
        oof, epochs = _cv_fixed(route, rows, folds, store), None
    elif route.classic:
        oof, epochs = _cv_classic(route, rows, folds, store, pooled), None
    else:
        oof, epochs = _cv_network(route, rows, folds, store, pooled)
    y = rows.y.numpy()
    decision = None if route.regression else {"rule": cfg.decision.rule,
                                              "optimize": cfg.decision.optimize}
    scores = fold_scores(metric, y, oof, folds, decision)
    complexity = cand.complexity if cand.complexity is not None else complexity_of(route)
    sign = -1 if metric in LOWER_IS_BETTER else 1
    return Scored(cand.name, complexity, scores, sign, epochs), oof


def _outputs(route: Route) -> int:
    return 1 if route.regression else len(route.classes)


def _cv_fixed(route: Route, rows: Tensors, folds: Folds,
              store: PrefixStore | None) -> np.ndarray:
    """The source model as it is: one prediction of every labelled row, the same in each fold
    (only the decision threshold, chosen on the other folds, depends on the labels)."""
    model = build(route, route.cfg.seed)
    rt = make_runtime(route.cfg.train, route.spec.input == "image")
    proba = predict_proba(model, rows, route.multilabel, rt=rt)
    return np.repeat(proba[None], folds.repeats, axis=0)


def _cv_classic(route: Route, rows: Tensors, folds: Folds, shared: PrefixStore | None,
                pooled: Tensors | None) -> np.ndarray:
    oof = np.zeros((folds.repeats, len(rows), _outputs(route)))
    rt = make_runtime(route.cfg.train, route.spec.input == "image")
    for j, (train_idx, held_idx) in enumerate(folds.splits):
        store = shared or PrefixStore()
        model = build(route, route.cfg.seed)
        train = store.with_prior(model, rows.subset(train_idx), rt)
        src = None if pooled is None else store.with_prior(model, pooled, rt)
        fit_classic(route, model, train, src, route.cfg.seed, rt, store)
        held = store.with_prior(model, rows.subset(held_idx), rt)
        feats = backbone_features(model, held, rt, store, route.cfg.train.cache_max_gb)
        with torch.no_grad():
            logits = model.from_features(feats, held.prior)
        oof[folds.repeat_of(j)][held_idx] = Task.of(model, route.multilabel).proba(
            logits.float()).double().numpy()
    return oof


def _fold_adaptation(route: Route, train: Tensors, rest: Tensors | None):
    """A fold's own domain adaptation: the rows aligned are the fold's training rows (labels
    unused) and the unlabelled pool, never its held-out rows."""
    from tltool.adapt import Adaptation

    a = route.adaptation
    if a is None:
        return None
    target = train if rest is None else concat_tensors([train, rest])
    return Adaptation(a.method, a.weight, target, a.source, a.source_weight)


def _cv_network(route: Route, rows: Tensors, folds: Folds, shared: PrefixStore | None,
                pooled: Tensors | None) -> tuple[np.ndarray, list[int]]:
    """Every fold model in lockstep; early stopping on the mean held-out score."""
    cfg = route.cfg
    image = route.spec.input == "image"
    rest = unlabelled_rows(route.inputs) if route.adaptation is not None else None
    trainers, held_rows = [], []
    phases: list[Phase] = []
    for train_idx, held_idx in folds.splits:
        store = shared or PrefixStore()
        model = build(route, cfg.seed)
        rt = make_runtime(cfg.train, image)
        phases = phases_of(cfg, route.command, len(model.backbone.blocks),
                           model.backbone.block_names)
        train = store.with_prior(model, rows.subset(train_idx), rt)
        held = store.with_prior(model, rows.subset(held_idx), rt)
        src = None if pooled is None else Pooled(store.with_prior(model, pooled, rt),
                                                 cfg.train.source_weight)
        trainers.append(Trainer(model, train, held, phases, cfg.train, route.classes, cfg.seed,
                                Task.of(model, route.multilabel), cfg.model.bn_policy, rt,
                                _fold_adaptation(route, train, rest), src, store))
        held_rows.append(held_idx)
    task = trainers[0].task
    monitor = cfg.train.early_stopping.monitor
    patience = cfg.train.early_stopping.patience
    sizes = np.array([len(h) for h in held_rows], dtype=np.float64)
    best, epochs = -np.inf, []
    oof = np.zeros((folds.repeats, len(rows), _outputs(route)))
    for r, phase in enumerate(phases, start=1):
        for t in trainers:
            t.start_round(r)
        stale, best_here = 0, 0
        for e in range(phase.epochs):
            results = [t.run_epoch() for t in trainers]
            fold_values, probas = [], []
            for t, res in zip(trainers, results, strict=True):
                proba = task.proba(res.logits).double().numpy()
                val_loss = task.val_loss(res.logits, t.val.y)
                scores = epoch_scores(t.val.y.numpy(), proba, task.multilabel, task.regression)
                fold_values.append(score_of(scores, val_loss, monitor))
                probas.append(proba)
            values = np.asarray(fold_values, dtype=np.float64)
            finite = np.isfinite(values)
            mean = float((values[finite] * sizes[finite]).sum() / sizes[finite].sum()) \
                if finite.any() else -np.inf
            if mean > best:
                best, best_here, stale = mean, e + 1, 0
                for j, (t, proba) in enumerate(zip(trainers, probas, strict=True)):
                    t.mark_best()
                    oof[folds.repeat_of(j)][held_rows[j]] = proba
            else:
                stale += 1
                if patience is not None and stale >= patience:
                    break
        epochs.append(best_here)
        for t in trainers:
            t.end_round()
    return oof, epochs


# ---------------------------------------------------------------- the leaderboard


def _leaderboard(results: list[Scored], winner: Scored, how: dict[str, Any], metric: str,
                 folds: Folds, by_name: dict[str, tuple[Candidate, Route]]) -> list[dict]:
    within = set(how.get("within_one_se") or [])
    ranked = sorted(results, key=lambda r: (-r.rank_value, r.complexity, r.name))
    rows = []
    for rank, r in enumerate(ranked, start=1):
        route = by_name[r.name][1]
        rows.append({
            "rank": rank, "name": r.name, "chosen": r.name == winner.name,
            "complexity": r.complexity, "metric": metric,
            "mean": None if math.isnan(r.mean) else round(r.mean, 6),
            "se": None if math.isnan(r.se) else round(r.se, 6),
            "folds": len(r.valid), "within_one_se": r.name in within,
            "epochs": r.epochs, "route": describe_route(route),
            "fold_scores": [None if math.isnan(s) else round(s, 6) for s in r.scores]})
    return rows


def _write_leaderboard(run, board: list[dict], metric: str, how: dict[str, Any],
                       cfg: ExperimentConfig) -> None:
    sel = cfg.select
    write_json(run.file("leaderboard.json"), {
        "metric": metric, "lower_is_better": metric in LOWER_IS_BETTER,
        "folds": sel.folds, "repeats": sel.repeats, "seed": sel.seed, "rule": how,
        "candidates": board})
    buf = io.StringIO()
    fields = ["rank", "name", "chosen", "complexity", "metric", "mean", "se", "folds",
              "within_one_se", "epochs", "route"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in board:
        writer.writerow(row | {"epochs": "" if row["epochs"] is None else
                               "+".join(map(str, row["epochs"])),
                               "route": _route_words(row["route"])})
    write_text(run.file("leaderboard.csv"), buf.getvalue())
    plots.leaderboard(board, run.file("plots", "leaderboard.png"), metric, how.get("bar"),
                      f"{cfg.name}: {len(board)} routes, {sel.repeats}x{sel.folds}-fold "
                      f"cross-validation on the labelled target rows")


def _route_words(route: dict[str, Any]) -> str:
    parts = [route["backbone"], route["head"]]
    if route["source_only"]:
        parts.append("source model as is")
    elif route["strategy"]:
        parts.append(f"{route['strategy']} {route['frozen_layers']}")
    for key in ("prior", "pooled", "l2sp"):
        if route.get(key):
            parts.append(key)
    if route.get("adapt"):
        parts.append(f"adapt {route['adapt']}")
    return " / ".join(str(p) for p in parts)


# ---------------------------------------------------------------- refit and test


def _refit_config(route: Route, epochs: list[int] | None) -> Route:
    """The route with the epoch counts the cross-validation chose (no early stopping: the
    refit has no validation rows)."""
    if epochs is None:
        return route
    cfg = route.cfg
    if cfg.train.rounds:
        rounds = [r.model_copy(update={"epochs": max(e, 0)})
                  for r, e in zip(cfg.train.rounds, epochs, strict=True)]
        train = cfg.train.model_copy(update={"rounds": rounds})
    else:
        train = cfg.train.model_copy(update={"epochs": epochs[0]})
    return replace(route, cfg=cfg.model_copy(update={"train": train}))


def refit(route: Route, scored: Scored, rows: Tensors, store: PrefixStore, make_save=None,
          metrics_csv="/dev/null") -> tuple[Any, dict[str, Any], Any, Route]:
    """The route trained on every labelled row, for the epochs its cross-validation chose
    (`make_save(model)` gives the checkpoint writer). Returns model, summary, runtime and the
    route as refit."""
    route = _refit_config(route, scored.epochs)
    model = build(route, route.cfg.seed)
    rt = make_runtime(route.cfg.train, route.spec.input == "image")
    if route.adaptation is not None:
        route = replace(route, adaptation=_fold_adaptation(route, rows,
                                                            unlabelled_rows(route.inputs)))
    save = make_save(model) if make_save else (lambda *_: None)
    summary = train_route(route, model, rows, None, save, metrics_csv, rt, store,
                          pooled_tensors(route))
    return model, summary, rt, route


def _oof_decision(route: Route, oof: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The refit model's decision rule, chosen on the out-of-fold predictions of every repeat
    (rows the fold models did not train on)."""
    flat = oof.reshape(-1, oof.shape[-1])
    ys = np.concatenate([y] * oof.shape[0])
    return decision_rule(route.cfg, route.classes, route.multilabel, flat, ys,
                         route.regression, chosen_on="out-of-fold")


def _refit_and_score(run, cfg: ExperimentConfig, route: Route, winner: Scored, oof: np.ndarray,
                     rows: Labelled, folds: Folds, store: PrefixStore, board: list[dict],
                     notes: list[str], how: dict[str, Any]) -> dict[str, Any]:
    inputs = route.inputs

    def make_save(model):
        def save(name: str, epoch: int) -> None:
            run.save_checkpoint(name, checkpoint_payload(model, inputs.state, route.classes,
                                                         route.label, route.multilabel,
                                                         "select", epoch))
        return save

    model, summary, rt, refit_route = refit(route, winner, rows.of(route), store, make_save,
                                            run.file("metrics.csv"))
    decision = _oof_decision(route, oof, rows.y)
    write_text(run.file("config.yaml"), dump_config(pin_config(refit_route.cfg,
                                                               route.weights, route.prior_path)))
    _write_oof(run, rows, route, oof)
    cv = {"metric": board[0]["metric"], "mean": winner.mean,
          "se": None if math.isnan(winner.se) else winner.se, "folds": len(winner.valid),
          "repeats": folds.repeats, "k": folds.k, "labelled_rows": int(len(rows.y)),
          "epochs": winner.epochs}
    extra = {"select": {"winner": winner.name, "rule": how, "cv": cv,
                        "candidates": len(board), "notes": notes + folds.notes,
                        "leaderboard": "leaderboard.csv"}}
    return write_outputs(run, refit_route, model, summary, rt, None, inputs.test, decision,
                         extra)


def _write_oof(run, rows: Labelled, route: Route, oof: np.ndarray) -> None:
    """Out-of-fold predictions (mean over repeats) of the chosen route: what `ensemble` uses
    as validation predictions of a select run."""
    import pandas as pd

    mean = oof.mean(axis=0)
    cols: dict[str, Any] = {"id": rows.ids}
    if route.regression:
        cols["prediction"] = np.round(mean[:, 0], 8)
        cols["label"] = rows.y
    else:
        for i, c in enumerate(route.classes):
            cols[f"p_{c}"] = np.round(mean[:, i], 8)
        cols["label"] = (["|".join(np.asarray(route.classes)[r.astype(bool)]) for r in rows.y]
                         if route.multilabel else np.asarray(route.classes)[rows.y])
    write_text(run.file("oof_predictions.csv"), pd.DataFrame(cols).to_csv(index=False))


def _headline(m: dict[str, Any]) -> str:
    if "rmse" in m:
        return f"rmse {m['rmse']:.4g}, r2 {m['r2']}"
    if "map" in m:
        return f"mAP {m['map']:.4f}"
    auroc = "n/a" if m.get("auroc") is None else f"{m['auroc']:.4f}"
    return f"accuracy {m['accuracy']:.4f}, auroc {auroc}"


def _research(run, routes: list[tuple[Candidate, Route]], results: list[Scored],
              winner: Scored, rows: Labelled, store: PrefixStore, oofs: dict[str, np.ndarray],
              metric: str) -> None:
    """Every candidate refit on all labelled rows and scored on the test split, for research
    (how often the choice was the best on test). Never read by the choice, which is final."""
    from tltool.cv import score

    out = []
    scored = {r.name: r for r in results}
    for cand, route in routes:
        r = scored[cand.name]
        model, _, rt, _ = refit(route, r, rows.of(route), store)
        proba = predict_proba(model, route.inputs.test, route.multilabel, rt=rt)
        decision = _oof_decision(route, oofs[cand.name], rows.y)
        y = route.inputs.test.y.numpy()
        test = report(y, proba, route.classes, decision)
        out.append({"name": cand.name, "chosen": cand.name == winner.name,
                    "cv_mean": r.mean, "test_" + metric: score(metric, y, proba,
                                                               decision.get("threshold")),
                    "test": {k: test.get(k) for k in ("accuracy", "auroc", "f1", "map",
                                                      "rmse", "mae", "r2") if k in test}})
    sign = -1 if metric in LOWER_IS_BETTER else 1
    best = max(out, key=lambda o: sign * o["test_" + metric])
    write_json(run.file("research.json"), {
        "note": "research only: every candidate refit on all labelled rows and scored on the "
                "test split after the choice was made; the choice never reads this file",
        "metric": metric, "best_on_test": best["name"], "chosen": winner.name,
        "chosen_is_best_on_test": best["name"] == winner.name, "candidates": out})

