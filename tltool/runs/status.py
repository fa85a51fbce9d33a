"""A run's status (run.json): running, complete, failed, or stale when its process died
without saying so; and finding runs by reference (a folder, or NAME_FOLDER/latest for the
newest complete one)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tltool.errors import RunError

STATUS_FILE = "run.json"


def process_identity() -> dict[str, Any]:
    """Who is writing a run: host, process id and the process's start time (so a reused pid
    is not mistaken for the writer)."""
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


def _latest(ref: str | Path, parent: Path, commands: tuple[str, ...] | None) -> Path:
    """The newest complete run (of `commands`) in an experiment folder."""
    if not parent.is_dir():
        raise RunError(f"{ref}: no experiment folder {parent}")
    runs = [p for p in parent.iterdir() if p.is_dir()
            and (run_status(p) or {}).get("status") == "complete"
            and (commands is None or (run_status(p) or {}).get("command") in commands)]
    if runs:
        return max(runs, key=_run_order)
    kinds = f" {'/'.join(commands)}" if commands else ""
    others = sorted({(run_status(p) or {}).get("command") for p in parent.iterdir()
                     if p.is_dir() and (run_status(p) or {}).get("status") == "complete"}
                    - {None})
    held = f" (it holds complete {', '.join(others)} run(s)" if others else ""
    if held and "extract" in others:
        held += "; extract saves features and head scores, not a model to apply"
    raise RunError(f"{ref}: no complete{kinds} run in {parent}{held + ')' if held else ''}")


def resolve_run(ref: str | Path, commands: tuple[str, ...] | None = None) -> Path:
    """A run folder, or NAME_FOLDER/latest for the newest complete run in it (as an absolute,
    resolved path: `.` or `RUN/checkpoints/..` name the run folder itself)."""
    path = Path(ref).expanduser().resolve()
    if path.name == "latest" and not (path / STATUS_FILE).exists():
        path = _latest(ref, path.parent, commands)
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
