"""COCO captions: a COCO caption file (``images[].id/file_name`` + ``annotations[].image_id/caption``)
or the Karpathy split file (``images[].filepath/filename/split/sentences[].raw``)."""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from typing import Any, Iterator

from lav2cli.data.prepare.items import (
    EXTRA_CAPTION, MALFORMED_RECORD, OTHER_SPLIT, UNKNOWN_IMAGE_ID, Candidate, Item, Skip, stripped,
)
from lav2cli.data.prepare.job import Job
from lav2cli.data.records import Record
from lav2cli.errors import Lav2Error
from lav2cli.templates import CAPTION_INSTRUCTION


def convert(job: Job, annotations: str, images: str, split: str | None = None, captions: str = "all",
            instruction: str | None = None) -> Iterator[Item]:
    """Caption records of either file (``karpathy`` records for the split file; ``split`` keeps a
    comma-separated list of its splits). ``captions="first"`` keeps one caption per image."""
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
        text = stripped(ann.get("caption")) if isinstance(ann, dict) else None
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
            text = stripped(sentence.get("raw")) if isinstance(sentence, dict) else None
            if text is None:
                yield Skip(MALFORMED_RECORD, at_k, "needs raw")
                continue
            rec_id = f"karpathy-{sentence['sentid']}" if "sentid" in sentence else f"karpathy-{im.get('imgid', i)}-{k}"
            yield _caption(rec_id, name, os.path.join(images, name), text, at_k, "karpathy", instruction, extra, taken)
