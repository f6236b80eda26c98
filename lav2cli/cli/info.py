"""`lav2 info`: what a model reference resolves to (lav2cli.info)."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from lav2cli import info as describing
from lav2cli.cli.common import load_engine
from lav2cli.registry import DEFAULT_MODEL, known_models

app = typer.Typer(add_completion=False)


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
    if list_models:
        for name, desc in known_models():
            print(f"{name}\t{desc}")
        return
    # counts only: bfloat16 halves the memory of float32
    engine = load_engine(ref, base=base, clip=clip, device="cpu", dtype="bfloat16", inference=False)
    data = describing.describe(engine)
    if as_json:
        print(json.dumps(data))
    else:
        describing.render(data, Console())
