"""The one answer pipeline of `lav2 ask` and `lav2 eval`: the experts read the image, a model
marked self_caption captions it itself, and the template turns question and context into the
prompt the engine answers.

Which caption a question gets, and whether the answer pass sees the image, follow one rule
(`Pipeline.make`), whichever command asks:

- a named caption expert (`--expert caption`) gives the caption, as named: the model's own
  caption never replaces it;
- a model whose artifact is marked self_caption is its own caption expert when no caption
  expert is named and self-captioning is on (the default; `--no-self-caption` turns it off);
- with self-captioning on, such a model answers from the caption as context and without the
  image, as it was trained, whichever expert wrote the caption;
- the OCR expert's text joins either caption.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from lav2cli.engine import Engine
from lav2cli.errors import Lav2Error
from lav2cli.experts import ExpertOptions, ExpertOutput, Experts, context
from lav2cli.formats import artifact, classify
from lav2cli.inference.generate import Sampling
from lav2cli.model.vision import load_image
from lav2cli.templates import Turn, join_context
from lav2cli.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from PIL.Image import Image


def marked_self_caption(ref: str) -> bool:
    """Whether model reference `ref` is an artifact marked self_caption (reads lav2.json only,
    so that a command can plan its experts before the model loads)."""
    kind, path = classify(ref)
    return kind == "artifact" and bool(artifact.read_meta(path).get("self_caption"))


def self_captions(engine: Engine) -> bool:
    """Whether a loaded model is marked self_caption and can see: it captions an image itself
    and answers from its caption (`lav2 info` shows it)."""
    return bool(engine.config.meta.get("self_caption")) and engine.can_see


@dataclass(frozen=True)
class Question:
    image: str | None  # an image file, or None for a text-only question
    instruction: str
    input: str = ""  # the record's own context; the experts' text joins it
    short_answer: bool = False
    history: tuple[Turn, ...] = ()  # a conversation's earlier exchanges (`lav2 serve`)
    system: str = ""  # a conversation's system message


@dataclass
class Prompt:
    text: str  # the template applied
    ids: list[int]
    experts: list[ExpertOutput]  # what each expert said about the question's image


@dataclass
class Batch:
    """Questions made ready for one `Engine.generate` call."""

    prompts: list[Prompt]
    images: torch.Tensor | None  # None: no row's image is read by the answer pass
    image_mask: torch.Tensor | None  # False for rows without an image


class Pipeline:
    """The experts of one command and how their text reaches the answering model."""

    def __init__(self, experts: Experts, from_caption: bool = False):
        self.experts = experts
        self.from_caption = from_caption  # the answer pass reads the caption, not the image

    @classmethod
    def make(cls, options: ExpertOptions, *, marked: bool, self_caption: bool = True) -> "Pipeline":
        """The rule (see the module docstring): `options` are the experts named on the command
        line, `marked` whether the answering model is marked self_caption, `self_caption`
        whether self-captioning is on."""
        from_caption = marked and self_caption
        if from_caption and "caption" not in options.experts:
            options = replace(options, experts=("caption",) + options.experts, self_caption=True)
        return cls(Experts(options), from_caption)

    @property
    def options(self) -> ExpertOptions:
        return self.experts.options

    def sources(self) -> list[list[str]]:
        """[name, source] of each expert, in order (kept with predictions and metrics)."""
        return self.options.sources()

    def load(self) -> None:
        """Build the experts' models now, so that one that cannot run fails before the language
        model loads."""
        self.experts.load()

    def bind(self, engine: Engine) -> None:
        """Make the answering model its own caption expert when the rule says so."""
        if not self.options.self_caption:
            return
        if not engine.can_see:
            raise Lav2Error(f"{engine.config.ref}: marked self_caption, but it has no trained visual branch to "
                            "caption images with; use --no-self-caption or --expert caption")
        self.experts.bind(engine)

    def prepare(self, engine: Engine, questions: list[Question], loaded: dict[str, "Image"] | None = None) -> Batch:
        """The questions' prompts (their experts' text as context) and the answer pass's images;
        `loaded` holds images already decoded, by file."""
        loaded = dict(loaded or {})

        def image(path: str) -> "Image":
            if path not in loaded:
                loaded[path] = load_image(path)
            return loaded[path]

        outputs = self._expert_outputs(questions, image)
        tpl, tok = engine.template, engine.tokenizer
        prompts = []
        for q, outs in zip(questions, outputs):
            parts = (q.instruction, join_context(q.input, context(outs)), q.short_answer, q.history, q.system)
            prompts.append(Prompt(tpl.prompt(*parts), tpl.encode_prompt(tok, *parts), outs))
        images, mask = (None, None) if self.from_caption else image_batch(engine, [q.image for q in questions], image)
        return Batch(prompts, images, mask)

    def _expert_outputs(self, questions: list[Question], load: Callable[[str], "Image"]) -> list[list[ExpertOutput]]:
        """Each question's expert outputs (none without an image or without experts)."""
        if not self.experts:
            return [[] for _ in questions]
        found = iter(self.experts.run_files([q.image for q in questions if q.image is not None], load))
        return [next(found) if q.image is not None else [] for q in questions]


def image_batch(engine: Engine, paths: list[str | None],
                load: Callable[[str], Any] = load_image) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(images, image_mask) for a batch of image files: zeros and mask False for rows without an
    image; (None, None) when the model has no encoder or no row has an image."""
    if engine.image_transform is None or all(p is None for p in paths):
        return None, None
    tensors = {i: engine.image_tensor([load(p)])[0] for i, p in enumerate(paths) if p is not None}
    shape = next(iter(tensors.values())).shape
    images = torch.zeros((len(paths), *shape), dtype=engine.dtype, device=engine.device)
    for i, t in tensors.items():
        images[i] = t
    mask = torch.tensor([p is not None for p in paths], device=engine.device)
    return images, mask


# -- one question, as `lav2 ask` answers it -------------------------------------------------------


@dataclass
class Answer:
    image: str | None
    question: str
    prompt: str
    answer: str
    new_tokens: int
    prompt_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    seconds: float
    experts: list[ExpertOutput]

    def to_json(self, model: str) -> dict:
        return {
            "image": self.image, "question": self.question, "answer": self.answer, "model": model,
            "experts": [e.to_json() for e in self.experts],
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "time_to_first_token_s": round(self.time_to_first_token_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "seconds": round(self.seconds, 4),
        }


def answer(engine: Engine, pipeline: Pipeline, image: str | None, question: str, sampling: Sampling, *,
           on_text: Callable[[str], None] | None = None,
           show_prompt: Callable[[str], None] | None = None) -> Answer:
    """Answer `question` about the image file `image` (None: text only). `on_text` receives the
    answer's text as it is generated, `show_prompt` the final prompt; the timings exclude the
    experts."""
    loaded = {image: load_image(image)} if image is not None else {}  # a bad file fails even when nothing reads it
    batch = pipeline.prepare(engine, [Question(image, question)], loaded)
    [prompt] = batch.prompts
    if show_prompt is not None:
        show_prompt(prompt.text)
    decoder = StreamDecoder(engine.tokenizer) if on_text is not None else None
    t0 = time.perf_counter()
    first: list[float] = []

    def on_token(row: int, new_ids: list[int]) -> None:
        if not first:
            first.append(time.perf_counter())
        if decoder is not None:
            text = decoder.push(new_ids[-1])
            if text:
                on_text(text)

    out = engine.generate([prompt.ids], images=batch.images, image_mask=batch.image_mask, sampling=sampling,
                          on_token=on_token)[0]
    t1 = time.perf_counter()
    if decoder is not None:
        rest = decoder.flush()
        if rest:
            on_text(rest)
    ttft = (first[0] - t0) if first else t1 - t0
    rate = (len(out) - 1) / (t1 - first[0]) if first and len(out) > 1 and t1 > first[0] else 0.0
    return Answer(image, question, prompt.text, engine.tokenizer.decode(out).strip(), len(out), len(prompt.ids),
                  ttft, rate, t1 - t0, prompt.experts)
