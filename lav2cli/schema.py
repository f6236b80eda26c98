"""JSON in: :func:`parse_json`, whose every failure is one :class:`JSONProblem`, and checking the
parsed value against a declared shape, the one validator of the JSON files lav2 reads (lav2.json,
params.json, records).

A shape is a :class:`Field`: a JSON type, whether it may be null or absent, a rule for its value,
and for an object its fields by name (for a list, the shape of each item). :func:`check` raises
:class:`SchemaError` naming the first bad field by its path and saying what it must be::

    field adapter.prompt_len must be an integer, not "ten"
    field preprocess.mean is missing
    field preprocess.std[2] must be a positive number, not 0

Readers prefix the file (and line). Every string, wherever it sits (undeclared fields and object
keys too), must be text that UTF-8 can write: a lone surrogate (JSON allows ``"\\ud800"``) is
refused here rather than by the encoder that writes it out or the tokenizer that reads it.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

# why a JSON text does not parse (prepare counts skipped lines by these names)
MALFORMED_JSON = "malformed json"
NOT_UTF8 = "not UTF-8"

_SURROGATE = re.compile("[\ud800-\udfff]")

# JSON type -> (test, how the expectation reads)
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: type(v) is int, "an integer"),  # not a bool, not 2.0
    "number": (lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "any": (lambda v: True, "any value"),
}

Rule = Callable[[Any], "str | None"]  # the value -> None when fine, else what it must be


@dataclass(frozen=True)
class Field:
    """The shape of one JSON value."""

    type: str  # a key of _TYPES
    required: bool = False  # (as an object's field) must be present
    null: bool = False  # null is allowed
    rule: Rule | None = None  # checked once the type is right
    fields: Mapping[str, "Field"] | None = None  # object: the known fields (others are free)
    closed: bool = False  # object: a field not in `fields` is an error
    items: "Field | None" = None  # list: the shape of every item
    length: int | None = None  # list: exactly this many items

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(f"unknown JSON type {self.type!r}")


class SchemaError(ValueError):
    """A value that does not fit its shape; `path` names it (``adapter.visual.depth``, ``mean[1]``)."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(problem)


class JSONProblem(ValueError):
    """A JSON text that does not parse: `reason` (MALFORMED_JSON or NOT_UTF8, the names prepare
    counts skips by), `detail`, and the 1-based `lineno` within the text."""

    def __init__(self, reason: str, detail: str, lineno: int = 1):
        self.reason, self.detail, self.lineno = reason, detail, lineno
        super().__init__(f"{reason} ({detail})")


def parse_json(data: bytes | str) -> Any:
    """One JSON value from UTF-8 bytes (a leading byte-order mark allowed) or text; every way it can
    fail is a JSONProblem: bad bytes, bad syntax, nesting deeper than the parser goes, an integer
    too long for Python to convert."""
    if isinstance(data, bytes):
        if data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8):]
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            lineno = data.count(b"\n", 0, e.start) + 1
            col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise JSONProblem(NOT_UTF8, f"byte 0x{data[e.start]:02x} at column {col}", lineno) from None
    elif data.startswith("\ufeff"):
        data = data[1:]
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise JSONProblem(MALFORMED_JSON, e.msg, e.lineno) from None
    except RecursionError:
        raise JSONProblem(MALFORMED_JSON, "nested too deeply") from None
    except ValueError as e:  # e.g. Python's limit on the digits of an integer
        raise JSONProblem(MALFORMED_JSON, str(e).splitlines()[0]) from None


def show(value: Any) -> str:
    """A short rendering of a found value for a message."""
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value)  # escapes surrogates and control characters: always printable
    return text if len(text) <= 40 else text[:37] + "..."


def check(value: Any, shape: Field, what: str = "the value") -> None:
    """Raise SchemaError for the first part of `value` that does not fit `shape`; `what` names the
    whole value in the message when it is the culprit itself (``a record must be ...``)."""
    try:
        _check(value, shape)
    except _Bad as bad:
        path = "".join(reversed(bad.parts)).removeprefix(".")
        raise SchemaError(path, bad.say(f"field {path}" if path else what)) from None


class _Bad(Exception):
    """A misfit found deep in a value: the path is collected on the way out (`parts`, innermost
    first), so that the common case, a value that fits, builds no path strings."""

    def __init__(self, say: Callable[[str], str], parts: list[str] | None = None):
        self.say, self.parts = say, parts or []


def _check(value: Any, shape: Field) -> None:
    kind = shape.type
    if kind == "any":
        _walk(value)
        return
    if value is None:
        if shape.null:
            return
        raise _Bad(lambda name: f"{name} must be {_expected(shape)}, not null")
    if not _TYPES[kind][0](value):
        raise _Bad(lambda name: f"{name} must be {_expected(shape)}, not {show(value)}")
    if shape.rule is not None:
        wanted = shape.rule(value)
        if wanted is not None:
            raise _Bad(lambda name: f"{name} must be {wanted}, not {show(value)}")
    if kind == "str":
        _text(value)
    elif kind == "list":
        if shape.length is not None and len(value) != shape.length:
            raise _Bad(lambda name: f"{name} must hold {shape.length} items, not {len(value)}")
        items = shape.items or _ANY
        for i, item in enumerate(value):
            try:
                _check(item, items)
            except _Bad as bad:
                bad.parts.append(f"[{i}]")
                raise
    elif kind == "object":
        known = shape.fields or {}
        for key, field in known.items():
            if key in value:
                try:
                    _check(value[key], field)
                except _Bad as bad:
                    bad.parts.append(f".{key}")
                    raise
            elif field.required:
                raise _Bad(lambda name: f"{name} is missing", [f".{key}"])
        for key, item in value.items():
            if key in known:
                continue
            if shape.closed:
                raise _Bad(lambda name: f"{name} is not one lav2 knows (expected {', '.join(known)})",
                           [f".{_printable(key)}"])
            _walk({key: item})


def _printable(text: str) -> str:
    """`text` for a message: lone surrogates (which no terminal encoding takes) escaped."""
    return _SURROGATE.sub(lambda m: json.dumps(m.group())[1:-1], text)


def _text(value: str) -> None:
    bad = _SURROGATE.search(value)
    if bad:
        raise _Bad(lambda name: f"{name} holds a lone surrogate {_printable(bad.group())}: not text UTF-8 can encode")


def _walk(value: Any) -> None:
    """Every string in a free-form value (keys too) must be writable text; iterative, so that the
    deepest nesting the JSON parser allows cannot overflow the stack here."""
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack:
        v, parts = stack.pop()
        try:
            if isinstance(v, str):
                _text(v)
            elif isinstance(v, list):
                stack.extend((item, [f"[{i}]", *parts]) for i, item in enumerate(v))
            elif isinstance(v, dict):
                for k, item in v.items():
                    if _SURROGATE.search(k):
                        raise _Bad(lambda name, k=k: f"{name} has a field name with a lone surrogate: "
                                                     f"{_printable(k)!r}")
                    stack.append((item, [f".{k}", *parts]))
        except _Bad as bad:
            bad.parts.extend(parts)
            raise


def _expected(shape: Field) -> str:
    text = _TYPES[shape.type][1]
    return text + " or null" if shape.null else text


_ANY = Field("any")


# -- rules -------------------------------------------------------------------------------------


def at_least(low: float) -> Rule:
    """A number >= low."""
    what = "a positive integer" if low == 1 else f"at least {low}"
    return lambda v: None if v >= low else what


def positive(v: float) -> str | None:
    return None if v > 0 else "a positive number"


def one_of(*choices: str) -> Rule:
    return lambda v: None if v in choices else "one of " + ", ".join(choices)


def nonempty(v: str) -> str | None:
    return None if v else "a non-empty string"
