"""What every `tltool` command shares: the Typer app and its common options, the Session (output
mode, progress display, collected warnings), the error and exit-code handling (`call`) and the
printing of a finished command's result. No ML here.

Heavy modules (torch, pandas, sklearn) are imported inside the commands, so `--help` is fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer

EXIT_CODES = ("Exit codes: 0 done; 1 an internal error, or no space left on the disk; 2 bad "
              "input (config, data, run folder, arguments: one 'error:' line says what); 130 "
              "stopped by Ctrl-C; 143 stopped by SIGTERM; 129 stopped by SIGHUP. A run folder "
              "a failed command had started is marked failed.")

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


def call(fn: Callable[[], Any], session: Session | None = None) -> Any:
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
        # Ctrl-C, or tltool.cli's Terminated (SIGTERM, SIGHUP), which names its signal
        name = getattr(exc, "signal_name", "Ctrl-C")
        raise fail(getattr(exc, "exit_code", 130),
                   f"tltool: stopped by {name}; a run folder it had started is marked "
                   f"failed") from None
    except TLError as exc:
        raise fail(exc.exit_code, f"error: {exc}") from None
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        raise fail(2, f"error: {where}{exc.strerror or exc}") from None


def reject(message: str, session: Session | None = None) -> NoReturn:
    """Stop the command on a bad argument: one 'error:' line and exit code 2, as a workflow's
    user error would (with --json, also the JSON object)."""
    from tltool.errors import TLError

    call(lambda: _raise(TLError(message)), session)


def _raise(exc: Exception) -> Any:
    raise exc


def load(config: str, overrides: list[str] | None):
    """The experiment config of a command: CONFIG with its --set overrides, validated."""
    from tltool.config import load_config

    return load_config(config, overrides or [])


def finish(result, lines: list[str], session: Session | None = None) -> None:
    """A finished command's answer: its summary lines on stderr, then the run folder on stdout
    (or, with --json, one JSON object with the headline metrics; nothing on ranks other than 0
    under torchrun). `result`: what the command returned (tltool.runs.summary.Result)."""
    from tltool import distributed

    distributed.finish()  # every rank done (torchrun), before rank 0 answers
    if session is not None and session.silent:
        session.close()
        return
    for line in lines:
        typer.echo(line, err=True)
    if session is not None and session.as_json:
        session.emit({"status": "complete", "run": str(result.run),
                      "metrics": _headline(result.summary)})
        return
    if session is not None:
        session.close()
    typer.echo(str(result.run))


def _headline(summary) -> dict[str, Any]:
    """The numbers a CI job checks: each split's headline metrics (and select's choice)."""
    keep = ("n", "accuracy", "f1", "auroc", "average_precision", "brier", "map", "macro_f1",
            "exact_match", "rmse", "mae", "r2")
    out: dict[str, Any] = {}
    for split, report in (("val", summary.val), ("test", summary.test)):
        if isinstance(report, dict):
            out[split] = {k: report[k] for k in keep if k in report}
    if summary.heads is not None:
        out["heads"] = {h: {k: r["test"].get(k) for k in keep if k in r["test"]}
                        for h, r in summary.heads.items()}
    if summary.choice is not None:
        out["select"] = {k: summary.choice.get(k) for k in ("winner", "cv")}
    if summary.prediction is not None:
        out["predict"] = {k: summary.prediction.get(k) for k in
                          ("rows", "predicted_counts", "predicted")}
    return out


def score_lines(val: dict[str, Any] | None, test: dict[str, Any] | None) -> list[str]:
    """One line per split (val, test) with its headline metrics, as training commands print."""
    out = []
    for split, m in (("val", val), ("test", test)):
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
