"""Run folders: ROOT/NAME/TIMESTAMP-COMMAND, created new and never overwritten.

`run.json` carries the status: "running" while a command works, then "complete" or "failed".
Only complete runs are picked by `.../latest`, so a crashed run never looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tltool import __version__
from tltool.errors import NoSpace, RunError, no_space

STATUS_FILE = "run.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run is shared like any file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def writing(path: Path):
    """A full disk while writing `path` becomes one clear error naming it."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if no_space(exc):
            raise NoSpace(f"no space left on device while writing {path}; free some space "
                          f"and run again (this run is marked failed)") from None
        raise


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


def write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class RunFolder:
    """A new folder for one command; records status, environment and files."""

    def __init__(self, path: Path, command: str, note: dict[str, Any] | None = None):
        self.path = path
        self.command = command
        self.note = dict(note or {})  # kept in run.json through every status (resumed_from)
        self._start = time.time()

    @classmethod
    def create(cls, root: str | Path, name: str, command: str, argv: list[str] | None,
               seed: int | None, note: dict[str, Any] | None = None) -> RunFolder:
        parent = Path(root) / name
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
        run = cls(path, command, note)
        run.set_status("running")
        write_text(path / "command.txt", " ".join(argv or sys.argv) + "\n")
        write_json(path / "env.json", environment(seed))
        return run

    def set_status(self, status: str, **extra: Any) -> None:
        info = {"command": self.command, "status": status, "tltool": __version__,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self._start)),
                **_process_identity(), **self.note}
        if status != "running":
            info["wall_seconds"] = round(time.time() - self._start, 3)
        write_json(self.path / STATUS_FILE, info | extra)

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> Path:
        """Atomic torch.save of plain tensors and primitives (weights_only-loadable)."""
        import torch

        path = self.file("checkpoints", name)
        _atomic_write(path, lambda fh: torch.save(payload, fh))
        return path


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


def _process_identity() -> dict[str, Any]:
    """Who is writing this run: host, process id and the process's start time (so a reused
    pid is not mistaken for the writer)."""
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_started": _process_start(os.getpid())}


def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux: /proc/PID/stat field 22), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _writer_is_gone(status: dict[str, Any]) -> bool:
    """A "running" run whose process died without marking it (SIGKILL, power loss): on this
    host, its process id no longer runs, or now belongs to a process started later."""
    import socket

    pid = status.get("pid")
    if not isinstance(pid, int) or status.get("host") != socket.gethostname():
        return False  # another machine (or an old run): cannot tell
    started = _process_start(pid)
    if started is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return status.get("pid_started") is not None and started != status.get("pid_started")


def run_status(path: Path) -> dict[str, Any] | None:
    """run.json, with a "running" run whose process is gone shown as "stale"."""
    try:
        status = json.loads((path / STATUS_FILE).read_text())
    except PermissionError:
        raise RunError(f"{path / STATUS_FILE}: cannot read it (permission denied)") from None
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict):
        return None
    if status.get("status") == "running" and _writer_is_gone(status):
        status = status | {"status": "stale", "stale_reason": f"its process {status['pid']} "
                           f"ended without finishing the run (killed?)"}
    return status


def _run_order(path: Path) -> tuple:
    """Newest last: the folder's time stamp, then its -N suffix as a number (-10 after -9)."""
    stem = path.name
    head, _, tail = stem.rpartition("-")
    return (stem[:15], int(tail) if tail.isdigit() and head else 1)


def resolve_run(ref: str | Path, commands: tuple[str, ...] | None = None) -> Path:
    """A run folder, or NAME_FOLDER/latest for the newest complete run in it (as an absolute,
    resolved path: `.` or `RUN/checkpoints/..` name the run folder itself)."""
    path = Path(ref).expanduser().resolve()
    if path.name == "latest" and not (path / STATUS_FILE).exists():
        parent = path.parent
        if not parent.is_dir():
            raise RunError(f"{ref}: no experiment folder {parent}")
        runs = [p for p in parent.iterdir() if p.is_dir()
                and (run_status(p) or {}).get("status") == "complete"
                and (commands is None or (run_status(p) or {}).get("command") in commands)]
        if not runs:
            kinds = f" {'/'.join(commands)}" if commands else ""
            others = sorted({(run_status(p) or {}).get("command") for p in parent.iterdir()
                             if p.is_dir() and (run_status(p) or {}).get("status") == "complete"}
                            - {None})
            held = f" (it holds complete {', '.join(others)} run(s)" if others else ""
            if held and "extract" in others:
                held += "; extract saves features and head scores, not a model to apply"
            raise RunError(f"{ref}: no complete{kinds} run in {parent}{held + ')' if held else ''}")
        path = max(runs, key=_run_order)
    if not path.is_dir():
        raise RunError(f"{ref}: run folder not found")
    status = run_status(path)
    if status is None:
        raise RunError(f"{ref}: not a tltool run folder ({STATUS_FILE} missing or damaged)")
    if status.get("status") != "complete":
        why = f" ({status['stale_reason']})" if status.get("stale_reason") else ""
        hint = ("; `tltool resume` continues it" if status.get("status") in ("stale", "failed")
                and status.get("command") in ("pretrain", "freeze-finetune") else "")
        raise RunError(f"{ref}: the run is {status.get('status')!r}{why}, not complete; use a "
                       f"finished run{hint}")
    if commands is not None and status.get("command") not in commands:
        raise RunError(f"{ref}: is a run of `{status.get('command')}`; expected a run of: "
                       f"{', '.join(commands)}")
    return path


def load_weights_file(path: Path) -> dict[str, Any]:
    """A tltool checkpoint or a plain state dict (name -> tensor), read without unpickling
    arbitrary objects."""
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    import torch

    allowed = ("allowed: a tltool checkpoint (a run's checkpoints/best.pt) or a PyTorch state "
               "dict of tensors saved with torch.save(model.state_dict(), path)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        text = str(exc)
        if "Unsupported global" in text:
            # a whole pickled object (model, optimizer, ...): never unpickled here, as code in
            # a pickle runs on load
            raise RunError(f"{path}: holds pickled Python objects (e.g. a whole model saved "
                           f"with torch.save(model)), which tltool does not load; save "
                           f"model.state_dict() instead. {allowed}") from None
        raise RunError(f"{path}: not a PyTorch weights file ({type(exc).__name__}); "
                       f"{allowed}") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict) and \
            payload.get("format") != "tltool-checkpoint":
        payload = payload["state_dict"]  # the common {"state_dict": ...} wrapper
    plain = isinstance(payload, dict) and payload and all(
        isinstance(v, torch.Tensor) for v in payload.values())
    if not plain and not (isinstance(payload, dict) and
                          payload.get("format") == "tltool-checkpoint"):
        raise RunError(f"{path}: neither a tltool checkpoint nor a state dict of tensors; "
                       f"{allowed}")
    return payload


CHECKPOINT_KEYS = ("command", "spec", "classes", "label", "preprocessor", "state_dict")


def load_checkpoint(path: Path) -> dict[str, Any]:
    payload = load_weights_file(path)
    if payload.get("format") != "tltool-checkpoint":
        raise RunError(f"{path}: not a tltool checkpoint (expected a dict with "
                       f"format 'tltool-checkpoint')")
    missing = [k for k in CHECKPOINT_KEYS if k not in payload]
    if missing:
        raise RunError(f"{path}: damaged tltool checkpoint (missing {', '.join(missing)})")
    from tltool.models.checks import check_checkpoint

    check_checkpoint(payload, str(path))  # every field, before any tensor is allocated
    return payload
