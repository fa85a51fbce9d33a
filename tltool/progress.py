"""Progress of long steps: the engine and the workflows report, only the CLI shows.

Code that runs a long step calls `current()` and reports to it:

    with current().steps("extract: train", total=len(rows)) as advance:
        for batch in ...:
            advance(len(batch))

and the training loop calls `current().epoch(...)` once per epoch. The default reporter shows
nothing (library use, tests); the CLI installs one per command with `use()`: a Rich display
when stderr is a terminal, one plain line per epoch (and a line at most every 10 s for other
steps) when it is not, nothing under `--quiet`. Reports go to stderr, never stdout, so
`--json` and `--out -` stay clean.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Epoch:
    """One finished epoch, as the training loop reports it."""

    round: int
    rounds: int
    epoch: int               # counted over all rounds
    planned: int             # epochs planned over all rounds (early stopping may end sooner)
    seconds: float           # this epoch's wall time, validation included
    metrics: dict[str, Any] = field(default_factory=dict)  # train_loss, val_loss, val_auroc...
    what: str = "train"


class Reporter:
    """Shows nothing. The interface every reporter has."""

    def epoch(self, e: Epoch) -> None:
        pass

    @contextlib.contextmanager
    def steps(self, what: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    def training_done(self) -> None:
        """The training loop ended (early stopping may end it before the planned epochs)."""

    def close(self) -> None:
        """Take down anything still on screen."""


_current: Reporter = Reporter()


def current() -> Reporter:
    return _current


@contextlib.contextmanager
def use(reporter: Reporter) -> Iterator[Reporter]:
    """Install `reporter` for the duration of a command."""
    global _current
    before, _current = _current, reporter
    try:
        yield reporter
    finally:
        _current = before
        reporter.close()


def duration(seconds: float) -> str:
    """3 s, 4 min 05 s, 1 h 02 min."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def eta(done: float, total: float, elapsed: float) -> str | None:
    """Time left at the pace so far; None before there is a pace to go by."""
    if done <= 0 or done >= total or elapsed <= 0 or not math.isfinite(elapsed):
        return None
    return duration(elapsed / done * (total - done))


_SHOWN = ("train_loss", "val_loss", "val_auroc", "val_accuracy", "val_f1", "val_rmse",
          "val_r2", "align_loss", "target_val_score")


def epoch_line(e: Epoch, elapsed: float) -> str:
    """One plain line: `epoch 3/20 (round 1/2) train_loss 0.4120 val_auroc 0.7710 · 2.1 s ·
    at most 36 s left`. "at most", because early stopping may end training sooner."""
    parts = [f"{e.what}: epoch {e.epoch}/{e.planned}"]
    if e.rounds > 1:
        parts.append(f"(round {e.round}/{e.rounds})")
    for k in _SHOWN:
        v = e.metrics.get(k)
        if isinstance(v, int | float) and math.isfinite(v):
            parts.append(f"{k} {v:.4f}")
    tail = f"· {e.seconds:.1f} s"
    left = eta(e.epoch, e.planned, elapsed)
    if left is not None:
        tail += f" · at most {left} left"
    return " ".join(parts + [tail])


class Plain(Reporter):
    """Lines on a stream that is not a terminal (CI logs, files): one per epoch; for other
    steps nothing while they are short, then a line at most every `every` seconds with the
    share done and the time left, and one when they end."""

    def __init__(self, stream: TextIO | None = None, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.every, self.clock = stream, every, clock
        self._started: float | None = None
        self._last_epoch = 0

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(f"tltool: {line}\n")
        stream.flush()

    def epoch(self, e: Epoch) -> None:
        now = self.clock()
        if self._started is None or e.epoch <= self._last_epoch:
            self._started = now - e.seconds  # a new training loop
        self._last_epoch = e.epoch
        self._write(epoch_line(e, now - self._started))

    def training_done(self) -> None:
        self._started, self._last_epoch = None, 0

    @contextlib.contextmanager
    def steps(self, what: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        start = last = self.clock()
        done = 0
        shown = False

        def advance(n: int = 1) -> None:
            nonlocal done, last, shown
            done += n
            now = self.clock()
            if now - last >= self.every:
                last, shown = now, True
                left = eta(done, total or 0, now - start)
                share = f"{done:,}/{total:,}" if total else f"{done:,}"
                self._write(f"{what}: {share}" + (f" · about {left} left" if left else ""))

        yield advance
        if shown or self.clock() - start >= self.every:
            self._write(f"{what}: done in {duration(self.clock() - start)}")


class Live(Reporter):  # pragma: no cover - needs a terminal; Plain carries the same numbers
    """A Rich display on a terminal: one live display with a bar and an ETA per running step
    (training, and the steps inside it), each epoch's line printed above it."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self._bar: Any = None
        self._train: Any = None
        self._started = 0.0
        self._last_epoch = 0

    def _display(self):
        if self._bar is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.console, transient=True)
            self._bar.start()
        return self._bar

    def _print(self, line: str) -> None:
        self.console.print(f"tltool: {line}", highlight=False, markup=False)

    def epoch(self, e: Epoch) -> None:
        now = time.monotonic()
        bar = self._display()
        if self._train is None or e.epoch <= self._last_epoch:
            if self._train is not None:
                bar.remove_task(self._train)
            self._started = now - e.seconds
            self._train = bar.add_task(e.what, total=e.planned)
        self._last_epoch = e.epoch
        bar.update(self._train, completed=e.epoch, total=e.planned)
        self._print(epoch_line(e, now - self._started))

    def training_done(self) -> None:
        if self._bar is not None and self._train is not None:
            self._bar.remove_task(self._train)
            self._train = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar, self._train = None, None

    @contextlib.contextmanager
    def steps(self, what: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        start = time.monotonic()
        bar = self._display()
        task = bar.add_task(what, total=total)
        try:
            yield lambda n=1: bar.advance(task, n)
        finally:
            bar.remove_task(task)
        if time.monotonic() - start >= 1.0:
            self._print(f"{what}: done in {duration(time.monotonic() - start)}")


def for_stream(stream: TextIO, quiet: bool) -> Reporter:
    """The reporter a command gets: nothing when quiet, Rich on a terminal, else plain lines."""
    if quiet:
        return Reporter()
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return Live() if tty else Plain()
