"""Which base-model layout is at PATH, and the tensor check shared by the three loaders.

Expected tensors (Meta names) follow from a `LlamaConfig`; optional `.bias` tensors of the
seven linear layers (what `lav2 merge` writes when adapter biases are folded in) are accepted
with their shapes checked. Ignorable tensors (dropped silently): Meta's `rope.freqs`, HF's
`*.rotary_emb.inv_freq`. Anything else is rejected by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from lav2cli.errors import Lav2Error
from lav2cli.model.config import LINEAR_MODULES, LlamaConfig

# The dim Meta's model-parallel shards split each linear's weight on
SPLIT_DIMS = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}
# Linear layers: Meta name -> (Meta module path, split dim for Meta model-parallel shards)
LINEARS = {name: (module, SPLIT_DIMS[name]) for name, module in LINEAR_MODULES.items()}

IGNORABLE = re.compile(r"^(rope\.freqs|.*rotary_emb\.inv_freq)$")


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


def load_base(path: str | Path, cache_dir: str | Path | None = None):
    """Load base weights from a .gguf file, a Meta directory (params.json + consolidated.*.pth,
    or a folder with one such model subfolder) or a Hugging Face directory (config.json +
    *.safetensors / pytorch_model*.bin). Named models (registry) are resolved first."""
    from lav2cli.formats import gguf, hf, meta

    p = Path(path).expanduser()
    if not p.exists():
        from lav2cli.registry import resolve_named

        named = resolve_named(str(path))
        if named is None:
            raise Lav2Error(f"{path}: no such file or directory (and not a known model name)")
        p = named
    if gguf.detect(p):
        return gguf.load(p, cache_dir=cache_dir)
    if meta.detect(p):
        return meta.load(p)
    if hf.detect(p):
        return hf.load(p)
    if p.is_file():
        raise Lav2Error(f"{p}: not a LLaMA weights file (expected a .gguf file or a model directory)")
    raise Lav2Error(
        f"{p}: no LLaMA weights found (expected a .gguf file, params.json + consolidated.*.pth, "
        f"or config.json + *.safetensors / pytorch_model*.bin)"
    )
