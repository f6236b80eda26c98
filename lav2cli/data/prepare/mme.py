"""The MME benchmark's release folder: yes/no vqa records grouped in image pairs."""

from __future__ import annotations

import codecs
import os
from typing import Iterator

from lav2cli.data.prepare.images import IMAGE_EXTENSIONS
from lav2cli.data.prepare.items import MALFORMED_ROW, MISSING_IMAGE, NOT_UTF8, Candidate, Item, Skip
from lav2cli.data.prepare.job import Job
from lav2cli.data.records import MME_COGNITION, Record
from lav2cli.errors import Lav2Error


def convert(job: Job, root: str) -> Iterator[Item]:
    """Per subtask either ``images/`` + ``questions_answers_YN/*.txt`` or ``*.txt`` beside
    same-stem images; each line ``question<TAB>Yes|No`` becomes a vqa record with ``subtask``,
    ``category`` and ``pair`` (``SUBTASK/IMAGE-STEM``, shared by an image's questions)."""
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
            yield from _questions(question_files[-1], subtask, category, idir, stems.get(txt[:-4]))
    if not question_files:
        raise Lav2Error(f"{root}: no MME subtask folders (SUBTASK/*.txt beside images, or SUBTASK/questions_answers_YN/)")
    job.add_tree(root, question_files)


def _questions(path: str, subtask: str, category: str, image_dir: str, image_name: str | None) -> Iterator[Item]:
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path, "rb") as f:
        data = f.read().removeprefix(codecs.BOM_UTF8)
    k = 0
    # split on newlines only (str.splitlines also breaks at \v, \x1c, U+2028, ...: wrong line numbers)
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        at = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            yield Skip(NOT_UTF8, at, f"byte 0x{raw[e.start]:02x} at column {e.start + 1}")
            continue
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
