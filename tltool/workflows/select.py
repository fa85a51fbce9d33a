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

import csv
import io
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tltool import plots, progress
from tltool.cache import PrefixStore
from tltool.config import ExperimentConfig, candidate_raw, dump_config, validate_config
from tltool.cv import LOWER_IS_BETTER, Folds, Scored, choose, default_metric, make_folds
from tltool.decision import Decision, report
from tltool.engine import predict_proba
from tltool.errors import ConfigError, DataError
from tltool.runs import write_json, write_text
from tltool.runtime import make_runtime
from tltool.workflows.candidates import (
    Candidate,
    candidate_list,
    facts,
    grid_notes,
    resolve_sources,
    source_plan,
    source_refs,
)
from tltool.workflows.common import check_output_root, checkpoint_payload, log, new_run, pin_config
from tltool.workflows.crossval import Labelled, cross_validate, labelled_rows, oof_decision, refit
from tltool.workflows.routes import (
    InputCache,
    Route,
    build,
    check_built,
    concat_tensors,
    describe_route,
    prepare,
    train_route,
)
from tltool.workflows.train import plot_test_split, write_outputs


def select(cfg: ExperimentConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Choose the route to the target model by cross-validation; see the module docstring."""
    if cfg.target is None:
        raise ConfigError("target: select needs a `target` data section (and, for transfer "
                          "routes, a source section or model.weights)")
    check_output_root(cfg.output.root)
    cache = InputCache(fit_rows="labelled")
    found = facts(cfg, cache)
    if not cfg.select.target_labels:
        from tltool.workflows.select_unsupervised import select_unsupervised

        return select_unsupervised(cfg, argv, cache, found)
    sel = cfg.select
    sources = source_plan(cfg, found)
    candidates = candidate_list(cfg, found, sources)
    needed = {ref for c in candidates for ref in source_refs(c.raw)}
    sources = {name: v for name, v in sources.items() if name in needed}
    metric = sel.metric if sel.metric != "auto" else default_metric(found["task"],
                                                                      len(found["classes"]))
    _check_metric(metric, found)
    shared = cache if sel.share_work else None
    # Candidates that need no source model are prepared now: their errors come before any
    # run folder exists (the data loaded stay in the cache for the rest).
    early, notes = _prepare_all([c for c in candidates if not source_refs(c.raw)], {}, shared)
    notes = grid_notes(cfg, found) + notes
    timing: dict[str, Any] = {"sources": {}, "candidates": {}}
    with new_run(cfg.output.root, cfg.name, "select", argv, cfg.seed, cfg) as run:
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
        folds = make_folds(rows.y, found["task"], sel.folds, sel.repeats, sel.seed,
                           found["classes"])
        for note in folds.notes:
            log.info("select: %s", note)
        store = PrefixStore() if sel.share_work else None
        results, oofs = [], {}
        with progress.current().steps("select: cross-validating candidates",
                                      total=len(routes)) as advance:
            for cand, route in routes:
                start = time.perf_counter()
                with progress.use(progress.Reporter()):  # a line per candidate, not per fold
                    scored, oof = cross_validate(route, cand, rows.of(route), folds, store,
                                                 metric, sel.seed)
                advance(1)
                timing["candidates"][cand.name] = round(time.perf_counter() - start, 3)
                results.append(scored)
                oofs[cand.name] = oof
                log.info("select: %-22s cv %s %.4f ± %.4f (complexity %d, %.1f s)", cand.name,
                         metric, scored.mean, scored.se if not math.isnan(scored.se) else 0.0,
                         scored.complexity, timing["candidates"][cand.name])
        winner, how = choose(results, sel.rule, sel.band)
        by_name = {c.name: (c, r) for c, r in routes}
        scored_all = results
        averaged = sel.rule == "ensemble" and len(how["members"]) > 1
        if averaged:
            winner, oofs[ENSEMBLE] = _ensemble_scored(
                [r for r in results if r.name in how["members"]], oofs, rows, folds, metric,
                by_name)
            scored_all = results + [winner]
        board = _leaderboard(scored_all, winner, how, metric, folds, by_name)
        _write_leaderboard(run, board, metric, how, cfg, folds)
        # ---- the choice is made; from here on the test split may be read
        start = time.perf_counter()
        refitted: dict[str, tuple[Any, Any]] = {}
        if averaged:
            metrics = _refit_ensemble(run, cfg, how["members"], by_name, results, oofs, rows,
                                      folds, store, board, notes, how, refitted, argv)
        else:
            cand, route = by_name[winner.name]
            metrics = _refit_and_score(run, cfg, route, winner, oofs[winner.name], rows, folds,
                                       store, board, notes, how)
        timing["refit_seconds"] = round(time.perf_counter() - start, 3)
        if sel.research:
            with progress.use(progress.Reporter()):
                _research(run, routes, results, winner, rows, store, oofs, metric, refitted,
                          metrics)
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
            def save(file: str, epoch: int, state=None, sub=sub, model=model,
                     route=route) -> None:
                sub.save_checkpoint(file, checkpoint_payload(
                    model, route.inputs.state, route.classes, route.label, route.multilabel,
                    "pretrain", epoch, state))

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
        cand = replace(cand, raw=raw)
        out.append((cand, route))
    return out, notes


# The leaderboard row of the averaged candidates (select.rule ensemble): not a valid candidate
# name (NAME_PATTERN has no spaces), so it never collides with one.
ENSEMBLE = "ensemble of candidates"


def _ensemble_scored(results: list[Scored], oofs: dict[str, np.ndarray], rows: Labelled,
                     folds: Folds, metric: str,
                     by_name: dict[str, tuple[Candidate, Route]]) -> tuple[Scored, np.ndarray]:
    """The unweighted average of the candidates in the band, cross-validated like one: its
    out-of-fold predictions are the average of the members' (each row predicted by fold models
    that never trained on it). The members were chosen on the same folds, so its score leans
    optimistic, like the best single candidate's; it is shown, never used to choose."""
    from tltool.cv import fold_scores

    members = results
    oof = np.mean([oofs[r.name] for r in members], axis=0)
    route = by_name[members[0].name][1]
    decision = None if route.regression else {"rule": route.cfg.decision.rule,
                                              "optimize": route.cfg.decision.optimize}
    scores = fold_scores(metric, rows.y, oof, folds, decision)
    complexity = max(r.complexity for r in members) + 1
    return Scored(ENSEMBLE, complexity, scores, members[0].sign), oof


def _leaderboard(results: list[Scored], winner: Scored, how: dict[str, Any], metric: str,
                 folds: Folds, by_name: dict[str, tuple[Candidate, Route]]) -> list[dict]:
    within = set(how.get("within_one_se") or [])
    ranked = sorted(results, key=lambda r: (-r.rank_value, r.complexity, r.name))
    rows = []
    for rank, r in enumerate(ranked, start=1):
        route = ({"average_of": list(how.get("members") or [])} if r.name == ENSEMBLE
                 else describe_route(by_name[r.name][1]))
        rows.append({
            "rank": rank, "name": r.name, "chosen": r.name == winner.name,
            "complexity": r.complexity, "metric": metric,
            "mean": None if math.isnan(r.mean) else round(r.mean, 6),
            "se": None if math.isnan(r.se) else round(r.se, 6),
            "folds": len(r.valid), "within_one_se": r.name in within,
            "averaged": winner.name == ENSEMBLE and r.name in (how.get("members") or []),
            "epochs": r.epochs, "route": route,
            "fold_scores": [None if math.isnan(s) else round(s, 6) for s in r.scores]})
    return rows


def _write_leaderboard(run, board: list[dict], metric: str, how: dict[str, Any],
                       cfg: ExperimentConfig, folds: Folds) -> None:
    sel = cfg.select
    write_json(run.file("leaderboard.json"), {
        "metric": metric, "lower_is_better": metric in LOWER_IS_BETTER,
        "folds": folds.k, "repeats": folds.repeats, "seed": sel.seed, "rule": how,
        "folds_asked": sel.folds, "notes": folds.notes, "candidates": board})
    buf = io.StringIO()
    fields = ["rank", "name", "chosen", "averaged", "complexity", "metric", "mean", "se",
              "folds", "within_one_se", "epochs", "route"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in board:
        writer.writerow(row | {"epochs": "" if row["epochs"] is None else
                               "+".join(map(str, row["epochs"])),
                               "route": _route_words(row["route"])})
    write_text(run.file("leaderboard.csv"), buf.getvalue())
    bar_label = (f"{how['band']:g} standard errors below the best (averaged above)"
                 if how.get("rule") == "ensemble" else "one standard error of the best")
    plots.leaderboard(board, run.file("plots", "leaderboard.png"), metric, how.get("bar"),
                      bar_label,
                      f"{cfg.name}: {len(board)} routes, {folds.repeats}x{folds.k}-fold "
                      f"cross-validation on the labelled target rows")


def _route_words(route: dict[str, Any]) -> str:
    if "average_of" in route:
        return f"average of {len(route['average_of'])} candidates' predictions"
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


def _refit_ensemble(run, cfg: ExperimentConfig, names: list[str],
                    by_name: dict[str, tuple[Candidate, Route]], results: list[Scored],
                    oofs: dict[str, np.ndarray], rows: Labelled, folds: Folds,
                    store: PrefixStore, board: list[dict], notes: list[str],
                    how: dict[str, Any], refitted: dict[str, tuple[Any, Any]],
                    argv: list[str] | None) -> dict[str, Any]:
    """select.rule ensemble: every member refit on all labelled rows into its own complete run
    folder (members/NAME, usable alone); this run is their average (ensemble.json), with the
    decision rule chosen on the averaged out-of-fold predictions."""
    from tltool.decision import predictions_frame
    from tltool.metrics import format_any
    from tltool.runs import RunFolder

    scored = {r.name: r for r in results}
    probas, members_test = [], []
    first = by_name[names[0]][1]
    test_ids, y_test = first.inputs.data.test.ids, first.inputs.test.y.numpy()
    with progress.current().steps("select: refitting the ensemble's members",
                                  total=len(names)) as advance:
        for name in names:
            route = by_name[name][1]
            if not np.array_equal(np.asarray(route.inputs.data.test.ids), np.asarray(test_ids)):
                raise DataError(f"select.candidates ({name}): tests other target rows than "
                                f"{names[0]}; an ensemble averages predictions on the same rows")
            path = run.file("members", name)
            path.mkdir(parents=True)
            member = RunFolder(path, "select", {"member_of": "../.."})
            member.set_status("running")
            try:
                with progress.use(progress.Reporter()):
                    m, model, rt = _refit_and_score(member, cfg, route, scored[name],
                                                    oofs[name], rows, folds, store, board,
                                                    notes, how, member=True)
            except BaseException as exc:
                member.set_status("failed", error=f"{type(exc).__name__}: {exc}")
                raise
            member.set_status("complete")
            refitted[name] = (model, rt)
            probas.append(predict_proba(model, route.inputs.test, route.multilabel, rt=rt))
            members_test.append({"name": name, "run": f"members/{name}",
                                 **{k: m["test"].get(k) for k in _HEADLINE if k in m["test"]}})
            advance(1)
    oof = oofs[ENSEMBLE]
    decision = oof_decision(first, oof, rows.y)
    proba = np.mean(probas, axis=0)
    write_json(run.file("ensemble.json"), {"members": [f"members/{n}" for n in names],
                                           "weights": "equal"})
    write_json(run.file("thresholds.json"), decision)
    _write_oof(run, rows, first, oof)
    ens = scored_by_name(board, ENSEMBLE)
    cv = {"metric": board[0]["metric"], "mean": ens["mean"], "se": ens["se"],
          "folds": ens["folds"], "repeats": folds.repeats, "k": folds.k,
          "labelled_rows": int(len(rows.y)), "epochs": None}
    metrics = {
        "command": "select", "name": cfg.name, "seed": cfg.seed,
        "route": {"average_of": names}, "classes": first.classes,
        "multilabel": first.multilabel, "decision": decision,
        "data": first.inputs.data.summary(), "val": None,
        "test": report(y_test, proba, first.classes, decision),
        "members_test": members_test,
        "select": {"winner": ENSEMBLE, "rule": how, "cv": cv, "candidates": len(board),
                   "notes": notes + folds.notes, "leaderboard": "leaderboard.csv"}}
    write_json(run.file("metrics.json"), metrics)
    table = format_any(metrics["test"], first.classes, decision)
    write_text(run.file("report.txt"), f"average of {len(names)} routes refit on every "
                                       f"labelled row, test split\n{table}\n")
    write_text(run.file("test_predictions.csv"), predictions_frame(
        test_ids, proba, first.classes, decision, y_test).to_csv(index=False))
    plot_test_split(run, y_test, proba, metrics["test"], first.classes, decision,
               f"{first.label}: ensemble (test split)", first.regression, first.multilabel)
    return metrics


_HEADLINE = ("accuracy", "auroc", "f1", "map", "rmse", "mae", "r2")


def scored_by_name(board: list[dict], name: str) -> dict[str, Any]:
    return next(row for row in board if row["name"] == name)


def _refit_and_score(run, cfg: ExperimentConfig, route: Route, winner: Scored, oof: np.ndarray,
                     rows: Labelled, folds: Folds, store: PrefixStore, board: list[dict],
                     notes: list[str], how: dict[str, Any], member: bool = False):
    """The winner (or, `member`, one member of the ensemble) refit on every labelled row and
    written as a complete trained run into `run`. Returns metrics (and, for a member, the
    model and its runtime)."""
    inputs = route.inputs

    def make_save(model):
        def save(name: str, epoch: int, state=None) -> None:
            run.save_checkpoint(name, checkpoint_payload(model, inputs.state, route.classes,
                                                         route.label, route.multilabel,
                                                         "select", epoch))
        return save

    model, summary, rt, refit_route = refit(route, winner, rows.of(route), store, make_save,
                                            run.file("metrics.csv"))
    decision = oof_decision(route, oof, rows.y)
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
    if member:
        extra["select"] = {"member_of_ensemble": "../..", "cv": cv,
                           "leaderboard": "../../leaderboard.csv"}
    metrics = write_outputs(run, refit_route, model, summary, rt, None, inputs.test, decision,
                            extra)
    return (metrics, model, rt) if member else metrics


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
              metric: str, refitted: dict[str, tuple[Any, Any]],
              metrics: dict[str, Any]) -> None:
    """Every candidate refit on all labelled rows and scored on the test split, for research
    (how often the choice was the best on test). Never read by the choice, which is final."""
    from tltool.cv import score

    out = []
    scored = {r.name: r for r in results}
    arrays: dict[str, np.ndarray] = {"y_labelled": np.asarray(rows.y)}
    for cand, route in routes:
        r = scored[cand.name]
        if cand.name in refitted:  # an ensemble member: refit already, the same model
            model, rt = refitted[cand.name]
        else:
            model, _, rt, _ = refit(route, r, rows.of(route), store)
        proba = predict_proba(model, route.inputs.test, route.multilabel, rt=rt)
        arrays[f"oof/{cand.name}"] = oofs[cand.name]
        arrays[f"test/{cand.name}"] = np.asarray(proba)
        arrays["y_test"] = route.inputs.test.y.numpy()
        decision = oof_decision(route, oofs[cand.name], rows.y)
        y = route.inputs.test.y.numpy()
        test = report(y, proba, route.classes, decision)
        out.append({"name": cand.name, "chosen": cand.name == winner.name,
                    "cv_mean": r.mean, "test_" + metric: score(metric, y, proba,
                                                               Decision.of(decision).threshold),
                    "test": {k: test.get(k) for k in ("accuracy", "auroc", "f1", "map",
                                                      "rmse", "mae", "r2") if k in test}})
    if winner.name == ENSEMBLE:
        proba = np.mean([arrays[f"test/{n}"] for n in metrics["route"]["average_of"]], axis=0)
        y = arrays["y_test"]
        out.append({"name": ENSEMBLE, "chosen": True, "cv_mean": winner.mean,
                    "test_" + metric: score(metric, y, proba,
                                            Decision.of(metrics["decision"]).threshold),
                    "test": {k: metrics["test"].get(k) for k in _HEADLINE
                             if k in metrics["test"]}})
    sign = -1 if metric in LOWER_IS_BETTER else 1
    best = max(out, key=lambda o: sign * o["test_" + metric])
    write_json(run.file("research.json"), {
        "note": "research only: every candidate refit on all labelled rows and scored on the "
                "test split after the choice was made; the choice never reads this file",
        "metric": metric, "best_on_test": best["name"], "chosen": winner.name,
        "chosen_is_best_on_test": best["name"] == winner.name, "candidates": out,
        "predictions": "research_predictions.npz"})
    # every candidate's out-of-fold and test predictions, to study choice rules afterwards
    with run.file("research_predictions.npz").open("wb") as fh:
        np.savez_compressed(fh, **arrays)
