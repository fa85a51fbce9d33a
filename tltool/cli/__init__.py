"""The `tltool` command line: the Typer app with every command registered, and `main`.

The commands live by family in training, using (trained run folders) and information; what they
share (options, Session, error handling, printing) in core.
"""

from __future__ import annotations

import logging
import sys

from tltool.cli import information, training, using
from tltool.cli.core import app

__all__ = ["app", "main"]

# `tltool --help` lists the commands in this order (a session's order of work, then reference),
# not in the order their modules register them.
ORDER = (training.pretrain, training.freeze_finetune, training.extract, training.select_,
         training.resume, using.evaluate, using.ensemble, using.predict, using.runs_,
         information.show_config, information.init, information.datasets, using.export,
         information.backbones)
app.registered_commands.sort(key=lambda command: ORDER.index(command.callback))

class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, docker stop) or SIGHUP (the terminal or SSH session closed):
    stop like Ctrl-C, so the run is marked failed; exit 128 + the signal's number."""

    def __init__(self, signum: int):
        import signal

        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {self.signal_name}")


def _on_signal(signum, frame) -> None:
    raise Terminated(signum)


def main() -> None:
    """The `tltool` program: log lines on stderr, SIGTERM and SIGHUP stop like Ctrl-C, run the
    command."""
    import signal

    logging.basicConfig(level=logging.INFO, format="tltool: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _on_signal)
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    # `nohup tltool ...` ignores SIGHUP so the run outlives the session: left ignored
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        signal.signal(hangup, _on_signal)
    app()
