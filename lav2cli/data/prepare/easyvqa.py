"""easy-VQA (the ``easy-vqa`` package's sets of coloured shapes): vqa records of its questions and
caption records derived from them ("a red circle")."""

from __future__ import annotations

import os
import random
import re
from typing import Iterator

from lav2cli.data.prepare.items import NO_CAPTION, UNKNOWN_IMAGE_ID, Candidate, Item, Skip
from lav2cli.data.prepare.job import Job
from lav2cli.data.records import Record
from lav2cli.errors import Lav2Error
from lav2cli.templates import CAPTION_INSTRUCTION, labelled

EASYVQA_COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASYVQA_SHAPES = ("circle", "rectangle", "triangle")


def easyvqa_attributes(question: str, answer: str) -> set[str]:
    """Colours and shapes an easy-VQA question/answer pair says the image shows.

    "what ..." questions: the answer plus any colour or shape the question names ("what is the
    blue shape?" -> rectangle, blue). Yes/no questions: the colour or shape they name when the
    answer affirms it ("is there a red shape?" yes, "is there not a circle?" no).
    """
    words = re.findall(r"[a-z]+", question.lower())
    if words and words[0] == "what":
        named = words + [answer.lower()]
    else:
        negated = "not" in words or "no" in words
        named = words if (answer.lower() == "yes") != negated else []
    return {w for w in named if w in EASYVQA_COLOURS or w in EASYVQA_SHAPES}


def easyvqa_caption(attributes: set[str]) -> str | None:
    """``"a red circle"``, ``"a red shape"`` or ``"a circle"`` from one image's attributes; None when
    no single colour or shape is known."""
    colours = [c for c in EASYVQA_COLOURS if c in attributes]
    shapes = [s for s in EASYVQA_SHAPES if s in attributes]
    colour = colours[0] if len(colours) == 1 else None
    shape = shapes[0] if len(shapes) == 1 else None
    if colour:
        return f"a {colour} {shape or 'shape'}"
    return f"a {shape}" if shape else None


def easyvqa_twin(question: str, answer: str, shown: set[str], pick: random.Random) -> tuple[str, str] | None:
    """The yes/no question's twin about the same image with the other answer: the colour (shape)
    it names swapped for the image's own one when it names an absent one, for an absent one when
    it names the image's own. None for "what" questions or when the image's colour (shape) is
    unknown. easy-VQA asks mostly about absent colours, so a model can score well on yes/no
    without looking; pairs leave it only the image to go by."""
    if answer.lower() not in ("yes", "no"):
        return None
    words = re.findall(r"[a-z]+", question.lower())
    named = [w for w in words if w in EASYVQA_COLOURS or w in EASYVQA_SHAPES]
    if len(named) != 1:  # one attribute, or the swap could keep the answer ("a red circle?")
        return None
    vocabulary = EASYVQA_COLOURS if named[0] in EASYVQA_COLOURS else EASYVQA_SHAPES
    own = [w for w in vocabulary if w in shown]
    if len(own) != 1:
        return None
    other = own[0] if named[0] != own[0] else pick.choice([w for w in vocabulary if w != own[0]])
    return re.sub(rf"\b{named[0]}\b", other, question, count=1), "no" if answer.lower() == "yes" else "yes"


def convert(job: Job, split: str = "both", kind: str = "both", instruction: str | None = None,
            yes_no_twins: bool = False, caption_context: bool = False) -> Iterator[Item]:
    """The easy-VQA package's sets: images copied to ``OUT_DIR/images/SPLIT/ID.png``, one vqa record
    per question (``easyvqa-SPLIT-q INDEX``) and one caption per image (``easyvqa-SPLIT-img ID``).
    With `yes_no_twins`, each yes/no question is followed by its twin with the other answer
    (``easyvqa-SPLIT-q INDEX-twin``, see easyvqa_twin): yes and no become equally likely.
    With `caption_context`, each vqa record's input is its image's caption as the caption expert
    words it ("Image caption: a red circle") and it has no image: data for a model that captions
    an image first and answers from its caption (the caption records keep their images)."""
    if split not in ("train", "test", "both") or kind not in ("vqa", "caption", "both"):
        raise Lav2Error("easyvqa: --split is train, test or both; --kind is vqa, caption or both")
    if yes_no_twins and kind == "caption":
        raise Lav2Error("easyvqa: --yes-no-twins adds questions; it needs --kind vqa or both")
    if caption_context and kind == "caption":
        raise Lav2Error("easyvqa: --caption-context is the context of questions; it needs --kind vqa or both")
    if job.out_dir is None:
        raise Lav2Error("easyvqa copies images beside the records: give --out FILE, not -")
    try:
        import easy_vqa
    except ImportError:
        raise Lav2Error("the easy-vqa package is not installed (pip install easy-vqa)") from None
    instruction = instruction or CAPTION_INSTRUCTION
    for name in ("train", "test") if split == "both" else (split,):
        questions = job.add_file(os.path.join(os.path.dirname(easy_vqa.__file__), "data", name, "questions.json"))
        texts, answers, image_ids = getattr(easy_vqa, f"get_{name}_questions")()
        available = getattr(easy_vqa, f"get_{name}_image_paths")()
        used = {i: available[i] for i in set(image_ids) if i in available}
        copies = job.copy_files(used, os.path.join(job.out_dir, "images", name), lambda i: f"{i}.png")
        extra = {"split": name}
        attributes: dict[int, set[str]] = {}
        for q, a, i in zip(texts, answers, image_ids):
            attributes.setdefault(i, set()).update(easyvqa_attributes(q, a))
        if kind in ("vqa", "both"):
            pick = random.Random(f"easyvqa-{name}-twins")
            for k, (q, a, i) in enumerate(zip(texts, answers, image_ids)):
                at = f"{questions}:[{k}]"
                if i not in copies:
                    yield Skip(UNKNOWN_IMAGE_ID, at, f"image {i}")
                    continue
                caption = easyvqa_caption(attributes[i]) if caption_context else None
                if caption_context and caption is None:
                    yield Skip(NO_CAPTION, at, "its image's questions name no single colour or shape", problem=False)
                    continue
                context = labelled("caption", caption) if caption_context else ""
                image = None if caption_context else copies[i]  # answered from the caption alone
                record = Record(f"easyvqa-{name}-q{k}", image, q, a, "vqa", "easyvqa", context,
                                extra={**extra, "image_id": i})
                yield Candidate(record, at, f"{name}/{i}")
                twin = easyvqa_twin(q, a, attributes[i], pick) if yes_no_twins else None
                if twin is not None:
                    record = Record(f"easyvqa-{name}-q{k}-twin", image, *twin, "vqa", "easyvqa", context,
                                    extra={**extra, "image_id": i, "twin_of": f"easyvqa-{name}-q{k}"})
                    yield Candidate(record, at, f"{name}/{i}")
        if kind in ("caption", "both"):
            for i in sorted(copies):
                at = f"{questions}:image {i}"
                text = easyvqa_caption(attributes.get(i, set()))
                if text is None:
                    yield Skip(NO_CAPTION, at, "its questions name no single colour or shape", problem=False)
                    continue
                record = Record(f"easyvqa-{name}-img{i}", copies[i], instruction, text, "caption", "easyvqa",
                                extra={**extra, "image_id": i})
                yield Candidate(record, at, f"{name}/{i}")
