"""select: score candidate routes by cross-validation on the target's labelled rows, choose (the
average of every route within a band of the best, or one route), refit the choice on every
labelled row, score it on test once.

Order of work (the test split is read only after the choice is made):
1. the candidates' configs are built and validated (all problems reported before a run folder);
2. the source models they name (`source:NAME`) are pretrained into the run folder (sources/),
   through the same `train_run` as `tltool pretrain`;
3. every route is prepared on one shared data cache, and cross-validated on the labelled rows
   (training + validation split of the target) with shared prefix/feature caches;
4. the leaderboard is written, the choice refit on all labelled rows (epochs chosen by the
   cross-validation; decision threshold chosen on its out-of-fold predictions) and saved as
   this run's model (evaluate / predict / ensemble take the run folder);
5. the choice is scored on the test split once; with select.research every other candidate is
   refit and scored too, in research.json, which the choice never reads.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tltool import progress
from tltool.cache import PrefixStore
from tltool.config import ExperimentConfig, candidate_raw, dump_config, validate_config
from tltool.errors import ConfigError, DataError
from tltool.routes.route import InputCache, Route, prepare
from tltool.routes.training import build, check_built
from tltool.runs.files import write_json, write_text
from tltool.runs.folder import RunFolder, RunPlace, check_output_root, new_run
from tltool.runs.summary import Result
from tltool.select.candidates import (
    Candidate,
    Facts,
    candidate_list,
    facts,
    grid_notes,
    resolve_sources,
    source_plan,
    source_refs,
)
from tltool.select.crossval import CrossValidation, cross_validate, labelled_rows
from tltool.select.leaderboard import ENSEMBLE, ensemble_scored, leaderboard, write_leaderboard
from tltool.select.refit import Choice, refit_and_score, refit_average
from tltool.select.research import Outcome, research
from tltool.select.rules import choose
from tltool.select.scoring import default_metric, make_folds
from tltool.task import CLASSIFICATION, MULTILABEL, REGRESSION
from tltool.workflows.train import TrainRequest, train_run

log = logging.getLogger("tltool")

ALLOWED_METRICS = {REGRESSION: ("rmse", "mae", "r2"), MULTILABEL: ("map",),
                   CLASSIFICATION: ("auroc", "accuracy", "balanced_accuracy", "f1",
                                    "log_loss")}


def select(cfg: ExperimentConfig, argv: list[str] | None = None) -> Result:
    """Choose the route to the target model by cross-validation; see the module docstring."""
    if cfg.target is None:
        raise ConfigError("target: select needs a `target` data section (and, for transfer "
                          "routes, a source section or model.weights)")
    check_output_root(cfg.output.root)
    cache = InputCache(fit_rows="labelled")
    found = facts(cfg, cache)
    if not cfg.select.target_labels:
        from tltool.select.unsupervised import select_unsupervised

        return select_unsupervised(cfg, argv, cache, found)
    sel = cfg.select
    sources = source_plan(cfg, found)
    candidates = candidate_list(cfg, found, sources)
    needed = {ref for c in candidates for ref in source_refs(c.raw)}
    sources = {name: v for name, v in sources.items() if name in needed}
    metric = sel.metric if sel.metric != "auto" else default_metric(found.task,
                                                                      len(found.classes))
    _check_metric(metric, found)
    shared = cache if sel.share_work else None
    # Candidates that need no source model are prepared now: their errors come before any
    # run folder exists (the data loaded stay in the cache for the rest).
    early, notes = _prepare_all([c for c in candidates if not source_refs(c.raw)], {}, shared)
    notes = grid_notes(cfg, found) + notes
    timing: dict[str, Any] = {"sources": {}, "candidates": {}}
    with new_run(RunPlace(cfg.output.root, cfg.name), "select", argv, cfg.seed, cfg) as run:
        write_text(run.file("select_config.yaml"), dump_config(cfg))
        source_runs = _pretrain_sources(cfg, sources, run, cache, timing)
        late, more = _prepare_all([c for c in candidates if source_refs(c.raw)], source_runs,
                                  shared)
        notes += more
        order = {c.name: i for i, c in enumerate(candidates)}
        routes = sorted(early + late, key=lambda cr: order[cr[0].name])
        if not routes:
            raise ConfigError("select: no candidate applies to this data; " + "; ".join(notes))
        rows = labelled_rows(routes)
        folds = make_folds(rows.y, found.task, sel.folds, sel.repeats, sel.seed, found.classes)
        for note in folds.notes:
            log.info("select: %s", note)
        cv = CrossValidation(rows, folds, metric, PrefixStore() if sel.share_work else None)
        outcome, board = _choose(run, cfg, routes, cv, timing)
        _refit(run, Choice(cfg, cv, board, notes, outcome.how), routes, outcome, timing)
        write_json(run.file("timing.json"), timing)
    summary = outcome.summary
    log.info("select: chose %s (cv %s %.4f); test: %s", outcome.winner.name, metric,
             outcome.winner.mean, _headline(summary.test))
    return Result(run.path, summary, leaderboard=board)


def _cross_validate_all(routes: list[tuple[Candidate, Route]], cv: CrossValidation,
                        timing: dict[str, Any]) -> tuple[list, dict]:
    """Every candidate's fold scores and out-of-fold predictions, one line each."""
    results, oofs = [], {}
    with progress.current().steps("select: cross-validating candidates",
                                  total=len(routes)) as advance:
        for cand, route in routes:
            start = time.perf_counter()
            with progress.use(progress.Reporter()):  # a line per candidate, not per fold
                scored, oof = cross_validate(route, cand, cv)
            advance(1)
            timing["candidates"][cand.name] = round(time.perf_counter() - start, 3)
            results.append(scored)
            oofs[cand.name] = oof
            log.info("select: %-22s cv %s %.4f ± %.4f (complexity %d, %.1f s)", cand.name,
                     cv.metric, scored.mean, scored.se if not math.isnan(scored.se) else 0.0,
                     scored.complexity, timing["candidates"][cand.name])
    return results, oofs


def _choose(run: RunFolder, cfg: ExperimentConfig, routes: list[tuple[Candidate, Route]],
            cv: CrossValidation, timing: dict[str, Any]) -> tuple[Outcome, list[dict]]:
    """Cross-validate every candidate, apply the rule, write the leaderboard."""
    sel = cfg.select
    results, oofs = _cross_validate_all(routes, cv, timing)
    winner, how = choose(results, sel.rule, sel.band)
    by_name = {c.name: (c, r) for c, r in routes}
    scored_all = results
    if sel.rule == "ensemble" and len(how["members"]) > 1:
        members = [r for r in results if r.name in how["members"]]
        winner, oofs[ENSEMBLE] = ensemble_scored(members, oofs, cv, by_name[members[0].name][1])
        scored_all = results + [winner]
    board = leaderboard(scored_all, winner, how, cv.metric, by_name)
    write_leaderboard(run, board, how, cfg, cv.folds)
    return Outcome({r.name: r for r in results}, oofs, winner, how), board


def _refit(run: RunFolder, choice: Choice, routes: list[tuple[Candidate, Route]],
           outcome: Outcome, timing: dict[str, Any]) -> None:
    """The choice is made; from here on the test split may be read."""
    start = time.perf_counter()
    by_name = {c.name: r for c, r in routes}
    if outcome.winner.name == ENSEMBLE:
        chosen = [(by_name[n], outcome.results[n]) for n in choice.how["members"]]
        outcome.summary, outcome.refitted = refit_average(run, choice, chosen, outcome.oofs)
    else:
        name = outcome.winner.name
        outcome.summary = refit_and_score(run, choice, by_name[name], outcome.winner,
                                          outcome.oofs[name])[0]
    timing["refit_seconds"] = round(time.perf_counter() - start, 3)
    if choice.cfg.select.research:
        with progress.use(progress.Reporter()):
            research(run, choice.cv, routes, outcome)


def _check_metric(metric: str, found: Facts) -> None:
    allowed = ALLOWED_METRICS[found.task]
    if metric not in allowed:
        raise ConfigError(f"select.metric: {metric!r} does not apply to a {found.task} target; "
                          f"allowed: auto, {', '.join(allowed)}")


def _pretrain_sources(cfg: ExperimentConfig, sources: dict[str, dict[str, Any]],
                      run: RunFolder, cache: InputCache,
                      timing: dict[str, Any]) -> dict[str, Path]:
    """Pretrain each named source model on the source section, as a run inside this one
    (through the same train_run as `tltool pretrain`)."""
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
        done = train_run(TrainRequest(src_cfg, "pretrain", cache=cache, select_source=True))
        made[name] = done.run
        timing["sources"][name] = round(time.perf_counter() - start, 3)
        log.info("select: source model %s pretrained (%s)", name, made[name])
    return made


def _prepare_all(candidates: list[Candidate], source_runs: dict[str, Path],
                 cache: InputCache | None) -> tuple[list[tuple[Candidate, Route]], list[str]]:
    """Each candidate's route; a default candidate that does not apply is left out (noted), a
    given one that does not is an error naming it. `cache` None: each candidate loads its data
    on its own (select.share_work false)."""
    out, notes = [], []
    for cand in candidates:
        cache_here = cache or InputCache(fit_rows="labelled")
        raw = resolve_sources(cand.raw, source_runs)
        where = f"select.candidates ({cand.name})"
        try:
            ccfg = validate_config(raw, origin=where)
            route = prepare(ccfg, "freeze-finetune", cache_here)
            check_built(route, build(route, ccfg.seed))
        except (ConfigError, DataError) as exc:
            if not cand.default:
                text = str(exc)
                raise type(exc)(text if text.startswith(where) else f"{where}: {text}") \
                    from None
            notes.append(f"{cand.name}: left out ({str(exc).splitlines()[0]})")
            log.info("select: %s left out: %s", cand.name, str(exc).splitlines()[0])
            continue
        out.append((replace(cand, raw=raw), route))
    return out, notes


def _headline(m: dict[str, Any]) -> str:
    if "rmse" in m:
        return f"rmse {m['rmse']:.4g}, r2 {m['r2']}"
    if "map" in m:
        return f"mAP {m['map']:.4f}"
    auroc = "n/a" if m.get("auroc") is None else f"{m['auroc']:.4f}"
    return f"accuracy {m['accuracy']:.4f}, auroc {auroc}"
