"""Writing files that readers may see at any moment: atomic replacement (a reader never sees
half a file) and a full disk turned into one clear error naming the file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from tltool.errors import NoSpace, no_space

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(fh)` into a temporary file beside `path`, then rename it over `path`."""
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


def write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
