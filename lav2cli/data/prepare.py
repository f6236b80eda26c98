"""`lav2 prepare`: convert real datasets into lav2 records plus a manifest.

Entry point: :func:`prepare` (``prepare("coco", "out/train.jsonl", annotations=..., images=...)``).
Each source is one small generator in :data:`SOURCES` that turns its input into a stream of
:class:`Candidate` records and :class:`Skip` notes; everything else is shared and runs in this
order for every source:

1. the converter's own problems (malformed JSON, unknown image id, ...),
2. empty text (instruction or output blank after stripping),
3. duplicate id (against earlier records that passed 1-2),
4. the image check: each distinct image opened and fully decoded once, in a thread pool
   (``check_images=False`` skips it, existence included),
5. the deterministic validation split (``val_fraction``), by SHA-256 of the record's group key:
   the image as the source names it (so all captions of one image fall on one side) or, for
   text-only records, the record id,
6. atomic writes (a temporary file in the same folder, then ``os.replace``) of ``FILE.jsonl``,
   ``FILE.val.jsonl`` and ``FILE.manifest.json`` (manifest last), and a summary on stderr.

With ``strict=True`` the first problem in input order raises :class:`Lav2Error`
``"FILE:WHERE: reason"`` and nothing is written. ``out="-"`` writes the records to stdout, writes no
manifest (the summary still goes to stderr) and writes image paths absolute.

Skip reasons are short stable strings (the constants below); *selections* made by options
(``--split``, ``--captions first``, ``--turns first``) are not problems and are counted apart.
Nothing here imports torch; PIL and rich are imported only when used.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import posixpath
import random
import re
import shutil
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Union

from lav2cli import __version__
from lav2cli.data.records import KINDS, Record
from lav2cli.errors import Lav2Error
from lav2cli.fileio import file_mode, sha256_file
from lav2cli.templates import labelled

CAPTION_INSTRUCTION = "Generate caption of this image"

# Problems (skipped, counted; --strict stops at the first one).
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
REMOTE_IMAGE = "remote image"
MALFORMED_JSON = "malformed json"
MALFORMED_RECORD = "malformed record"
MALFORMED_ROW = "malformed row"
EMPTY_TEXT = "empty text"
DUPLICATE_ID = "duplicate id"
UNKNOWN_IMAGE_ID = "unknown image id"
# Selections (dropped on purpose by an option, or nothing to derive; counted apart, never an error).
NO_CAPTION = "no shape or colour"
OTHER_SPLIT = "other split"
EXTRA_CAPTION = "extra caption"
LATER_TURN = "later turn"
UNFINISHED_ANSWER = "unfinished answer"

EXAMPLES_PER_REASON = 5
PROGRESS_MIN_ITEMS = 1000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Candidate:
    """A converted record, where it came from (``FILE:LINE`` or ``FILE:key[i]``) and its split key."""

    record: Record
    at: str
    group: str


@dataclass
class Skip:
    """An input item that yields no record: why, where, and an optional detail."""

    reason: str
    at: str
    detail: str = ""
    problem: bool = True

    def message(self) -> str:
        return f"{self.at}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


Item = Union[Candidate, Skip]


# --- shared machinery ---------------------------------------------------------------------


class _UI:
    """Progress bars and the summary, on stderr (rich, imported lazily)."""

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
    """What a converter may use: the output folder, input registration (hashed for the manifest),
    JSON loading with located errors, and parallel file copies."""

    def __init__(self, out_dir: str | None, workers: int, ui: _UI) -> None:
        self.out_dir = out_dir
        self.workers = workers
        self.ui = ui
        self.inputs: list[dict[str, Any]] = []

    def add_file(self, path: str | os.PathLike[str]) -> str:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise Lav2Error(f"{path}: no such file")
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


def _check_image(path: str) -> tuple[str, str] | None:
    """None if ``path`` opens and fully decodes, else ``(reason, detail)``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        return MISSING_IMAGE, path
    except Exception as e:  # truncated, not an image, unsupported mode, a directory, ...
        return UNREADABLE_IMAGE, f"{path}: {type(e).__name__}: {e}"
    return None


def find_bad_images(paths: Iterable[str], workers: int, ui: _UI | None = None) -> dict[str, tuple[str, str]]:
    """Open and decode each path once, in threads; returns ``{path: (reason, detail)}`` for the bad ones.

    PIL's ``LOAD_TRUNCATED_IMAGES`` is forced off meanwhile so that truncated files fail.
    """
    from PIL import ImageFile

    paths = sorted(set(paths))
    ui = ui or _UI(quiet=True)
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    bad: dict[str, tuple[str, str]] = {}
    try:
        with ui.progress("checking images", len(paths)) as advance:
            with ThreadPoolExecutor(workers) as pool:
                for path, result in zip(paths, pool.map(_check_image, paths)):
                    if result is not None:
                        bad[path] = result
                    advance(1)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return bad


def in_val(key: str, fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of SHA-256(key) as a number in [0, 1) below ``fraction``."""
    if fraction <= 0:
        return False
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64 < fraction


class _Tally:
    """Skips by reason with the first few examples, kept separately for problems and selections."""

    def __init__(self) -> None:
        self.problems: dict[str, dict[str, Any]] = {}
        self.selections: Counter[str] = Counter()

    def add(self, skip: Skip) -> None:
        if not skip.problem:
            self.selections[skip.reason] += 1
            return
        entry = self.problems.setdefault(skip.reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append({"at": skip.at, "detail": skip.detail} if skip.detail else {"at": skip.at})


def _output_paths(out: str) -> tuple[str, str, str]:
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return out, stem + ".val.jsonl", stem + ".manifest.json"


def _write_atomic(contents: list[tuple[str, Iterable[str]]]) -> None:
    """Write each ``(path, chunks)`` to a temporary file beside it, then rename them all in order."""
    temps: list[tuple[str, str]] = []
    try:
        for path, chunks in contents:
            folder, name = os.path.split(os.path.abspath(path))
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.chmod(tmp, file_mode())  # mkstemp's files are private; records are not
            temps.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(chunks)
        for tmp, path in temps:
            os.replace(tmp, path)
        temps = []
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _lines(records: list[Record], base_dir: str | None) -> Iterator[str]:
    encode, cache = json.JSONEncoder(ensure_ascii=False).encode, {}
    for r in records:
        yield encode(r.to_dict(base_dir, cache)) + "\n"


def _by_kind(records: list[Record]) -> dict[str, int]:
    counts = Counter(r.kind for r in records)
    return {k: counts[k] for k in KINDS if counts[k]}


def _option_value(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _screen(items: Iterable[Item], strict: bool, tally: _Tally) -> tuple[list[Candidate], Skip | None]:
    """Stages 1-3 in input order: converter skips, empty text, duplicate ids.

    Returns the surviving candidates and, under ``strict``, the first problem (the candidates
    before it are returned so that their images can still be checked: an earlier bad image wins).
    """
    kept: list[Candidate] = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, Candidate):
            r = item.record
            if not r.instruction.strip() or not r.output.strip():
                item = Skip(EMPTY_TEXT, item.at)
            elif r.id in seen:
                item = Skip(DUPLICATE_ID, item.at, r.id)
            else:
                seen.add(r.id)
                kept.append(item)
                continue
        if strict and item.problem:
            return kept, item
        tally.add(item)
    return kept, None


def _drop_bad_images(kept: list[Candidate], bad: dict[str, tuple[str, str]], strict: bool, tally: _Tally) -> list[Candidate]:
    good: list[Candidate] = []
    for c in kept:
        if c.record.image in bad:
            reason, detail = bad[c.record.image]
            skip = Skip(reason, c.at, detail)
            if strict:
                raise Lav2Error(skip.message())
            tally.add(skip)
        else:
            good.append(c)
    return good


def prepare(
    source: str,
    out: str | os.PathLike[str],
    *,
    check_images: bool = True,
    strict: bool = False,
    val_fraction: float = 0.0,
    workers: int | None = None,
    quiet: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Convert one source into records; returns the manifest (also written beside ``out``).

    ``options`` are the source's own: the keyword arguments of its function in :data:`SOURCES`.
    """
    if source not in SOURCES:
        raise Lav2Error(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
    if not 0.0 <= val_fraction < 1.0:
        raise Lav2Error(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = os.fspath(out)
    to_stdout = out == "-"
    if to_stdout and val_fraction > 0:
        raise Lav2Error("--val-fraction needs --out FILE (records on stdout have no FILE.val.jsonl)")
    if not to_stdout and (os.path.isdir(out) or out.endswith(os.sep)):
        raise Lav2Error(f"--out {out}: a folder; give a file name such as {os.path.join(out, 'records.jsonl')}")
    out_dir = None if to_stdout else os.path.dirname(os.path.abspath(out))
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    ui = _UI(quiet)
    job = Job(out_dir, workers, ui)
    tally = _Tally()

    kept, first_problem = _screen(SOURCES[source](job, **options), strict, tally)
    images = {c.record.image for c in kept if c.record.image is not None}
    bad = find_bad_images(images, workers, ui) if check_images and images else {}
    kept = _drop_bad_images(kept, bad, strict, tally)
    if first_problem is not None:
        raise Lav2Error(first_problem.message())

    train: list[Record] = []
    val: list[Record] = []
    for c in kept:
        (val if in_val(c.group, val_fraction) else train).append(c.record)
    manifest: dict[str, Any] = {
        "lav2_version": __version__,
        "source": source,
        "inputs": job.inputs,
        "options": {
            **{k: _option_value(v) for k, v in options.items()},
            "check_images": check_images,
            "strict": strict,
            "val_fraction": val_fraction,
        },
        "records": len(kept),
        "by_kind": _by_kind([c.record for c in kept]),
        "outputs": {},
        "images": {"distinct": len(images), "checked": check_images, "bad": len(bad)},
        "skipped": {
            "total": sum(e["count"] for e in tally.problems.values()),
            "by_reason": dict(sorted(tally.problems.items())),
        },
        "not_selected": dict(sorted(tally.selections.items())),
    }
    if to_stdout:
        manifest["outputs"]["records"] = {"path": "-", "records": len(train), "by_kind": _by_kind(train)}
        sys.stdout.writelines(_lines(train, None))
        sys.stdout.flush()
    else:
        out_path, val_path, manifest_path = _output_paths(out)
        outputs = [("records", out_path, train)] + ([("val", val_path, val)] if val_fraction > 0 else [])
        for name, path, recs in outputs:
            manifest["outputs"][name] = {"path": os.path.basename(path), "records": len(recs), "by_kind": _by_kind(recs)}
        manifest_text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        os.makedirs(out_dir, exist_ok=True)
        _write_atomic([(path, _lines(recs, out_dir)) for _, path, recs in outputs] + [(manifest_path, [manifest_text])])
    _summary(ui, manifest, None if to_stdout else out)
    return manifest


def _summary(ui: _UI, manifest: dict[str, Any], out: str | None) -> None:
    def counts(d: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v['count'] if isinstance(v, dict) else v:,}" for k, v in d.items())

    folder = os.path.dirname(out) if out else ""
    kinds = counts(manifest["by_kind"]) or "none"
    ui.print(f"lav2 prepare {manifest['source']}: kept {manifest['records']:,} records ({kinds})")
    for name, o in manifest["outputs"].items():
        ui.print(f"  {name}: {o['records']:,} -> {os.path.join(folder, o['path'])}")
    skipped = manifest["skipped"]
    ui.print(f"  skipped {skipped['total']:,}" + (f": {counts(skipped['by_reason'])}" if skipped["total"] else ""))
    if manifest["not_selected"]:
        ui.print(f"  not selected: {counts(manifest['not_selected'])}")
    if out:
        ui.print(f"  manifest: {_output_paths(out)[2]}")


# --- sources --------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    """A stripped string, or None when the value is not a string."""
    return value.strip() if isinstance(value, str) else None


def _caption(rec_id: str, group: str, image: str, text: str, at: str, source: str,
             instruction: str, extra: dict[str, Any], taken: set[str] | None) -> Item:
    """One caption record; with ``taken`` (``--captions first``) later captions of an image are dropped."""
    if taken is not None:
        if group in taken:
            return Skip(EXTRA_CAPTION, at, problem=False)
        if text:
            taken.add(group)
    record = Record(rec_id, image, instruction, text, "caption", source, extra=extra)
    return Candidate(record, at, group)


def coco(job: Job, annotations: str, images: str, split: str | None = None, captions: str = "all",
         instruction: str | None = None) -> Iterator[Item]:
    """COCO caption files (``images[].id/file_name`` + ``annotations[].image_id/caption``) or the
    Karpathy split file (``images[].filepath/filename/split/sentences[].raw``; ``split`` keeps a
    comma-separated list of splits). ``captions="first"`` keeps one caption per image."""
    if captions not in ("all", "first"):
        raise Lav2Error(f"--captions must be all or first, got {captions!r}")
    doc = job.load_json(annotations)
    path = os.fspath(annotations)
    instruction = instruction or CAPTION_INSTRUCTION
    taken: set[str] | None = set() if captions == "first" else None
    if isinstance(doc, dict) and isinstance(doc.get("annotations"), list):
        if split is not None:
            raise Lav2Error(f"{path}: --split selects images of a Karpathy split file; a COCO caption file holds one split")
        yield from _coco_annotations(doc, path, os.fspath(images), instruction, taken)
    elif isinstance(doc, dict) and isinstance(doc.get("images"), list) and all(
        isinstance(im, dict) and "sentences" in im for im in doc["images"][:10]
    ):
        wanted = None if split is None else {s.strip() for s in split.split(",") if s.strip()}
        yield from _karpathy(doc, path, os.fspath(images), instruction, taken, wanted)
    else:
        raise Lav2Error(f"{path}: neither a COCO caption file (images + annotations) nor a Karpathy split file")


def _coco_annotations(doc: dict, path: str, images: str, instruction: str, taken: set[str] | None) -> Iterator[Item]:
    files: dict[Any, str] = {}
    for i, im in enumerate(doc.get("images") or []):
        if isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str):
            files[im["id"]] = im["file_name"]
        else:
            yield Skip(MALFORMED_RECORD, f"{path}:images[{i}]", "needs id and file_name")
    per_image: Counter[Any] = Counter()
    for i, ann in enumerate(doc["annotations"]):
        at = f"{path}:annotations[{i}]"
        text = _text(ann.get("caption")) if isinstance(ann, dict) else None
        if text is None or "image_id" not in ann:
            yield Skip(MALFORMED_RECORD, at, "needs image_id and caption")
            continue
        image_id = ann["image_id"]
        if image_id not in files:
            yield Skip(UNKNOWN_IMAGE_ID, at, f"image_id {image_id}")
            continue
        rec_id = f"coco-{ann['id']}" if "id" in ann else f"coco-{image_id}-{per_image[image_id]}"
        per_image[image_id] += 1
        name = files[image_id]
        yield _caption(rec_id, name, os.path.join(images, name), text, at, "coco", instruction, {}, taken)


def _karpathy(doc: dict, path: str, images: str, instruction: str, taken: set[str] | None,
              wanted: set[str] | None) -> Iterator[Item]:
    for i, im in enumerate(doc["images"]):
        at = f"{path}:images[{i}]"
        if not (isinstance(im, dict) and isinstance(im.get("filename"), str) and isinstance(im.get("sentences"), list)):
            yield Skip(MALFORMED_RECORD, at, "needs filename and sentences")
            continue
        name = posixpath.join(im.get("filepath") or "", im["filename"])
        extra = {"split": im["split"]} if "split" in im else {}
        for k, sentence in enumerate(im["sentences"]):
            at_k = f"{at}.sentences[{k}]"
            if wanted is not None and im.get("split") not in wanted:
                yield Skip(OTHER_SPLIT, at_k, problem=False)
                continue
            text = _text(sentence.get("raw")) if isinstance(sentence, dict) else None
            if text is None:
                yield Skip(MALFORMED_RECORD, at_k, "needs raw")
                continue
            rec_id = f"karpathy-{sentence['sentid']}" if "sentid" in sentence else f"karpathy-{im.get('imgid', i)}-{k}"
            yield _caption(rec_id, name, os.path.join(images, name), text, at_k, "karpathy", instruction, extra, taken)


def _column(header: list[str], chosen: str | None, defaults: tuple[str, ...], what: str, path: str) -> int:
    lower = [h.strip().lower() for h in header]
    for name in (chosen,) if chosen else defaults:
        if name.lower() in lower:
            return lower.index(name.lower())
    wanted = chosen or " or ".join(defaults)
    raise Lav2Error(f"{path}:1: no {what} column {wanted} in header {header}")


def csv_table(job: Job, input: str, images: str | None = None, image_column: str | None = None,
              caption_column: str | None = None, instruction: str | None = None) -> Iterator[Item]:
    """Caption tables (CC3M-style lists): tab-separated (no quoting) or comma-separated (CSV
    quoting) with a header; relative image paths resolve against ``images`` (default: the table's
    folder). URLs are skipped as ``remote image`` (download them first)."""
    path = job.add_file(input)
    base = os.fspath(images) if images else os.path.dirname(os.path.abspath(path))
    instruction = instruction or CAPTION_INSTRUCTION
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            tab = "\t" in f.readline()
            f.seek(0)
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tab else csv.reader(f)
            header = next(reader, None)
            if not header:
                raise Lav2Error(f"{path}: empty table (a header naming the image and caption columns is needed)")
            col_image = _column(header, image_column, ("url", "image", "path"), "image", path)
            col_text = _column(header, caption_column, ("caption", "text"), "caption", path)
            for row in reader:
                at = f"{path}:{reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    yield Skip(MALFORMED_ROW, at, f"{len(row)} fields, header has {len(header)}")
                    continue
                ref, text = row[col_image].strip(), row[col_text].strip()
                if "://" in ref:
                    yield Skip(REMOTE_IMAGE, at, ref)
                    continue
                if not ref:
                    yield Skip(MISSING_IMAGE, at, "empty image cell")
                    continue
                record = Record(f"csv-{reader.line_num}", os.path.join(base, ref), instruction, text, "caption", "csv")
                yield Candidate(record, at, ref)
    except UnicodeDecodeError:
        raise Lav2Error(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise Lav2Error(f"{path}:{reader.line_num}: unreadable table ({e})") from None


def alpaca(job: Job, input: str) -> Iterator[Item]:
    """Alpaca / GPT-4-LLM instruction data: a JSON list or JSON lines of ``instruction``,
    ``input`` (optional), ``output``; text-only records, id from ``id`` or ``alpaca-INDEX``."""
    for entry in job.json_entries(input):
        if isinstance(entry, Skip):
            yield entry
            continue
        at, index, obj = entry
        if not isinstance(obj, dict):
            obj = {}
        instruction, text_input, output = (_text(obj.get("instruction")), _text(obj.get("input", "")),
                                           _text(obj.get("output")))
        if instruction is None or text_input is None or output is None:
            yield Skip(MALFORMED_RECORD, at, "needs string instruction, output (and input)")
            continue
        rec_id = str(obj["id"]) if "id" in obj else f"alpaca-{index}"
        yield Candidate(Record(rec_id, None, instruction, output, "instruction", "alpaca", input=text_input), at, rec_id)


_ROLES = {"human": "q", "user": "q", "gpt": "a", "assistant": "a"}


def _llava_turns(obj: Any) -> list[tuple[str, str]] | None:
    """``[(question, answer), ...]`` from alternating human/gpt messages, ``<image>`` removed; None if malformed."""
    conv = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        return None
    texts = []
    for n, message in enumerate(conv):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            return None
        if _ROLES.get(str(message.get("from")).lower()) != "qa"[n % 2]:
            return None
        texts.append(re.sub(r"\s*<image>\s*", " ", message["value"]).strip())
    return list(zip(texts[0::2], texts[1::2]))


def llava(job: Job, input: str, images: str | None = None, keep_history: bool = False,
          turns: str = "all") -> Iterator[Item]:
    """LLaVA conversations: one record per human/gpt turn (``turns="first"``: the first only);
    with ``keep_history`` earlier turns go into ``input`` as ``Human: ...`` / ``Assistant: ...``
    lines. Samples without ``image`` become text-only records."""
    if turns not in ("all", "first"):
        raise Lav2Error(f"--turns must be all or first, got {turns!r}")
    base = os.fspath(images) if images else os.path.dirname(os.path.abspath(input))
    for entry in job.json_entries(input):
        if isinstance(entry, Skip):
            yield entry
            continue
        at, index, obj = entry
        pairs = _llava_turns(obj)
        ref = obj.get("image") if isinstance(obj, dict) else None
        if pairs is None or not (ref is None or (isinstance(ref, str) and ref)):
            yield Skip(MALFORMED_RECORD, at, "needs conversations alternating human/gpt (and image a path)")
            continue
        sample_id = str(obj.get("id", index))
        image = os.path.join(base, ref) if ref else None
        history: list[str] = []
        for t, (question, answer) in enumerate(pairs):
            at_t = f"{at}.conversations[{2 * t}]"
            if turns == "first" and t > 0:
                yield Skip(LATER_TURN, at_t, problem=False)
                continue
            record = Record(f"llava-{sample_id}-{t}", image, question, answer, "instruction", "llava",
                            input="\n".join(history) if keep_history else "")
            yield Candidate(record, at_t, ref or record.id)
            history += [f"Human: {question}", f"Assistant: {answer}"]


MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme(job: Job, root: str) -> Iterator[Item]:
    """The MME release folder: per subtask either ``images/`` + ``questions_answers_YN/*.txt`` or
    ``*.txt`` beside same-stem images; each line ``question<TAB>Yes|No`` becomes a vqa record with
    ``subtask``, ``category`` and ``pair`` (``SUBTASK/IMAGE-STEM``, shared by an image's questions)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise Lav2Error(f"{root}: no such folder")
    nested = os.path.join(root, "MME_Benchmark_release_version")
    if os.path.isdir(nested):
        root = nested
    question_files: list[str] = []
    for subtask in sorted(os.listdir(root)):
        folder = os.path.join(root, subtask)
        qa_dir = os.path.join(folder, "questions_answers_YN")
        if not os.path.isdir(folder):
            continue
        qdir, idir = (qa_dir, os.path.join(folder, "images")) if os.path.isdir(qa_dir) else (folder, folder)
        names = os.listdir(idir) if os.path.isdir(idir) else []
        stems = {os.path.splitext(n)[0]: n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)}
        if not stems and qdir == idir:
            continue  # not a subtask folder (e.g. eval_tool)
        category = "cognition" if subtask in MME_COGNITION else "perception"
        for txt in sorted(n for n in os.listdir(qdir) if n.endswith(".txt")):
            question_files.append(os.path.join(qdir, txt))
            yield from _mme_questions(question_files[-1], subtask, category, idir, stems.get(txt[:-4]))
    if not question_files:
        raise Lav2Error(f"{root}: no MME subtask folders (SUBTASK/*.txt beside images, or SUBTASK/questions_answers_YN/)")
    job.add_tree(root, question_files)


def _mme_questions(path: str, subtask: str, category: str, image_dir: str, image_name: str | None) -> Iterator[Item]:
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise Lav2Error(f"{path}: not UTF-8 text") from None
    k = 0
    for lineno, line in enumerate(lines, 1):
        at = f"{path}:{lineno}"
        if not line.strip():
            continue
        parts = line.split("\t")
        answer = parts[-1].strip().capitalize()
        if len(parts) != 2 or answer not in ("Yes", "No"):
            yield Skip(MALFORMED_ROW, at, "expected question<TAB>Yes|No")
            continue
        if image_name is None:
            yield Skip(MISSING_IMAGE, at, f"no image {stem}.* in {image_dir}")
            continue
        extra = {"subtask": subtask, "category": category, "pair": f"{subtask}/{stem}"}
        record = Record(f"mme-{subtask}-{stem}-{k}", os.path.join(image_dir, image_name), parts[0].strip(), answer,
                        "vqa", "mme", extra=extra)
        yield Candidate(record, at, f"{subtask}/{image_name}")
        k += 1


EASYVQA_COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASYVQA_SHAPES = ("circle", "rectangle", "triangle")


def easyvqa_attributes(question: str, answer: str) -> set[str]:
    """Colours and shapes an easy-VQA question/answer pair says the image shows.

    "what ..." questions: the answer plus any colour or shape the question names ("what is the
    blue shape?" -> rectangle, blue). Yes/no questions: the colour or shape they name when the
    answer affirms it ("is there a red shape?" yes, "is there not a circle?" no).
    """
    words = re.findall(r"[a-z]+", question.lower())
    if words and words[0] == "what":
        named = words + [answer.lower()]
    else:
        negated = "not" in words or "no" in words
        named = words if (answer.lower() == "yes") != negated else []
    return {w for w in named if w in EASYVQA_COLOURS or w in EASYVQA_SHAPES}


def easyvqa_caption(attributes: set[str]) -> str | None:
    """``"a red circle"``, ``"a red shape"`` or ``"a circle"`` from one image's attributes; None when
    no single colour or shape is known."""
    colours = [c for c in EASYVQA_COLOURS if c in attributes]
    shapes = [s for s in EASYVQA_SHAPES if s in attributes]
    colour = colours[0] if len(colours) == 1 else None
    shape = shapes[0] if len(shapes) == 1 else None
    if colour:
        return f"a {colour} {shape or 'shape'}"
    return f"a {shape}" if shape else None


def easyvqa_twin(question: str, answer: str, shown: set[str], pick: random.Random) -> tuple[str, str] | None:
    """The yes/no question's twin about the same image with the other answer: the colour (shape)
    it names swapped for the image's own one when it names an absent one, for an absent one when
    it names the image's own. None for "what" questions or when the image's colour (shape) is
    unknown. easy-VQA asks mostly about absent colours (7 in 8 of its colour yes/no questions),
    so a model can score 0.8 on yes/no without looking; pairs leave it only the image to go by."""
    if answer.lower() not in ("yes", "no"):
        return None
    words = re.findall(r"[a-z]+", question.lower())
    named = [w for w in words if w in EASYVQA_COLOURS or w in EASYVQA_SHAPES]
    if len(named) != 1:  # one attribute, or the swap could keep the answer ("a red circle?")
        return None
    vocabulary = EASYVQA_COLOURS if named[0] in EASYVQA_COLOURS else EASYVQA_SHAPES
    own = [w for w in vocabulary if w in shown]
    if len(own) != 1:
        return None
    other = own[0] if named[0] != own[0] else pick.choice([w for w in vocabulary if w != own[0]])
    return re.sub(rf"\b{named[0]}\b", other, question, count=1), "no" if answer.lower() == "yes" else "yes"


def easyvqa(job: Job, split: str = "both", kind: str = "both", instruction: str | None = None,
            yes_no_twins: bool = False, caption_context: bool = False) -> Iterator[Item]:
    """The easy-VQA package's sets: images copied to ``OUT_DIR/images/SPLIT/ID.png``, one vqa record
    per question (``easyvqa-SPLIT-q INDEX``) and one caption per image (``easyvqa-SPLIT-img ID``).
    With `yes_no_twins`, each yes/no question is followed by its twin with the other answer
    (``easyvqa-SPLIT-q INDEX-twin``, see easyvqa_twin): yes and no become equally likely.
    With `caption_context`, each vqa record's input is its image's caption as the caption expert
    words it ("Image caption: a red circle") and it has no image: data for a model that captions
    an image first and answers from its caption (the caption records keep their images)."""
    if split not in ("train", "test", "both") or kind not in ("vqa", "caption", "both"):
        raise Lav2Error("easyvqa: --split is train, test or both; --kind is vqa, caption or both")
    if yes_no_twins and kind == "caption":
        raise Lav2Error("easyvqa: --yes-no-twins adds questions; it needs --kind vqa or both")
    if caption_context and kind == "caption":
        raise Lav2Error("easyvqa: --caption-context is the context of questions; it needs --kind vqa or both")
    if job.out_dir is None:
        raise Lav2Error("easyvqa copies images beside the records: give --out FILE, not -")
    try:
        import easy_vqa
    except ImportError:
        raise Lav2Error("the easy-vqa package is not installed (pip install easy-vqa)") from None
    instruction = instruction or CAPTION_INSTRUCTION
    for name in ("train", "test") if split == "both" else (split,):
        questions = job.add_file(os.path.join(os.path.dirname(easy_vqa.__file__), "data", name, "questions.json"))
        texts, answers, image_ids = getattr(easy_vqa, f"get_{name}_questions")()
        available = getattr(easy_vqa, f"get_{name}_image_paths")()
        used = {i: available[i] for i in set(image_ids) if i in available}
        copies = job.copy_files(used, os.path.join(job.out_dir, "images", name), lambda i: f"{i}.png")
        extra = {"split": name}
        attributes: dict[int, set[str]] = {}
        for q, a, i in zip(texts, answers, image_ids):
            attributes.setdefault(i, set()).update(easyvqa_attributes(q, a))
        if kind in ("vqa", "both"):
            pick = random.Random(f"easyvqa-{name}-twins")
            for k, (q, a, i) in enumerate(zip(texts, answers, image_ids)):
                at = f"{questions}:[{k}]"
                if i not in copies:
                    yield Skip(UNKNOWN_IMAGE_ID, at, f"image {i}")
                    continue
                caption = easyvqa_caption(attributes[i]) if caption_context else None
                if caption_context and caption is None:
                    yield Skip(NO_CAPTION, at, "its image's questions name no single colour or shape", problem=False)
                    continue
                context = labelled("caption", caption) if caption_context else ""
                image = None if caption_context else copies[i]  # answered from the caption alone
                record = Record(f"easyvqa-{name}-q{k}", image, q, a, "vqa", "easyvqa", context,
                                extra={**extra, "image_id": i})
                yield Candidate(record, at, f"{name}/{i}")
                twin = easyvqa_twin(q, a, attributes[i], pick) if yes_no_twins else None
                if twin is not None:
                    record = Record(f"easyvqa-{name}-q{k}-twin", image, *twin, "vqa", "easyvqa", context,
                                    extra={**extra, "image_id": i, "twin_of": f"easyvqa-{name}-q{k}"})
                    yield Candidate(record, at, f"{name}/{i}")
        if kind in ("caption", "both"):
            for i in sorted(copies):
                at = f"{questions}:image {i}"
                text = easyvqa_caption(attributes.get(i, set()))
                if text is None:
                    yield Skip(NO_CAPTION, at, "its questions name no single colour or shape", problem=False)
                    continue
                record = Record(f"easyvqa-{name}-img{i}", copies[i], instruction, text, "caption", "easyvqa",
                                extra={**extra, "image_id": i})
                yield Candidate(record, at, f"{name}/{i}")


DISTILL_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "prompts", "distill.txt")


def _distill_prompts(job: Job, path: str) -> Iterator[tuple[str, str, str] | Skip]:
    """(where, instruction, input) from a text file (one prompt per line, # comments) or from
    records / Alpaca-style JSON lines (``instruction`` and optional ``input``)."""
    if path.endswith((".jsonl", ".json")):
        for entry in job.json_entries(path):
            if isinstance(entry, Skip):
                yield entry
                continue
            at, _, obj = entry
            obj = obj if isinstance(obj, dict) else {}
            instruction, text_input = _text(obj.get("instruction")), _text(obj.get("input", ""))
            if instruction is None or text_input is None:
                yield Skip(MALFORMED_RECORD, at, "needs a string instruction (and input)")
                continue
            yield at, instruction, text_input
        return
    with open(job.add_file(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                yield f"{path}:{lineno}", line.strip(), ""


def distill(job: Job, model: str, prompts: str | None = None, max_new_tokens: int = 200, batch_size: int = 16,
            device: str = "auto") -> Iterator[Item]:
    """A model's own greedy answers to prompts -> text-only instruction records (``distill-INDEX``).
    Trained alongside new data, they keep what the model already says (its language ability).
    Answers cut off at ``max_new_tokens`` are not kept: a record must end where the model ends."""
    from lav2cli import engine as engine_mod
    from lav2cli.generate import Sampling

    prompts = os.fspath(prompts or DISTILL_PROMPTS)
    items = list(_distill_prompts(job, prompts))
    todo = [it for it in items if not isinstance(it, Skip)]
    yield from (it for it in items if isinstance(it, Skip))
    if not todo:
        return
    eng = engine_mod.load(model, device=device)
    tok, tpl = eng.tokenizer, eng.template
    encoded = [tpl.encode_prompt(tok, instruction, text_input) for _, instruction, text_input in todo]
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))  # similar lengths batch with little padding
    answers: dict[int, list[int]] = {}
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    with job.ui.progress(f"answering {len(todo)} prompts with {model}", len(todo), min_items=1) as advance:
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            for k, out in zip(chunk, eng.generate([encoded[k] for k in chunk], sampling=sampling)):
                answers[k] = out
            advance(len(chunk))
    for k, (at, instruction, text_input) in enumerate(todo):
        if len(answers[k]) >= max_new_tokens:
            yield Skip(UNFINISHED_ANSWER, at, f"longer than {max_new_tokens} tokens", problem=False)
            continue
        record = Record(f"distill-{k}", None, instruction, tok.decode(answers[k]).strip(), "instruction", "distill",
                        input=text_input, extra={"model": model})
        yield Candidate(record, at, record.id)


SOURCES: dict[str, Callable[..., Iterator[Item]]] = {
    "coco": coco,
    "csv": csv_table,
    "alpaca": alpaca,
    "llava": llava,
    "mme": mme,
    "easyvqa": easyvqa,
    "distill": distill,
}
