"""The `lav2` command line: the Typer app, its command table and the console entry point.

Each command group lives in its own module here (prepare, train, eval, merge, bench, ask,
info), which calls the library with explicit keyword arguments. A module is imported only when
its command runs or shows its help: the library behind most commands imports torch, which
takes seconds, so `lav2 --help` lists the commands from `COMMANDS` without importing them.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from lav2cli import __version__
from lav2cli.errors import Lav2Error


@dataclass(frozen=True)
class Command:
    module: str  # defines `app`: a Typer holding the command, or the command group
    summary: str  # the first paragraph of the command's help (tests keep the two equal)


COMMANDS: dict[str, Command] = {
    "train": Command("lav2cli.cli.train", "Train the adapter: stage pretrain (image-text), finetune (instructions) "
                                          "or joint (both)."),
    "merge": Command("lav2cli.cli.merge", "Fold an adapter's bias, scale, LoRA and norms into plain LLaMA weights; "
                                          "prompts, gates and the visual branch stay a small sidecar artifact in "
                                          "the same directory."),
    "ask": Command("lav2cli.cli.ask", "Answer a question about an image (or none) from the shell."),
    "info": Command("lav2cli.cli.info", "Show what a model reference resolves to: files, sizes, shape, parameter "
                                        "counts."),
    "prepare": Command("lav2cli.cli.prepare", "Convert a dataset into lav2 records (JSON lines) plus a manifest."),
    "eval": Command("lav2cli.cli.eval", "Score a model on VQA, COCO-style captions, MME or held-out text; "
                                        "predictions as JSON lines."),
    "bench": Command("lav2cli.cli.bench", "Throughput on random weights of a named shape (tiny, smollm2-135m, "
                                          "llama-7b, llama-13b)."),
}


def load_command(name: str) -> TyperCommand | TyperGroup:
    """The click command (or group) of `COMMANDS[name]`, its module imported."""
    module = importlib.import_module(COMMANDS[name].module)
    command = typer.main.get_command(module.app)
    command.name = name
    return command


class LazyGroup(TyperGroup):
    """The root group: the help lists `COMMANDS` by their summaries; a command's module is
    imported when that command is resolved."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # stand-ins for the listing, and for the "did you mean" of a mistyped command
        self.commands = {name: TyperCommand(name, help=c.summary) for name, c in COMMANDS.items()}
        self._loaded: dict[str, TyperCommand | TyperGroup] = {}
        self._listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> TyperCommand | TyperGroup | None:
        if cmd_name not in COMMANDS:
            return None
        if self._listing:
            return self.commands[cmd_name]
        if cmd_name not in self._loaded:
            self._loaded[cmd_name] = load_command(cmd_name)
        return self._loaded[cmd_name]

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="lav2",
    cls=LazyGroup,
    help="LLaMA-Adapter V2 from the shell: prepare data, train adapters, merge, evaluate, ask.\n\n"
         "Examples:\n\n"
         "  lav2 ask none \"What is the capital of France?\" --temperature 0\n\n"
         "  lav2 ask photo.jpg \"What is in the picture?\"\n\n"
         "  lav2 prepare easyvqa --kind vqa --split test --out data/easyvqa/test.jsonl\n\n"
         "  lav2 ask data/easyvqa/images/test/0.png \"What shape is in the image?\"",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _debug() -> bool:
    return os.environ.get("LAV2_DEBUG", "") not in ("", "0")


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
) -> None:
    if debug:
        os.environ["LAV2_DEBUG"] = "1"


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
