"""Atomic writes and hashing: nothing half-written ever sits under a final name."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator, Sequence


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where lav2 keeps conversions and feature caches: `cache_dir`, $LAV2_CACHE,
    $XDG_CACHE_HOME/lav2 or ~/.cache/lav2."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LAV2_CACHE"):
        return Path(os.environ["LAV2_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lav2"


def file_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (mkstemp's are private)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | Path, keep_others: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` in one rename
    (an existing `final` is moved aside first and removed after). On failure it is removed.
    keep_others: entries of the old `final` that the new one does not write are carried over
    (hard links where possible), so files a user put there survive."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _normal_modes(tmp)
        if keep_others and final.is_dir():
            for entry in final.iterdir():
                dest = tmp / entry.name
                if dest.exists() or entry.name.startswith(f".{final.name}."):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, dest, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, dest)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _normal_modes(root: Path) -> None:
    """mkdtemp (and some writers) create private files; give them the usual umask modes."""
    root.chmod(file_mode(directory=True))
    for p in root.rglob("*"):
        p.chmod(file_mode(p.is_dir()))


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `final`; rename it over `final` when the block succeeds."""
    with atomic_files([final], mode, encoding) as (f,):
        yield f


@contextlib.contextmanager
def atomic_files(finals: Sequence[str | Path], mode: str = "w", encoding: str | None = None) -> Iterator[list[IO]]:
    """atomic_file for several files that belong together: each is written to a temporary file
    beside it, and only when the block succeeds are they renamed over `finals`, in the order given
    (the last one named, a manifest say, appears last). On failure no temporary file is left."""
    pending: list[tuple[str, Path]] = []  # (temporary file, final name) not yet renamed
    try:
        with contextlib.ExitStack() as files:
            handles = []
            for final in map(Path, finals):
                final.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
                pending.append((tmp, final))
                handles.append(files.enter_context(os.fdopen(fd, mode, encoding=encoding)))
            yield handles
        while pending:
            tmp, final = pending[0]
            os.chmod(tmp, file_mode())  # mkstemp's files are private; use the usual mode
            os.replace(tmp, final)
            pending.pop(0)
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
