"""Training data: records tokenised once, length-grouped batches in a reproducible order, and
collation into right-padded token/label tensors plus images (pixels or cached encoder features).

The batch order is a pure function of (seed, epoch), so a resumed run continues exactly where
it stopped from just (epoch, position)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lav2cli.data.records import read_records
from lav2cli.errors import Lav2Error
from lav2cli.templates import IGNORE_INDEX, Template
from lav2cli.tokenizer import Tokenizer


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    image: str | None  # absolute path, or None for text-only


# record kinds trained with the short-answer prompt, the one `lav2 eval vqa` asks them with
SHORT_ANSWER_KINDS = ("vqa",)


def load_examples(path: str | Path, tok: Tokenizer, template: Template, max_tokens: int) -> list[Example]:
    """Tokenise every record of a records file; records whose response is cut away entirely by
    max_tokens are dropped (they would teach nothing)."""
    out: list[Example] = []
    for rec in read_records(path):
        ids, labels = template.encode_example(tok, rec.instruction, rec.input, rec.output, max_tokens,
                                              short_answer=rec.kind in SHORT_ANSWER_KINDS)
        if all(lab == IGNORE_INDEX for lab in labels):
            continue
        out.append(Example(ids, labels, rec.image))
    if not out:
        raise Lav2Error(f"{path}: no usable records (all empty or longer than max_tokens={max_tokens})")
    return out


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           group: int = 64) -> list[list[int]]:
    """Shuffle, sort by length inside windows of `group` batches (little padding), shuffle the
    batches. Deterministic in (seed, epoch). The last incomplete batch is dropped."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    window = batch_size * group
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


class Stream:
    """An endless, resumable sequence of batches over one records file."""

    def __init__(self, name: str, examples: list[Example], batch_size: int, seed: int):
        self.name, self.examples, self.batch_size, self.seed = name, examples, batch_size, seed
        if len(examples) < batch_size:
            raise Lav2Error(f"data stream {name!r}: {len(examples)} usable records, fewer than one batch of {batch_size}")
        self.lengths = [len(e.ids) for e in examples]
        self.epoch, self.position = 0, 0
        self._batches = length_grouped_batches(self.lengths, batch_size, seed, 0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def next(self) -> list[Example]:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = length_grouped_batches(self.lengths, self.batch_size, self.seed, self.epoch)
        batch = [self.examples[i] for i in self._batches[self.position]]
        self.position += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = length_grouped_batches(self.lengths, self.batch_size, self.seed, self.epoch)


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] right-padded
    labels: torch.Tensor  # [B, T], IGNORE_INDEX on prompt and padding
    images: torch.Tensor | None  # [B, 3, H, W] pixels or [B, N, C] cached features
    image_mask: torch.Tensor | None  # [B] bool: which rows have an image

    def to(self, device: torch.device, image_dtype: torch.dtype) -> "Batch":
        return Batch(self.tokens.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     None if self.images is None else self.images.to(device, image_dtype, non_blocking=True),
                     None if self.image_mask is None else self.image_mask.to(device, non_blocking=True))


def bucket_length(length: int, multiple: int, max_len: int | None = None) -> int:
    """length rounded up to a multiple of `multiple`, but not past max_len (nor below length).
    Padding is invisible to the loss: padded positions are unsupervised and, being last, are
    never attended to by the real tokens."""
    padded = -(-length // multiple) * multiple
    return max(length, min(padded, max_len)) if max_len else padded


def collate(examples: list[Example], pad_id: int, image_fn: Callable[[str], torch.Tensor] | None,
            map_fn: Callable = map, pad_multiple: int = 1, max_len: int | None = None) -> Batch:
    """Right-pad to the longest example, rounded up to a multiple of pad_multiple (at most
    max_len, unless the longest is longer: a compiled model then sees a few lengths, not every
    one); images through image_fn (path -> tensor), mapped with map_fn (a thread pool's map loads
    them in parallel)."""
    T = bucket_length(max(len(e.ids) for e in examples), pad_multiple, max_len)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        tokens[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    images = mask = None
    if image_fn is not None and any(e.image for e in examples):
        present = list(map_fn(image_fn, [e.image for e in examples if e.image]))
        zero = torch.zeros_like(present[0])
        it = iter(present)
        images = torch.stack([next(it) if e.image else zero for e in examples])
        mask = torch.tensor([e.image is not None for e in examples])
    return Batch(tokens, labels, images, mask)
