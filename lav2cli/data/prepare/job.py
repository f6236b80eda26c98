"""What a converter may use: :class:`Job` (the output folder, inputs registered for the manifest,
JSON loading with located errors, parallel copies) and :class:`UI` (progress bars and the summary
on stderr; rich is imported only when something is shown)."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from lav2cli.data.prepare.items import Skip
from lav2cli.schema import JSONProblem, parse_json
from lav2cli.errors import Lav2Error
from lav2cli.fileio import sha256_file

PROGRESS_MIN_ITEMS = 1000


class UI:
    """Progress bars and the summary, on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._console: Any = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
        return self._console

    @contextlib.contextmanager
    def progress(self, description: str, total: int, min_items: int = PROGRESS_MIN_ITEMS) -> Iterator[Callable[[int], None]]:
        """Yield ``advance(n)``; a bar is drawn only for long inputs (``min_items``) on a terminal."""
        if self.quiet or total < min_items or not self.console.is_terminal:
            yield lambda n=1: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def print(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, soft_wrap=True)


class Job:
    """One run of a converter: ``out_dir`` (None when the records go to stdout), the thread count,
    the UI, and the inputs it has read (path and SHA-256, for the manifest)."""

    def __init__(self, out_dir: str | None, workers: int, ui: UI) -> None:
        self.out_dir = out_dir
        self.workers = workers
        self.ui = ui
        self.inputs: list[dict[str, Any]] = []

    def add_file(self, path: str | os.PathLike[str]) -> str:
        path = os.fspath(path)
        if os.path.isdir(path):
            raise Lav2Error(f"{path}: a folder, where a file is expected")
        if not os.path.isfile(path):
            raise Lav2Error(f"{path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
        self.inputs.append({"path": os.path.abspath(path), "sha256": sha256_file(path)})
        return path

    def add_tree(self, root: str, files: list[str]) -> None:
        """Register many files as one input: SHA-256 over sorted ``relative path, file SHA-256`` lines."""
        lines = sorted(f"{os.path.relpath(f, root)}\t{sha256_file(f)}\n" for f in files)
        digest = hashlib.sha256("".join(lines).encode()).hexdigest()
        self.inputs.append({"path": os.path.abspath(root), "sha256": digest, "files": len(files)})

    def load_json(self, path: str | os.PathLike[str]) -> Any:
        """Parse a whole JSON document; a parse error is fatal (``FILE:LINE: malformed json``)."""
        return _parse_json(self.add_file(path))

    def json_entries(self, path: str | os.PathLike[str]) -> Iterator[tuple[str, int, Any] | Skip]:
        """The entries of a JSON list (``FILE:[i]``) or a JSON lines file (``FILE:LINE``).

        A JSON line that does not parse (or is not UTF-8) is yielded as a Skip. Fatal: a JSON list
        that does not parse, and one JSON object over several lines (an object where the list of
        entries belongs would otherwise read as a file of malformed lines).
        """
        path = self.add_file(path)
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
        if head.startswith(b"["):
            for i, obj in enumerate(_parse_json(path)):
                yield f"{path}:[{i}]", i, obj
            return
        index, first = 0, True
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is skipped alone, on its own line number
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = parse_json(line)
                except JSONProblem as e:
                    if first and head.startswith(b"{") and isinstance(_try_parse_json(path), dict):
                        raise Lav2Error(f"{path}: one JSON object; expected a JSON list of entries or JSON lines "
                                        "(one entry per line)") from None
                    first = False
                    yield Skip(e.reason, f"{path}:{lineno}", e.detail)
                    continue
                first = False
                yield f"{path}:{lineno}", index, obj
                index += 1

    def copy_files(self, sources: dict[Any, str], dest_dir: str, name: Callable[[Any], str]) -> dict[Any, str]:
        """Copy ``{key: path}`` into ``dest_dir/name(key)`` in parallel; unchanged copies are kept."""
        os.makedirs(dest_dir, exist_ok=True)

        def copy(key: Any) -> tuple[Any, str]:
            src, dst = sources[key], os.path.join(dest_dir, name(key))
            if not (os.path.isfile(dst) and os.path.getsize(dst) == os.path.getsize(src)):
                shutil.copyfile(src, dst)
            return key, dst

        out: dict[Any, str] = {}
        with self.ui.progress(f"copying images to {dest_dir}", len(sources)) as advance:
            with ThreadPoolExecutor(self.workers) as pool:
                for key, dst in pool.map(copy, sorted(sources)):
                    out[key] = dst
                    advance(1)
        return out


def _parse_json(path: str) -> Any:
    """A whole JSON document; a failure is fatal (``FILE:LINE: malformed json (...)``)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return parse_json(data)
    except JSONProblem as e:
        raise Lav2Error(f"{path}:{e.lineno}: {e}") from None


def _try_parse_json(path: str) -> Any:
    """The whole document, or None when it does not parse."""
    try:
        return _parse_json(path)
    except Lav2Error:
        return None
