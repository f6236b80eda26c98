"""Weight layouts in and out. Each base-model module (meta, hf, gguf) offers
`detect(path) -> bool` and `load(path) -> BaseWeights`; adapters come from official.py
(released LLaMA-Adapter V2 .pth files) and artifact.py (lav2's own directories)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lav2cli.model.config import LlamaConfig
from lav2cli.tokenizer import Tokenizer


@dataclass
class BaseWeights:
    """A frozen base LLaMA, in Meta tensor names and the Meta (interleaved) RoPE layout.

    state_dict keys: tok_embeddings.weight, norm.weight, output.weight (absent when
    config.tie_embeddings), layers.{i}.attention.{wq,wk,wv,wo}.weight,
    layers.{i}.feed_forward.{w1,w2,w3}.weight, layers.{i}.{attention_norm,ffn_norm}.weight.
    """

    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    template: str  # "alpaca" or "chatml"
    source: Path
    format: str  # "meta", "hf" or "gguf"
    files: list[Path] = field(default_factory=list)
