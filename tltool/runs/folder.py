"""Run folders: ROOT/NAME/TIMESTAMP-COMMAND, created new and never overwritten.

`run.json` carries the status: "running" while a command works, then "complete" or "failed".
Only complete runs are picked by `.../latest`, so a crashed run never looks finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tltool import __version__, distributed
from tltool.checkpoint import is_best_checkpoint
from tltool.config import ExperimentConfig, dump_config
from tltool.errors import ConfigError, RunError
from tltool.runs.files import write_json, write_text
from tltool.runs.status import STATUS_FILE, process_identity, run_status

log = logging.getLogger("tltool")


class RunFolder:
    """A new folder for one command; records status, environment and files."""

    def __init__(self, path: Path, command: str, note: dict[str, Any] | None = None):
        self.path = path
        self.command = command
        self.note = dict(note or {})  # kept in run.json through every status (resumed_from)
        self._start = time.time()

    @classmethod
    def create(cls, where: RunPlace, command: str, argv: list[str] | None,
               seed: int | None) -> RunFolder:
        parent = Path(where.root) / where.name
        parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1, 1000):
            suffix = "" if attempt == 1 else f"-{attempt}"
            path = parent / f"{stamp}-{command}{suffix}"
            try:
                path.mkdir()  # fails if it exists: a run is never overwritten
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - a thousand runs in one second
            raise RunError(f"{parent}: could not create a new run folder")
        run = cls(path, command, where.note)
        run.set_status("running")
        write_text(path / "command.txt", " ".join(argv or sys.argv) + "\n")
        write_json(path / "env.json", environment(seed))
        return run

    def set_status(self, status: str, **extra: Any) -> None:
        info = {"command": self.command, "status": status, "tltool": __version__,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self._start)),
                **process_identity(), **self.note}
        if status != "running":
            info["wall_seconds"] = round(time.time() - self._start, 3)
        write_json(self.path / STATUS_FILE, info | extra)

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def save_checkpoint(self, name: str, checkpoint) -> Path:
        """checkpoints/NAME, written atomically (a tltool.checkpoint.Checkpoint)."""
        return checkpoint.save(self.file("checkpoints", name))


@dataclass(frozen=True)
class RunPlace:
    """Where a new run folder goes: ROOT/NAME/, and what its run.json keeps throughout
    (`note`, e.g. resumed_from)."""

    root: str | Path
    name: str
    note: dict[str, Any] | None = None


def environment(seed: int | None) -> dict[str, Any]:
    import numpy
    import sklearn
    import torch

    return {
        "tltool": __version__, "python": platform.python_version(),
        "torch": torch.__version__, "numpy": numpy.__version__, "sklearn": sklearn.__version__,
        "platform": platform.platform(), "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "seed": seed, "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def check_output_file(path: str | Path, option: str, force: bool = False) -> Path:
    """A file the user names for tltool to write, outside a new run folder: refused when it is
    a device, FIFO, socket or folder, a symbolic link (unless `force`, and then only to a
    regular file), or inside an existing run folder. Returns the path to write (a link's
    target with `force`)."""
    import stat

    p = Path(path)
    if p.is_symlink():
        if not force:
            raise RunError(f"{option} {path}: is a symbolic link; refusing to replace it (use "
                           f"--force to write through it to the regular file it points to)")
        try:
            p = p.resolve(strict=False)
        except (RuntimeError, OSError):
            raise RunError(f"{option} {path}: a symbolic link loop") from None
    try:
        mode = p.stat().st_mode if p.exists() else None
    except OSError as exc:
        raise RunError(f"{option} {path}: cannot be inspected ({exc.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or
                stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
                if stat.S_ISSOCK(mode) else "not a regular file")
        raise RunError(f"{option} {path}: is {kind}; give the name of a regular file (or - for "
                       f"standard output)")
    if not p.parent.is_dir():
        raise RunError(f"{option} {path}: folder {p.parent} does not exist")
    for folder in [p.parent.resolve(), *p.parent.resolve().parents]:
        if (folder / STATUS_FILE).is_file():
            raise RunError(f"{option} {path}: is inside the run folder {folder}; tltool never "
                           f"changes a run's files (write elsewhere)")
    return p


def check_output_root(root: str | Path) -> None:
    """output.root must be (or become) a writable folder; said before any data is read."""
    path = Path(root)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output.root: {root} is a file; run folders need a folder there")
    if not probe.is_dir():
        raise ConfigError(f"output.root: {root} cannot be created ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output.root: {root} is not writable ({probe}: permission denied)")


def experiment_home(run: Path) -> RunPlace:
    """Where commands reading a run write: ROOT/NAME of ROOT/NAME/RUN. A member of a select
    ensemble (RUN/members/CANDIDATE) belongs to its ensemble's experiment, so evaluating it
    never writes inside the ensemble's folder."""
    run = Path(run).resolve()
    owner = (run_status(run) or {}).get("member_of")
    if isinstance(owner, str):
        up = (run / owner).resolve()
        if up in run.parents:
            run = up
    return RunPlace(run.parent.parent, run.parent.name)


@contextlib.contextmanager
def new_run(where: RunPlace, command: str, argv: list[str] | None, seed: int | None,
            cfg: ExperimentConfig | None = None) -> Iterator[RunFolder]:
    """Create the run folder (config.yaml written first when `cfg` is given); mark it
    complete on success, failed (with the error) otherwise. Under torchrun only rank 0
    writes: the other ranks write into a private folder removed at the end."""
    check_output_root(where.root)
    with contextlib.ExitStack() as stack:
        if not distributed.is_main():
            import shutil
            import tempfile

            scratch = tempfile.mkdtemp(prefix=f"tltool-rank{distributed.rank()}-")
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
            where = RunPlace(scratch, where.name, where.note)
        run = RunFolder.create(where, command, argv, seed)
        if cfg is not None:
            write_text(run.file("config.yaml"), dump_config(cfg))
        log.info("run folder: %s", run.path)
        try:
            yield run
        except BaseException as exc:
            detail = f": {exc}" if str(exc) else ""
            run.set_status("failed", error=f"{type(exc).__name__}{detail}")
            raise
        run.set_status("complete")


def pinned_config(cfg: ExperimentConfig, weights: Path | None = None,
                  priors: list[Path] | None = None) -> ExperimentConfig:
    """The config as a run folder keeps it: data paths absolute (evaluate works from any
    folder) and model.weights (and model.prior_weights) the run folder or file actually used
    (not `.../latest`, which moves on as new runs complete)."""
    update: dict[str, Any] = {}
    for section in ("source", "target"):
        data = getattr(cfg, section)
        if data is None:
            continue
        paths = {k: str(Path(v).expanduser().resolve()) for k in ("path", "root")
                 if (v := getattr(data, k))}
        if paths:
            update[section] = data.model_copy(update=paths)
    model: dict[str, Any] = {}
    if weights is not None:
        model["weights"] = _pinned(weights)
    if priors:
        model["prior_weights"] = ([_pinned(p) for p in priors] if len(priors) > 1
                                  else _pinned(priors[0]))
    if model:
        update["model"] = cfg.model.model_copy(update=model)
    return cfg.model_copy(update=update)


def _pinned(used: Path) -> str:
    used = Path(used)
    if is_best_checkpoint(used):
        used = used.parent.parent  # the run folder
    return str(used.resolve())
