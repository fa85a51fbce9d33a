"""Strict scalar types of the config: a boolean is never a number, a number never a boolean,
a fraction never a whole number.

pydantic's lax mode would turn `--set train.epochs=true` into 1 epoch and `train.lr: yes` into
1.0, silently. These types refuse a value of the wrong kind with an error naming what was given
(the config loader adds the key and the field's bounds). What stays accepted, on purpose:
- a whole number where a float is expected (`lr: 1` is 1.0);
- a number in quotes, or written as YAML 1.1 reads it as text (`lr: 1e-3` without a dot is a
  string to PyYAML; `"0.001"`): it is read as the number it spells;
- YAML's words for booleans, quoted or not: true/false, yes/no, on/off (any case YAML allows).
"""

from __future__ import annotations

from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

STRICT_TYPE = "strict_scalar"  # the pydantic error type of these refusals


def shown(value: Any) -> str:
    """A value as the user wrote it in YAML: true/false/null, numbers as is, text quoted."""
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).removesuffix("\n...\n")
    return repr(value)


def _refuse(value: Any, kind: str, allowed: str) -> PydanticCustomError:
    return PydanticCustomError(STRICT_TYPE, "got {given} ({kind}); allowed: {allowed}",
                               {"given": shown(value), "kind": kind, "allowed": allowed})


def _whole_number(value: Any) -> Any:
    if isinstance(value, bool):
        raise _refuse(value, "a boolean", "a whole number")
    if isinstance(value, float):
        raise _refuse(value, "a decimal number", "a whole number")
    if isinstance(value, str):
        try:
            int(value)
        except ValueError:
            try:
                float(value)
            except ValueError:
                return value  # not a number at all: pydantic's own message
            raise _refuse(value, "a decimal number", "a whole number") from None
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise _refuse(value, "a boolean", "a number")
    return value


def _boolean(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise _refuse(value, "a number", "true or false")
    if isinstance(value, str):
        if value not in _BOOLEAN_WORDS:
            raise _refuse(value, "text", "true or false")
        return _BOOLEAN_WORDS[value]
    return value


# The words YAML 1.1 (PyYAML's resolver) reads as booleans, in the cases it allows.
_BOOLEAN_WORDS = {spelling: truth for words, truth in (("true yes on", True),
                                                       ("false no off", False))
                  for word in words.split()
                  for spelling in (word, word.capitalize(), word.upper())}


Int = Annotated[int, BeforeValidator(_whole_number)]
"""A whole number: not a boolean, not 2.0 or 2.5 (nor "2.5"); "2" in quotes is 2."""

Float = Annotated[float, BeforeValidator(_number)]
"""A number: not a boolean; a whole number and a number in quotes ("1e-3") are accepted."""

OptionalInt = Annotated[int | None, BeforeValidator(_whole_number)]
"""Int or null (one annotation, so that pydantic keeps the field's bounds in the JSON Schema)."""

OptionalFloat = Annotated[float | None, BeforeValidator(_number)]
"""Float or null."""

Bool = Annotated[bool, BeforeValidator(_boolean)]
"""true or false (YAML's yes/no/on/off too, quoted or not); not 1, 0 or "1"."""
