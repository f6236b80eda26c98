"""Weight layouts in and out. Each base-model module (meta, hf, gguf) offers
`detect(path) -> bool` and `load(path) -> BaseWeights`; adapters come from official.py
(released LLaMA-Adapter V2 .pth files) and artifact.py (lav2's own directories)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lav2cli.errors import Lav2Error

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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_safetensors(f: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or a one-line Lav2Error naming the file."""
    from safetensors.torch import load_file

    f = Path(f)
    if not f.is_file():
        raise Lav2Error(f"{f}: missing")
    try:
        return load_file(str(f))
    except Exception as e:
        raise Lav2Error(f"{f}: unreadable safetensors ({_first_line(e)})") from None


def read_checkpoint(f: str | Path, problem: str = "cannot read checkpoint") -> Any:
    """A pickled checkpoint through torch.load(weights_only=True) only (memory-mapped when the
    file allows it), or a one-line Lav2Error: `FILE: <problem> (<reason>)`."""
    try:
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Lav2Error(f"{f}: {problem} ({_first_line(e)})") from None


def read_state_dict(f: str | Path) -> dict[str, torch.Tensor]:
    """read_checkpoint that must hold a flat dict of tensors."""
    sd = read_checkpoint(f)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise Lav2Error(f"{f}: not a state dict of tensors")
    return sd
