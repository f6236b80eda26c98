"""`lav2 ask`: one question about an image (or none), through the answer pipeline (lav2cli.ask)."""

from __future__ import annotations

import typer

from lav2cli import ask as asking
from lav2cli.answer import Pipeline, marked_self_caption
from lav2cli.cli.common import (DTYPES_HELP, EXPERTS_HELP, CaptionModel, CaptionThreshold, Experts,
                                OcrEngineOption, Quantize, RepetitionPenalty, SelfCaption, load_engine,
                                log_to_stderr)
from lav2cli.engine import DEVICE_HELP
from lav2cli.experts import ExpertOptions, OcrEngine
from lav2cli.inference.generate import Sampling
from lav2cli.model.quant import parse_quantize
from lav2cli.registry import DEFAULT_MODEL

# a small model's greedy answer about an image unlike its training images loops; this ends most
# loops and leaves answers without repeated tokens as they were (eval stays at 1.0, as benchmarks score)
ASK_REPETITION_PENALTY = 1.1

app = typer.Typer(add_completion=False)


@app.command(epilog=EXPERTS_HELP)
def ask(
    image: str = typer.Argument(..., help="Image path, 'none' for a text-only question, or '-' for one image path per stdin line."),
    prompt: str = typer.Argument(..., help="The question or instruction."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model reference: a name, an artifact or base directory, a .gguf, or an official .pth."),
    base: str | None = typer.Option(None, help="Base LLaMA (Meta or HF directory) for an official .pth, or to override an artifact's."),
    clip: str | None = typer.Option(None, help="open_clip encoder NAME[:PRETRAINED] (tag or weights file), e.g. ViT-L-14:openai."),
    max_new_tokens: int = typer.Option(256, min=1, help="Stop after this many new tokens."),
    temperature: float = typer.Option(0.1, min=0.0, help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(0.75, min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: int | None = typer.Option(None, help="Random seed for sampling (reproducible answers)."),
    repetition_penalty: RepetitionPenalty = ASK_REPETITION_PENALTY,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer (with timings) instead of streamed text."),
    show_prompt: bool = typer.Option(False, help="Print the full prompt (template applied) on stderr."),
    device: str = typer.Option("auto", help=f"{DEVICE_HELP}."),
    dtype: str = typer.Option("auto", help=f"auto (bf16 on CUDA, fp32 on CPU), {DTYPES_HELP}."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step (pays off on long answers)."),
    quantize: Quantize = "none",
    expert: Experts = [], caption_model: CaptionModel = None, caption_threshold: CaptionThreshold = 0.2,
    ocr_engine: OcrEngineOption = OcrEngine.rapidocr, self_caption: SelfCaption = True,
) -> None:
    """Answer a question about an image (or none) from the shell.

    Examples:

      lav2 ask none "What is the capital of France?" --temperature 0

      lav2 ask photo.jpg "Describe this image."

      lav2 ask sign.png "What does the sign say?" --expert ocr --expert caption --show-prompt

      ls data/easyvqa/images/test/*.png | head -3 | lav2 ask - "What shape is it?" --json

      lav2 ask none "What is the capital of France?" --quantize int8
    """
    named = ExpertOptions.make(expert, caption_model=caption_model, caption_threshold=caption_threshold,
                               ocr_engine=ocr_engine, device=device, dtype=dtype)
    asking.check_image_arg(image, named)
    parse_quantize(quantize)  # a bad value fails before anything loads
    log = log_to_stderr()
    pipeline = Pipeline.make(named, marked=marked_self_caption(model), self_caption=self_caption, log=log)
    pipeline.load()  # an expert that cannot run fails before the model loads
    engine = load_engine(model, base=base, clip=clip, device=device, dtype=dtype, inference=True, quantize=quantize)
    engine.compile_decode = compile
    pipeline.bind(engine)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        repetition_penalty=repetition_penalty)
    status = asking.run(engine, pipeline, image, prompt, sampling, as_json=as_json, show_prompt=show_prompt,
                        model_name=model, log=log)
    raise typer.Exit(status)
