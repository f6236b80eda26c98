"""`lav2 eval vqa|caption|mme|text`: score a model or a predictions file (lav2cli.evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lav2cli.cli.common import (DTYPES_HELP, EXPERTS_HELP, CaptionModel, CaptionThreshold, Experts,
                                OcrEngineOption, Quantize, RepetitionPenalty, SelfCaption)
from lav2cli.engine import DEVICE_HELP
from lav2cli.evaluate import EvalOptions, run
from lav2cli.experts import OcrEngine
from lav2cli.registry import DEFAULT_MODEL

app = typer.Typer(
    help="Score a model on VQA, COCO-style captions, MME or held-out text; predictions as JSON lines.\n\n"
         "Examples:\n\n"
         "  lav2 eval vqa --data data/easyvqa/test.jsonl --model runs/tiny --out runs/tiny/vqa.jsonl --limit 64\n\n"
         "  lav2 eval caption --data karpathy-test.jsonl --predictions coco.jsonl --json",
    no_args_is_help=True, add_completion=False,
)

_EData = Annotated[Path, typer.Option("--data", "-d", help="Records (JSON lines from `lav2 prepare`), or - for standard input.")]
_ERoot = Annotated[Optional[Path], typer.Option("--images-root", help="Folder that relative image paths in the records are relative to (default: the records file's folder; with --data -, the current folder).")]
_EModel = Annotated[Optional[str], typer.Option("--model", "-m", help=f"Model reference (as `lav2 ask`; default {DEFAULT_MODEL}).")]
_EBase = Annotated[Optional[str], typer.Option("--base", help="Base LLaMA for an official .pth, or to override an artifact's.")]
_EClip = Annotated[Optional[str], typer.Option("--clip", help="open_clip encoder NAME[:PRETRAINED] for an official .pth.")]
_EOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="Predictions FILE.jsonl (resumed when it exists); metrics go to FILE.metrics.json. Required, unless --predictions names the file to score.")]
_EOutText = Annotated[Path, typer.Option("--out", "-o", help="Predictions FILE.jsonl (resumed when it exists); metrics go to FILE.metrics.json.")]
_EBatch = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Records per generation batch.")]
_ELimit = Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate only the first N units (quick looks).")]
_EJson = Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object instead of a table.")]
_EMaxNew = Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Greedy decoding length (default: vqa 30, caption 64, mme 30, text 30).")]
_EDevice = Annotated[str, typer.Option("--device", help=f"{DEVICE_HELP}.")]
_EDtype = Annotated[str, typer.Option("--dtype", help=f"auto (bf16 on CUDA, fp32 on CPU), {DTYPES_HELP}.")]
_ECompile = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the decode step (batches are padded to a power of two so that few graphs serve them; pays off on GPUs). Default: on CUDA.", show_default=False)]
_EPred = Annotated[Optional[Path], typer.Option("--predictions", help="Score this predictions file (JSON lines with id and prediction) instead of running a model.")]


@app.command("vqa", epilog=EXPERTS_HELP)
def eval_vqa(
    data: _EData, model: _EModel = None, base: _EBase = None, clip: _EClip = None, out: _EOut = None,
    batch_size: _EBatch = 8, limit: _ELimit = None, as_json: _EJson = False, max_new_tokens: _EMaxNew = None,
    device: _EDevice = "auto", dtype: _EDtype = "auto", compile: _ECompile = None, predictions: _EPred = None,
    quantize: Quantize = "none", repetition_penalty: RepetitionPenalty = 1.0,
    short_answer: Annotated[bool, typer.Option("--short-answer/--no-short-answer", help='Ask for "a single word or phrase" in the template.')] = True,
    suffix: Annotated[str, typer.Option("--suffix", help="Text appended to every question, e.g. 'Answer with one word.'")] = "",
    expert: Experts = [], caption_model: CaptionModel = None, caption_threshold: CaptionThreshold = 0.2,
    ocr_engine: OcrEngineOption = OcrEngine.rapidocr, self_caption: SelfCaption = True, images_root: _ERoot = None,
) -> None:
    """Short-answer accuracy (VQA normalisation; VQAv2's ten answers when records carry "answers").

    Examples:

      lav2 prepare easyvqa --kind vqa --split test --out data/easyvqa/test.jsonl

      lav2 eval vqa --data data/easyvqa/test.jsonl --out easyvqa-demo.jsonl --limit 64

      lav2 eval vqa --data data/easyvqa/records.jsonl --model runs/joint --out runs/joint/easyvqa.jsonl

      lav2 eval vqa --data data/vqa.jsonl --model runs/joint --out preds.jsonl --limit 200 --json

      lav2 eval vqa --data data/vqa.jsonl --model runs/joint --out preds-ocr.jsonl --expert ocr

      lav2 eval vqa --data data/vqa.jsonl --model runs/joint --out preds-int4.jsonl --quantize int4
    """
    run(EvalOptions(task="vqa", data=data, model=model, base=base, clip=clip, out=out, batch_size=batch_size,
                    limit=limit, as_json=as_json, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                    compile=compile, quantize=quantize, predictions=predictions, short_answer=short_answer, suffix=suffix,
                    expert=expert, caption_model=caption_model, caption_threshold=caption_threshold,
                    ocr_engine=ocr_engine, self_caption=self_caption, images_root=images_root,
                    repetition_penalty=repetition_penalty))


@app.command("caption")
def eval_caption(
    data: _EData, model: _EModel = None, base: _EBase = None, clip: _EClip = None, out: _EOut = None,
    batch_size: _EBatch = 8, limit: _ELimit = None, as_json: _EJson = False, max_new_tokens: _EMaxNew = None,
    device: _EDevice = "auto", dtype: _EDtype = "auto", compile: _ECompile = None, predictions: _EPred = None,
    images_root: _ERoot = None,
    quantize: Quantize = "none", repetition_penalty: RepetitionPenalty = 1.0,
) -> None:
    """BLEU-1..4 and CIDEr-D over all reference captions of each image (COCO caption evaluation).

    Examples:

      lav2 eval caption --data data/karpathy-test.jsonl --model runs/joint --out runs/joint/coco.jsonl

      lav2 eval caption --data data/karpathy-test.jsonl --predictions runs/joint/coco.jsonl --json
    """
    run(EvalOptions(task="caption", data=data, model=model, base=base, clip=clip, out=out, batch_size=batch_size,
                    limit=limit, as_json=as_json, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                    compile=compile, quantize=quantize, predictions=predictions, images_root=images_root,
                    repetition_penalty=repetition_penalty))


@app.command("mme", epilog=EXPERTS_HELP)
def eval_mme(
    data: _EData, model: _EModel = None, base: _EBase = None, clip: _EClip = None, out: _EOut = None,
    batch_size: _EBatch = 8, limit: _ELimit = None, as_json: _EJson = False, max_new_tokens: _EMaxNew = None,
    device: _EDevice = "auto", dtype: _EDtype = "auto", compile: _ECompile = None, predictions: _EPred = None,
    quantize: Quantize = "none", repetition_penalty: RepetitionPenalty = 1.0,
    expert: Experts = [], caption_model: CaptionModel = None, caption_threshold: CaptionThreshold = 0.2,
    ocr_engine: OcrEngineOption = OcrEngine.rapidocr, self_caption: SelfCaption = True, images_root: _ERoot = None,
) -> None:
    """The MME protocol: yes/no parsing, acc and acc+ per subtask, perception and cognition totals.

    Examples:

      lav2 eval mme --data data/mme.jsonl --model llama-adapter.pth --base llama-7b --out mme.jsonl

      lav2 eval mme --data data/mme.jsonl --predictions mme.jsonl --json

      lav2 eval mme --data data/mme.jsonl --model runs/joint --out mme-experts.jsonl --expert caption --expert ocr
    """
    run(EvalOptions(task="mme", data=data, model=model, base=base, clip=clip, out=out, batch_size=batch_size,
                    limit=limit, as_json=as_json, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                    compile=compile, quantize=quantize, predictions=predictions, expert=expert, caption_model=caption_model,
                    caption_threshold=caption_threshold, ocr_engine=ocr_engine, self_caption=self_caption,
                    images_root=images_root, repetition_penalty=repetition_penalty))


@app.command("text")
def eval_text(
    data: _EData, model: _EModel = None, base: _EBase = None, clip: _EClip = None, out: _EOutText = ...,
    batch_size: _EBatch = 8, limit: _ELimit = None, as_json: _EJson = False, max_new_tokens: _EMaxNew = None,
    device: _EDevice = "auto", dtype: _EDtype = "auto", compile: _ECompile = None,
    quantize: Quantize = "none", repetition_penalty: RepetitionPenalty = 1.0,
    exact_match: Annotated[Optional[bool], typer.Option("--exact-match/--no-exact-match", help="Also generate and report exact match (default: when every reference is at most 3 words).")] = None,
    images_root: _ERoot = None,
) -> None:
    """Mean loss and perplexity over response tokens (and exact match for short answers).

    Examples:

      lav2 eval text --data benchmarks/text-facts.jsonl --out text-facts.jsonl

      lav2 eval text --data data/alpaca.val.jsonl --model runs/finetune --out runs/finetune/val.jsonl

      lav2 eval text --data data/easyvqa/records.val.jsonl --model runs/joint --out val.jsonl --json
    """
    run(EvalOptions(task="text", data=data, model=model, base=base, clip=clip, out=out, batch_size=batch_size,
                    limit=limit, as_json=as_json, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                    compile=compile, quantize=quantize, exact_match=exact_match, images_root=images_root,
                    repetition_penalty=repetition_penalty))
