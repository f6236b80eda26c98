"""The `lav2` command line: one short function per command; the work lives in the modules."""

from __future__ import annotations

import os
import sys

import typer

from lav2cli import __version__
from lav2cli.errors import Lav2Error

app = typer.Typer(
    name="lav2",
    help="LLaMA-Adapter V2 from the shell: prepare data, train adapters, merge, evaluate, ask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
prepare_app = typer.Typer(
    help="Convert a dataset into lav2 records (JSON lines) plus a manifest.",
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

# --- end prepare ------------------------------------------------------------------------


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
