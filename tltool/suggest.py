"""The one "did you mean" helper: the closest of the allowed names to a wrong one."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable


def did_you_mean(word: object, choices: Iterable[object], *, n: int = 1,
                 show: Callable[[str], str] = repr, around: tuple[str, str] = ("", "")) -> str:
    """`"did you mean X?"` between `around`'s two strings, for the closest of `choices` to
    `word` (up to n of them, joined by commas, each written by `show`), or "" when none is
    close enough (difflib's ratio at least 0.6)."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n)
    if not close:
        return ""
    return f"{around[0]}did you mean {', '.join(show(c) for c in close)}?{around[1]}"
