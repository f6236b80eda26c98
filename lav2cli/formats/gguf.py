"""llama.cpp GGUF files (architecture "llama"): dequantised with the `gguf` package and cached.

llama.cpp's converter already stores wq/wk in Meta's interleaved RoPE layout, so no permutation
is applied (checked on SmolLM2: the rows of each interleaved pair (2i, 2i+1) have near-equal
norms, the rotate-half pairs (i, i + d/2) do not). GGUF lists shapes in ggml order (ne,
innermost first); the numpy arrays the reader returns are already [out, in] = Meta order.

Cache (first load converts, later loads read only the cache):
    <cache>/gguf/<sha256 of the file>/{model.safetensors, config.json, tokenizer.json,
                                       tokenizer_config.json, meta.json}
    <cache>/gguf/keys/<sha1 of "abs path|size|mtime_ns">.json -> {"sha256": ...}
The entry is content-addressed (copies of one file share it); the small key file remembers the
hash of a (path, size, mtime) so a second load neither hashes nor parses the GGUF. Entries are
written atomically (fileio.atomic_dir; a killed conversion's leftovers are swept on the next
load); a damaged entry is named in a warning and converted again; a cache that cannot be
written (full disk included) only warns. Tensors are stored as float32 (exact
dequantised values). <cache> = $LAV2_CACHE, else $XDG_CACHE_HOME/lav2, else ~/.cache/lav2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lav2cli.errors import Lav2Error, Lav2Note
from lav2cli.fileio import atomic_dir, atomic_file, cache_root, sha256_file, sweep
from lav2cli.formats import gguf_tokenizer
from lav2cli.formats.base import BaseWeights, check_state_dict
from lav2cli.formats.io import read_safetensors
from lav2cli.model.config import LlamaConfig
from lav2cli.tokenizer import BPETokenizer, Tokenizer, template_for

CACHE_VERSION = 1
_MAGIC = b"GGUF"

_LAYER = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
        "output.weight": "output.weight"}
_TOP_INV = {v: k for k, v in _TOP.items()}


def gguf_to_meta_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = re.match(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$", name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def meta_to_gguf_name(name: str) -> str:
    if name in _TOP_INV:
        return _TOP_INV[name]
    m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _LAYER_INV:
        return f"blk.{m.group(1)}.{_LAYER_INV[m.group(2)]}.{m.group(3)}"
    raise Lav2Error(f"tensor {name}: no GGUF name for it")


def detect(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def _key_file(root: Path, p: Path, st: os.stat_result) -> Path:
    k = hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return root / "keys" / f"{k}.json"


# --- reading the GGUF ----------------------------------------------------------------------


def _fields(reader: Any) -> dict[str, Any]:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # a value type this gguf version cannot render: not needed here
            pass
    return out


def _config(md: dict[str, Any], n_tokens: int, where: Path) -> LlamaConfig:
    arch = md.get("general.architecture")
    if arch != "llama":
        raise Lav2Error(f"{where}: GGUF architecture {arch!r} is not supported (expected 'llama')")

    def need(key: str) -> Any:
        v = md.get(f"llama.{key}")
        if v is None:
            raise Lav2Error(f"{where}: GGUF metadata llama.{key} missing")
        return v

    st = md.get("llama.rope.scaling.type")
    if st not in (None, "none"):
        raise Lav2Error(f"{where}: rope scaling {st!r} (llama.rope.scaling.type) is not supported")
    n_heads = int(need("attention.head_count"))
    dim = int(need("embedding_length"))
    c = LlamaConfig(
        dim=dim,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(md.get("llama.attention.head_count_kv") or n_heads),
        vocab_size=n_tokens,
        hidden_dim=int(need("feed_forward_length")),
        norm_eps=_f32(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(md.get("llama.rope.freq_base", 10000.0)),
        tie_embeddings=False,
        max_seq_len=int(md.get("llama.context_length", 2048)),
    )
    rd = md.get("llama.rope.dimension_count")
    if dim % n_heads or (rd is not None and int(rd) != dim // n_heads):
        raise Lav2Error(f"{where}: rope.dimension_count {rd} != head dim {dim // n_heads} is not supported")
    return c


def _f32(v: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")"))


def read_gguf(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor], BPETokenizer, dict[str, Any]]:
    """Parse and dequantise: (config, Meta state dict in float32, tokenizer, summary)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise Lav2Error(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else e!r})") from None
    md = _fields(reader)
    tokenizer = gguf_tokenizer.from_metadata(md, path)
    config = _config(md, len(md["tokenizer.ggml.tokens"]), path)
    state: dict[str, torch.Tensor] = {}
    gname: dict[str, str] = {}
    qtypes: dict[str, int] = {}
    for t in reader.tensors:
        m = gguf_to_meta_name(t.name)
        if m is None:
            raise Lav2Error(f"{path}: unexpected tensor {t.name} (not a LLaMA tensor name)")
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise Lav2Error(f"{path}: tensor {t.name}: quantisation {t.tensor_type.name} "
                            f"cannot be dequantised by the gguf package") from None
        a = np.ascontiguousarray(a, dtype=np.float32)
        expect = tuple(int(x) for x in reversed(t.shape.tolist()))
        if a.shape != expect:  # the reader's arrays are in [out, in] order; guard against surprises
            a = a.reshape(expect)
        state[m] = torch.from_numpy(a.copy() if not a.flags.writeable else a)
        gname[m] = t.name
        qtypes[t.tensor_type.name] = qtypes.get(t.tensor_type.name, 0) + 1
    if "output.weight" not in state:
        config.tie_embeddings = True
    check_state_dict(state, config, path, name_of=lambda n: gname.get(n) or meta_to_gguf_name(n))
    summary = {
        "name": md.get("general.name"),
        "architecture": md.get("general.architecture"),
        "tensor_types": qtypes,
        "template": template_for(tokenizer),
    }
    del reader
    return config, state, tokenizer, summary


# --- the cache -----------------------------------------------------------------------------


def _entry_ok(entry: Path) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("cache_version") == CACHE_VERSION and all(
        (entry / f).is_file() for f in ("model.safetensors", "config.json", "tokenizer.json"))


def _load_entry(entry: Path, source: Path) -> BaseWeights | None:
    """The entry's weights, or None (with a warning naming the file) when a file of it is
    damaged (cut short, edited): the caller converts again and replaces it."""
    f = entry / "meta.json"
    try:
        meta = json.loads(f.read_text())
        f = entry / "config.json"
        config = LlamaConfig.from_dict(json.loads(f.read_text()))
        f = entry / "model.safetensors"
        state = read_safetensors(f)
        check_state_dict(state, config, f)
        f = entry / "tokenizer.json"
        tokenizer = BPETokenizer.from_file(f)
        template = meta["template"]
    except Exception as e:  # whatever the damage, the GGUF file itself is the truth
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"{f}: damaged GGUF cache entry ({reason}); converting {source.name} again", stacklevel=3)
        return None
    return BaseWeights(config=config, state_dict=state, tokenizer=tokenizer, template=template,
                       source=source, format="gguf", files=[source, entry / "model.safetensors"])


def _write_entry(entry: Path, config: LlamaConfig, state: dict[str, torch.Tensor],
                 tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Write a cache entry atomically (a stale or damaged one is replaced; a concurrent writer
    of the same entry waits for the lock, then replaces it with the same content). A full disk
    raises fileio.NoSpace, an OSError like any other unwritable cache."""
    from safetensors.torch import save_file

    with atomic_dir(entry) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        tokenizer.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load(path: str | Path, cache_dir: str | Path | None = None) -> BaseWeights:
    """Load a GGUF file through the cache (see the module doc). An unwritable cache only warns."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise Lav2Error(f"{path}: no such GGUF file")
    st = p.stat()
    root = cache_root(cache_dir) / "gguf"
    key = _key_file(root, p, st)
    for folder in (root, key.parent):  # what a killed conversion left
        sweep(folder)
    tried = None
    try:
        sha = json.loads(key.read_text())["sha256"]
        if _entry_ok(root / sha):
            tried = root / sha
            if (weights := _load_entry(tried, p)) is not None:
                return weights
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha = sha256_file(p)
    entry = root / sha
    if entry != tried and _entry_ok(entry) and (weights := _load_entry(entry, p)) is not None:
        _remember(key, p, st, sha)
        return weights
    t0 = time.perf_counter()
    config, state, tokenizer, summary = read_gguf(p)
    meta = {"cache_version": CACHE_VERSION, "sha256": sha, "source": str(p), "size": st.st_size,
            "dtype": "float32", "convert_seconds": round(time.perf_counter() - t0, 2), **summary}
    try:
        _write_entry(entry, config, state, tokenizer, meta)
        _remember(key, p, st, sha)
        files = [p, entry / "model.safetensors"]
    except OSError as e:
        warnings.warn(f"{root}: cannot write the GGUF cache ({e.strerror or e}); the next load converts again "
                      "(LAV2_CACHE names another cache folder)", Lav2Note, stacklevel=2)
        files = [p]
    return BaseWeights(config=config, state_dict=state, tokenizer=tokenizer, template=summary["template"],
                       source=p, format="gguf", files=files)


def _remember(key: Path, p: Path, st: os.stat_result, sha: str) -> None:
    with atomic_file(key) as f:
        f.write(json.dumps({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}) + "\n")


# --- writing (tests, small exports) --------------------------------------------------------


def save(
    path: str | Path,
    config: LlamaConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    *,
    chat_template: str | None = None,
    name: str = "lav2",
) -> Path:
    """Write a GGUF file (architecture llama, F32 tensors in Meta's interleaved layout as
    llama.cpp does). `tokenizer`: byte-level BPE is written as a "gpt2" vocabulary, sentencepiece
    as a "llama" one (gguf_tokenizer.write); None writes no tokenizer section."""
    import gguf

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_name(name)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(0)  # ALL_F32
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if tokenizer is not None:
        gguf_tokenizer.write(w, tokenizer)
    if template:
        w.add_chat_template(template)
    for k, v in state_dict.items():
        if config.tie_embeddings and k == "output.weight":
            continue
        w.add_tensor(meta_to_gguf_name(k), v.detach().to(torch.float32).contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p
