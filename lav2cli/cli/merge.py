"""`lav2 merge`: an adapter folded into plain LLaMA weights (lav2cli.merge)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from lav2cli import merge as merging
from lav2cli.cli.common import DTYPES_HELP

app = typer.Typer(add_completion=False)


@app.command()
def merge(
    ref: Annotated[str, typer.Argument(metavar="REF", help="The adapter: a lav2 artifact directory, or an official .pth with --base.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")],
    format: Annotated[Literal["lav2", "hf", "meta"], typer.Option("--format", "-f", help="lav2: folded base + sidecar for lav2; hf: transformers' Llama checkpoint; meta: consolidated.00.pth + params.json.")] = "lav2",
    dtype: Annotated[Literal["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"], typer.Option("--dtype", help=f"Output dtype: auto (the base's stored dtype), {DTYPES_HELP}; folding is float32.")] = "auto",
    base: Annotated[Optional[str], typer.Option("--base", help="Base LLaMA for an official .pth, or to override an artifact's.")] = None,
    clip: Annotated[Optional[str], typer.Option("--clip", help="open_clip encoder NAME[:PRETRAINED] for an official .pth.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (folding runs in float32 there).")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Load the result back and report the max logit difference to the unmerged model.")] = True,
    float_base: Annotated[bool, typer.Option("--float-base", help="An adapter trained on a quantised base (training.quantize): fold into the original float weights instead of the dequantised ones it trained on.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Fold an adapter's bias, scale, LoRA and norms into plain LLaMA weights; prompts, gates and
    the visual branch stay a small sidecar artifact in the same directory.

    An adapter trained on a quantised base is folded into that base dequantised; the weights
    written are float.

    Examples:

      lav2 merge demo --out merged/demo

      lav2 merge runs/joint --out merged/joint

      lav2 merge runs/alpaca-bias --out hf/alpaca --format hf --dtype bf16

      lav2 merge LORA-BIAS-7B.pth --base llama-7b/ --clip ViT-L-14:openai --out merged/lora --format meta
    """
    merging.main(ref=ref, out=out, format=format, dtype=dtype, base=base, clip=clip, device=device, force=force,
                 verify=verify, as_json=as_json, float_base=float_base)
