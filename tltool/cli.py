"""The `tltool` command line. Parses arguments, calls a workflow, prints. No ML here.

Heavy modules (torch, pandas, sklearn) are imported inside the commands, so `--help` is fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

EXIT_CODES = ("Exit codes: 0 done; 1 an internal error, or no space left on the disk; 2 bad "
              "input (config, data, run folder, arguments: one 'error:' line says what); 130 "
              "stopped by Ctrl-C; 143 stopped by SIGTERM. A run folder a failed command had "
              "started is marked failed.")

app = typer.Typer(
    name="tltool",
    help="Transfer learning from the command line: pretrain a source model, freeze and "
    "fine-tune it on a target task, extract features, evaluate, predict.\n\n"
    "Example (credit-default transfer on the built-in credit_data):\n\n"
    "  tltool pretrain configs/credit/pretrain.yaml\n\n"
    "  tltool freeze-finetune configs/credit/finetune.yaml\n\n"
    "  tltool evaluate runs/credit-finetune/latest\n\n"
    "  tltool predict runs/credit-finetune/latest configs/credit/new_applicants.csv "
    "--id-column applicant_id --out preds.csv\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SET_HELP = "Override a config key, typed as YAML: --set train.lr=0.0005 (repeatable)."
SET_OPTION = typer.Option(None, "--set", help=SET_HELP, metavar="KEY=VALUE")
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on standard output "
                           "(run folder, status, headline metrics, warnings; on failure the "
                           "error and exit code) instead of the run folder's path.")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No progress display and no "
                            "information lines on stderr; warnings and errors still show.")
log = logging.getLogger("tltool")


def _version(value: bool) -> None:
    if value:
        from tltool import __version__

        typer.echo(f"tltool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Transfer learning from the command line."""


class Session:
    """One command's output mode and the warnings it logged (for --json)."""

    def __init__(self, command: str, as_json: bool, quiet: bool = False):
        from tltool import distributed, progress

        self.command, self.as_json = command, as_json
        self.joined = False
        # under torchrun, ranks other than 0 train silently; rank 0 reports and prints
        self.silent = distributed.launched() and os.environ.get("RANK", "0") != "0"
        quiet = quiet or self.silent
        self.warnings: list[str] = []
        self._handler = _Collect(self.warnings)
        log.addHandler(self._handler)
        self._level = log.level
        if quiet:
            log.setLevel(logging.WARNING)
        # Progress goes to stderr: a Rich display on a terminal, plain lines otherwise.
        self._progress = progress.use(progress.for_stream(sys.stderr, quiet))
        self._progress.__enter__()
        self._open = True

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        log.removeHandler(self._handler)
        log.setLevel(self._level)
        self._progress.__exit__(None, None, None)

    def emit(self, payload: dict[str, Any]) -> None:
        import json

        self.close()
        typer.echo(json.dumps({"command": self.command, **payload,
                               "warnings": self.warnings}, default=str))


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


def _call(fn: Callable[[], Any], session: Session | None = None) -> Any:
    """Run a workflow; a user error becomes one line on stderr and exit code 2 (with --json,
    also a JSON object on stdout)."""
    from tltool.errors import TLError

    def fail(code: int, message: str) -> typer.Exit:
        if session is not None:
            session.close()  # takes any progress display down before the error line
        typer.echo(message, err=True)
        if session is not None and session.as_json:
            session.emit({"status": "error", "exit_code": code, "error": message})
        return typer.Exit(code=code)

    try:
        if session is not None and not session.joined:
            from tltool import distributed

            session.joined = True
            if distributed.launched():  # under torchrun: join the process group first
                distributed.init(session.command)
        return fn()
    except KeyboardInterrupt as exc:
        terminated = type(exc).__name__ == "Terminated"
        raise fail(143 if terminated else 130,
                   f"tltool: stopped by {'SIGTERM' if terminated else 'Ctrl-C'}; a run folder "
                   f"it had started is marked failed") from None
    except TLError as exc:
        raise fail(exc.exit_code, f"error: {exc}") from None
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        raise fail(2, f"error: {where}{exc.strerror or exc}") from None


def _raise(exc: Exception) -> Any:
    raise exc


def _load(config: str, overrides: list[str] | None):
    from tltool.config import load_config

    return load_config(config, overrides or [])


def _finish(result: dict[str, Any], lines: list[str], session: Session | None = None) -> None:
    from tltool import distributed

    distributed.finish()  # every rank done (torchrun), before rank 0 answers
    if session is not None and session.silent:
        session.close()
        return
    for line in lines:
        typer.echo(line, err=True)
    if session is not None and session.as_json:
        session.emit({"status": "complete", "run": result["run"],
                      "metrics": _headline(result)})
        return
    if session is not None:
        session.close()
    typer.echo(result["run"])


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers a CI job checks: each split's headline metrics (and select's choice)."""
    metrics = result.get("metrics") or {}
    keep = ("n", "accuracy", "f1", "auroc", "average_precision", "brier", "map", "macro_f1",
            "exact_match", "rmse", "mae", "r2")
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        if isinstance(metrics.get(split), dict):
            out[split] = {k: metrics[split][k] for k in keep if k in metrics[split]}
    if "heads" in metrics:
        out["heads"] = {h: {k: r["test"].get(k) for k in keep if k in r["test"]}
                        for h, r in metrics["heads"].items()}
    if "select" in metrics:
        out["select"] = {k: metrics["select"].get(k) for k in ("winner", "cv")}
    if "summary" in result:
        out["predict"] = {k: result["summary"].get(k) for k in
                          ("rows", "predicted_counts", "predicted")}
    return out


def _score_lines(metrics: dict[str, Any]) -> list[str]:
    out = []
    for split in ("val", "test"):
        m = metrics.get(split)
        if m and "rmse" in m:
            r2 = "n/a" if m["r2"] is None else f"{m['r2']:.4f}"
            out.append(f"{split:<5} rmse {m['rmse']:.4g}  mae {m['mae']:.4g}  r2 {r2}  "
                       f"(n={m['n']})")
        elif m:
            auroc = "n/a" if m.get("auroc") is None else f"{m['auroc']:.4f}"
            if "map" in m:
                out.append(f"{split:<5} mAP {m['map']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                           f"exact match {m['exact_match']:.4f}  (n={m['n']})")
            else:
                out.append(f"{split:<5} accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  "
                           f"auroc {auroc}  (n={m['n']})")
    return out


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
    cfg = _call(lambda: _load(config, set_), session)  # config errors answer before torch loads
    from tltool.workflows.train import pretrain as run

    result = _call(lambda: run(cfg, sys.argv), session)
    _finish(result, _score_lines(result["metrics"]), session)


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
    cfg = _call(lambda: _load(config, set_), session)  # config errors answer before torch loads
    from tltool.workflows.train import freeze_finetune as run

    result = _call(lambda: run(cfg, sys.argv), session)
    _finish(result, _score_lines(result["metrics"]), session)


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
    cfg = _call(lambda: _load(config, set_), session)  # config errors answer before torch loads
    from tltool.workflows.extract import extract as run

    result = _call(lambda: run(cfg, sys.argv), session)
    lines = [f"{kind:<20} " + " ".join(_score_lines(r)[-1:])
             for kind, r in result["metrics"]["heads"].items()]
    _finish(result, lines, session)


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
    cfg = _call(lambda: _load(config, set_), session)  # config errors answer before torch loads
    from tltool.workflows.select import select as run

    result = _call(lambda: run(cfg, sys.argv), session)
    unsupervised = bool(result.get("unsupervised"))
    lines = [f"{'':2}{'rank':>4}  {'candidate':<22} "
             f"{(row['metric'] if unsupervised else 'cv ' + row['metric']):>14}  "
             f"{'± se':>7}  complexity" for row in result["leaderboard"][:1]]
    for row in result["leaderboard"]:
        mean = "n/a" if row["mean"] is None else f"{row['mean']:.4f}"
        se = "" if row["se"] is None else f"{row['se']:.4f}"
        mark = "->" if row["chosen"] else (" +" if row.get("averaged") else
                                           " ~" if row["within_one_se"] else "  ")
        lines.append(f"{mark}{row['rank']:>4}  {row['name']:<22} {mean:>14}  {se:>7}  "
                     f"{row['complexity']}")
    _finish(result, lines + _score_lines(result["metrics"]), session)


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
    result = _call(lambda: run_resume(run, sys.argv), session)
    _finish(result, _score_lines(result["metrics"]), session)


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
    from tltool.errors import TLError
    from tltool.workflows.infer import evaluate as run_eval

    session = Session("evaluate", as_json, quiet)
    if csv is not None and on is not None:
        _call(lambda: _raise(TLError("--csv and --on: give one (--csv evaluates the rows of a "
                                     "labelled table; --on a data section of the run's config)")),
              session)
    if on not in (None, "source", "target"):
        _call(lambda: _raise(TLError(f"--on: got {on!r}; allowed: source, target")), session)
    result = _call(lambda: run_eval(run, on, csv, sys.argv, recompute), session)
    _finish(result, [result["table"]], session)


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
    from tltool.errors import TLError
    from tltool.workflows.ensemble import ensemble as run_ensemble

    session = Session("ensemble", as_json, quiet)
    for key, value, allowed in (("--rule", rule, ("auto", "threshold", "argmax")),
                                ("--optimize", optimize, ("accuracy", "f1", "youden"))):
        if value is not None and value not in allowed:
            message = f"{key}: got {value!r}; allowed: {', '.join(allowed)}"
            _call(lambda m=message: _raise(TLError(m)), session)
    result = _call(lambda: run_ensemble(runs, name, rule, optimize, sys.argv), session)
    _finish(result, [result["table"]], session)


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
    from tltool.workflows.infer import predict as run_predict

    session = Session("predict", as_json, quiet)
    if out == "-" and as_json:
        from tltool.errors import TLError

        _call(lambda: _raise(TLError("--out - and --json: both would use standard output; "
                                     "give --out a file with --json")), session)
    result = _call(lambda: run_predict(run, input_csv, out, id_column, sys.argv, force),
                   session)
    s = result["summary"]
    if "predicted" in s:  # regression: the predicted values' summary
        p = s["predicted"]
        what = f"mean {p['mean']:.4g}, min {p['min']:.4g}, max {p['max']:.4g}"
    else:
        what = str(s["predicted_counts"])
    lines = [f"{s['rows']} rows predicted: {what}" + (
        f"; written to {out}" if out and out != "-" else "")]
    if out == "-":  # the predictions are standard output; the run folder goes to stderr
        for line in lines + [result["run"]]:
            typer.echo(line, err=True)
        session.close()
        typer.echo(result["csv"], nl=False)
        return
    _finish(result, lines, session)


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

    from tltool.workflows.listing import diff_runs, format_diff, format_table, list_runs

    args = list(args or [])
    if status is not None and status not in ("complete", "failed", "running", "stale"):
        from tltool.errors import TLError as _E

        _call(lambda: _raise(_E(f"--status: got {status!r}; allowed: complete, failed, "
                                f"running, stale")), Session("runs", as_json, quiet))
    session = Session("runs", False, quiet)
    if args and args[0] == "diff":
        if len(args) != 3:
            _call(lambda: _raise(_usage("runs diff needs two run folders: tltool runs diff "
                                        "RUN_A RUN_B")), session)
        d = _call(lambda: diff_runs(args[1], args[2]), session)
        session.close()
        typer.echo(json.dumps(d, indent=1) if as_json else format_diff(d))
        return
    if len(args) > 1:
        _call(lambda: _raise(_usage(f"runs takes one output root, got {len(args)}")), session)
    rows = _call(lambda: list_runs(args[0] if args else "runs", name, command, status),
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


def _usage(message: str) -> Exception:
    from tltool.errors import TLError

    return TLError(message)


@app.command("config")
def show_config(
    config: str = typer.Argument(None, help="YAML config to resolve."),
    set_: list[str] = SET_OPTION,
    reference: bool = typer.Option(False, "--reference", help="Print every key with its "
                                   "default and meaning (Markdown)."),
    schema: bool = typer.Option(False, "--schema", help="Print the config's JSON Schema (for "
                                "editors: completion and checking of keys)."),
) -> None:
    """Print the fully resolved config (extends + --set + defaults) without running anything.

    Example: tltool config configs/credit/finetune.yaml --set model.frozen_layers=2
    """
    from tltool.config import dump_config, json_schema, schema_reference

    if reference:
        typer.echo(schema_reference())
        return
    if schema:
        import json

        typer.echo(json.dumps(json_schema(), indent=1))
        return
    if config is None:
        typer.echo("error: give a CONFIG file, or --reference / --schema", err=True)
        raise typer.Exit(2)
    typer.echo(dump_config(_call(lambda: _load(config, set_))), nl=False)


TEMPLATES = ("credit", "images", "multilabel", "adapt")


@app.command()
def init(
    template: str = typer.Argument(..., metavar="credit|images|multilabel|adapt",
                                   help="Which starter config."),
    out: str = typer.Option(None, "--out", help="File to write (default TEMPLATE.yaml; - for "
                            "standard output). An existing file is never replaced."),
) -> None:
    """Write a commented starter config that runs as written on a built-in data set.

    Example: tltool init credit && tltool pretrain credit.yaml
    """
    from importlib.resources import files

    if template not in TEMPLATES:
        typer.echo(f"error: unknown template {template!r}; allowed: {', '.join(TEMPLATES)}",
                   err=True)
        raise typer.Exit(2)
    text = files("tltool").joinpath("templates", f"{template}.yaml").read_text()
    if out == "-":
        typer.echo(text, nl=False)
        return
    from pathlib import Path

    path = Path(out or f"{template}.yaml")
    try:
        with open(path, "x") as fh:  # exclusive: never replaces a file
            fh.write(text)
    except FileExistsError:
        typer.echo(f"error: {path}: exists; choose another --out (nothing was replaced)",
                   err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"error: {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(path))


@app.command()
def datasets() -> None:
    """List the built-in data sets (tables and images) with their options.

    Example: tltool datasets
    """
    from tltool.datasets import TABLES
    from tltool.datasets.images import describe

    typer.echo("tables (kind: builtin, name: NAME):")
    for t in TABLES.values():
        typer.echo(f"  {t.name:<15} {t.rows:>6} rows  label={t.label} (positive: {t.positive})"
                   f"  {t.description}")
    typer.echo("images (kind: builtin, name: NAME, options: {...}):")
    for d in describe():
        kind = "multi-label" if d["multilabel"] else "single-label"
        typer.echo(f"  {d['name']:<15} {d['rows']}; {d['image']}; {kind}; classes: "
                   f"{d['classes']}\n  {'':<15} {d['description']}")
        for key, text in d["options"].items():
            typer.echo(f"  {'':<15} option {key}: {text}")


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
        from tltool.errors import TLError

        _call(lambda: _raise(TLError(f"--format: got {fmt!r}; allowed: onnx, torchscript")),
              session)
    from tltool.workflows.export import export as run_export
    from tltool.workflows.export import shown

    report = _call(lambda: run_export(run, fmt, out, force), session)
    if as_json:
        session.emit({"status": "complete", "run": run, "export": report})
        return
    session.close()
    typer.echo(shown(report), err=True)
    typer.echo(report["folder"])


@app.command()
def backbones(
    inputs: int = typer.Option(20, min=1, help="Input width used to count tabular parameters."),
    name: str = typer.Option(None, "--name", help="Show only this backbone."),
) -> None:
    """List backbones with their ordered freezable blocks (the unit of frozen_layers),
    parameter counts, input size and pretrained weight names.

    Example: tltool backbones --name resnet18
    """
    from tltool import catalog

    known = catalog.load()  # static data: no torch import, answers in well under a second
    if name is not None and name.startswith("timm:"):
        _timm_backbone(name)
        return
    if name is not None and name not in known:
        from tltool.suggest import did_you_mean

        hint = did_you_mean(name, known, suffix=" ")
        typer.echo(f"error: --name: unknown backbone {name!r}; {hint}available: "
                   f"{', '.join(known)}", err=True)
        raise typer.Exit(2)
    for key, spec in known.items():
        if name is not None and key != name:
            continue
        tabular = spec["input"] == "tabular"
        blocks = [(b["name"], catalog.params(b, inputs)) for b in spec["blocks"]]
        total = sum(n for _, n in blocks)
        feats = catalog.params(spec["out_features"], inputs)
        extra = (f"{inputs} inputs" if tabular else
                 f"{spec['default_size']} px; weights: {', '.join(spec['weights']) or 'none'}")
        typer.echo(f"{key} ({spec['input']}; {extra}; {total:,} parameters, "
                   f"{feats} features): {spec['description']}")
        for i, (block, n) in enumerate(blocks):
            typer.echo(f"  {i + 1:>2}. {block:<12} {n:>12,} parameters")
    if name is None:
        typer.echo("timm:NAME (image; any model of the timm package, pip install timm): blocks "
                   "at its feature stages, its pretrained input size and normalisation; "
                   "weights: timm or a state-dict file. tltool backbones --name timm:NAME "
                   "shows its blocks")


def _timm_backbone(name: str) -> None:
    """`tltool backbones --name timm:NAME`: builds the model to list its blocks."""
    from tltool.errors import ConfigError
    from tltool.models.backbones import build_backbone, get_spec

    try:
        spec = get_spec(name)
        net = build_backbone(name, {}, 3)
    except ConfigError as exc:
        typer.echo(f"error: --name: {exc}", err=True)
        raise typer.Exit(2) from None
    total = sum(p.numel() for p in net.parameters())
    typer.echo(f"{name} (image; {spec.default_size} px; weights: timm; {total:,} parameters, "
               f"{net.out_features} features): {spec.description}")
    for i, (block, module) in enumerate(zip(net.block_names, net.blocks, strict=True)):
        n = sum(p.numel() for p in module.parameters())
        typer.echo(f"  {i + 1:>2}. {block:<12} {n:>12,} parameters")


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, docker stop): stop like Ctrl-C, so the run is marked failed."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated("stopped by SIGTERM")


def main() -> None:
    import signal

    logging.basicConfig(level=logging.INFO, format="tltool: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":
    main()
