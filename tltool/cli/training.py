"""The training commands: pretrain, freeze-finetune, extract, select and resume. Each reads its
config (errors answer before torch loads), calls its workflow and prints the scores.
"""

from __future__ import annotations

import sys

import typer

from tltool.cli.core import (
    JSON_OPTION,
    QUIET_OPTION,
    SET_OPTION,
    Session,
    app,
    call,
    finish,
    load,
    score_lines,
)


@app.command()
def pretrain(
    config: str = typer.Argument(
        ..., metavar="CONFIG", help="YAML experiment config with a `source` section."),
    set_: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Train a source model (backbone + head) on the source data.

    Example: tltool pretrain configs/credit/pretrain.yaml --set train.epochs=50
    """
    session = Session("pretrain", as_json, quiet)
    cfg = call(lambda: load(config, set_), session)  # config errors answer before torch loads
    from tltool.workflows.train import pretrain as run

    result = call(lambda: run(cfg, sys.argv), session)
    finish(result, score_lines(result.summary.val, result.summary.test), session)


@app.command("freeze-finetune")
def freeze_finetune(
    config: str = typer.Argument(
        ..., metavar="CONFIG", help="YAML config with a `target` section and "
                                 "model.weights naming the source run."),
    set_: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Transfer a source model: freeze its first N blocks, fine-tune the rest on the target.

    Example: tltool freeze-finetune configs/credit/finetune.yaml --set model.frozen_layers=1
    """
    session = Session("freeze-finetune", as_json, quiet)
    cfg = call(lambda: load(config, set_), session)  # config errors answer before torch loads
    from tltool.workflows.train import freeze_finetune as run

    result = call(lambda: run(cfg, sys.argv), session)
    finish(result, score_lines(result.summary.val, result.summary.test), session)


@app.command()
def extract(
    config: str = typer.Argument(
        ..., metavar="CONFIG", help="YAML config; model.weights names the trained run."),
    set_: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Write frozen-backbone features to disk and fit sklearn heads on them.

    Example: tltool extract configs/credit/extract.yaml
    """
    session = Session("extract", as_json, quiet)
    cfg = call(lambda: load(config, set_), session)  # config errors answer before torch loads
    from tltool.workflows.extract import extract as run

    result = call(lambda: run(cfg, sys.argv), session)
    lines = [f"{kind:<20} " + " ".join(score_lines(r.get("val"), r.get("test"))[-1:])
             for kind, r in result.summary.heads.items()]
    finish(result, lines, session)


@app.command("select")
def select_(
    config: str = typer.Argument(
        ..., metavar="CONFIG", help="YAML config with a `target` section (and a `source` "
                                 "section or model.weights for transfer routes); "
                                 "select.candidates lists routes (default: a grid)."),
    set_: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Choose how to build the target model: score candidate routes (transfer, pooled, prior,
    fine-tunes, reference models) by repeated k-fold cross-validation on the target's labelled
    rows, average every route within 3 standard errors of the best (select.rule ensemble;
    one_se: the simplest single route within one), refit them on all of those rows and score
    the result on the test split once. The run folder holds the leaderboard and the chosen model
    (evaluate / predict / ensemble take it).

    Example: tltool select configs/credit/select.yaml --set target.n_train=50
    """
    session = Session("select", as_json, quiet)
    cfg = call(lambda: load(config, set_), session)  # config errors answer before torch loads
    from tltool.select.workflow import select as run

    result = call(lambda: run(cfg, sys.argv), session)
    unsupervised = result.unsupervised
    lines = [f"{'':2}{'rank':>4}  {'candidate':<22} "
             f"{(row['metric'] if unsupervised else 'cv ' + row['metric']):>14}  "
             f"{'± se':>7}  complexity" for row in result.leaderboard[:1]]
    for row in result.leaderboard:
        mean = "n/a" if row["mean"] is None else f"{row['mean']:.4f}"
        se = "" if row["se"] is None else f"{row['se']:.4f}"
        mark = "->" if row["chosen"] else (" +" if row.get("averaged") else
                                           " ~" if row["within_one_se"] else "  ")
        lines.append(f"{mark}{row['rank']:>4}  {row['name']:<22} {mean:>14}  {se:>7}  "
                     f"{row['complexity']}")
    finish(result, lines + score_lines(result.summary.val, result.summary.test), session)


@app.command()
def resume(
    run: str = typer.Argument(..., help="An interrupted pretrain / freeze-finetune run folder "
                              "(failed, stopped, or stale: its process was killed)."),
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Continue an interrupted training from its last finished epoch, into a new run folder
    that names its parent (run.json resumed_from); the result is the one an uninterrupted run
    gives (byte for byte on the CPU).

    Example: tltool resume runs/credit-pretrain/20261201-101500-pretrain
    """
    from tltool.workflows.resume import resume as run_resume

    session = Session("resume", as_json, quiet)
    result = call(lambda: run_resume(run, sys.argv), session)
    finish(result, score_lines(result.summary.val, result.summary.test), session)
