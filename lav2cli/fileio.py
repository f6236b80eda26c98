"""Atomic writes, their locks and their recovery, and hashing: nothing half-written ever sits
under a final name, and a crash leaves nothing that the next writer cannot finish or undo.

Every atomic write of FINAL holds FINAL's advisory lock (`.FINAL.lock` beside it: fcntl.flock,
released by the kernel when the holder dies, so a stale file never blocks) from the moment its
temporary exists until its last rename. Whoever takes the lock next may therefore treat every
leftover of FINAL as dead and first finishes or undoes it (`recover`):

    .FINAL.tmp-TAG    a temporary being written: removed
    .FINAL.old-TAG    the previous directory, moved aside by a swap (atomic_dir) that renames
                      .FINAL.tmp-TAG over FINAL next: a crash between the two renames leaves
                      both, and the swap is finished (the new directory was complete before
                      the old one moved); an old without its temporary is put back
    .FINAL.commit     the renames of several files that belong together (atomic_files), written
                      before the first of them: the remaining ones are done

`sweep(folder)` does the same for every leftover in a folder whose lock is free (the caches).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Sequence

from lav2cli.errors import Lav2Error

try:
    import fcntl
except ImportError:  # not on this platform: writes stay atomic, but unlocked and unrecovered
    fcntl = None  # type: ignore[assignment]

Log = Callable[[str], None]


class InUse(Lav2Error):
    """FINAL's lock is held by another process (the message names it)."""


class NoSpace(Lav2Error, OSError):
    """The disk filled up during an atomic write; nothing was replaced. An OSError too, so that
    callers that tolerate an unwritable cache keep doing so."""


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


def refuse_overwrite(out: str | Path, inputs: dict[str, str | Path | None], option: str = "--out") -> None:
    """Refuse (one line) an output that would replace one of the command's `inputs` ({what:
    path}): the same file or folder, or a folder holding it. Paths that do not exist are not
    inputs (a registry name, say)."""
    o = Path(out).expanduser().absolute()
    o_real = o.resolve()
    for what, path in inputs.items():
        if not path:
            continue
        p = Path(path).expanduser()
        if not p.exists():
            continue
        p_real = p.resolve()
        same = o.exists() and os.path.samefile(o, p)
        if same or o_real == p_real or o_real in p_real.parents:
            raise Lav2Error(f"{option} {out}: would replace {what} ({path}), which this command reads; "
                            f"choose another {option}")


# -- locks -------------------------------------------------------------------------------------

_held: dict[str, list] = {}  # lock file -> [fd, depth]: a process re-entering its own lock passes


def _side(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"pid {info['pid']} on {info['host']}, since {info['started']}"
                + (f", `{info['command']}`" if info.get("command") else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _command() -> str:
    argv = sys.argv or [""]
    lav2 = Path(argv[0]).name == "lav2" or Path(argv[0]).parent.name == "lav2cli"  # the script, or python -m
    prog = "lav2" if lav2 else Path(argv[0]).name
    return f"{prog} {argv[1]}" if len(argv) > 1 and not argv[1].startswith("-") else prog


@contextlib.contextmanager
def lock(final: str | Path, wait: bool = True) -> Iterator[None]:
    """Hold FINAL's advisory lock for the block (see the module doc). wait=False: refuse with
    InUse, naming the holder (pid, host, start time, command), when another process holds it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    path = _side(final, "lock")
    key = os.path.join(os.path.realpath(path.parent), path.name)
    if fcntl is None or key in _held:
        if key in _held:
            _held[key][1] += 1
        try:
            yield
        finally:
            if key in _held:
                _held[key][1] -= 1
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                holder = _holder(fd)
                os.close(fd)
                raise InUse(f"{final}: in use by {holder}; wait for it to finish or write elsewhere") from None
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        # the previous holder removes the file when it lets go: a lock taken on a removed file
        # locks nothing, so take it again on the file now there
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"), "command": _command()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: nobody can be holding the file removed
            os.close(fd)


# -- recovery ----------------------------------------------------------------------------------

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<tag>[0-9A-Za-z_]+)\Z")
_MARKER = re.compile(r"\.(?P<name>.+)\.(commit|lock)\Z")  # a stale lock file too


def _leftovers(final: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(temporaries by tag, moved-aside directories by tag) of FINAL."""
    tmps: dict[str, Path] = {}
    olds: dict[str, Path] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(final.parent):
            m = _LEFTOVER.match(entry.name)
            if m and m["name"] == final.name:
                (tmps if m["kind"] == "tmp" else olds)[m["tag"]] = Path(entry.path)
    return tmps, olds


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _read_journal(journal: Path) -> list[tuple[Path, Path]]:
    try:
        renames = json.loads(journal.read_text())["renames"]
        return [(journal.parent / tmp, journal.parent / dst) for tmp, dst in renames]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a journal is written whole (renamed into place): this one is not lav2's


def _roll_journals(final: Path) -> list[str]:
    """Do the renames a dead atomic_files committed to: its journal beside FINAL, or one that
    names FINAL (its writer held FINAL's lock, which the caller holds now: it is dead)."""
    notes = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(final.parent):
            m = _MARKER.match(entry.name)
            if not m or not entry.name.endswith(".commit"):
                continue
            journal = Path(entry.path)
            renames = _read_journal(journal)
            if m["name"] != final.name and not any(d.name == final.name for _, d in renames):
                continue
            done = []
            for tmp, dst in renames:
                if tmp.exists():
                    os.replace(tmp, dst)
                    done.append(dst.name)
            journal.unlink()
            if done:
                notes.append(f"{final}: finished an interrupted write ({', '.join(done)})")
    return notes


def _recover_swap(final: Path) -> list[str]:
    """Finish or undo a dead atomic_dir's swap of FINAL, then remove FINAL's leftovers."""
    notes = []
    tmps, olds = _leftovers(final)
    if not final.exists() and not final.is_symlink() and olds:
        paired = [tag for tag in olds if tag in tmps]
        if paired:  # the new directory was complete before the old one moved aside
            os.replace(tmps.pop(paired[0]), final)
            notes.append(f"{final}: finished an interrupted replacement (the new version is in place)")
        else:
            tag = max(olds, key=lambda t: olds[t].stat().st_mtime)
            os.replace(olds.pop(tag), final)
            notes.append(f"{final}: undid an interrupted replacement (the previous version is back)")
    debris = [*tmps.values(), *olds.values()]
    for p in debris:
        _remove(p)
    if debris:
        notes.append(f"{final}: removed {len(debris)} leftover(s) of an interrupted write")
    return notes


def recover(finals: Iterable[str | Path], log: Log | None = None) -> None:
    """Finish or undo what a dead writer of `finals` left (see the module doc). The caller holds
    their locks. Journals go first: their temporaries are not debris."""
    finals = [Path(f) for f in finals]
    notes = [n for f in finals for n in _roll_journals(f)] + [n for f in finals for n in _recover_swap(f)]
    for n in notes:
        if log:
            log(n)


@contextlib.contextmanager
def claim(final: str | Path, wait: bool = True, log: Log | None = None) -> Iterator[None]:
    """lock(final) and recover(final): FINAL as its last complete write left it, held."""
    with lock(final, wait=wait):
        recover([final], log)
        yield


def _journalled_with(final: Path) -> list[Path]:
    """The files a dead or live atomic_files' journal names together with FINAL ([] if none)."""
    finals: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(final.parent):
            if entry.name.endswith(".commit") and _MARKER.match(entry.name):
                dsts = [d for _, d in _read_journal(Path(entry.path))]
                if any(d.name == final.name for d in dsts):
                    finals += [d for d in dsts if d not in finals]
    return finals


def find_interrupted(final: str | Path) -> None:
    """For readers: a missing `final` that a dead swap left aside is put back in place, and the
    remaining renames of a dead atomic_files that names `final` are done (a live writer's are
    left to it), so that a run is found, and files written together are read together, by any
    command, not only the next writer."""
    final = Path(final)
    finals = _journalled_with(final)
    if not finals:
        if final.exists() or final.is_symlink() or not _leftovers(final)[1]:
            return
        finals = [final]
    with contextlib.suppress(InUse, OSError), contextlib.ExitStack() as locks:
        for f in sorted(set(finals), key=lambda p: str(p.absolute())):  # atomic_files' order
            locks.enter_context(lock(f, wait=False))
        recover(finals)


def sweep(folder: str | Path, log: Log | None = None) -> None:
    """recover every leftover in `folder` whose lock is free (a cache's entries of a key no one
    asks for any more are never written again, so their debris would stay)."""
    folder = Path(folder)
    names = set()
    with contextlib.suppress(OSError):  # no folder (yet), or one that cannot be: nothing to sweep
        for entry in os.scandir(folder):
            m = _LEFTOVER.match(entry.name) or _MARKER.match(entry.name)
            if m:
                names.add(m["name"])
    for name in sorted(names):
        with contextlib.suppress(InUse, OSError):
            with claim(folder / name, wait=False, log=log):
                pass


# -- atomic writes -----------------------------------------------------------------------------


def _pause_for_tests() -> None:
    """LAV2_TEST_PAUSE_IN_SWAP=FILE: stop between the renames of a swap, after creating FILE
    (the crash tests kill the process there)."""
    marker = os.environ.get("LAV2_TEST_PAUSE_IN_SWAP")
    if marker:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(3600)


def _disk_full(e: BaseException) -> bool:
    # safetensors reports I/O errors as its own exception type, with the OS error in the text
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(e, Exception) and not isinstance(e, OSError) and "No space left on device" in str(e))


def _no_space(final: Path, e: BaseException) -> NoSpace:
    err = NoSpace(f"{final}: no space left on the device while writing it; nothing was replaced "
                  f"(free some space, or write elsewhere)")
    err.errno = errno.ENOSPC
    return err


@contextlib.contextmanager
def atomic_dir(final: str | Path, keep_others: bool = False, wait: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` (an existing
    `final` is moved aside first and removed after: a crash between the two renames is finished
    by the next writer, see the module doc). On failure it is removed. keep_others: entries of
    the old `final` that the new one does not write are carried over (hard links where possible,
    symbolic links as links), so files a user put there survive. wait=False: refuse (InUse)
    while another process writes `final`."""
    final = Path(final)
    with claim(final, wait=wait):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        old = _side(final, "old-" + tmp.name.rsplit(".tmp-", 1)[1])
        try:
            yield tmp
            _normal_modes(tmp)
            if keep_others and final.is_dir():
                _carry_over(final, tmp)
            if final.exists() or final.is_symlink():
                os.replace(final, old)
                _pause_for_tests()
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException as e:
            if old.exists() and not final.exists():
                os.replace(old, final)
            shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(e):
                raise _no_space(final, e) from e
            raise


def _carry_over(final: Path, tmp: Path) -> None:
    for entry in final.iterdir():
        dest = tmp / entry.name
        if dest.exists() or dest.is_symlink() or entry.name.startswith(f".{final.name}."):
            continue
        if _LEFTOVER.match(entry.name) or _MARKER.match(entry.name):
            continue  # debris of an interrupted write inside `final` (a torn metrics rewrite) ends here
        if entry.is_symlink():  # a link the user made stays a link (not a copy of its target)
            os.symlink(os.readlink(entry), dest)
        elif entry.is_dir():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _normal_modes(root: Path) -> None:
    """mkdtemp (and some writers) create private files; give them the usual umask modes."""
    root.chmod(file_mode(directory=True))
    for p in root.rglob("*"):
        if not p.is_symlink():
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
    (the last one named, a manifest say, appears last). Before the first rename a journal of all
    of them is written beside the last, so that a crash between the renames is finished by the
    next writer: the files stay a pair. On failure no temporary file is left."""
    finals = [Path(f) for f in finals]
    pending: list[tuple[Path, Path]] = []  # (temporary file, final name) not yet renamed
    journal = _side(finals[-1], "commit")
    committed = False
    with contextlib.ExitStack() as locks:
        for final in sorted(set(finals), key=lambda p: str(p.absolute())):  # one order: no deadlock
            locks.enter_context(lock(final))
        recover(finals)
        try:
            with contextlib.ExitStack() as files:
                handles = []
                for final in finals:
                    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
                    pending.append((Path(tmp), final))
                    handles.append(files.enter_context(os.fdopen(fd, mode, encoding=encoding)))
                yield handles
            for tmp, _ in pending:
                os.chmod(tmp, file_mode())  # mkstemp's files are private; use the usual mode
            if len(pending) > 1:
                base = journal.parent
                part = _side(finals[-1], "tmp-journal")  # a temporary of the last file: debris if cut
                part.write_text(json.dumps({"renames": [[os.path.relpath(t, base), os.path.relpath(d, base)]
                                                        for t, d in pending]}))
                os.replace(part, journal)
                committed = True
            while pending:
                tmp, final = pending[0]
                os.replace(tmp, final)
                pending.pop(0)
                if pending:
                    _pause_for_tests()
            if committed:
                journal.unlink()
        except BaseException as e:
            if committed:  # past the point of no return (an interrupt between renames): finish
                _roll_journals(finals[-1])
            else:
                for tmp, _ in pending:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            if _disk_full(e):
                raise _no_space(finals[0], e) from e
            raise
