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
- the OCR expert's text joins either caption;
- an image unlike the images the model was trained on (`DomainCheck`: its encoder features lie
  far from the training images' `FeatureStats`, which training stores in the artifact) is said
  so (a note, and `out_of_domain` in the answer), and a model that would caption it itself gets
  the caption and OCR experts' text instead: its own caption would describe its training world.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
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


# -- is the image like the training images? ------------------------------------------------------

# An image is unfamiliar when its distance (FeatureStats.distance: about 1 for training images)
# exceeds this; README.md ("The demo model") has the distances it was chosen from.
DOMAIN_THRESHOLD = 2.4
STATS_COMPONENTS = 64  # the directions of the training images' subspace FeatureStats keeps
NOTES_LISTED = 5  # unfamiliar images named one by one in a command's notes


@dataclass(frozen=True)
class FeatureStats:
    """Where a model's training images lie in its encoder's feature space: the `mean` [C] of
    their pooled (token-averaged) encoder features, the `basis` [k, C] of the k directions those
    vary most in, and `scale`, their root mean square distance from that subspace. Training
    writes them into the artifact (artifact.FEATURE_STATS)."""

    mean: torch.Tensor
    basis: torch.Tensor
    scale: float

    @classmethod
    def fit(cls, pooled: torch.Tensor, components: int = STATS_COMPONENTS) -> "FeatureStats":
        """The statistics of pooled features [N, C] of N training images."""
        x = pooled.double()
        mean = x.mean(0)
        centred = x - mean
        # at most half as many directions as images: N - 1 directions would hold every image of
        # the sample exactly, leaving no distance to measure the others in
        k = max(0, min(components, (x.shape[0] - 1) // 2, x.shape[1] - 1))
        basis = torch.linalg.svd(centred, full_matrices=False).Vh[:k]
        resid = centred - centred @ basis.T @ basis
        spread = float(centred.square().sum(1).mean().sqrt())
        scale = max(float(resid.square().sum(1).mean().sqrt()), 1e-6 * spread, 1e-12)  # one image: no spread
        return cls(mean.float(), basis.float(), scale)

    def distance(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] distances of images' encoder tokens [B, N, C] from the training images' subspace,
        in units of `scale` (over the training images themselves, their root mean square is 1)."""
        p = tokens.float().mean(1) - self.mean.to(tokens.device)
        basis = self.basis.to(tokens.device)
        return (p - p @ basis.T @ basis).norm(dim=1) / self.scale

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "basis": self.basis, "scale": torch.tensor(self.scale)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], channels: int | None, where: str) -> "FeatureStats":
        """Read back to_tensors (checked against the encoder's `channels`)."""
        mean, basis, scale = t.get("mean"), t.get("basis"), t.get("scale")
        if (mean is None or basis is None or scale is None or mean.dim() != 1 or basis.dim() != 2
                or basis.shape[1] != mean.shape[0] or scale.numel() != 1 or not float(scale) > 0
                or (channels is not None and mean.shape[0] != channels)):
            shapes = {k: list(v.shape) for k, v in t.items()}
            raise Lav2Error(f"{where}: {artifact.FEATURE_STATS} does not hold feature statistics of a "
                            f"{channels}-channel encoder (mean [C], basis [k, C], scale []; found {shapes})")
        return cls(mean.float(), basis.float(), float(scale))


@dataclass(frozen=True)
class Domain:
    """What the domain check found about one image."""

    distance: float
    threshold: float

    @property
    def unfamiliar(self) -> bool:
        return self.distance > self.threshold

    def to_json(self) -> dict[str, Any]:
        return {"out_of_domain": self.unfamiliar, "domain_distance": round(self.distance, 3)}


@dataclass
class DomainCheck:
    """Tells images unlike a model's training images: their FeatureStats distance exceeds the
    threshold."""

    stats: FeatureStats
    threshold: float = DOMAIN_THRESHOLD
    _seen: dict[str, Domain] = field(default_factory=dict)  # by image file

    @classmethod
    def of(cls, engine: Engine) -> "DomainCheck | None":
        """The check of a loaded model that sees and whose artifact stores statistics; else None."""
        c = engine.config
        if not c.feature_stats or not engine.can_see:
            return None
        channels = c.adapter.visual.encoder_dim if c.adapter is not None and c.adapter.visual is not None else None
        return cls(FeatureStats.from_tensors(c.feature_stats, channels, c.ref))

    def knows(self, path: str) -> bool:
        return path in self._seen

    def check_files(self, encode: Callable[[list["Image"]], torch.Tensor], paths: list[str],
                    load: Callable[[str], "Image"]) -> list[Domain]:
        """Each image file's `Domain`, computed once per command (new files in one batch);
        `encode` turns images into encoder tokens [B, N, C]."""
        new = list(dict.fromkeys(p for p in paths if p not in self._seen))
        if new:
            with torch.no_grad():
                dist = self.stats.distance(encode([load(p) for p in new])).tolist()
            self._seen.update((p, Domain(d, self.threshold)) for p, d in zip(new, dist))
        return [self._seen[p] for p in paths]


def encoder_tokens(engine: Engine) -> Callable[[list["Image"]], torch.Tensor]:
    """Images -> the engine's encoder tokens [B, N, C] (what its visual branch reads)."""
    return lambda images: engine.model.encode_images(engine.image_tensor(images))


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
    domain: Domain | None = None  # the domain check's finding (None: no image, or no check)


@dataclass
class Batch:
    """Questions made ready for one `Engine.generate` call."""

    prompts: list[Prompt]
    images: torch.Tensor | None  # None: no row's image is read by the answer pass
    image_mask: torch.Tensor | None  # False for rows without an image


class Pipeline:
    """The experts of one command and how their text reaches the answering model."""

    def __init__(self, experts: Experts, from_caption: bool = False, fallback: Experts | None = None,
                 log: Callable[[str], None] | None = None):
        self.experts = experts
        self.from_caption = from_caption  # the answer pass reads the caption, not the image
        # the experts that replace the model's own caption on an unfamiliar image
        self.fallback = fallback
        self.log = log or (lambda m: None)
        self.domain: DomainCheck | None = None  # set by bind
        self._noted = 0
        self._fallback_loaded = False

    @classmethod
    def make(cls, options: ExpertOptions, *, marked: bool, self_caption: bool = True,
             log: Callable[[str], None] | None = None) -> "Pipeline":
        """The rule (see the module docstring): `options` are the experts named on the command
        line, `marked` whether the answering model is marked self_caption, `self_caption`
        whether self-captioning is on; `log` receives the notes on unfamiliar images."""
        from_caption = marked and self_caption
        fallback = None
        if from_caption and "caption" not in options.experts:
            fallback = Experts(replace(options, experts=("caption", "ocr")))  # the classifier's caption
            options = replace(options, experts=("caption",) + options.experts, self_caption=True)
        return cls(Experts(options), from_caption, fallback, log)

    @property
    def options(self) -> ExpertOptions:
        return self.experts.options

    def sources(self) -> list[list[str]]:
        """[name, source] of each expert, in order (kept with predictions and metrics)."""
        return self.options.sources()

    def accepts(self, sources: list[list[str]]) -> bool:
        """Whether an image's expert sources are this pipeline's (or those it uses for an
        unfamiliar image): a resumed evaluation must not mix experts."""
        return sources == self.sources() or (self.fallback is not None and sources == self.fallback.options.sources())

    def load(self) -> None:
        """Build the experts' models now, so that one that cannot run fails before the language
        model loads."""
        self.experts.load()

    def bind(self, engine: Engine) -> None:
        """Make the answering model its own caption expert when the rule says so, and check
        images against its training images when its artifact stores their statistics."""
        self.domain = DomainCheck.of(engine)
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

        domains = self._domains(engine, questions, image)
        outputs = self._expert_outputs(questions, domains, image)
        tpl, tok = engine.template, engine.tokenizer
        prompts = []
        for q, outs, dom in zip(questions, outputs, domains):
            parts = (q.instruction, join_context(q.input, context(outs)), q.short_answer, q.history, q.system)
            prompts.append(Prompt(tpl.prompt(*parts), tpl.encode_prompt(tok, *parts), outs, dom))
        images, mask = (None, None) if self.from_caption else image_batch(engine, [q.image for q in questions], image)
        return Batch(prompts, images, mask)

    def _domains(self, engine: Engine, questions: list[Question],
                 load: Callable[[str], "Image"]) -> list[Domain | None]:
        """Each question's domain check (None without an image or without a check); a note for
        each image newly found unfamiliar."""
        if self.domain is None:
            return [None for _ in questions]
        paths = [q.image for q in questions if q.image is not None]
        fresh = [p for p in dict.fromkeys(paths) if not self.domain.knows(p)]
        found = dict(zip(paths, self.domain.check_files(encoder_tokens(engine), paths, load)))
        for p in fresh:
            if found[p].unfamiliar:
                self._note(engine, p, found[p])
        return [found[q.image] if q.image is not None else None for q in questions]

    def _note(self, engine: Engine, path: str, dom: Domain) -> None:
        self._noted += 1
        if self._noted > NOTES_LISTED:
            if self._noted == NOTES_LISTED + 1:
                self.log("lav2: note: more images are unlike the training images; not listed one by one "
                         "(out_of_domain in the answers and predictions says which)")
            return
        if self.fallback is not None:
            how = "answering from the caption and OCR experts instead of its own caption"
        elif self.from_caption:
            how = "answering from the caption expert named"
        else:
            how = "its answer may describe its training images rather than this one"
        self.log(f"lav2: note: {path} looks unlike the images {engine.config.ref} was trained on (feature "
                 f"distance {dom.distance:.1f}, threshold {dom.threshold:.1f}): {how}")

    def _fallback_experts(self) -> Experts:
        """The caption and OCR experts for unfamiliar images, built on first use; without the
        OCR engine installed, the caption expert alone (with a note)."""
        assert self.fallback is not None
        if not self._fallback_loaded:
            try:
                self.fallback.load()
            except Lav2Error as e:
                if "ocr" not in self.fallback.options.experts:
                    raise
                self.log(f"lav2: note: {e}; unfamiliar images get the caption expert alone")
                opts = self.fallback.options
                self.fallback = Experts(replace(opts, experts=tuple(n for n in opts.experts if n != "ocr")))
                self.fallback.load()
            self._fallback_loaded = True
        return self.fallback

    def _expert_outputs(self, questions: list[Question], domains: list[Domain | None],
                        load: Callable[[str], "Image"]) -> list[list[ExpertOutput]]:
        """Each question's expert outputs (none without an image or without experts); an
        unfamiliar image gets the fallback experts' when there are any."""
        def swapped(d: Domain | None) -> bool:
            return self.fallback is not None and d is not None and d.unfamiliar

        out: list[list[ExpertOutput]] = [[] for _ in questions]
        for experts, pick in ((self.experts, lambda d: not swapped(d)), (self.fallback, swapped)):
            rows = [i for i, (q, d) in enumerate(zip(questions, domains)) if q.image is not None and pick(d)]
            if not rows or experts is None or not experts:
                continue
            if experts is self.fallback:
                experts = self._fallback_experts()
            for i, outs in zip(rows, experts.run_files([questions[i].image for i in rows], load)):
                out[i] = outs
        return out


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
    domain: Domain | None = None

    def to_json(self, model: str) -> dict:
        return {
            "image": self.image, "question": self.question, "answer": self.answer, "model": model,
            "experts": [e.to_json() for e in self.experts],
            **(self.domain.to_json() if self.domain is not None else {"out_of_domain": None}),
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
                  ttft, rate, t1 - t0, prompt.experts, prompt.domain)
