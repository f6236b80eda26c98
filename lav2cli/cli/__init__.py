"""The `lav2` command line: the Typer app, its command table and the console entry point.

Each command group lives in its own module here (prepare, train, eval, merge, bench, ask,
info, plot, serve), which calls the library with explicit keyword arguments. A module is imported only when
its command runs or shows its help: the library behind most commands imports torch, which
takes seconds, so `lav2 --help` lists the commands from `COMMANDS` without importing them.

The shell contract lives in `main`: results on stdout, one `lav2: error:` / `lav2: note:` line on
stderr for anything that goes wrong (usage errors included), Ctrl-C named in one line (exit 130),
and a closed pipe (`lav2 ... | head -1`) ends quietly with the status of a program killed by
SIGPIPE (141). Help is click's plain layout, which reads well in 80 columns.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import re
import shutil
import sys
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from lav2cli import __version__
from lav2cli.errors import Lav2Error, Lav2Note

PROG = "lav2"
SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for a program a closed pipe killed
INTERRUPTED_STATUS = 130  # 128 + SIGINT


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
    "serve": Command("lav2cli.cli.serve", "Serve a model over HTTP: an OpenAI-compatible chat API and a chat page."),
    "info": Command("lav2cli.cli.info", "Show what a model reference resolves to: files, sizes, shape, parameter "
                                        "counts."),
    "prepare": Command("lav2cli.cli.prepare", "Convert a dataset into lav2 records (JSON lines) plus a manifest."),
    "eval": Command("lav2cli.cli.eval", "Score a model on VQA, COCO-style captions, MME or held-out text; "
                                        "predictions as JSON lines."),
    "plot": Command("lav2cli.cli.plot", "Draw the loss (per stream, smoothed) and learning rate of training runs, "
                                        "to compare them."),
    "bench": Command("lav2cli.cli.bench", "Throughput on random weights of a named shape (tiny, smollm2-135m, "
                                          "llama-7b, llama-13b), and what a quantised base costs a real model."),
}


def load_command(name: str) -> TyperCommand | TyperGroup:
    """The click command (or group) of `COMMANDS[name]`, its module imported, its help laid
    out for the terminal (`plain_help`)."""
    module = importlib.import_module(COMMANDS[name].module)
    command = typer.main.get_command(module.app)
    command.name = name
    plain_help(command)
    return command


# -- help that reads well in 80 columns ----------------------------------------------------------


def help_width() -> int:
    """The width click's formatter gives a command's help text (terminal, at most 80 columns,
    less its margin and the text's indent)."""
    return max(min(shutil.get_terminal_size().columns, 80) - 2, 50) - 2


# a shell word: unquoted characters and quoted strings, glued (--suffix='Answer with one word.')
_SHELL_WORD = re.compile(r"""(?:[^\s"']+|"[^"]*"|'[^']*')+""")


def wrap_command_line(line: str, width: int) -> list[str]:
    """An example command line folded at word boundaries with ` \\` continuations, so that
    every piece still pastes into a shell as one command."""
    indent = line[: len(line) - len(line.lstrip())]
    words = _SHELL_WORD.findall(line) or [line.strip()]
    lines, current = [], indent + words[0]
    for word in words[1:]:
        if len(current) + 1 + len(word) + 2 > width:
            lines.append(current + " \\")
            current = indent + "    " + word
        else:
            current += " " + word
    return [*lines, current]


def tidy_help(text: str | None, width: int, *, summary: bool = True) -> str | None:
    """Help text laid out for `width` columns. Each paragraph is wrapped here and marked as
    preformatted (click's `\\b`), so that an indented example stays a pasteable command line and
    prose never breaks an option name at its hyphens (`--no-` / `self-caption`). With `summary`,
    the first paragraph (a command's summary, also shown in its group's list) is left to click."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    out = paragraphs[:1] if summary else []
    for para in paragraphs[len(out):]:
        if para.startswith("\b"):  # already laid out
            out.append(para)
        elif para[:1].isspace():  # an example: one command per line
            lines = [piece for line in para.splitlines() for piece in wrap_command_line(line, width)]
            out.append("\b\n" + "\n".join(lines))
        else:
            out.append("\b\n" + textwrap.fill(" ".join(para.split()), width, break_on_hyphens=False,
                                                break_long_words=False))
    return "\n\n".join(out)


def plain_help(command: Any) -> None:
    """Give `command` (and its subcommands) click's plain help layout: at 80 columns Typer's rich
    panels cut option names and squeeze descriptions into a narrow column, show a `<bool>` type
    for every flag, and read `[experts]` in a help text as markup. A group lists each command's
    whole summary, wrapped, rather than a truncated one."""
    width = help_width()
    command.rich_markup_mode = None
    command.help = tidy_help(command.help, width)
    command.epilog = tidy_help(command.epilog, width, summary=False)
    for param in command.params:  # `lav2 ask IMAGE PROMPT`, as click and man pages write arguments
        if param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        if not sub.short_help and sub.help:
            sub.short_help = " ".join(inspect.cleandoc(sub.help).split("\n\n")[0].split())
        plain_help(sub)


class _EndOfFile(Exception):
    """An EOFError out of a command. Click answers one with a bare "Aborted!" (meant for Ctrl-D at
    a prompt; lav2 prompts for nothing), which names nothing: main() reports the EOFError instead."""


class LazyGroup(TyperGroup):
    """The root group: the help lists `COMMANDS` by their summaries; a command's module is
    imported when that command is resolved."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # stand-ins for the listing, and for the "did you mean" of a mistyped command
        self.commands = {name: TyperCommand(name, help=c.summary, short_help=c.summary)
                         for name, c in COMMANDS.items()}
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

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EOFError as e:
            raise _EndOfFile() from e

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        self.help = tidy_help(self.help, help_width())
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
    rich_markup_mode=None,  # plain_help says why
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


def command_words(group: Any, args: list[str]) -> list[str]:
    """The command `args` name, as typed ("eval", "vqa"), for messages."""
    words: list[str] = []
    node = group
    for a in args:
        if a.startswith("-"):
            continue
        sub = node.get_command(None, a)
        if sub is None:
            break
        words.append(a)
        if not hasattr(sub, "commands"):
            break
        node = sub
    return words


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _usage_error(e: Any) -> str:
    """Click's usage message in the one-line style of runtime errors."""
    message = _one_line(e.format_message()).rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(e, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"{message}{hint}"


def _os_error(e: OSError) -> str:
    """An OSError that escaped a command, named by its path ("runs/x: a file, not a folder")."""
    name = e.filename
    if name is None:
        return f"{type(e).__name__}: {e}"
    name = os.fsdecode(name)
    if e.errno == errno.EISDIR:
        return f"{name}: a folder, not a file"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        # mkdir(parents=True) across a file fails on the file itself (EEXIST), open() or
        # mkdir below a file with ENOTDIR: name the file that is in the way
        probe = name
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if probe and not os.path.isdir(probe):
            return f"{probe}: a file, where a folder is needed" + (f" (for {name})" if probe != name else "")
    if e.errno == errno.EBUSY:
        return f"{name}: in use (a mount point or the current folder?), cannot be replaced"
    target = f" -> {os.fsdecode(e.filename2)}" if e.filename2 is not None else ""
    return f"{name}{target}: {e.strerror or e}"


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """lav2's own notes (errors.Lav2Note) as one `lav2: note:` line; other warnings as Python shows them."""
    if issubclass(category, Lav2Note):
        print(f"lav2: note: {_one_line(str(message))}", file=sys.stderr, flush=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _quiet_pipe() -> None:
    """The reader of stdout went away: point stdout at /dev/null, so that the interpreter's last
    flush at exit cannot fail (and print its own traceback) either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (an embedding, a test runner)
        pass


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the command line `argv` (default `sys.argv[1:]`) and exit.

    Runtime errors are one `lav2: error:` line and exit status 1 (`--debug` or LAV2_DEBUG=1
    raise them with their traceback); usage errors are one such line and status 2; Ctrl-C one
    `lav2: interrupted:` line and status 130 (a command may name more, as `train` does, and
    then exits 130 itself); a closed stdout pipe ends quietly with status 141, as if SIGPIPE had
    killed the program."""
    args = sys.argv[1:] if argv is None else list(argv)
    warnings.showwarning = _show_warning
    group = typer.main.get_command(app)
    try:
        # click's own main loop (Typer's `app()`) would turn a closed pipe into a silent exit 1
        # and Ctrl-C into a silent 130; this one reports them
        with group.make_context(PROG, args) as ctx:
            group.invoke(ctx)
        sys.exit(0)
    except typer.Exit as e:  # --help, --version, a command's own status
        sys.exit(e.exit_code)
    except BrokenPipeError:
        _quiet_pipe()
        sys.exit(SIGPIPE_STATUS)
    except Lav2Error as e:  # before OSError: some are both (fileio.NoSpace), and name their file
        if _debug():
            raise
        print(f"lav2: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno == errno.EPIPE:
            _quiet_pipe()
            sys.exit(SIGPIPE_STATUS)
        if _debug():
            raise
        print(f"lav2: error: {_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        what = " ".join(command_words(group, args)) or "lav2"
        newline = "\n" if sys.stderr.isatty() else ""  # after a half-written line and the terminal's ^C
        print(f"{newline}lav2: interrupted: {what}", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)
    except typer.Abort:
        print("lav2: interrupted", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as e:  # click's usage errors, bad option values, a missing command
        if type(e).__name__ == "NoArgsIsHelpError":  # `lav2`, `lav2 eval`: the help, as click shows it
            e.show()  # type: ignore[attr-defined]
        else:
            print(f"lav2: error: {_usage_error(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # an unexpected failure still gets one line unless --debug
        if _debug():
            raise
        if isinstance(e, _EndOfFile):
            e = e.__cause__ or e
        print(f"lav2: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
