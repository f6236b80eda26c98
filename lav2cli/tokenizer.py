"""One small tokenizer interface, two backends: sentencepiece and byte-level BPE (tokenizers)."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: frozenset[int]  # generation stops at any of these (eos, chatml's <|im_end|>, ...)
    chat_template: str | None  # raw chat template from the model files, when present

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...
