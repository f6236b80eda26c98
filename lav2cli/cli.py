"""The `lav2` command line: one short function per command; the work lives in the modules."""

from __future__ import annotations

import os
import sys

import typer

from lav2cli import __version__
from lav2cli.errors import Lav2Error

app = typer.Typer(
    name="lav2",
    help="LLaMA-Adapter V2 from the shell: prepare data, train adapters, merge, evaluate, ask.\n\n"
         "Examples:\n\n"
         "  lav2 ask none \"What is the capital of France?\" --temperature 0\n\n"
         "  lav2 prepare easyvqa --kind vqa --out data/easyvqa/vqa.jsonl\n\n"
         "  lav2 train --recipe recipes/tiny.toml --out runs/tiny\n\n"
         "  lav2 ask photo.png \"What shape is this?\" --model runs/tiny",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
prepare_app = typer.Typer(
    help="Convert a dataset into lav2 records (JSON lines) plus a manifest.\n\n"
         "Examples:\n\n"
         "  lav2 prepare easyvqa --kind caption --split train --out data/easyvqa/captions.jsonl\n\n"
         "  lav2 prepare coco --annotations captions_train2017.json --images train2017 --out data/coco.jsonl",
    no_args_is_help=True,
)
app.add_typer(prepare_app, name="prepare")


def _debug() -> bool:
    return os.environ.get("LAV2_DEBUG", "") not in ("", "0")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if debug:
        os.environ["LAV2_DEBUG"] = "1"
    if version:
        print(__version__)
        raise typer.Exit(0)


# --- prepare (lav2cli/data) -------------------------------------------------------------

from pathlib import Path  # noqa: E402
from typing import Annotated, Literal, Optional  # noqa: E402

from lav2cli.data import prepare as _data  # noqa: E402  (torch-free; PIL and rich load lazily)
from lav2cli.registry import DEFAULT_MODEL  # noqa: E402

_Out = Annotated[str, typer.Option("--out", "-o", help="FILE.jsonl (FILE.manifest.json beside it), or - for stdout (no manifest).")]
_Val = Annotated[float, typer.Option("--val-fraction", help="Share of images (text: records) for FILE.val.jsonl, by SHA-256 of image or id.")]
_Strict = Annotated[bool, typer.Option("--strict", help="Stop at the first problem (exit 1 naming FILE:LINE) and write nothing.")]
_Check = Annotated[bool, typer.Option("--check-images/--no-check-images", help="Open and fully decode every image once (in threads).")]
_Workers = Annotated[Optional[int], typer.Option("--workers", min=1, help="Threads for image checks and copies (default: cores + 4, at most 32).")]
_Instruction = Annotated[Optional[str], typer.Option("--instruction", help='Caption instruction (default: "Generate caption of this image").')]


@prepare_app.command("coco")
def prepare_coco(
    annotations: Annotated[Path, typer.Option("--annotations", help="captions_*.json, or a Karpathy dataset_coco.json.")],
    images: Annotated[Path, typer.Option("--images", help="Folder the file names (Karpathy: filepath/filename) are relative to.")],
    out: _Out,
    split: Annotated[Optional[str], typer.Option("--split", help="Karpathy only: splits to keep, comma-separated (train, restval, val, test).")] = None,
    captions: Annotated[Literal["all", "first"], typer.Option("--captions", help="One record per caption, or per image (its first caption).")] = "all",
    instruction: _Instruction = None,
    val_fraction: _Val = 0.0,
    strict: _Strict = False,
    check_images: _Check = True,
    workers: _Workers = None,
) -> None:
    """COCO captions or the Karpathy split file -> caption records.

    Examples:

      lav2 prepare coco --annotations annotations/captions_train2017.json --images train2017 --out data/coco-train.jsonl

      lav2 prepare coco --annotations dataset_coco.json --images coco --split train,restval --val-fraction 0.01 --out data/karpathy.jsonl
    """
    _data.prepare("coco", **locals())


@prepare_app.command("csv")
def prepare_csv(
    input: Annotated[Path, typer.Option("--input", help="Tab- or comma-separated table with a header.")],
    out: _Out,
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder relative image paths resolve against (default: the table's folder).")] = None,
    image_column: Annotated[Optional[str], typer.Option("--image-column", help="Image column (default: url, image or path).")] = None,
    caption_column: Annotated[Optional[str], typer.Option("--caption-column", help="Caption column (default: caption or text).")] = None,
    instruction: _Instruction = None,
    val_fraction: _Val = 0.0,
    strict: _Strict = False,
    check_images: _Check = True,
    workers: _Workers = None,
) -> None:
    """Caption tables (CC3M-style, the release's url<TAB>caption lists) -> caption records.

    Examples:

      lav2 prepare csv --input cc3m.tsv --images cc3m/ --out data/cc3m.jsonl

      lav2 prepare csv --input pairs.csv --image-column file --caption-column text --no-check-images --out -
    """
    _data.prepare("csv", **locals())


@prepare_app.command("alpaca")
def prepare_alpaca(
    input: Annotated[Path, typer.Option("--input", help="JSON list or JSON lines of instruction, input, output.")],
    out: _Out,
    val_fraction: _Val = 0.0,
    strict: _Strict = False,
    workers: _Workers = None,
) -> None:
    """Alpaca / GPT-4-LLM instruction data -> text-only instruction records.

    Examples:

      lav2 prepare alpaca --input alpaca_gpt4_data.json --out data/alpaca.jsonl

      lav2 prepare alpaca --input alpaca_data.json --val-fraction 0.02 --out data/alpaca.jsonl
    """
    _data.prepare("alpaca", **locals())


@prepare_app.command("llava")
def prepare_llava(
    input: Annotated[Path, typer.Option("--input", help="LLaVA JSON (id, image, conversations) or JSON lines.")],
    out: _Out,
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder the image names are relative to (default: the input's folder).")] = None,
    keep_history: Annotated[bool, typer.Option("--keep-history", help="Put earlier turns into input as Human:/Assistant: lines.")] = False,
    turns: Annotated[Literal["all", "first"], typer.Option("--turns", help="One record per turn, or the first turn only (as the release).")] = "all",
    val_fraction: _Val = 0.0,
    strict: _Strict = False,
    check_images: _Check = True,
    workers: _Workers = None,
) -> None:
    """LLaVA conversations -> single-turn instruction records (text-only samples stay text-only).

    Examples:

      lav2 prepare llava --input llava_instruct_150k.json --images coco/train2014 --out data/llava.jsonl

      lav2 prepare llava --input llava_instruct_150k.json --images coco/train2014 --turns first --out data/llava-first.jsonl
    """
    _data.prepare("llava", **locals())


@prepare_app.command("mme")
def prepare_mme(
    root: Annotated[Path, typer.Option("--root", help="MME_Benchmark_release_version (or the folder holding it).")],
    out: _Out,
    strict: _Strict = False,
    check_images: _Check = True,
    workers: _Workers = None,
) -> None:
    """The MME benchmark folder (both layouts) -> yes/no vqa records with subtask, category and pair.

    Examples:

      lav2 prepare mme --root MME_Benchmark_release_version --out data/mme.jsonl
    """
    _data.prepare("mme", **locals())


@prepare_app.command("easyvqa")
def prepare_easyvqa(
    out: _Out,
    split: Annotated[Literal["train", "test", "both"], typer.Option("--split", help="Which easy-VQA set(s).")] = "both",
    kind: Annotated[Literal["vqa", "caption", "both"], typer.Option("--kind", help="Question records, caption records (a red circle), or both.")] = "both",
    instruction: _Instruction = None,
    yes_no_twins: Annotated[bool, typer.Option("--yes-no-twins", help="After each yes/no question, its twin about the same image with the other answer (the image's own colour or shape swapped in or out): yes and no become equally likely, so the answer must come from the image. For training sets.")] = False,
    caption_context: Annotated[bool, typer.Option("--caption-context", help='Each question\'s input is its image\'s caption as the caption expert words it ("Image caption: a red circle"), and the question has no image: data for a model that captions first and answers from its caption (recipe data.caption_context). Caption records keep their images.')] = False,
    val_fraction: _Val = 0.0,
    strict: _Strict = False,
    check_images: _Check = True,
    workers: _Workers = None,
) -> None:
    """The easy-VQA package (images copied to OUT_DIR/images/SPLIT/) -> vqa and caption records.

    Examples:

      lav2 prepare easyvqa --out data/easyvqa/records.jsonl

      lav2 prepare easyvqa --split train --kind caption --out data/easyvqa/captions.jsonl

      lav2 prepare easyvqa --split train --kind vqa --yes-no-twins --out data/easyvqa/vqa.jsonl

      lav2 prepare easyvqa --split train --kind both --yes-no-twins --caption-context --out data/easyvqa/read.jsonl
    """
    _data.prepare("easyvqa", **locals())


@prepare_app.command("distill")
def prepare_distill(
    out: _Out,
    model: Annotated[str, typer.Option("--model", "-m", help="The model whose answers become the records (a base, or any model reference).")] = "smollm2-135m-instruct",
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="One prompt per line (# comments), or JSON lines with instruction (and input). Default: the packaged set of varied prompts.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer kept; longer ones are not selected.")] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Prompts per generation batch.")] = 16,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    val_fraction: _Val = 0.0,
    strict: _Strict = False,
) -> None:
    """A model's own greedy answers to prompts -> text-only instruction records.

    Mixed into adapter training (recipe key data.text), they keep the base model's language
    ability while the adapter learns a new task.

    Examples:

      lav2 prepare distill --out data/text/distill.jsonl

      lav2 prepare distill --model smollm2-135m-instruct --prompts my-prompts.txt --out data/text/mine.jsonl
    """
    _data.prepare("distill", check_images=False, **locals())


# --- end prepare ------------------------------------------------------------------------


# --- train (lav2cli/train.py) ---------------------------------------------------------------


@app.command()
def train(
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="TOML recipe (see recipes/)."),
    stage: str | None = typer.Option(None, help="pretrain, finetune or joint (overrides train.stage)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field: SECTION.KEY=VALUE (repeatable)."),
    out: str = typer.Option("runs/lav2", "--out", "-o", help="Run directory: the adapter artifact, checkpoint and metrics."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its last checkpoint stopped."),
    max_steps: int | None = typer.Option(None, help="Stop after this many optimiser steps (overrides train.max_steps)."),
    force: bool = typer.Option(False, "--force", help="Start over in a non-empty --out."),
    stop_after: int | None = typer.Option(None, help="Checkpoint and exit after this many steps in all; the schedule stays the full run's (continue with --resume)."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun: shard the frozen base's blocks across the processes (train.fsdp)."),
) -> None:
    """Train the adapter: stage pretrain (image-text), finetune (instructions) or joint (both).

    Examples:

      lav2 train --recipe recipes/tiny.toml --out runs/tiny

      lav2 train --recipe recipes/tiny.toml --stage finetune --set train.batch_size=8 --out runs/ft

      lav2 train --out runs/ft --resume

      torchrun --nproc_per_node 2 -m lav2cli train --recipe recipes/tiny.toml --out runs/ddp

      torchrun --nproc_per_node 8 -m lav2cli train --recipe recipes/llama7b-joint.toml --fsdp --out runs/7b
    """
    from pathlib import Path

    from rich.table import Table

    from lav2cli import train as train_mod

    overrides = list(set_)
    if stage:
        overrides.append(f"train.stage={stage}")
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if fsdp:
        overrides.append("train.fsdp=true")
    out_dir = Path(out)
    r = train_mod.resolve(recipe, overrides, out_dir, resume)
    created = not out_dir.exists()
    train_mod.prepare_out(out_dir, resume, force)
    err = _stderr()
    try:
        trainer = train_mod.Trainer(r, out_dir, resume, log=lambda m: err.print(m, markup=False, soft_wrap=True))
    except BaseException:
        if created and not any(out_dir.iterdir()):  # a run that could not start leaves no empty --out
            out_dir.rmdir()
        raise
    if trainer.dist.main:
        table = Table(title="recipe", show_header=False, title_justify="left")
        for sec, values in r.to_dict().items():
            for k, v in values.items():
                table.add_row(f"{sec}.{k}", str(v))
        for grp, n in trainer.print_groups():
            table.add_row(f"trainable: {grp}", f"{n:,} parameters")
        table.add_row("steps", f"{trainer.total_steps} (lr {trainer.lr:.3g}, global batch {trainer.global_batch})")
        err.print(table)
    info = trainer.run(stop_after)
    if trainer.dist.main:
        err.print(f"done: {info.steps} steps, final loss {info.final_loss:.4f}, {info.tokens_per_s:.0f} tok/s, "
                  f"{info.seconds:.1f} s")
        print(info.out)

# --- end train ------------------------------------------------------------------------------


# --- eval (lav2cli/evaluate) ----------------------------------------------------------------

eval_app = typer.Typer(
    help="Score a model on VQA, COCO-style captions, MME or held-out text; predictions as JSON lines.\n\n"
         "Examples:\n\n"
         "  lav2 eval vqa --data data/easyvqa/test.jsonl --model runs/tiny --out runs/tiny/vqa.jsonl --limit 64\n\n"
         "  lav2 eval caption --data karpathy-test.jsonl --predictions coco.jsonl --json",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")

from lav2cli import evaluate as _eval  # noqa: E402  (torch-free; the model loads only when needed)

_EData = Annotated[Path, typer.Option("--data", "-d", help="Records (JSON lines from `lav2 prepare`).")]
_EModel = Annotated[Optional[str], typer.Option("--model", "-m", help=f"Model reference (as `lav2 ask`; default {DEFAULT_MODEL}).")]
_EBase = Annotated[Optional[str], typer.Option("--base", help="Base LLaMA for an official .pth, or to override an artifact's.")]
_EClip = Annotated[Optional[str], typer.Option("--clip", help="open_clip encoder NAME[:PRETRAINED] for an official .pth.")]
_EOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="Predictions FILE.jsonl (resumed when it exists); metrics go to FILE.metrics.json.")]
_EBatch = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Records per generation batch.")]
_ELimit = Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate only the first N units (quick looks).")]
_EJson = Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object instead of a table.")]
_EMaxNew = Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Greedy decoding length (default: vqa 30, caption 64, mme 30, text 30).")]
_EDevice = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
_EDtype = Annotated[str, typer.Option("--dtype", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")]
_ECompile = Annotated[bool, typer.Option("--compile", help="torch.compile the decode step (batches are padded to a power of two so that few graphs serve them; pays off on GPUs).")]
_EPred = Annotated[Optional[Path], typer.Option("--predictions", help="Score this predictions file (JSON lines with id and prediction) instead of running a model.")]

from lav2cli.experts import Expert, OcrEngine  # noqa: E402  (stdlib only; the expert models load lazily)

_Experts = Annotated[list[Expert], typer.Option("--expert", "-e", help="Give the model an expert's text about the image as context: caption, ocr (repeatable).")]
_CaptionModel = Annotated[Optional[str], typer.Option("--caption-model", help="Caption expert: a lav2 artifact trained for captioning (default: the EfficientNet-Lite0 ImageNet classifier).")]
_CaptionThreshold = Annotated[float, typer.Option("--caption-threshold", min=0.0, max=1.0, help="Caption expert (classifier): name the top classes at least this probable (none: no caption).")]
_SelfCaption = Annotated[bool, typer.Option("--self-caption/--no-self-caption", help="A model marked self_caption captions each image itself and answers from its caption (as context, without the image); --no-self-caption asks it directly.")]
_OcrEngine = Annotated[OcrEngine, typer.Option("--ocr-engine", help="OCR expert: rapidocr (pip install 'lav2cli[experts]') or tesseract (the program).")]


@eval_app.command("vqa")
def eval_vqa(
    data: _EData, model: _EModel = None, base: _EBase = None, clip: _EClip = None, out: _EOut = None,
    batch_size: _EBatch = 8, limit: _ELimit = None, as_json: _EJson = False, max_new_tokens: _EMaxNew = None,
    device: _EDevice = "auto", dtype: _EDtype = "auto", compile: _ECompile = False, predictions: _EPred = None,
    short_answer: Annotated[bool, typer.Option("--short-answer/--no-short-answer", help='Ask for "a single word or phrase" in the template.')] = True,
    suffix: Annotated[str, typer.Option("--suffix", help="Text appended to every question, e.g. 'Answer with one word.'")] = "",
    expert: _Experts = [], caption_model: _CaptionModel = None, caption_threshold: _CaptionThreshold = 0.2,
    ocr_engine: _OcrEngine = OcrEngine.rapidocr, self_caption: _SelfCaption = True,
) -> None:
    """Short-answer accuracy (VQA normalisation; VQAv2's ten answers when records carry "answers").

    Examples:

      lav2 eval vqa --data data/easyvqa/records.jsonl --model runs/joint --out runs/joint/easyvqa.jsonl

      lav2 eval vqa --data data/vqa.jsonl --model runs/joint --out preds.jsonl --limit 200 --json

      lav2 eval vqa --data data/vqa.jsonl --model runs/joint --out preds-ocr.jsonl --expert ocr
    """
    _eval.run("vqa", **locals())


@eval_app.command("caption")
def eval_caption(
    data: _EData, model: _EModel = None, base: _EBase = None, clip: _EClip = None, out: _EOut = None,
    batch_size: _EBatch = 8, limit: _ELimit = None, as_json: _EJson = False, max_new_tokens: _EMaxNew = None,
    device: _EDevice = "auto", dtype: _EDtype = "auto", compile: _ECompile = False, predictions: _EPred = None,
) -> None:
    """BLEU-1..4 and CIDEr-D over all reference captions of each image (COCO caption evaluation).

    Examples:

      lav2 eval caption --data data/karpathy-test.jsonl --model runs/joint --out runs/joint/coco.jsonl

      lav2 eval caption --data data/karpathy-test.jsonl --predictions runs/joint/coco.jsonl --json
    """
    _eval.run("caption", **locals())


@eval_app.command("mme")
def eval_mme(
    data: _EData, model: _EModel = None, base: _EBase = None, clip: _EClip = None, out: _EOut = None,
    batch_size: _EBatch = 8, limit: _ELimit = None, as_json: _EJson = False, max_new_tokens: _EMaxNew = None,
    device: _EDevice = "auto", dtype: _EDtype = "auto", compile: _ECompile = False, predictions: _EPred = None,
    expert: _Experts = [], caption_model: _CaptionModel = None, caption_threshold: _CaptionThreshold = 0.2,
    ocr_engine: _OcrEngine = OcrEngine.rapidocr, self_caption: _SelfCaption = True,
) -> None:
    """The MME protocol: yes/no parsing, acc and acc+ per subtask, perception and cognition totals.

    Examples:

      lav2 eval mme --data data/mme.jsonl --model llama-adapter.pth --base llama-7b --out mme.jsonl

      lav2 eval mme --data data/mme.jsonl --predictions mme.jsonl --json

      lav2 eval mme --data data/mme.jsonl --model runs/joint --out mme-experts.jsonl --expert caption --expert ocr
    """
    _eval.run("mme", **locals())


@eval_app.command("text")
def eval_text(
    data: _EData, model: _EModel = None, base: _EBase = None, clip: _EClip = None, out: _EOut = None,
    batch_size: _EBatch = 8, limit: _ELimit = None, as_json: _EJson = False, max_new_tokens: _EMaxNew = None,
    device: _EDevice = "auto", dtype: _EDtype = "auto", compile: _ECompile = False,
    exact_match: Annotated[Optional[bool], typer.Option("--exact-match/--no-exact-match", help="Also generate and report exact match (default: when every reference is at most 3 words).")] = None,
) -> None:
    """Mean loss and perplexity over response tokens (and exact match for short answers).

    Examples:

      lav2 eval text --data data/alpaca.val.jsonl --model runs/finetune --out runs/finetune/val.jsonl

      lav2 eval text --data data/easyvqa/records.val.jsonl --model runs/joint --out val.jsonl --json
    """
    _eval.run("text", **locals())

# --- end eval -------------------------------------------------------------------------------


# --- merge (lav2cli/merge.py) ---------------------------------------------------------------


@app.command()
def merge(
    ref: Annotated[str, typer.Argument(metavar="REF", help="The adapter: a lav2 artifact directory, or an official .pth with --base.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")],
    format: Annotated[Literal["lav2", "hf", "meta"], typer.Option("--format", "-f", help="lav2: folded base + sidecar for lav2; hf: transformers' Llama checkpoint; meta: consolidated.00.pth + params.json.")] = "lav2",
    dtype: Annotated[Literal["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"], typer.Option("--dtype", help="Output dtype (folding is float32); auto = the base's stored dtype.")] = "auto",
    base: Annotated[Optional[str], typer.Option("--base", help="Base LLaMA for an official .pth, or to override an artifact's.")] = None,
    clip: Annotated[Optional[str], typer.Option("--clip", help="open_clip encoder NAME[:PRETRAINED] for an official .pth.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (folding runs in float32 there).")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Load the result back and report the max logit difference to the unmerged model.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Fold an adapter's bias, scale, LoRA and norms into plain LLaMA weights; prompts, gates and
    the visual branch stay a small sidecar artifact in the same directory.

    Examples:

      lav2 merge runs/joint --out merged/joint

      lav2 merge runs/alpaca-bias --out hf/alpaca --format hf --dtype bf16

      lav2 merge LORA-BIAS-7B.pth --base llama-7b/ --clip ViT-L-14:openai --out merged/lora --format meta
    """
    from lav2cli import merge as _merge

    _merge.main(ref, out, format, dtype, base, clip, device, force, verify, as_json)


# --- end merge ------------------------------------------------------------------------------


# --- bench (lav2cli/bench.py) ---------------------------------------------------------------

bench_app = typer.Typer(help="Throughput on random weights of a named shape (tiny, smollm2-135m, llama-7b, llama-13b).\n\n"
                             "Examples:\n\n"
                             "  lav2 bench decode --shape llama-7b --compile\n\n"
                             "  lav2 bench train --shape smollm2-135m --device cpu --batch 2 --seq 128 --json",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _bench_print(result: dict, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lav2 bench {result['bench']}", show_header=False, title_justify="left")
    for k, v in result.items():
        table.add_row(k, str(v))
    Console().print(table)


@bench_app.command("decode")
def bench_decode(
    shape: str = typer.Option("llama-7b", help="tiny, smollm2-135m, llama-7b or llama-13b."),
    batch: int = typer.Option(1, min=1),
    prompt_len: int = typer.Option(32, min=1),
    new_tokens: int = typer.Option(200, min=2),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step."),
    variant: str = typer.Option("paper", help="paper, official or none (the plain base)."),
    fold: bool = typer.Option(True, "--fold/--no-fold", help="Prepare the weights as ask and eval do: fold the adapter's scales (and LoRA), float32 CPU weights column-major."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto", help="auto: bf16 on CUDA, fp32 on CPU."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Profile one more run and write its Chrome trace here (adds device_busy_share on CUDA)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Decoding tokens/s and weight-read bandwidth (warm-up excluded).

    Examples:

      lav2 bench decode --shape llama-7b --compile

      lav2 bench decode --shape llama-7b --compile --trace decode-trace.json

      lav2 bench decode --shape smollm2-135m --device cpu --new-tokens 50 --json
    """
    from lav2cli import bench
    from lav2cli.engine import resolve_device, resolve_dtype

    dev = resolve_device(device)
    _bench_print(bench.bench_decode(shape, batch, prompt_len, new_tokens, compile, variant, dev,
                                    resolve_dtype(dtype, dev), fold=fold, trace=trace), as_json)


@bench_app.command("train")
def bench_train(
    shape: str = typer.Option("llama-7b", help="tiny, smollm2-135m, llama-7b or llama-13b."),
    batch: int = typer.Option(8, min=1),
    seq: int = typer.Option(512, min=2),
    grad_ckpt: bool = typer.Option(False, "--grad-ckpt/--no-grad-ckpt", help="Activation checkpointing per block."),
    ckpt_blocks: int = typer.Option(0, "--ckpt-blocks", min=0, help="Checkpoint only the first N blocks (less recompute than --grad-ckpt, more memory)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile each transformer block."),
    variant: str = typer.Option("paper", help="paper, official or none."),
    lora_rank: int = typer.Option(0, min=0),
    steps: int = typer.Option(10, min=1, help="Timed steps (after 3 warm-up steps)."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto", help="auto: bf16 frozen weights on CUDA, fp32 on CPU."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Profile up to 3 more steps and write their Chrome trace here (adds device_busy_share on CUDA)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Adapter-training tokens/s, model FLOP/s and MFU (4 x frozen params x tokens), peak memory.

    Examples:

      lav2 bench train --shape llama-7b --batch 8 --seq 512 --compile

      lav2 bench train --shape llama-7b --batch 8 --seq 512 --compile --ckpt-blocks 8

      lav2 bench train --shape tiny --device cpu --json
    """
    from lav2cli import bench
    from lav2cli.engine import resolve_device, resolve_dtype

    dev = resolve_device(device)
    _bench_print(bench.bench_train(shape, batch, seq, grad_ckpt, compile, variant, lora_rank, steps, dev,
                                   resolve_dtype(dtype, dev), trace=trace, ckpt_blocks=ckpt_blocks), as_json)


# --- ask and info -----------------------------------------------------------------------


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _load_engine(model: str, base: str | None, clip: str | None, device: str, dtype: str, inference: bool):
    from lav2cli.engine import load

    with _stderr().status(f"loading {model} ...", spinner="dots"):
        return load(model, base=base, clip=clip, device=device, dtype=dtype, inference=inference)


@app.command()
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
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer (with timings) instead of streamed text."),
    show_prompt: bool = typer.Option(False, help="Print the full prompt (template applied) on stderr."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step (pays off on long answers)."),
    expert: _Experts = [], caption_model: _CaptionModel = None, caption_threshold: _CaptionThreshold = 0.2,
    ocr_engine: _OcrEngine = OcrEngine.rapidocr, self_caption: _SelfCaption = True,
) -> None:
    """Answer a question about an image (or none) from the shell.

    Examples:

      lav2 ask none "What is the capital of France?" --temperature 0

      lav2 ask photo.jpg "Describe this image." --model runs/joint

      lav2 ask sign.png "What does the sign say?" --expert ocr --expert caption --show-prompt

      ls images/*.png | lav2 ask - "What shape is in the image?" --json
    """
    from lav2cli import ask as ask_mod
    from lav2cli.experts import ExpertOptions, Experts
    from lav2cli.inference.generate import Sampling

    experts = Experts(ExpertOptions.make(expert, caption_model, caption_threshold, ocr_engine, device, dtype))
    ask_mod.check_image_arg(image, experts)
    experts.load()
    engine = _load_engine(model, base, clip, device, dtype, inference=True)
    engine.compile_decode = compile
    if self_caption and engine.self_captions:
        experts = experts.with_self_caption()
        experts.bind(engine)
    err = _stderr()
    status = ask_mod.run(engine, image, prompt, Sampling(max_new_tokens, temperature, top_p, seed),
                         as_json=as_json, show_prompt=show_prompt, model_name=model,
                         log=lambda m: err.print(m, markup=False, soft_wrap=True), experts=experts)
    raise typer.Exit(status)


@app.command()
def info(
    ref: str = typer.Argument(DEFAULT_MODEL, help="Model reference (see `lav2 ask --help`)."),
    base: str | None = typer.Option(None, help="Base LLaMA for an official .pth."),
    clip: str | None = typer.Option(None, help="open_clip encoder NAME[:PRETRAINED]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    list_models: bool = typer.Option(False, "--list", help="List the named models and exit."),
) -> None:
    """Show what a model reference resolves to: files, sizes, shape, parameter counts.

    Examples:

      lav2 info smollm2-135m-instruct

      lav2 info runs/joint --json

      lav2 info --list
    """
    import json

    from lav2cli import info as info_mod
    from lav2cli.registry import known_models

    if list_models:
        for name, desc in known_models():
            print(f"{name}\t{desc}")
        return
    engine = _load_engine(ref, base, clip, "cpu", "bfloat16", inference=False)  # counts only: half the memory of fp32
    data = info_mod.describe(engine)
    if as_json:
        print(json.dumps(data))
    else:
        from rich.console import Console

        info_mod.render(data, Console())


def main() -> None:
    """Console entry point: runtime errors become one line on stderr and exit status 1."""
    try:
        app()
    except Lav2Error as e:
        if _debug():
            raise
        print(f"lav2: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("lav2: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # an unexpected failure still gets one line unless --debug
        if _debug():
            raise
        print(f"lav2: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
