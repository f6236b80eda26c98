"""The lav2 record: one training or evaluation example, stored as one JSON line.

A records file (written by ``lav2 prepare``, read by ``train`` and ``eval``) holds one JSON object
per line::

    {"id": "coco-48", "image": "images/0001.jpg", "instruction": "Generate caption of this image",
     "input": "", "output": "A man riding a horse.", "kind": "caption", "source": "coco"}

Core fields (always present, in this order when written):

- ``id``: unique within the file (string).
- ``image``: path to the image, or ``null`` for text-only records. A relative path is relative to
  the folder of the records file. Writers use one rule (:func:`image_ref`): relative (with ``/``)
  when the image lies under that folder, absolute otherwise.
- ``instruction``, ``input``, ``output``: the prompt, optional context (``""`` when none) and the
  target text.
- ``kind``: ``"caption"``, ``"instruction"`` or ``"vqa"``.
- ``source``: the converter that wrote it (``coco``, ``karpathy``, ``csv``, ``alpaca``, ``llava``,
  ``mme``, ``easyvqa``).

Any other keys are task fields, kept in :attr:`Record.extra` and written after the core fields:
``split`` (the source's own split name, where it has one), MME's ``subtask``, ``pair`` (shared by
the two questions about one image) and ``category`` (``perception`` or ``cognition``: the subtask's
group, :data:`MME_PERCEPTION` or :data:`MME_COGNITION`).

This module imports nothing heavy (no torch, no PIL) so that any command can use it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

from lav2cli.errors import Lav2Error
from lav2cli.fileio import find_interrupted
from lav2cli.schema import Field, SchemaError, check, nonempty, one_of, parse_json

KINDS = ("caption", "instruction", "vqa")
CORE_FIELDS = ("id", "image", "instruction", "input", "output", "kind", "source")
# MME's subtasks (the ``subtask`` field) by ``category``, in the benchmark's order
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


@dataclass
class Record:
    """One example. ``image`` is a path (see :func:`read_records` for how it is resolved) or None."""

    id: str
    image: str | None
    instruction: str
    output: str
    kind: str
    source: str
    input: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, base_dir: str | None = None, cache: dict[str, str] | None = None) -> dict[str, Any]:
        """The JSON object for this record; the image path is written by :func:`image_ref`.

        ``cache`` (a dict kept across calls with the same ``base_dir``) memoises the image paths
        when many records share an image.
        """
        if self.image is None:
            image = None
        elif cache is None:
            image = image_ref(self.image, base_dir)
        else:
            image = cache.get(self.image)
            if image is None:
                image = cache[self.image] = image_ref(self.image, base_dir)
        obj: dict[str, Any] = {
            "id": self.id,
            "image": image,
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "kind": self.kind,
            "source": self.source,
        }
        obj.update(self.extra)
        return obj

    def problem(self) -> str | None:
        """Why :func:`read_records` would refuse this record once written (None: it would read it
        back): writers check with the same :data:`RECORD` shape as the reader."""
        clash = sorted(set(self.extra) & set(CORE_FIELDS))
        if clash:
            return f"task field {clash[0]!r} would overwrite the core field"
        obj = {"id": self.id, "image": self.image, "instruction": self.instruction, "input": self.input,
               "output": self.output, "kind": self.kind, "source": self.source, **self.extra}
        try:
            check(obj, RECORD, "a record")
        except SchemaError as e:
            return str(e)
        return None

    @classmethod
    def from_dict(cls, obj: Any, base_dir: str | None = None) -> "Record":
        """Validate one parsed JSON object against :data:`RECORD`; raises ValueError (a
        SchemaError) naming the bad field.

        A relative ``image`` is joined to ``base_dir`` (when given) and normalised.
        ``input`` may be absent (it then reads as ``""``).
        """
        check(obj, RECORD, "a record")
        image = obj["image"]
        if image is not None and base_dir is not None and not os.path.isabs(image):
            image = os.path.normpath(os.path.join(base_dir, image))
        extra = {k: v for k, v in obj.items() if k not in CORE_FIELDS}
        return cls(
            id=obj["id"],
            image=image,
            instruction=obj["instruction"],
            output=obj["output"],
            kind=obj["kind"],
            source=obj["source"],
            input=obj.get("input", ""),
            extra=extra,
        )


def _image_path(v: str) -> str | None:
    if not v:
        return "a path or null"
    return "a path without NUL characters" if "\0" in v else None


# The one shape of a record, for the reader (Record.from_dict) and every writer (Record.problem).
# Task fields beyond these are free JSON (their strings must still be text).
RECORD = Field("object", fields={
    "id": Field("str", required=True, rule=nonempty),
    "image": Field("str", required=True, null=True, rule=_image_path),
    "instruction": Field("str", required=True),
    "input": Field("str"),
    "output": Field("str", required=True),
    "kind": Field("str", required=True, rule=one_of(*KINDS)),
    "source": Field("str", required=True),
})


def image_ref(path: str, base_dir: str | None) -> str:
    """How an image path is written into a records file living in ``base_dir``.

    Relative (POSIX separators) when the image is inside ``base_dir``; absolute otherwise, and
    always absolute when ``base_dir`` is None (records written to stdout). Paths are compared
    after ``os.path.abspath`` (symbolic links are not resolved).
    """
    absolute = os.path.abspath(path)
    if base_dir is None:
        return absolute
    base = os.path.abspath(base_dir)
    try:
        inside = os.path.commonpath([absolute, base]) == base
    except ValueError:  # different drives (Windows)
        inside = False
    if not inside:
        return absolute
    return os.path.relpath(absolute, base).replace(os.sep, "/")


def _stdin_bytes() -> contextlib.AbstractContextManager[IO[bytes]]:
    """Standard input as bytes, left open afterwards."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is not None:
        return contextlib.nullcontext(buffer)
    return contextlib.nullcontext(sys.stdin)  # a text stream put in its place (tests): lines are str


def read_records(path: str | os.PathLike[str], images_root: str | os.PathLike[str] | None = None) -> Iterator[Record]:
    """Yield the records of a JSON lines file, validated, with image paths made absolute.

    Relative image paths resolve against ``images_root`` when given, else against the folder
    holding ``path``; ``path`` ``"-"`` reads standard input (relative paths then resolve against
    ``images_root`` or the current folder). Blank lines are ignored, and a UTF-8 byte-order mark
    before the first line. The first bad line (not UTF-8, bad JSON, a record that does not fit
    :data:`RECORD`, an id seen on an earlier line) raises :class:`~lav2cli.errors.Lav2Error` as
    ``"FILE:LINE: reason"``. Images are not opened here.
    """
    path = os.fspath(path)
    stdin = path == "-"
    if images_root is not None:
        base_dir = os.path.abspath(images_root)
        if not os.path.isdir(base_dir):
            raise Lav2Error(f"--images-root {images_root}: no such folder")
    else:
        base_dir = os.getcwd() if stdin else os.path.dirname(os.path.abspath(path))
    if stdin:
        handle, name = _stdin_bytes(), "<stdin>"
    else:
        name = path
        find_interrupted(path)  # a prepare killed between the renames of its files: finish them
        try:
            handle = open(path, "rb")  # bytes: each line decoded alone, so a bad byte is reported on its line
        except IsADirectoryError:
            raise Lav2Error(f"{path}: a folder; give the records file (JSON lines) inside it") from None
        except OSError as e:
            raise Lav2Error(f"{path}: cannot read records: {e.strerror or e}") from None
    first_line: dict[str, int] = {}
    with handle as lines:
        try:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = Record.from_dict(parse_json(line), base_dir)
                except ValueError as e:
                    raise Lav2Error(f"{name}:{lineno}: {e}") from None
                first = first_line.setdefault(record.id, lineno)
                if first != lineno:
                    raise Lav2Error(f"{name}:{lineno}: duplicate id {record.id!r} (first on line {first})")
                yield record
        except OSError as e:
            raise Lav2Error(f"{name}: cannot read records: {e.strerror or e}") from None
