"""select without target labels (pure domain adaptation, `select.target_labels: false`).

Every candidate is a pretrain route: the network learns the labelled source rows, with or
without an `adapt` method aligning it to the target's unlabelled rows. Without target labels
there is no cross-validation on the target; each model is scored by an estimate of its target
risk from the labelled source *validation* rows, re-weighted towards the target
(`select.criterion`: dev or iwcv, see tltool.criteria). The lowest estimate wins; the target's
test split is scored once, after the choice.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from tltool.checkpoint import BEST
from tltool.config import ExperimentConfig, candidate_raw, dump_config, validate_config
from tltool.decision import Decision
from tltool.engine.plan import Sink, TrainingData
from tltool.engine.predict import predict_logits, predict_proba
from tltool.errors import ConfigError, DataError
from tltool.inputs import Encoding, pool_of
from tltool.routes.route import InputCache, describe_route, prepare
from tltool.routes.training import backbone_features, build, check_built, train_route
from tltool.runs.files import write_json, write_text
from tltool.runs.folder import RunFolder, RunPlace, new_run, pinned_config
from tltool.runs.summary import Result
from tltool.runtime import make_runtime
from tltool.select.candidates import Facts
from tltool.select.criteria import ensv_scores, estimate
from tltool.task import CLASSIFICATION, Task
from tltool.workflows.outputs import Scoring, Trained, checkpoint_saver, write_outputs

log = logging.getLogger("tltool")

METHODS = ("none", "coral", "mmd", "dann")


def _candidates(cfg: ExperimentConfig) -> list[tuple[str, dict[str, Any], bool]]:
    if cfg.select.candidates is not None:
        return [(c.name, c.set, False) for c in cfg.select.candidates]
    plain = {"model.keep_head": False, "model.prior": "none", "train.source_weight": 0.0,
             "model.frozen_layers": 0, "model.strategy": "full", "train.rounds": []}
    return [("source-only" if m == "none" else f"adapt-{m}", {**plain, "adapt.method": m,
                                                             "adapt.unlabeled": "pool"}, True)
            for m in METHODS]


def _checked(cfg: ExperimentConfig, found: Facts) -> list[tuple[str, ExperimentConfig, bool]]:
    """The candidates' configs (all problems in one error)."""
    if cfg.source is None:
        raise ConfigError("select.target_labels: false chooses among models trained on the "
                          "source's labels; the config needs a `source` section")
    if found.task != CLASSIFICATION:
        raise ConfigError("select.target_labels: false is for single-label classification "
                          "(domain adaptation); this target is " + found.task)
    if not found.same_classes:
        raise ConfigError("select.target_labels: false trains on the source's labels and "
                          "predicts them on the target, so the target's classes must be the "
                          "source's (same values of the label)")
    names = [name for name, _, _ in _candidates(cfg)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"select.candidates: name(s) {', '.join(dup)} given twice; each "
                          f"candidate needs its own name")
    configs, problems = [], []
    for i, (name, changes, default) in enumerate(_candidates(cfg)):
        where = f"select.candidates.{i} ({name})"
        try:
            raw = candidate_raw(cfg, changes, where)
            configs.append((name, validate_config(raw, origin=where), default))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return configs


def _train_all(configs, cache: InputCache, notes: list[str]) -> tuple[list, dict, dict]:
    """Every candidate pretrained on the source and scored without a target label."""
    rows, kept, timing, probas = [], {}, {}, {}
    for name, ccfg, default in configs:
        start = time.perf_counter()
        try:
            route = prepare(ccfg, "pretrain", cache)
        except (ConfigError, DataError) as exc:
            if not default:
                raise
            notes.append(f"{name}: left out ({str(exc).splitlines()[0]})")
            continue
        model = build(route, ccfg.seed)
        check_built(route, model)
        rt = make_runtime(ccfg.train, route.spec.input == "image")
        report = train_route(route, model, TrainingData(route.inputs.train, route.inputs.val),
                             Sink(lambda *_: None), rt)
        risk, probas[name] = _risk(route, model, rt, cache, ccfg)
        timing[name] = round(time.perf_counter() - start, 3)
        rows.append({"name": name, **risk, "route": describe_route(route),
                     "best_epoch": report.best_epoch})
        kept[name] = (route, model, rt, report)
        log.info("select: %-14s dev %.4f, iwcv %.4f (source val loss %.4f, %.1f s)", name,
                 risk["dev"], risk["iwcv"], risk["source_val_loss"], timing[name])
    if not rows:
        raise ConfigError("select: no candidate applies; " + "; ".join(notes))
    for row, (_name, agree) in zip(rows, ensv_scores(probas).items(), strict=True):
        row["ensv"] = agree
    return rows, kept, timing


def _rank(run: RunFolder, rows: list[dict], crit: str) -> str:
    """Order the candidates by the criterion, write the leaderboard; returns the winner."""
    lower = crit != "ensv"  # ensv is an agreement: higher is better
    # ties: the earlier candidate (the default list starts with no adaptation at all)
    order = {r["name"]: i for i, r in enumerate(rows)}
    rows.sort(key=lambda r: (r[crit] if lower else -r[crit], order[r["name"]]))
    winner = rows[0]["name"]
    for rank, r in enumerate(rows, start=1):
        r["rank"], r["chosen"] = rank, r["name"] == winner
    write_json(run.file("leaderboard.json"), {
        "criterion": crit, "lower_is_better": lower, "target_labels": False,
        "note": "no target label was read: ensv scores agreement with the candidates' "
                "averaged predictions on unlabelled target rows; dev and iwcv estimate the "
                "target risk from source validation rows re-weighted towards the target",
        "candidates": rows})
    _write_csv(run, rows, crit)
    return winner


def select_unsupervised(cfg: ExperimentConfig, argv, cache: InputCache,
                        found: Facts) -> Result:
    """select.target_labels false: see the module docstring."""
    configs = _checked(cfg, found)
    crit = cfg.select.criterion
    notes: list[str] = []
    with new_run(RunPlace(cfg.output.root, cfg.name), "select", argv, cfg.seed, cfg) as run:
        write_text(run.file("select_config.yaml"), dump_config(cfg))
        rows, kept, timing = _train_all(configs, cache, notes)
        winner = _rank(run, rows, crit)
        # ---- the choice is made; the test split may be read now
        route, model, rt, report = kept[winner]
        checkpoint_saver(run, route, model, "select")(BEST, report.best_epoch)
        write_text(run.file("config.yaml"), dump_config(pinned_config(route.cfg,
                                                                      route.weights.path)))
        target = _target_inputs(cache, route)
        summary = write_outputs(run, route, Trained(model, report, rt), Scoring(
            route.inputs.val, target.test,
            extra={"select": {"winner": winner, "criterion": crit, "target_labels": False,
                              "notes": notes}, "evaluated_on": "target test split"}))
        if cfg.select.research:
            _research(run, kept, winner, cache, crit)
        write_json(run.file("timing.json"), {"candidates": timing})
    board = [{"rank": r["rank"], "name": r["name"], "chosen": r["chosen"], "metric": crit,
              "mean": r[crit], "se": None, "within_one_se": False, "complexity": 0}
             for r in rows]
    return Result(run.path, summary, unsupervised=True, leaderboard=board)


def _target_inputs(cache: InputCache, route):
    """The target section encoded like the route's model (its unlabelled pool included)."""
    cfg = route.cfg
    other = cfg.target
    if route.inputs.state.get("kind") == "image":
        other = other.model_copy(update={"image_size": route.inputs.state["size"]})
    return cache.load(other, "target", route.spec, route.weights,
                      Encoding(like=route.inputs.state))


@torch.no_grad()
def _risk(route, model, rt, cache: InputCache,
          cfg: ExperimentConfig) -> tuple[dict[str, Any], Any]:
    """The candidate's estimated target risk from source validation rows, and its predicted
    probabilities of the unlabelled target rows (no target label is read)."""
    target = _target_inputs(cache, route)
    rows = pool_of(target)  # the target's training-split rows, labels unused
    feats = {"source_train": backbone_features(model, route.inputs.train, rt).numpy(),
             "source_val": backbone_features(model, route.inputs.val, rt).numpy(),
             "target": backbone_features(model, rows, rt).numpy()}
    logits = predict_logits(model, route.inputs.val, rt=rt)
    y = route.inputs.val.y
    losses = torch.nn.functional.cross_entropy(logits, y, reduction="none").double().numpy()
    out = estimate(losses, feats, cfg.select.seed)
    proba = Task.of(model).proba(logits).numpy()
    out["source_val_accuracy"] = float((proba.argmax(1) == y.numpy()).mean())
    target_proba = predict_proba(model, rows, rt=rt)
    return ({k: (None if isinstance(v, float) and math.isnan(v) else v)
             for k, v in out.items()}, target_proba)


def _write_csv(run, rows: list[dict], crit: str) -> None:
    import csv
    import io

    buf = io.StringIO()
    others = [c for c in ("ensv", "dev", "iwcv") if c != crit]
    fields = ["rank", "name", "chosen", crit, *others, "source_val_loss",
              "source_val_accuracy", "effective_rows", "best_epoch"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    write_text(run.file("leaderboard.csv"), buf.getvalue())


def _research(run, kept: dict, winner: str, cache: InputCache, crit: str) -> None:
    out = []
    for name, (route, model, rt, _) in kept.items():
        target = _target_inputs(cache, route)
        proba = predict_proba(model, target.test, rt=rt)
        y = target.test.y.numpy()
        rep = Decision.argmax(route.classes).report(y, proba)
        out.append({"name": name, "chosen": name == winner,
                    "test": {k: rep[k] for k in ("accuracy", "auroc", "f1")}})
    key = "auroc" if len(next(iter(kept.values()))[0].classes) == 2 else "accuracy"
    best = max(out, key=lambda o: (o["test"][key], o["test"]["auroc"] or 0))
    write_json(run.file("research.json"), {
        "note": "research only: every candidate scored on the target test split after the "
                "choice was made; the choice never reads this file",
        "best_on_test": best["name"], "chosen": winner,
        "chosen_is_best_on_test": best["name"] == winner, "by": key, "candidates": out,
        "criterion": crit})

