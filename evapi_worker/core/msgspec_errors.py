"""What msgspec's validation messages say, read in one place.

msgspec reports a problem as one sentence and where it is, ``"Expected
`int`, got `str` - at `$.engine.window`"``; the events' parser and the
settings' checker both turn that into their own errors.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["Problem", "read_problem"]

_FIELD_RE: Final = re.compile(r"Object (contains unknown|missing required) field `(\w+)`")


class Problem:
    """One validation message: the sentence, the path, and the field it names."""

    __slots__ = ("field", "kind", "path", "text")

    def __init__(self, text: str, path: list[str], kind: str, field: str | None) -> None:
        self.text = text  # the sentence, without its location
        self.path = path  # the keys leading to the problem ([] at the top)
        self.kind = kind  # "unknown_field", "missing_field" or "" (anything else)
        self.field = field  # the field an unknown or missing field problem names


def read_problem(message: str) -> Problem:
    """Split msgspec's ``message`` into what is wrong and where."""
    text, at, where = message.rpartition(" - at `$")
    if not at:
        text, where = message, ""
    path = [part for part in where.rstrip("`").split(".") if part]
    found = _FIELD_RE.match(text)
    if found is None:
        return Problem(text, path, "", None)
    kind = "unknown_field" if found.group(1) == "contains unknown" else "missing_field"
    return Problem(text, path, kind, found.group(2))
