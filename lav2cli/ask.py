"""`lav2 ask`: one question about one image (or none), or one per stdin line, answered through
the answer pipeline; the answer streams to stdout unless --json.

With image paths on stdin (`-`) each answer is one line, `PATH<TAB>ANSWER` (or one JSON object
with --json), in the order of the paths, so that `cut -f2` or `awk -F'\t'` can take it apart."""

from __future__ import annotations

import json
import sys
from typing import Callable, Iterable

from lav2cli.answer import Pipeline, answer
from lav2cli.engine import Engine
from lav2cli.errors import Lav2Error
from lav2cli.experts import ExpertOptions
from lav2cli.inference.generate import Sampling
from lav2cli.model.vision import load_image


def check_image_arg(image: str, experts: ExpertOptions) -> None:
    """Fail before the model loads when a single IMAGE argument is unusable."""
    if experts.experts and image.lower() == "none":
        raise Lav2Error("--expert reads the image, but IMAGE is none")
    if image not in ("-",) and image.lower() != "none":
        load_image(image)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(engine: Engine, pipeline: Pipeline, image: str, question: str, sampling: Sampling, *, as_json: bool,
        show_prompt: bool, model_name: str, stdin: Iterable[str] = sys.stdin,
        log: Callable[[str], None] | None = None) -> int:
    """Drive `lav2 ask`; returns the exit status (1 when any stdin line failed)."""
    if image == "-" and log is not None and getattr(stdin, "isatty", lambda: False)():
        log("reading image paths from stdin, one per line (Ctrl-D ends)")
    if image == "-":  # lazily: each answer is printed before the next line is read
        paths: Iterable[str | None] = (line.strip() for line in stdin if line.strip())
    else:
        paths = [None if image.lower() == "none" else image]
    if image.lower() != "none" and not engine.can_see and log is not None:
        log("note: this model has no trained visual branch, so it cannot see the image; the answer comes "
            + ("from the text and the experts' context" if pipeline.experts else "from the text alone"))
    status = 0
    for p in paths:
        streaming = not as_json and image != "-"
        try:
            ans = answer(engine, pipeline, p, question, sampling, on_text=_write if streaming else None,
                         show_prompt=log if show_prompt else None)
        except Lav2Error as e:
            if image != "-":
                raise
            status = 1
            if log is not None:
                log(f"lav2: error: {e}")
            print(json.dumps({"image": p, "question": question, "error": str(e)}) if as_json else f"{p}\t",
                  flush=True)
            continue
        if as_json:
            print(json.dumps(ans.to_json(model_name)), flush=True)
        elif streaming:
            _write("\n")
        else:  # one line per path in pipelines
            print(f"{p}\t{' '.join(ans.answer.split())}", flush=True)
    return status
