"""The commands that use trained run folders: evaluate, ensemble, predict, runs (list and diff)
and export.
"""

from __future__ import annotations

import sys

import typer

from tltool.cli.core import JSON_OPTION, QUIET_OPTION, Session, app, call, finish, reject


@app.command()
def evaluate(
    run: str = typer.Argument(..., help="A pretrain/freeze-finetune/ensemble run folder, or "
                              "ROOT/NAME/latest for the newest complete one."),
    on: str = typer.Option(None, "--on", help="Data section to test on: source or target "
                           "(default: what the run trained on).", metavar="[source|target]"),
    csv: str = typer.Option(None, "--csv", help="Evaluate on all rows of this labelled CSV."),
    recompute: bool = typer.Option(False, "--recompute", help="Run the backbone even where "
                                   "the run folder holds its features of the same rows."),
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Test-split metrics (accuracy, F1, AUROC, AP, Brier, confusion matrix) of a run.

    Example: tltool evaluate runs/credit-finetune/latest
    """
    from tltool.workflows.evaluate import evaluate as run_eval

    session = Session("evaluate", as_json, quiet)
    if csv is not None and on is not None:
        reject("--csv and --on: give one (--csv evaluates the rows of a labelled table; --on a "
               "data section of the run's config)", session)
    if on not in (None, "source", "target"):
        reject(f"--on: got {on!r}; allowed: source, target", session)
    result = call(lambda: run_eval(run, on, csv, sys.argv, recompute), session)
    finish(result, [result.table], session)


@app.command()
def ensemble(
    runs: list[str] = typer.Argument(..., help="Two or more pretrain/freeze-finetune runs of "
                                     "one task and data split (e.g. one config, several "
                                     "seeds); ROOT/NAME/latest works for each."),
    name: str = typer.Option(None, "--name", help="Experiment name of the ensemble run "
                             "(default: the first member's name + '-ensemble')."),
    rule: str = typer.Option("auto", "--rule", help="threshold (chosen on validation "
                             "rows; binary or multi-label), argmax, or auto (threshold where "
                             "it applies, else argmax).", metavar="[auto|threshold|argmax]"),
    optimize: str = typer.Option(None, "--optimize", help="What the threshold maximises: "
                                 "accuracy, f1 or youden (default: the members' "
                                 "decision.optimize).", metavar="[accuracy|f1|youden]"),
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Average the members' probabilities, choose the decision threshold on their validation
    rows (the design document's 'avg' rule) and score the test split once.

    Example: tltool ensemble runs/credit-finetune/2026*-freeze-finetune --name credit-avg
    """
    from tltool.workflows.ensemble import ensemble as run_ensemble

    session = Session("ensemble", as_json, quiet)
    for key, value, allowed in (("--rule", rule, ("auto", "threshold", "argmax")),
                                ("--optimize", optimize, ("accuracy", "f1", "youden"))):
        if value is not None and value not in allowed:
            reject(f"{key}: got {value!r}; allowed: {', '.join(allowed)}", session)
    result = call(lambda: run_ensemble(runs, name, rule, optimize, sys.argv), session)
    finish(result, [result.table], session)


@app.command()
def predict(
    run: str = typer.Argument(..., help="A trained run folder, or ROOT/NAME/latest."),
    input_csv: str = typer.Argument(..., help="Tables: a CSV of new rows with the training "
                                    "columns. Images: a folder of images, one image file, or a "
                                    "CSV of image paths (the run's image_column, else 'path')."),
    out: str = typer.Option(None, "--out", help="Also write the predictions to this CSV "
                            "(- : standard output, and the run folder goes to standard error)."),
    id_column: str = typer.Option(None, "--id-column", help="Input column that identifies "
                                  "rows (default: the config's id_column, else the row index; "
                                  "images: the path)."),
    force: bool = typer.Option(False, "--force", help="--out may be a symbolic link to a "
                               "regular file (written through the link)."),
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Probabilities and decisions for new rows, with the run's preprocessing and threshold.

    Example: tltool predict runs/credit-finetune/latest new_rows.csv --out preds.csv
    """
    from tltool.workflows.predict import predict as run_predict

    session = Session("predict", as_json, quiet)
    if out == "-" and as_json:
        reject("--out - and --json: both would use standard output; give --out a file with "
               "--json", session)
    result = call(lambda: run_predict(run, input_csv, out, id_column, sys.argv, force),
                   session)
    s = result.summary.prediction
    if "predicted" in s:  # regression: the predicted values' summary
        p = s["predicted"]
        what = f"mean {p['mean']:.4g}, min {p['min']:.4g}, max {p['max']:.4g}"
    else:
        what = str(s["predicted_counts"])
    lines = [f"{s['rows']} rows predicted: {what}" + (
        f"; written to {out}" if out and out != "-" else "")]
    if out == "-":  # the predictions are standard output; the run folder goes to stderr
        for line in lines + [str(result.run)]:
            typer.echo(line, err=True)
        session.close()
        typer.echo(result.csv, nl=False)
        return
    finish(result, lines, session)


@app.command("runs")
def runs_(
    args: list[str] = typer.Argument(None, metavar="[ROOT] | diff RUN RUN",
                                     help="The output root to list (default: runs), or `diff` "
                                     "and two run folders to compare."),
    name: str = typer.Option(None, "--name", help="Only runs of this experiment name."),
    command: str = typer.Option(None, "--command", help="Only runs of this command."),
    status: str = typer.Option(None, "--status", help="Only runs with this status.",
                               metavar="[complete|failed|running|stale]"),
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
    as_csv: bool = typer.Option(False, "--csv", help="Print the table as CSV."),
) -> None:
    """A table of runs (name, command, status, started, data, backbone, frozen blocks,
    strategy, headline test and validation metric), or what differs between two runs (config
    keys and metric changes).

    Example: tltool runs runs --command select; tltool runs diff RUN_A RUN_B
    """
    import json

    from tltool.runs.listing import diff_runs, format_diff, format_table, list_runs

    args = list(args or [])
    if status is not None and status not in ("complete", "failed", "running", "stale"):
        reject(f"--status: got {status!r}; allowed: complete, failed, running, stale",
               Session("runs", as_json, quiet))
    session = Session("runs", False, quiet)
    if args and args[0] == "diff":
        if len(args) != 3:
            reject("runs diff needs two run folders: tltool runs diff RUN_A RUN_B", session)
        d = call(lambda: diff_runs(args[1], args[2]), session)
        session.close()
        typer.echo(json.dumps(d, indent=1) if as_json else format_diff(d))
        return
    if len(args) > 1:
        reject(f"runs takes one output root, got {len(args)}", session)
    rows = call(lambda: list_runs(args[0] if args else "runs", name, command, status),
                 session)
    session.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    elif as_csv:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(buf.getvalue(), nl=False)
    else:
        typer.echo(format_table(rows) if rows else "no runs")



@app.command()
def export(
    run: str = typer.Argument(..., metavar="RUN", help="A pretrain / freeze-finetune / select "
                              "run folder, or NAME_FOLDER/latest."),
    fmt: str = typer.Option(..., "--format", metavar="onnx|torchscript",
                            help="onnx (checked with onnxruntime) or torchscript."),
    out: str = typer.Option(None, "--out", help="Folder to write (default RUN/export-FORMAT)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export folder."),
    as_json: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Export a trained model for serving: raw input tensor in (images: uint8 pixels, the
    normalisation inside; tables: the encoded matrix, preprocessing.json beside it),
    probabilities out (calibration inside); checked against tltool predict on 100 test rows.

    Example: tltool export runs/credit-finetune/latest --format onnx
    """
    session = Session("export", as_json, quiet)
    if fmt not in ("onnx", "torchscript"):
        reject(f"--format: got {fmt!r}; allowed: onnx, torchscript", session)
    from tltool.workflows.export import export as run_export
    from tltool.workflows.export import shown

    report = call(lambda: run_export(run, fmt, out, force), session)
    if as_json:
        session.emit({"status": "complete", "run": run, "export": report})
        return
    session.close()
    typer.echo(shown(report), err=True)
    typer.echo(report["folder"])
