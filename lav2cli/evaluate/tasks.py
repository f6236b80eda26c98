"""The four evaluation tasks: which records become units (one prediction each), how a unit is
prompted, what a prediction line holds, and how the predictions are scored.

A *unit* is what gets one prediction: a question (vqa, mme), an image with all its reference
captions (caption), or a record (text). Records that cannot be scored are counted per reason
and left out, never silently.

Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from lav2cli.data.records import Record
from lav2cli.errors import Lav2Error
from lav2cli.evaluate import metrics as M

TASKS = ("vqa", "caption", "mme", "text")
DEFAULT_MAX_NEW_TOKENS = {"vqa": 30, "caption": 64, "mme": 30, "text": 30}
SHORT_ANSWER_WORDS = 3  # text task: exact match is reported when every reference is this short
TOKENIZER_NOTE = ("tokenisation is a pure-Python approximation of the PTB tokenizer "
                  "(lav2cli.evaluate.metrics.ptb_tokenize); CIDEr can differ from the COCO tools' by a few points")


@dataclass
class Unit:
    id: str
    image: str | None
    instruction: str
    input: str
    references: list[str]
    record_ids: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    units: list[Unit]
    skipped: Counter  # reason -> records left out
    examples: dict[str, str]  # reason -> one example id

    def skip(self, reason: str, rid: str, n: int = 1) -> None:
        self.skipped[reason] += n
        self.examples.setdefault(reason, rid)


def _answers(rec: Record) -> list[str]:
    """Reference answers: the record's ``answers`` list (VQAv2's ten) when present, else its output."""
    extra = rec.extra.get("answers")
    if isinstance(extra, list) and extra and all(isinstance(a, str) for a in extra):
        return [a for a in extra if a.strip()]
    return [rec.output] if rec.output.strip() else []


def select(task: str, records: list[Record]) -> Selection:
    """The units of `task` in `records`, in file order, and the records left out (by reason)."""
    sel = Selection([], Counter(), {})
    if task == "caption":
        groups: dict[str, Unit] = {}
        for r in records:
            if r.kind != "caption":
                sel.skip("not a caption record", r.id)
            elif r.image is None:
                sel.skip("caption record without an image", r.id)
            elif not r.output.strip():
                sel.skip("record without a reference", r.id)
            elif r.image in groups:
                groups[r.image].references.append(r.output)
                groups[r.image].record_ids.append(r.id)
            else:
                groups[r.image] = Unit(r.id, r.image, r.instruction, r.input, [r.output], [r.id])
        sel.units = list(groups.values())
        return sel
    for r in records:
        refs = _answers(r)
        if task in ("vqa", "mme") and r.kind != "vqa":
            sel.skip("not a vqa record", r.id)
        elif not refs:
            sel.skip("record without a reference", r.id)
        elif task == "mme" and not (isinstance(r.extra.get("subtask"), str) and isinstance(r.extra.get("pair"), str)):
            sel.skip("no MME subtask/pair fields (records from `lav2 prepare mme` have them)", r.id)
        elif task == "mme" and refs[0].strip().lower() not in ("yes", "no"):
            sel.skip("MME reference not Yes or No", r.id)
        else:
            extra = {k: r.extra[k] for k in ("subtask", "pair", "category", "question_type", "answer_type")
                     if k in r.extra}
            sel.units.append(Unit(r.id, r.image, r.instruction, r.input, refs, [r.id], extra))
    if task == "mme":  # the protocol needs exactly two questions per image
        per_pair = Counter((u.extra["subtask"], u.extra["pair"]) for u in sel.units)
        keep = []
        for u in sel.units:
            if per_pair[(u.extra["subtask"], u.extra["pair"])] == 2:
                keep.append(u)
            else:
                sel.skip("MME image without exactly two questions", u.extra["pair"])
        sel.units = keep
    return sel


def prompt_parts(task: str, unit: Unit, short_answer: bool, suffix: str) -> tuple[str, str, bool]:
    """(instruction, input, short_answer) for the template."""
    instruction = unit.instruction
    if task == "vqa" and suffix:
        instruction = f"{instruction.rstrip()} {suffix.strip()}"
    if task == "mme":
        return instruction, unit.input, True  # the official run: "... using a single word or phrase."
    if task == "vqa":
        return instruction, unit.input, short_answer
    return instruction, unit.input, False


def reference_field(task: str, unit: Unit) -> Any:
    if task == "caption" or len(unit.references) > 1:
        return list(unit.references)
    return unit.references[0]


def judge(task: str, unit: Unit, prediction: str) -> dict[str, Any]:
    """The per-line correctness fields of a prediction (none for captions: CIDEr is corpus-level)."""
    if task == "vqa":
        score = M.vqa_accuracy(prediction, unit.references)
        return {"score": round(score, 6), "correct": score >= 1.0}
    if task == "mme":
        parsed = M.parse_yes_no(prediction)
        return {"parsed": parsed, "correct": parsed == unit.references[0].strip().lower(),
                "subtask": unit.extra["subtask"], "pair": unit.extra["pair"]}
    if task == "text":
        return {"correct": M.normalize_answer(prediction) == M.normalize_answer(unit.references[0]),
                "contains": M.contains_answer(prediction, unit.references[0])}
    return {}


def wants_exact_match(units: list[Unit]) -> bool:
    """True when every reference is a short answer (at most SHORT_ANSWER_WORDS words)."""
    return all(len(u.references[0].split()) <= SHORT_ANSWER_WORDS for u in units)


# -- scoring -----------------------------------------------------------------------------------


def _question_type(unit: Unit) -> str:
    qt = unit.extra.get("question_type")
    if isinstance(qt, str) and qt:
        return qt
    words = unit.instruction.strip().lower().split()
    return words[0].strip("?,.!:;") if words else ""


def score_vqa(units: list[Unit], preds: dict[str, dict]) -> dict[str, Any]:
    total = 0.0
    by_type: dict[str, list[float]] = defaultdict(list)
    by_question: dict[str, list[float]] = defaultdict(list)
    by_answer: dict[str, list[float]] = defaultdict(list)
    for u in units:
        acc = M.vqa_accuracy(preds[u.id]["prediction"], u.references)
        total += acc
        majority = Counter(M.normalize_answer(a) for a in u.references).most_common(1)[0][0]
        atype = u.extra.get("answer_type") if isinstance(u.extra.get("answer_type"), str) else M.answer_type(majority)
        by_type[atype].append(acc)
        by_question[_question_type(u)].append(acc)
        by_answer[majority].append(acc)

    def table(d: dict[str, list[float]]) -> dict[str, dict]:
        rows = sorted(d.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in rows}

    return {"accuracy": total / len(units), "per_answer_type": table(by_type),
            "per_question_type": table(by_question), "per_answer": table(by_answer),
            "references_per_question": max(len(u.references) for u in units)}


def score_caption(units: list[Unit], preds: dict[str, dict]) -> dict[str, Any]:
    cands = {u.id: M.ptb_tokenize(preds[u.id]["prediction"]) for u in units}
    refs = {u.id: [M.ptb_tokenize(r) for r in u.references] for u in units}
    b = M.bleu(cands, refs)
    cider, _ = M.cider_d(cands, refs)
    out: dict[str, Any] = {f"BLEU-{k + 1}": b[k] for k in range(4)}
    out["CIDEr"] = cider
    out["references_per_image"] = sum(len(u.references) for u in units) / len(units)
    out["tokenizer"] = "ptb-like (approximate)"
    out["note"] = TOKENIZER_NOTE
    return out


def score_mme(units: list[Unit], preds: dict[str, dict]) -> dict[str, Any]:
    results = [M.MMEResult(u.extra["subtask"], u.extra["pair"], u.references[0], preds[u.id]["prediction"],
                           u.extra.get("category")) for u in units]
    return M.mme_scores(results)


def score_text(units: list[Unit], preds: dict[str, dict]) -> dict[str, Any]:
    nll = sum(float(preds[u.id]["loss"]) * int(preds[u.id]["tokens"]) for u in units)
    tokens = sum(int(preds[u.id]["tokens"]) for u in units)
    if tokens == 0:
        raise Lav2Error("no response tokens to score")
    loss = nll / tokens
    out: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    with_pred = [u for u in units if isinstance(preds[u.id].get("prediction"), str)]
    if with_pred and len(with_pred) == len(units):
        right = sum(M.normalize_answer(preds[u.id]["prediction"]) == M.normalize_answer(u.references[0])
                    for u in units)
        out["exact_match"] = right / len(units)
        out["contains_answer"] = sum(M.contains_answer(preds[u.id]["prediction"], u.references[0])
                                     for u in units) / len(units)
    else:
        out["exact_match"] = out["contains_answer"] = None
    return out


SCORERS = {"vqa": score_vqa, "caption": score_caption, "mme": score_mme, "text": score_text}
