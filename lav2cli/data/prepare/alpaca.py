"""Alpaca / GPT-4-LLM instruction data: text-only instruction records."""

from __future__ import annotations

from typing import Iterator

from lav2cli.data.prepare.items import MALFORMED_RECORD, Candidate, Item, Skip, bad_id, id_text, stripped
from lav2cli.data.prepare.job import Job
from lav2cli.data.records import Record


def convert(job: Job, input: str) -> Iterator[Item]:
    """A JSON list or JSON lines of ``instruction``, ``input`` (optional), ``output``; the id
    from ``id`` or ``alpaca-INDEX``."""
    for entry in job.json_entries(input):
        if isinstance(entry, Skip):
            yield entry
            continue
        at, index, obj = entry
        if not isinstance(obj, dict):
            obj = {}
        instruction, text_input, output = (stripped(obj.get("instruction")), stripped(obj.get("input", "")),
                                           stripped(obj.get("output")))
        if instruction is None or text_input is None or output is None:
            yield Skip(MALFORMED_RECORD, at, "needs string instruction, output (and input)")
            continue
        rec_id = id_text(obj["id"]) if "id" in obj else f"alpaca-{index}"
        if rec_id is None:
            yield Skip(MALFORMED_RECORD, at, bad_id("id", obj["id"]))
            continue
        yield Candidate(Record(rec_id, None, instruction, output, "instruction", "alpaca", input=text_input), at, rec_id)
