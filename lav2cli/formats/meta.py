"""Meta's LLaMA release layout: consolidated.NN.pth + params.json + tokenizer.model.

Accepted: a directory holding all three; the original release layout `DIR/7B/...` with
`DIR/tokenizer.model` (pass DIR when it holds exactly one model folder, or DIR/7B).
Model-parallel shards are merged: column-parallel (wq, wk, wv, w1, w3, output) on dim 0,
row-parallel (wo, w2, tok_embeddings) on dim 1, norms taken from shard 0 (they are replicated).
Tensors keep their stored dtype (the model casts).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from lav2cli.errors import Lav2Error, Lav2Note
from lav2cli.formats.base import (
    BaseWeights,
    check_state_dict,
    drop_ignorable,
    expected_shapes,
    optional_shapes,
    split_dim,
)
from lav2cli.formats.io import read_state_dict
from lav2cli.model.config import LlamaConfig
from lav2cli.schema import Field, JSONProblem, SchemaError, at_least, check, parse_json, positive
from lav2cli.tokenizer import SentencePieceTokenizer

_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


def _shards(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    files = [f for f in d.iterdir() if _SHARD.match(f.name)]
    return sorted(files, key=lambda f: int(_SHARD.match(f.name).group(1)))


def _is_model_dir(d: Path) -> bool:
    return d.is_dir() and (d / "params.json").is_file() and bool(_shards(d))


def _model_dir(path: Path) -> Path | None:
    """The folder holding params.json + shards: `path` itself or its single model subfolder."""
    if _is_model_dir(path):
        return path
    if not path.is_dir():
        return None
    subs = sorted(s for s in path.iterdir() if _is_model_dir(s))
    if len(subs) == 1:
        return subs[0]
    if len(subs) > 1:
        names = ", ".join(s.name for s in subs)
        raise Lav2Error(f"{path}: holds several models ({names}): pass one of these folders")
    return None


def detect(path: str | Path) -> bool:
    p = Path(path)
    try:
        return _model_dir(p) is not None
    except Lav2Error:
        return True  # it is a Meta layout; load() reports the ambiguity


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width rule."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _count(**kw: Any) -> Field:
    return Field("int", rule=at_least(1), **kw)


# The shape of Meta's params.json (ModelArgs); other fields (e.g. use_scaled_rope) are free.
PARAMS_JSON = Field("object", fields={
    "dim": _count(required=True),
    "n_layers": _count(required=True),
    "n_heads": _count(required=True),
    "n_kv_heads": _count(null=True),
    "vocab_size": Field("int"),  # -1 in the original release: the embedding's rows say
    "multiple_of": _count(),
    "ffn_dim_multiplier": Field("number", null=True, rule=positive),
    "norm_eps": Field("number", rule=positive),
    "rope_theta": Field("number", rule=positive),
    "max_seq_len": _count(),
})


def read_params(f: Path) -> dict[str, Any]:
    """params.json checked against PARAMS_JSON: any problem is one Lav2Error naming the file and field."""
    try:
        params = parse_json(f.read_bytes())
        check(params, PARAMS_JSON, "params.json")
    except OSError as e:
        raise Lav2Error(f"{f}: cannot read ({e.strerror or e})") from None
    except JSONProblem as e:
        raise Lav2Error(f"{f}:{e.lineno}: {e}") from None
    except SchemaError as e:
        raise Lav2Error(f"{f}: {e}") from None
    return params


def load(path: str | Path) -> BaseWeights:
    p = Path(path)
    d = _model_dir(p)
    if d is None:
        raise Lav2Error(f"{p}: no LLaMA weights found (expected params.json + consolidated.*.pth)")
    params_file = d / "params.json"
    params = read_params(params_file)
    tok_file = next((t for t in (d / "tokenizer.model", d.parent / "tokenizer.model") if t.is_file()), None)
    if tok_file is None:
        raise Lav2Error(f"{d}: no tokenizer.model (looked in {d} and {d.parent})")
    tokenizer = SentencePieceTokenizer(tok_file)

    files = _shards(d)
    shards = [drop_ignorable(read_state_dict(f)) for f in files]
    n = len(shards)
    first = shards[0]
    w1 = "layers.0.feed_forward.w1.weight"
    emb = "tok_embeddings.weight"
    for name in (w1, emb):
        if name not in first:
            raise Lav2Error(f"{files[0]}: tensor {name} missing")
    dim = params["dim"]
    hidden = sum(int(s[w1].shape[0]) for s in shards if w1 in s)
    if "multiple_of" in params:
        expect = ffn_hidden_dim(dim, int(params["multiple_of"]), params.get("ffn_dim_multiplier"))
        if expect != hidden:
            warnings.warn(f"{params_file}: multiple_of/ffn_dim_multiplier give hidden_dim {expect}, "
                          f"but {w1} has {hidden} rows: using {hidden}", Lav2Note, stacklevel=2)
    vocab = int(params.get("vocab_size", -1))
    emb_rows = int(first[emb].shape[0])
    if vocab <= 0:
        vocab = emb_rows
    config = LlamaConfig(
        dim=dim,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=vocab,
        hidden_dim=hidden,
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        tie_embeddings=False,
        max_seq_len=int(params.get("max_seq_len", 2048)),
    )
    if dim % config.n_heads:
        raise Lav2Error(f"{params_file}: dim {dim} is not a multiple of n_heads {config.n_heads}")
    if tokenizer.vocab_size > vocab:
        raise Lav2Error(f"{tok_file}: tokenizer has {tokenizer.vocab_size} tokens, model only {vocab}")

    full = expected_shapes(config)
    opt = optional_shapes(config)
    if n == 1:
        check_state_dict(first, config, files[0])
        state = first
    else:
        def shard_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
            out = {}
            for k, s in shapes.items():
                sd_ = split_dim(k)
                if sd_ is not None:
                    if s[sd_] % n:
                        raise Lav2Error(f"{d}: {k} dim {sd_} of size {s[sd_]} does not split into {n} shards")
                    s = tuple(v // n if j == sd_ else v for j, v in enumerate(s))
                out[k] = s
            return out

        per, per_opt = shard_shapes(full), shard_shapes(opt)
        keys0 = set(first)
        for f, s in zip(files, shards):
            check_state_dict(s, config, f, shapes=per, optional=per_opt)
            extra = keys0 ^ set(s)
            if extra:
                k = sorted(extra)[0]
                raise Lav2Error(f"{f}: tensor {k} {'missing' if k in keys0 else 'present only in this shard'}")
        state = {}
        for k in first:
            sd_ = split_dim(k)
            if sd_ is None:
                state[k] = first[k]
            else:
                state[k] = torch.cat([s[k] for s in shards], dim=sd_)
        check_state_dict(state, config, d)
    return BaseWeights(config=config, state_dict=state, tokenizer=tokenizer, template="alpaca",
                       source=d, format="meta", files=[*files, params_file, tok_file])


def params_for(config: LlamaConfig) -> dict:
    """params.json for `config`, with multiple_of (and ffn_dim_multiplier when no multiple_of
    fits) chosen so that Meta's width rule reproduces config.hidden_dim."""
    c = config
    p: dict = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads}
    if c.n_kv_heads != c.n_heads:
        p["n_kv_heads"] = c.n_kv_heads
    base = int(2 * (4 * c.dim) / 3)
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_hidden_dim(c.dim, m, None) == c.hidden_dim:
            p["multiple_of"] = m
            break
    else:
        p["multiple_of"] = 1
        p["ffn_dim_multiplier"] = (c.hidden_dim + 0.5) / base
        assert ffn_hidden_dim(c.dim, 1, p["ffn_dim_multiplier"]) == c.hidden_dim
    p["norm_eps"] = c.norm_eps
    if c.rope_theta != 10000.0:
        p["rope_theta"] = c.rope_theta
    p["vocab_size"] = c.vocab_size
    if c.max_seq_len != 2048:  # a ModelArgs field in Meta's code, so params.json may carry it
        p["max_seq_len"] = c.max_seq_len
    return p


def save(
    out_dir: str | Path,
    config: LlamaConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer_model_path: str | Path | None = None,
    shards: int = 1,
) -> list[Path]:
    """Write consolidated.NN.pth (split as Meta's model-parallel shards when shards > 1),
    params.json and a copy of tokenizer.model. Tied embeddings are written out as output.weight
    (Meta checkpoints have no tying). Extra tensors (e.g. `.bias`) are saved as they are
    (split like their layer's weight when sharded)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = dict(state_dict)
    if "output.weight" not in sd and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    written: list[Path] = []
    for r in range(shards):
        part: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            d = split_dim(k)
            if shards > 1 and d is not None:
                if v.shape[d] % shards:
                    raise Lav2Error(f"{k}: dim {d} of size {v.shape[d]} does not split into {shards} shards")
                v = v.chunk(shards, dim=d)[r]
            part[k] = v.detach().contiguous().clone()
        f = out / f"consolidated.{r:02d}.pth"
        torch.save(part, f)
        written.append(f)
    cfg = config if "output.weight" in state_dict or not config.tie_embeddings else \
        LlamaConfig.from_dict({**config.to_dict(), "tie_embeddings": False})
    pf = out / "params.json"
    pf.write_text(json.dumps(params_for(cfg), indent=2) + "\n")
    written.append(pf)
    if tokenizer_model_path is not None:
        t = out / "tokenizer.model"
        if Path(tokenizer_model_path).resolve() != t.resolve():
            shutil.copyfile(tokenizer_model_path, t)
        written.append(t)
    return written
