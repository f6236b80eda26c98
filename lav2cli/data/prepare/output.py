"""Where prepared records go: ``FILE.jsonl``, ``FILE.val.jsonl`` and ``FILE.manifest.json``
written together and atomically (manifest last), or the records on stdout; then the summary."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Iterator

from lav2cli.data.prepare.job import UI
from lav2cli.data.records import Record
from lav2cli.fileio import atomic_files


def output_paths(out: str) -> tuple[str, str, str]:
    """The records, validation records and manifest files of ``--out FILE``."""
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return out, stem + ".val.jsonl", stem + ".manifest.json"


def write_files(outputs: list[tuple[str, list[Record]]], manifest: dict[str, Any], manifest_path: str,
                out_dir: str) -> None:
    """Each ``(path, records)`` and then the manifest, all or none (fileio.atomic_files: a crash
    between the renames is finished by the next write): a failure leaves earlier files as they
    were. The manifest's ``outputs`` entries get each file's ``sha256``, so that a records file
    can be checked against the manifest beside it. Image paths are written relative to
    ``out_dir`` where they lie under it."""
    by_file = {o["path"]: o for o in manifest["outputs"].values()}
    with atomic_files([path for path, _ in outputs] + [manifest_path], encoding="utf-8") as files:
        for f, (path, records) in zip(files, outputs):
            h = hashlib.sha256()
            for line in _lines(records, out_dir):
                f.write(line)
                h.update(line.encode("utf-8"))
            if os.path.basename(path) in by_file:
                by_file[os.path.basename(path)]["sha256"] = h.hexdigest()
        files[-1].write(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def write_stdout(records: list[Record]) -> None:
    """The records on stdout, image paths absolute."""
    sys.stdout.writelines(_lines(records, None))
    sys.stdout.flush()


def _lines(records: list[Record], base_dir: str | None) -> Iterator[str]:
    encode, cache = json.JSONEncoder(ensure_ascii=False).encode, {}
    for r in records:
        yield encode(r.to_dict(base_dir, cache)) + "\n"


def print_summary(ui: UI, manifest: dict[str, Any], out: str | None) -> None:
    """What was kept, written and skipped, from the manifest (``out`` None: records on stdout)."""

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
        ui.print(f"  manifest: {output_paths(out)[2]}")
