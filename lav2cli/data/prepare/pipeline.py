"""The stages every source runs through, in this order:

1. the converter's own problems (malformed JSON, unknown image id, ...), and any record that
   lav2's reader would refuse (``Record.problem``: e.g. a lone surrogate in its text),
2. empty text (instruction or output blank after stripping),
3. duplicate id (against earlier records that passed 1-2),
4. the image check: each distinct image opened and fully decoded once, in a thread pool
   (``check_images=False`` skips it, existence included),
5. the deterministic validation split (``val_fraction``), by SHA-256 of the record's group key:
   the image as the source names it (so all captions of one image fall on one side) or, for
   text-only records, the record id,
6. atomic writes of ``FILE.jsonl``, ``FILE.val.jsonl`` and ``FILE.manifest.json`` (manifest
   last; a crash between the renames is finished by the next write, and the manifest names each
   file's SHA-256), and a summary on stderr. An output that would replace an input is refused.

With ``strict=True`` the first problem in input order raises :class:`Lav2Error`
``"FILE:WHERE: reason"`` and nothing is written. ``out="-"`` writes the records to stdout, writes no
manifest (the summary still goes to stderr) and writes image paths absolute.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

from lav2cli import __version__
from lav2cli.data.prepare import alpaca, coco, distill, easyvqa, llava, mme, table
from lav2cli.data.prepare.images import find_bad_images
from lav2cli.data.prepare.items import DUPLICATE_ID, EMPTY_TEXT, MALFORMED_RECORD, Candidate, Item, Skip
from lav2cli.data.prepare.job import UI, Job
from lav2cli.data.prepare.output import output_paths, print_summary, write_files, write_stdout
from lav2cli.data.records import KINDS, Record
from lav2cli.errors import Lav2Error
from lav2cli.fileio import refuse_overwrite

# each source's converter; its keyword arguments are the source's own options
SOURCES: dict[str, Callable[..., Iterator[Item]]] = {
    "coco": coco.convert,
    "csv": table.convert,
    "alpaca": alpaca.convert,
    "llava": llava.convert,
    "mme": mme.convert,
    "easyvqa": easyvqa.convert,
    "distill": distill.convert,
}

EXAMPLES_PER_REASON = 5


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
    if not to_stdout:  # the outputs must not replace what this run reads (checked again once read)
        _refuse_overwrite(out, [(f"--{k.replace('_', '-')}", v) for k, v in options.items()
                                if isinstance(v, (str, os.PathLike))])
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    ui = UI(quiet)
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
        write_stdout(train)
    else:
        _refuse_overwrite(out, [("the input", i["path"]) for i in job.inputs])
        out_path, val_path, manifest_path = output_paths(out)
        outputs = [("records", out_path, train)] + ([("val", val_path, val)] if val_fraction > 0 else [])
        for name, path, recs in outputs:
            manifest["outputs"][name] = {"path": os.path.basename(path), "records": len(recs), "by_kind": _by_kind(recs)}
        write_files([(path, recs) for _, path, recs in outputs], manifest, manifest_path, out_dir)
    print_summary(ui, manifest, None if to_stdout else out)
    return manifest


def _refuse_overwrite(out: str, inputs: list[tuple[str, Any]]) -> None:
    for path in output_paths(out):
        for what, src in inputs:
            refuse_overwrite(path, {what: src})


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
            bad = r.problem()  # the reader's own check: whatever is written reads back
            if bad is not None:
                item = Skip(MALFORMED_RECORD, item.at, bad)
            elif not r.instruction.strip() or not r.output.strip():
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


def _by_kind(records: list[Record]) -> dict[str, int]:
    counts = Counter(r.kind for r in records)
    return {k: counts[k] for k in KINDS if counts[k]}


def _option_value(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value
