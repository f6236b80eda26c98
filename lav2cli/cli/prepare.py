"""`lav2 prepare SOURCE`: datasets -> lav2 records (lav2cli.data.prepare)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from lav2cli.data.prepare import prepare
from lav2cli.templates import CAPTION_INSTRUCTION

app = typer.Typer(
    help="Convert a dataset into lav2 records (JSON lines) plus a manifest.\n\n"
         "Examples:\n\n"
         "  lav2 prepare easyvqa --kind caption --split train --out data/easyvqa/captions.jsonl\n\n"
         "  lav2 prepare coco --annotations captions_train2017.json --images train2017 --out data/coco.jsonl",
    no_args_is_help=True, add_completion=False,
)

_Out = Annotated[str, typer.Option("--out", "-o", help="FILE.jsonl (FILE.manifest.json beside it), or - for stdout (no manifest).")]
_Val = Annotated[float, typer.Option("--val-fraction", help="Share of images (text: records) for FILE.val.jsonl, by SHA-256 of image or id.")]
_Strict = Annotated[bool, typer.Option("--strict", help="Stop at the first problem (exit 1 naming FILE:LINE) and write nothing.")]
_Check = Annotated[bool, typer.Option("--check-images/--no-check-images", help="Open and fully decode every image once (in threads).")]
_Workers = Annotated[Optional[int], typer.Option("--workers", min=1, help="Threads for image checks and copies (default: cores + 4, at most 32).")]
_Instruction = Annotated[Optional[str], typer.Option("--instruction", help=f'Caption instruction (default: "{CAPTION_INSTRUCTION}").')]


@app.command("coco")
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
    prepare("coco", out, annotations=annotations, images=images, split=split, captions=captions,
            instruction=instruction, val_fraction=val_fraction, strict=strict, check_images=check_images,
            workers=workers, quiet=False)


@app.command("csv")
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
    prepare("csv", out, input=input, images=images, image_column=image_column, caption_column=caption_column,
            instruction=instruction, val_fraction=val_fraction, strict=strict, check_images=check_images,
            workers=workers, quiet=False)


@app.command("alpaca")
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
    prepare("alpaca", out, input=input, val_fraction=val_fraction, strict=strict, check_images=True,
            workers=workers, quiet=False)


@app.command("llava")
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
    prepare("llava", out, input=input, images=images, keep_history=keep_history, turns=turns,
            val_fraction=val_fraction, strict=strict, check_images=check_images, workers=workers, quiet=False)


@app.command("mme")
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
    prepare("mme", out, root=root, strict=strict, check_images=check_images, workers=workers, quiet=False)


@app.command("easyvqa")
def prepare_easyvqa(
    out: Annotated[str, typer.Option("--out", "-o", help="FILE.jsonl (FILE.manifest.json beside it); the images are copied to images/SPLIT/ beside it, so records cannot go to stdout.")],
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
    prepare("easyvqa", out, split=split, kind=kind, instruction=instruction, yes_no_twins=yes_no_twins,
            caption_context=caption_context, val_fraction=val_fraction, strict=strict,
            check_images=check_images, workers=workers, quiet=False)


@app.command("distill")
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
    prepare("distill", out, model=model, prompts=prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            device=device, val_fraction=val_fraction, strict=strict, check_images=False, quiet=False)
