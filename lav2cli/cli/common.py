"""What several command modules share: the console on stderr, loading a model behind a
spinner, and the experts' options of `ask` and `eval vqa|mme`."""

from __future__ import annotations

from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from lav2cli.engine import Engine, load
from lav2cli.experts import Expert, OcrEngine


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def log_to_stderr() -> Callable[[str], None]:
    """A `log(message)` printing plain lines on stderr."""
    err = stderr()
    return lambda m: err.print(m, markup=False, soft_wrap=True)


def load_engine(model: str, *, base: str | None, clip: str | None, device: str, dtype: str,
                inference: bool, quantize: str | None = None) -> Engine:
    with stderr().status(f"loading {model} ...", spinner="dots"):
        return load(model, base=base, clip=clip, device=device, dtype=dtype, inference=inference, quantize=quantize)


Quantize = Annotated[str, typer.Option(
    "--quantize", help="Store the frozen base linears as int8 (per output row) or int4 (int4:GROUP, group-wise "
                       "along the input; int4 = int4:32); the adapter stays float. none: float weights.")]


# the --dtype names every command accepts (engine.DTYPES)
DTYPES_HELP = "float32, bfloat16, float16 (or fp32, bf16, fp16)"

# the rule these options follow is answer.Pipeline.make's
EXPERTS_HELP = (
    "Experts: --expert caption puts a caption of the image into the prompt, --expert ocr the text "
    "found in it. A model marked self_caption (see `lav2 info`) is its own caption expert: it "
    "captions the image first and answers from its caption, without the image. A caption expert "
    "named with --expert caption is used as named, never replaced by the model's own caption; the "
    "model then answers from that caption. OCR's text joins either caption. --no-self-caption "
    "asks the model directly, with the image."
)

Experts = Annotated[list[Expert], typer.Option(
    "--expert", "-e", help="Give the model an expert's text about the image as context: caption, ocr (repeatable).")]
CaptionModel = Annotated[Optional[str], typer.Option(
    "--caption-model", help="Caption expert: a lav2 artifact trained for captioning (default: the "
                            "EfficientNet-Lite0 ImageNet classifier).")]
CaptionThreshold = Annotated[float, typer.Option(
    "--caption-threshold", min=0.0, max=1.0, help="Caption expert (classifier): name the top classes at least "
                                                  "this probable (none: no caption).")]
SelfCaption = Annotated[bool, typer.Option(
    "--self-caption/--no-self-caption", help="A model marked self_caption answers from a caption as context, "
                                             "without the image: its own caption, or the named caption expert's "
                                             "with --expert caption. --no-self-caption asks it directly, with the "
                                             "image.")]
RepetitionPenalty = Annotated[float, typer.Option(
    "--repetition-penalty", min=0.01, help="Make tokens the answer already generated less likely (CTRL-style: "
                                          "1.0 is off, 1.1-1.3 stops most loops).")]
OcrEngineOption = Annotated[OcrEngine, typer.Option(
    "--ocr-engine", help="OCR expert: rapidocr (pip install 'lav2cli[experts]') or tesseract (the program).")]
