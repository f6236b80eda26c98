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
written to a temporary folder and renamed into place. Tensors are stored as float32 (exact
dequantised values). <cache> = $LAV2_CACHE, else $XDG_CACHE_HOME/lav2, else ~/.cache/lav2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lav2cli.errors import Lav2Error
from lav2cli.fileio import atomic_file, cache_root, sha256_file
from lav2cli.formats import BaseWeights
from lav2cli.formats.base import check_state_dict
from lav2cli.model.config import LlamaConfig

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


def _tokenizer(md: dict[str, Any], where: Path):
    from lav2cli.tokenizer import BPETokenizer

    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise Lav2Error(f"{where}: no tokenizer in the GGUF (tokenizer.ggml.tokens missing)")
    types = md.get("tokenizer.ggml.token_type")
    eos = md.get("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise Lav2Error(f"{where}: GGUF metadata tokenizer.ggml.eos_token_id missing")
    bos = md.get("tokenizer.ggml.bos_token_id")
    pad = md.get("tokenizer.ggml.padding_token_id")
    tmpl = md.get("tokenizer.chat_template")
    if model == "gpt2":
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise Lav2Error(f"{where}: GGUF metadata tokenizer.ggml.merges missing")
        return BPETokenizer.from_gguf_metadata(
            list(tokens), list(merges), list(types) if types is not None else None, bos, eos, pad,
            md.get("tokenizer.ggml.pre"), add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=tmpl)
    if model == "llama":
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise Lav2Error(f"{where}: GGUF metadata tokenizer.ggml.scores missing")
        return BPETokenizer.from_gguf_spm(
            list(tokens), list(scores), list(types) if types is not None else None, bos, eos, pad,
            md.get("tokenizer.ggml.unknown_token_id", 0),
            add_bos=bool(md.get("tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)), chat_template=tmpl)
    raise Lav2Error(f"{where}: GGUF tokenizer model {model!r} is not supported (expected 'gpt2' or 'llama')")


def _template(chat_template: str | None) -> str:
    return "chatml" if chat_template and "<|im_start|>" in chat_template else "alpaca"


def read_gguf(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor], Any, dict[str, Any]]:
    """Parse and dequantise: (config, Meta state dict in float32, tokenizer, summary)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise Lav2Error(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else e!r})") from None
    md = _fields(reader)
    tokenizer = _tokenizer(md, path)
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
        "template": _template(md.get("tokenizer.chat_template")),
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


def _load_entry(entry: Path, source: Path) -> BaseWeights:
    from safetensors.torch import load_file

    from lav2cli.tokenizer import BPETokenizer

    meta = json.loads((entry / "meta.json").read_text())
    config = LlamaConfig.from_dict(json.loads((entry / "config.json").read_text()))
    state = load_file(str(entry / "model.safetensors"))
    tokenizer = BPETokenizer.from_file(entry / "tokenizer.json")
    return BaseWeights(config=config, state_dict=state, tokenizer=tokenizer, template=meta["template"],
                       source=source, format="gguf", files=[source, entry / "model.safetensors"])


def _write_entry(root: Path, entry: Path, config: LlamaConfig, state: dict[str, torch.Tensor],
                 tokenizer: Any, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        tokenizer.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if entry.exists():  # stale (older cache version or incomplete): replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _entry_ok(entry):  # not a concurrent writer that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load(path: str | Path, cache_dir: str | Path | None = None) -> BaseWeights:
    """Load a GGUF file through the cache (see the module doc). An unwritable cache only warns."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise Lav2Error(f"{path}: no such GGUF file")
    st = p.stat()
    root = cache_root(cache_dir) / "gguf"
    key = _key_file(root, p, st)
    try:
        sha = json.loads(key.read_text())["sha256"]
        if _entry_ok(root / sha):
            return _load_entry(root / sha, p)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha = sha256_file(p)
    entry = root / sha
    if _entry_ok(entry):
        _remember(key, p, st, sha)
        return _load_entry(entry, p)
    t0 = time.perf_counter()
    config, state, tokenizer, summary = read_gguf(p)
    meta = {"cache_version": CACHE_VERSION, "sha256": sha, "source": str(p), "size": st.st_size,
            "dtype": "float32", "convert_seconds": round(time.perf_counter() - t0, 2), **summary}
    try:
        _write_entry(root, entry, config, state, tokenizer, meta)
        _remember(key, p, st, sha)
        files = [p, entry / "model.safetensors"]
    except OSError as e:
        warnings.warn(f"{root}: cannot write the GGUF cache ({e}); the next load converts again", stacklevel=2)
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
    tokenizer: Any = None,
    *,
    chat_template: str | None = None,
    name: str = "lav2",
) -> Path:
    """Write a GGUF file (architecture llama, F32 tensors in Meta's interleaved layout as
    llama.cpp does). `tokenizer`: a BPETokenizer (byte-level: written as a "gpt2" vocabulary) or a
    SentencePieceTokenizer (written as a "llama" vocabulary), or None (no tokenizer section)."""
    import gguf

    from lav2cli.tokenizer import BPETokenizer, SentencePieceTokenizer

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
    if isinstance(tokenizer, BPETokenizer):
        d = json.loads(tokenizer.to_json())
        model = d["model"]
        if model.get("type") != "BPE":
            raise Lav2Error(f"GGUF writer: tokenizer model {model.get('type')} is not BPE")
        n = tokenizer.vocab_size
        tokens = [""] * n
        for t, i in model["vocab"].items():
            tokens[i] = t
        types = [1] * n
        for a in d.get("added_tokens", []):
            tokens[a["id"]] = a["content"]
            types[a["id"]] = 3 if a.get("special") else 4
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_name(d))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_add_bos_token(tokenizer.add_bos)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        sp = tokenizer.sp
        n = tokenizer.vocab_size
        tokens = [sp.id_to_piece(i) for i in range(n)]
        scores = [float(sp.get_score(i)) for i in range(n)]
        types = []
        for i in range(n):
            types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                         else 5 if sp.is_unused(i) else 1)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        if sp.unk_id() >= 0:
            w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(tokenizer.add_bos)
        w.add_add_space_prefix(True)
    elif tokenizer is not None:
        raise Lav2Error(f"GGUF writer: cannot write a tokenizer of type {type(tokenizer).__name__}")
    if tokenizer is not None:
        if tokenizer.bos_id is not None:
            w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_pad_token_id(tokenizer.pad_id)
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


def _pre_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json (digits split -> smollm)."""
    pre = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if '"Digits"' in pre:
        return "smollm"
    if "\\p{N}{1,3}" in pre:
        return "llama-bpe"
    return "gpt-2"
