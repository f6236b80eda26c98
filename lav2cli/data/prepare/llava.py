"""LLaVA conversations: one instruction record per human/gpt turn."""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

from lav2cli.data.prepare.items import LATER_TURN, MALFORMED_RECORD, Candidate, Item, Skip, bad_id, id_text
from lav2cli.data.prepare.job import Job
from lav2cli.data.records import Record
from lav2cli.errors import Lav2Error

_ROLES = {"human": "q", "user": "q", "gpt": "a", "assistant": "a"}


def convert(job: Job, input: str, images: str | None = None, keep_history: bool = False,
            turns: str = "all") -> Iterator[Item]:
    """One record per turn (``turns="first"``: the first only); with ``keep_history`` earlier
    turns go into ``input`` as ``Human: ...`` / ``Assistant: ...`` lines. Samples without
    ``image`` become text-only records."""
    if turns not in ("all", "first"):
        raise Lav2Error(f"--turns must be all or first, got {turns!r}")
    base = os.fspath(images) if images else os.path.dirname(os.path.abspath(input))
    for entry in job.json_entries(input):
        if isinstance(entry, Skip):
            yield entry
            continue
        at, index, obj = entry
        pairs = _turns(obj)
        ref = obj.get("image") if isinstance(obj, dict) else None
        if pairs is None or not (ref is None or (isinstance(ref, str) and ref)):
            yield Skip(MALFORMED_RECORD, at, "needs conversations alternating human/gpt (and image a path)")
            continue
        sample_id = id_text(obj.get("id", index))
        if sample_id is None:
            yield Skip(MALFORMED_RECORD, at, bad_id("id", obj.get("id")))
            continue
        image = os.path.join(base, ref) if ref else None
        history: list[str] = []
        for t, (question, answer) in enumerate(pairs):
            at_t = f"{at}.conversations[{2 * t}]"
            if turns == "first" and t > 0:
                yield Skip(LATER_TURN, at_t, problem=False)
                continue
            record = Record(f"llava-{sample_id}-{t}", image, question, answer, "instruction", "llava",
                            input="\n".join(history) if keep_history else "")
            yield Candidate(record, at_t, ref or record.id)
            history += [f"Human: {question}", f"Assistant: {answer}"]


def _turns(obj: Any) -> list[tuple[str, str]] | None:
    """``[(question, answer), ...]`` from alternating human/gpt messages, ``<image>`` removed; None if malformed."""
    conv = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        return None
    texts = []
    for n, message in enumerate(conv):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            return None
        if _ROLES.get(str(message.get("from")).lower()) != "qa"[n % 2]:
            return None
        texts.append(re.sub(r"\s*<image>\s*", " ", message["value"]).strip())
    return list(zip(texts[0::2], texts[1::2]))
