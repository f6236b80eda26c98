"""`lav2 bench decode|train`: throughput on random weights (lav2cli.bench)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lav2cli import bench
from lav2cli.cli.common import Quantize, log_to_stderr
from lav2cli.engine import resolve_device, resolve_dtype

app = typer.Typer(help="Throughput on random weights of a named shape (tiny, smollm2-135m, llama-7b, llama-13b), "
                       "and what a quantised base costs a real model.\n\n"
                       "Examples:\n\n"
                       "  lav2 bench decode --shape llama-7b --compile\n\n"
                       "  lav2 bench train --shape smollm2-135m --device cpu --batch 2 --seq 128 --json\n\n"
                       "  lav2 bench quality --model demo --data benchmarks/text-facts.jsonl",
                  no_args_is_help=True, add_completion=False)


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"lav2 bench {result['bench']}", show_header=False, title_justify="left")
    for k, v in result.items():
        table.add_row(k, str(v))
    Console().print(table)


@app.command("decode")
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
    quantize: Quantize = "none",
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Decoding tokens/s and weight-read bandwidth (warm-up excluded).

    Examples:

      lav2 bench decode --shape llama-7b --compile

      lav2 bench decode --shape llama-7b --compile --trace decode-trace.json

      lav2 bench decode --shape smollm2-135m --device cpu --new-tokens 50 --json

      lav2 bench decode --shape llama-7b --compile --quantize int4
    """
    dev = resolve_device(device)
    _print(bench.bench_decode(shape=shape, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, compile=compile,
                              variant=variant, device=dev, dtype=resolve_dtype(dtype, dev), fold=fold, trace=trace,
                              quantize=quantize), as_json)


@app.command("train")
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
    quantize: Quantize = "none",
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Adapter-training tokens/s, model FLOP/s and MFU (4 x frozen params x tokens), peak memory.

    Examples:

      lav2 bench train --shape llama-7b --batch 8 --seq 512 --compile

      lav2 bench train --shape llama-7b --batch 8 --seq 512 --compile --ckpt-blocks 8

      lav2 bench train --shape tiny --device cpu --json

      lav2 bench train --shape llama-7b --batch 4 --seq 512 --grad-ckpt --quantize int4
    """
    dev = resolve_device(device)
    _print(bench.bench_train(shape=shape, batch=batch, seq=seq, grad_ckpt=grad_ckpt, compile=compile, variant=variant,
                             lora_rank=lora_rank, steps=steps, device=dev, dtype=resolve_dtype(dtype, dev),
                             trace=trace, ckpt_blocks=ckpt_blocks, quantize=quantize), as_json)


@app.command("quality")
def bench_quality(
    data: Path = typer.Option(..., "--data", "-d", help="Records whose instruction (and input) are the prompts; images are not read."),
    model: str = typer.Option("demo", "--model", "-m", help="Model reference (as `lav2 ask`)."),
    quantize: list[str] = typer.Option(["int8", "int4"], "--quantize", help="Quantisations to compare with the float model (repeatable): int8, int4, int4:GROUP."),
    limit: int = typer.Option(60, min=1, help="The first N records."),
    new_tokens: int = typer.Option(32, min=1, help="Greedy answer length."),
    batch_size: int = typer.Option(16, min=1),
    base: Optional[str] = typer.Option(None, help="Base LLaMA for an official .pth, or to override an artifact's."),
    clip: Optional[str] = typer.Option(None, help="open_clip encoder for an official .pth."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto", help="auto: bf16 on CUDA, fp32 on CPU."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Float vs quantised base on fixed prompts: mean |logit difference| and top-1 agreement on the
    float model's greedy answers, and the share of identical greedy answers.

    Examples:

      lav2 bench quality --model demo --data benchmarks/text-facts.jsonl

      lav2 bench quality --model smollm2-135m-instruct --data benchmarks/text-facts.jsonl --quantize int4:32 --json
    """
    result = bench.bench_quality(model, data, quantize, limit=limit, new_tokens=new_tokens, batch_size=batch_size,
                                 device=device, dtype=dtype, base=base, clip=clip, log=log_to_stderr())
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"lav2 bench quality: {model}, {result['prompts']} prompts of {data}, "
                        f"{result['answer_tokens']} answer tokens ({result['device']}, {result['dtype']})",
                  title_justify="left")
    for c in ("base", "weight MB", "mean |dlogit|", "max |dlogit|", "top-1 agreement", "same greedy answer"):
        table.add_column(c, justify="left" if c == "base" else "right")
    table.add_row("float", f"{result['float_weight_bytes'] / 1e6:.1f}", "-", "-", "-", "-")
    for name, r in result["quantized"].items():
        table.add_row(name, f"{r['weight_bytes'] / 1e6:.1f}", f"{r['mean_abs_logit_diff']:.4f}",
                      f"{r['max_abs_logit_diff']:.2f}", f"{r['top1_agreement']:.3f}", f"{r['same_greedy_answer']:.3f}")
    Console().print(table)
