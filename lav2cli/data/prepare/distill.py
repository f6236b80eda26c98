"""Distillation: a model's own greedy answers to prompts as text-only instruction records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from lav2cli.data.prepare.items import MALFORMED_RECORD, UNFINISHED_ANSWER, Candidate, Item, Skip, stripped
from lav2cli.data.prepare.job import Job
from lav2cli.data.records import Record

# the prompts used when none are given
DISTILL_PROMPTS = str(Path(__file__).parents[2] / "assets" / "prompts" / "distill.txt")


def convert(job: Job, model: str, prompts: str | None = None, max_new_tokens: int = 200, batch_size: int = 16,
            device: str = "auto") -> Iterator[Item]:
    """A model's own greedy answers to prompts -> text-only instruction records (``distill-INDEX``).
    Trained alongside new data, they keep what the model already says (its language ability).
    Answers cut off at ``max_new_tokens`` are not kept: a record must end where the model ends."""
    # the engine brings torch: imported here so that the other sources start without it
    from lav2cli.engine import load
    from lav2cli.inference.generate import Sampling

    prompts = os.fspath(prompts or DISTILL_PROMPTS)
    items = list(_prompts(job, prompts))
    todo = [it for it in items if not isinstance(it, Skip)]
    yield from (it for it in items if isinstance(it, Skip))
    if not todo:
        return
    eng = load(model, device=device)
    tok, tpl = eng.tokenizer, eng.template
    encoded = [tpl.encode_prompt(tok, instruction, text_input) for _, instruction, text_input in todo]
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))  # similar lengths batch with little padding
    answers: dict[int, list[int]] = {}
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    with job.ui.progress(f"answering {len(todo)} prompts with {model}", len(todo), min_items=1) as advance:
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            for k, out in zip(chunk, eng.generate([encoded[k] for k in chunk], sampling=sampling)):
                answers[k] = out
            advance(len(chunk))
    for k, (at, instruction, text_input) in enumerate(todo):
        if len(answers[k]) >= max_new_tokens:
            yield Skip(UNFINISHED_ANSWER, at, f"longer than {max_new_tokens} tokens", problem=False)
            continue
        record = Record(f"distill-{k}", None, instruction, tok.decode(answers[k]).strip(), "instruction", "distill",
                        input=text_input, extra={"model": model})
        yield Candidate(record, at, record.id)


def _prompts(job: Job, path: str) -> Iterator[tuple[str, str, str] | Skip]:
    """(where, instruction, input) from a text file (one prompt per line, # comments) or from
    records / Alpaca-style JSON lines (``instruction`` and optional ``input``)."""
    if path.endswith((".jsonl", ".json")):
        for entry in job.json_entries(path):
            if isinstance(entry, Skip):
                yield entry
                continue
            at, _, obj = entry
            obj = obj if isinstance(obj, dict) else {}
            instruction, text_input = stripped(obj.get("instruction")), stripped(obj.get("input", ""))
            if instruction is None or text_input is None:
                yield Skip(MALFORMED_RECORD, at, "needs a string instruction (and input)")
                continue
            yield at, instruction, text_input
        return
    with open(job.add_file(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                yield f"{path}:{lineno}", line.strip(), ""
