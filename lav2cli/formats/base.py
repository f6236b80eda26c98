"""Base weights as every loader returns them (`BaseWeights`), and the tensor check the loaders share.

Expected tensors (Meta names) follow from a `LlamaConfig`; optional `.bias` tensors of the
seven linear layers (what `lav2 merge` writes when adapter biases are folded in) are accepted
with their shapes checked. Ignorable tensors (dropped silently): Meta's `rope.freqs`, HF's
`*.rotary_emb.inv_freq`. Anything else is rejected by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lav2cli.errors import Lav2Error
from lav2cli.model.config import LINEAR_MODULES, LlamaConfig
from lav2cli.tokenizer import Tokenizer

# The dim Meta's model-parallel shards split each linear's weight on
SPLIT_DIMS = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}
# Linear layers: Meta name -> (Meta module path, split dim for Meta model-parallel shards)
LINEARS = {name: (module, SPLIT_DIMS[name]) for name, module in LINEAR_MODULES.items()}

IGNORABLE = re.compile(r"^(rope\.freqs|.*rotary_emb\.inv_freq)$")


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
    format: str  # "meta", "hf", "gguf", or "merged-<layout>" for a `lav2 merge` directory
    files: list[Path] = field(default_factory=list)


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every base tensor the config needs, Meta names, in a stable order."""
    c = config
    hd = c.head_dim
    q, kv = c.n_heads * hd, c.n_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (c.vocab_size, c.dim)}
    lin = {"wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim), "wo": (c.dim, q),
           "w1": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim), "w3": (c.hidden_dim, c.dim)}
    for i in range(c.n_layers):
        for n, (mod, _) in LINEARS.items():
            shapes[f"layers.{i}.{mod}.{n}.weight"] = lin[n]
        shapes[f"layers.{i}.attention_norm.weight"] = (c.dim,)
        shapes[f"layers.{i}.ffn_norm.weight"] = (c.dim,)
    shapes["norm.weight"] = (c.dim,)
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    return shapes


def optional_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Bias tensors a merged model may carry (shape = the linear's output rows)."""
    out: dict[str, tuple[int, ...]] = {}
    exp = expected_shapes(config)
    for i in range(config.n_layers):
        for n, (mod, _) in LINEARS.items():
            out[f"layers.{i}.{mod}.{n}.bias"] = (exp[f"layers.{i}.{mod}.{n}.weight"][0],)
    return out


def split_dim(name: str) -> int | None:
    """The dim Meta's model-parallel shards split `name` on (None: replicated)."""
    if name == "tok_embeddings.weight":
        return 1
    if name == "output.weight":
        return 0
    m = re.match(r"^layers\.\d+\.(attention|feed_forward)\.(w[qkvo123])\.(weight|bias)$", name)
    if m:
        d = LINEARS[m.group(2)][1]
        if m.group(3) == "bias":
            return 0 if d == 0 else None  # row-parallel biases are added after the reduce
        return d
    return None


def drop_ignorable(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not IGNORABLE.match(k)}


def _fmt(shape: tuple[int, ...] | torch.Size) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_state_dict(
    sd: dict[str, torch.Tensor],
    config: LlamaConfig,
    where: Path | str | Callable[[str], str],
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    optional: dict[str, tuple[int, ...]] | None = None,
    name_of: Callable[[str], str] | None = None,
) -> None:
    """Raise Lav2Error naming the first missing, misshaped or unexpected tensor and its file.

    `where` is the file (or a function tensor name -> file) the message names; `name_of` maps a
    Meta name back to the name in the file (HF, GGUF) for the message; `shapes`/`optional`
    override the expected shapes (Meta shards)."""
    loc = where if callable(where) else (lambda _n, _w=str(where): _w)
    nm = name_of or (lambda n: n)
    exp = shapes if shapes is not None else expected_shapes(config)
    opt = optional if optional is not None else optional_shapes(config)
    cfg = (f"dim={config.dim} n_layers={config.n_layers} n_heads={config.n_heads} "
           f"n_kv_heads={config.n_kv_heads} hidden_dim={config.hidden_dim} vocab_size={config.vocab_size}")
    for k, shape in exp.items():
        t = sd.get(k)
        if t is None:
            raise Lav2Error(f"{loc(k)}: tensor {nm(k)} missing (expected shape {_fmt(shape)} for {cfg})")
        if tuple(t.shape) != tuple(shape):
            raise Lav2Error(f"{loc(k)}: tensor {nm(k)} has shape {_fmt(t.shape)}, expected {_fmt(shape)} for {cfg}")
    for k, t in sd.items():
        if k in exp:
            continue
        if k in opt:
            if tuple(t.shape) != tuple(opt[k]):
                raise Lav2Error(f"{loc(k)}: tensor {nm(k)} has shape {_fmt(t.shape)}, expected {_fmt(opt[k])} for {cfg}")
            continue
        if IGNORABLE.match(k):
            continue
        raise Lav2Error(f"{loc(k)}: unexpected tensor {nm(k)} (not part of a LLaMA with {cfg})")
