"""What a converter may use: :class:`Job` (the output folder, inputs registered for the manifest,
JSON loading with located errors, parallel copies) and :class:`UI` (progress bars and the summary
on stderr; rich is imported only when something is shown)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from lav2cli.data.prepare.items import MALFORMED_JSON, Skip
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

        A malformed JSON line is yielded as a Skip; a malformed JSON list is fatal.
        """
        path = self.add_file(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):
            for i, obj in enumerate(_parse_json(path)):
                yield f"{path}:[{i}]", i, obj
            return
        index = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Skip(MALFORMED_JSON, f"{path}:{lineno}", e.msg)
                    continue
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
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise Lav2Error(f"{path}:{e.lineno}: {MALFORMED_JSON} ({e.msg})") from None
        except UnicodeDecodeError:
            raise Lav2Error(f"{path}: not UTF-8 text") from None
