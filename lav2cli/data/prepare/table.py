"""Caption tables (CC3M-style lists): an image column and a caption column under a header."""

from __future__ import annotations

import csv
import os
import re
from typing import Iterator

from lav2cli.data.prepare.items import MALFORMED_ROW, MISSING_IMAGE, NOT_UTF8, REMOTE_IMAGE, Candidate, Item, Skip
from lav2cli.data.prepare.job import Job
from lav2cli.data.records import Record
from lav2cli.errors import Lav2Error
from lav2cli.templates import CAPTION_INSTRUCTION


def convert(job: Job, input: str, images: str | None = None, image_column: str | None = None,
            caption_column: str | None = None, instruction: str | None = None) -> Iterator[Item]:
    """Tab-separated (no quoting) or comma-separated (CSV quoting) tables with a header; relative
    image paths resolve against ``images`` (default: the table's folder). URLs are skipped as
    ``remote image`` (download them first)."""
    path = job.add_file(input)
    base = os.fspath(images) if images else os.path.dirname(os.path.abspath(path))
    instruction = instruction or CAPTION_INSTRUCTION
    try:
        # bytes that are not UTF-8 read as U+DC80..U+DCFF (surrogateescape): their row is skipped alone
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            tab = "\t" in f.readline()
            f.seek(0)
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tab else csv.reader(f)
            header = next(reader, None)
            if not header:
                raise Lav2Error(f"{path}: empty table (a header naming the image and caption columns is needed)")
            col_image = _column(header, image_column, ("url", "image", "path"), "image", path)
            col_text = _column(header, caption_column, ("caption", "text"), "caption", path)
            for row in reader:
                at = f"{path}:{reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue
                bad = next((m for cell in row if (m := _UNDECODED.search(cell))), None)
                if bad:
                    yield Skip(NOT_UTF8, at, f"byte 0x{ord(bad.group()) - 0xDC00:02x}")
                    continue
                if len(row) != len(header):
                    yield Skip(MALFORMED_ROW, at, f"{len(row)} fields, header has {len(header)}")
                    continue
                ref, text = row[col_image].strip(), row[col_text].strip()
                if "://" in ref:
                    yield Skip(REMOTE_IMAGE, at, ref)
                    continue
                if not ref:
                    yield Skip(MISSING_IMAGE, at, "empty image cell")
                    continue
                record = Record(f"csv-{reader.line_num}", os.path.join(base, ref), instruction, text, "caption", "csv")
                yield Candidate(record, at, ref)
    except csv.Error as e:
        raise Lav2Error(f"{path}:{reader.line_num}: unreadable table ({e})") from None


_UNDECODED = re.compile("[\udc80-\udcff]")


def _column(header: list[str], chosen: str | None, defaults: tuple[str, ...], what: str, path: str) -> int:
    lower = [h.strip().lower() for h in header]
    for name in (chosen,) if chosen else defaults:
        if name.lower() in lower:
            return lower.index(name.lower())
    wanted = chosen or " or ".join(defaults)
    raise Lav2Error(f"{path}:1: no {what} column {wanted} in header {header}")
