"""`lav2 ask`: one question about one image (or none), or one per stdin line, answered by
the engine; the answer streams to stdout unless --json."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import IO, Callable, Iterable

from lav2cli.engine import Engine
from lav2cli.errors import Lav2Error
from lav2cli.experts import ExpertOutput, Experts, context
from lav2cli.inference.generate import Sampling
from lav2cli.model.vision import load_image
from lav2cli.tokenizer import StreamDecoder


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


def answer_one(engine: Engine, image_path: str | None, question: str, sampling: Sampling,
               experts: Experts | None = None, stream: IO[str] | None = None,
               show_prompt: Callable[[str], None] | None = None) -> Answer:
    """Answer `question` about the image at `image_path` (None: text only), with the experts'
    text about the image as context; `show_prompt` receives the final prompt. A self-captioning
    model answers from its caption alone (the image was read by the caption pass)."""
    images, outputs = None, []
    if image_path is not None:
        pil = load_image(image_path)
        if engine.image_transform is not None and not (experts and experts.options.self_caption):
            images = engine.image_tensor([pil])
        if experts:
            outputs = experts.run(pil, image_path)
    tpl = engine.template
    ctx = context(outputs)
    prompt_text = tpl.prompt(question, ctx)
    if show_prompt is not None:
        show_prompt(prompt_text)
    ids = tpl.encode_prompt(engine.tokenizer, question, ctx)
    decoder = StreamDecoder(engine.tokenizer) if stream is not None else None
    t0 = time.perf_counter()
    first: list[float] = []

    def on_token(row: int, new_ids: list[int]) -> None:
        if not first:
            first.append(time.perf_counter())
        if decoder is not None:
            text = decoder.push(new_ids[-1])
            if text:
                stream.write(text)
                stream.flush()

    out = engine.generate([ids], images=images, sampling=sampling, on_token=on_token)[0]
    t1 = time.perf_counter()
    if decoder is not None:
        rest = decoder.flush()
        if rest:
            stream.write(rest)
        stream.write("\n")
        stream.flush()
    ttft = (first[0] - t0) if first else t1 - t0
    rate = (len(out) - 1) / (t1 - first[0]) if first and len(out) > 1 and t1 > first[0] else 0.0
    return Answer(image_path, question, prompt_text, engine.tokenizer.decode(out).strip(), len(out), len(ids),
                  ttft, rate, t1 - t0, outputs)


def check_image_arg(image: str, experts: Experts | None = None) -> None:
    """Fail before the model loads when a single IMAGE argument is unusable."""
    if experts and image.lower() == "none":
        raise Lav2Error("--expert reads the image, but IMAGE is none")
    if image not in ("-",) and image.lower() != "none":
        load_image(image)


def run(engine: Engine, image: str, question: str, sampling: Sampling, *, as_json: bool, show_prompt: bool,
        model_name: str, stdin: Iterable[str] = sys.stdin, log=None,
        experts: Experts | None = None) -> int:
    """Drive `lav2 ask`; returns the exit status (1 when any stdin line failed)."""
    if image == "-":  # lazily: each answer is printed before the next line is read
        paths: Iterable[str | None] = (line.strip() for line in stdin if line.strip())
    else:
        paths = [None if image.lower() == "none" else image]
    if image.lower() != "none" and not engine.can_see and log is not None:
        log("note: this model has no trained visual branch, so it cannot see the image; the answer comes "
            + ("from the text and the experts' context" if experts else "from the text alone"))
    status = 0
    for p in paths:
        try:
            streaming = not as_json and image != "-"
            ans = answer_one(engine, p, question, sampling, experts, stream=sys.stdout if streaming else None,
                             show_prompt=log if show_prompt else None)
        except Lav2Error as e:
            if image != "-":
                raise
            status = 1
            if log is not None:
                log(f"lav2: error: {e}")
            print(json.dumps({"image": p, "question": question, "error": str(e)}) if as_json else "", flush=True)
            continue
        if as_json:
            print(json.dumps(ans.to_json(model_name)), flush=True)
        elif not streaming:
            print(ans.answer.replace("\n", " "), flush=True)  # one answer per line in pipelines
    return status
