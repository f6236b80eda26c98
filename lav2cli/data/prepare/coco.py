"""COCO captions: a COCO caption file (``images[].id/file_name`` + ``annotations[].image_id/caption``)
or the Karpathy split file (``images[].filepath/filename/split/sentences[].raw``)."""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from typing import Any, Iterator

from lav2cli.data.prepare.items import (
    EXTRA_CAPTION, MALFORMED_RECORD, OTHER_SPLIT, UNKNOWN_IMAGE_ID, Candidate, Item, Skip, bad_id, id_text, stripped,
)
from lav2cli.schema import show
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
    if isinstance(doc, dict) and "annotations" in doc:
        if not isinstance(doc["annotations"], list):
            raise Lav2Error(f"{path}: annotations must be a list, not {show(doc['annotations'])}")
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
    listed = doc.get("images") or []
    if not isinstance(listed, list):
        raise Lav2Error(f"{path}: images must be a list, not {show(listed)}")
    files: dict[int | str, str] = {}  # by the id as written: 1 and "1" differ, and false is not 0
    for i, im in enumerate(listed):
        if isinstance(im, dict) and id_text(im.get("id")) is not None and isinstance(im.get("file_name"), str):
            files[im["id"]] = im["file_name"]
        else:
            yield Skip(MALFORMED_RECORD, f"{path}:images[{i}]", "needs id (a string or an integer) and file_name")
    per_image: Counter[Any] = Counter()
    for i, ann in enumerate(doc["annotations"]):
        at = f"{path}:annotations[{i}]"
        text = stripped(ann.get("caption")) if isinstance(ann, dict) else None
        if text is None or "image_id" not in ann:
            yield Skip(MALFORMED_RECORD, at, "needs image_id and caption")
            continue
        image_id = ann["image_id"]
        if id_text(image_id) is None:
            yield Skip(MALFORMED_RECORD, at, bad_id("image_id", image_id))
            continue
        if image_id not in files:
            yield Skip(UNKNOWN_IMAGE_ID, at, f"image_id {show(image_id)}")
            continue
        if "id" in ann and id_text(ann["id"]) is None:
            yield Skip(MALFORMED_RECORD, at, bad_id("id", ann["id"]))
            continue
        rec_id = f"coco-{id_text(ann['id'])}" if "id" in ann else f"coco-{id_text(image_id)}-{per_image[image_id]}"
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
        filepath, split = im.get("filepath") or "", im.get("split")
        if not isinstance(filepath, str) or not isinstance(split, (str, type(None))):
            yield Skip(MALFORMED_RECORD, at, "filepath and split must be strings")
            continue
        if id_text(im.get("imgid", i)) is None:
            yield Skip(MALFORMED_RECORD, at, bad_id("imgid", im.get("imgid")))
            continue
        name = posixpath.join(filepath, im["filename"])
        extra = {"split": split} if "split" in im else {}
        for k, sentence in enumerate(im["sentences"]):
            at_k = f"{at}.sentences[{k}]"
            if wanted is not None and split not in wanted:
                yield Skip(OTHER_SPLIT, at_k, problem=False)
                continue
            text = stripped(sentence.get("raw")) if isinstance(sentence, dict) else None
            if text is None:
                yield Skip(MALFORMED_RECORD, at_k, "needs raw")
                continue
            if "sentid" in sentence and id_text(sentence["sentid"]) is None:
                yield Skip(MALFORMED_RECORD, at_k, bad_id("sentid", sentence["sentid"]))
                continue
            rec_id = (f"karpathy-{id_text(sentence['sentid'])}" if "sentid" in sentence
                      else f"karpathy-{id_text(im.get('imgid', i))}-{k}")
            yield _caption(rec_id, name, os.path.join(images, name), text, at_k, "karpathy", instruction, extra, taken)
