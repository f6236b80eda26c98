"""What a converter yields: a :class:`Candidate` record, or a :class:`Skip` saying why an input
item gave none. Skip reasons are short stable strings (the manifest counts them by name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from lav2cli.data.records import Record
from lav2cli.schema import MALFORMED_JSON, NOT_UTF8, show  # noqa: F401 (the parse problems, named where parsed)

# Problems (skipped, counted; --strict stops at the first one).
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
REMOTE_IMAGE = "remote image"
MALFORMED_RECORD = "malformed record"
MALFORMED_ROW = "malformed row"
EMPTY_TEXT = "empty text"
DUPLICATE_ID = "duplicate id"
UNKNOWN_IMAGE_ID = "unknown image id"
# Selections (dropped on purpose by an option, or nothing to derive; counted apart, never an error).
NO_CAPTION = "no shape or colour"
OTHER_SPLIT = "other split"
EXTRA_CAPTION = "extra caption"
LATER_TURN = "later turn"
UNFINISHED_ANSWER = "unfinished answer"


@dataclass
class Candidate:
    """A converted record, where it came from (``FILE:LINE`` or ``FILE:key[i]``) and its split key."""

    record: Record
    at: str
    group: str


@dataclass
class Skip:
    """An input item that yields no record: why, where, and an optional detail."""

    reason: str
    at: str
    detail: str = ""
    problem: bool = True

    def message(self) -> str:
        return f"{self.at}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


Item = Union[Candidate, Skip]


def stripped(value: Any) -> str | None:
    """A stripped string, or None when the value is not a string."""
    return value.strip() if isinstance(value, str) else None


def id_text(value: Any) -> str | None:
    """An input's id as a record id part: a non-empty string as it is, an integer in decimal; None
    for anything else (null, true, 1.5, a list, an object), which would become a Python repr."""
    if type(value) is int:
        return str(value)
    return value if isinstance(value, str) and value.strip() else None


def bad_id(field: str, value: Any) -> str:
    """The detail of a skip for an id that id_text refuses."""
    return f"{field} must be a non-empty string or an integer, not {show(value)}"
