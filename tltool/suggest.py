"""The one "did you mean" helper: the closest of the allowed names to a wrong one."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable


def did_you_mean(word: object, choices: Iterable[object], *, n: int = 1, cutoff: float = 0.6,
                 show: Callable[[str], str] = repr, prefix: str = "",
                 suffix: str = "") -> str:
    """`prefix + "did you mean X?" + suffix` for the closest of `choices` to `word` (up to n
    of them, joined by commas, each written by `show`), or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=cutoff)
    if not close:
        return ""
    return f"{prefix}did you mean {', '.join(show(c) for c in close)}?{suffix}"
