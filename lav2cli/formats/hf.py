"""Hugging Face Llama checkpoints: config.json + model.safetensors (or a sharded index, or
pytorch_model*.bin read with weights_only=True) + tokenizer files.

HF stores wq/wk rows permuted for the rotate-half RoPE form: per head, HF row j < d/2 is Meta
row 2j and HF row d/2 + j is Meta row 2j + 1. `load` undoes that (wk with n_kv_heads), `save`
applies it; q/k biases follow their weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lav2cli.errors import Lav2Error
from lav2cli.formats.base import IGNORABLE, BaseWeights, check_state_dict
from lav2cli.formats.io import read_tensors
from lav2cli.model.config import LlamaConfig
from lav2cli.tokenizer import Tokenizer, load_tokenizer, template_for

_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
_TOP_INV = {v: k for k, v in _TOP.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_META_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_meta_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def meta_to_hf_name(name: str) -> str:
    if name in _TOP_INV:
        return _TOP_INV[name]
    m = _META_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_INV:
        return f"model.layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}.{m.group(3)}"
    raise Lav2Error(f"tensor {name}: no Hugging Face Llama name for it")


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved rows -> HF rotate-half rows (weights [out, in] or biases [out])."""
    rows = w.shape[0]
    hd = rows // n_heads
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta interleaved rows (inverse of permute_to_hf)."""
    rows = w.shape[0]
    hd = rows // n_heads
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, hd // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _weight_files(d: Path) -> list[Path] | None:
    """Weight files of the checkpoint in `d` (safetensors preferred), None when there are none."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        idx = d / index
        if idx.is_file():
            try:
                wm = json.loads(idx.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise Lav2Error(f"{idx}: not a weight index ({e})") from None
            files = sorted({d / f for f in wm.values()})
            for f in files:
                if not f.is_file():
                    raise Lav2Error(f"{idx}: lists {f.name}, which is missing")
            return files
        if (d / single).is_file():
            return [d / single]
    st = sorted(d.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(d.glob("pytorch_model*.bin"))
    return bins or None


def detect(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    try:
        return _weight_files(p) is not None
    except Lav2Error:
        return True


def config_from_hf(cfg: dict[str, Any], where: Path) -> LlamaConfig:
    mt = cfg.get("model_type")
    if mt not in (None, "llama"):
        raise Lav2Error(f"{where}: model_type {mt!r} is not a LLaMA (expected 'llama')")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(k), int):
            raise Lav2Error(f"{where}: missing or non-integer '{k}'")
    if cfg.get("rope_scaling"):
        raise Lav2Error(f"{where}: rope_scaling {cfg['rope_scaling']} is not supported (plain RoPE only)")
    # transformers >= 5 writes rope_parameters {"rope_theta", "rope_type"} instead of rope_theta
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise Lav2Error(f"{where}: rope_type {rope['rope_type']!r} is not supported (plain RoPE only)")
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if cfg.get("hidden_act", "silu") != "silu":
        raise Lav2Error(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
    c = LlamaConfig(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"],
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
    )
    hd = cfg.get("head_dim")
    if c.dim % c.n_heads or (hd is not None and hd != c.dim // c.n_heads):
        raise Lav2Error(f"{where}: head_dim {hd} != hidden_size / num_attention_heads is not supported")
    return c


def load(path: str | Path) -> BaseWeights:
    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise Lav2Error(f"{d}: no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise Lav2Error(f"{cfg_file}: cannot read ({e})") from None
    config = config_from_hf(cfg, cfg_file)
    files = _weight_files(d)
    if files is None:
        raise Lav2Error(f"{d}: no LLaMA weights found (expected model.safetensors or pytorch_model*.bin)")

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    hf_name: dict[str, str] = {}
    for f in files:
        for k, v in read_tensors(f).items():
            if IGNORABLE.match(k):
                continue
            m = hf_to_meta_name(k)
            if m is None:
                raise Lav2Error(f"{f}: unexpected tensor {k} (not a Hugging Face Llama tensor name)")
            if m in state:
                raise Lav2Error(f"{f}: tensor {k} appears twice (also in {origin[m].name})")
            state[m], origin[m], hf_name[m] = v, f, k
    if config.tie_embeddings:
        state.pop("output.weight", None)  # some exports store the tied head anyway

    def where(n: str) -> str:
        return str(origin.get(n, files[0] if len(files) == 1 else d))

    check_state_dict(state, config, where, name_of=lambda n: hf_name.get(n) or meta_to_hf_name(n))
    for i in range(config.n_layers):
        for n, heads in (("wq", config.n_heads), ("wk", config.n_kv_heads)):
            for kind in ("weight", "bias"):
                k = f"layers.{i}.attention.{n}.{kind}"
                if k in state:
                    state[k] = permute_from_hf(state[k], heads)
    tokenizer = load_tokenizer(d)
    if tokenizer.vocab_size > config.vocab_size:
        raise Lav2Error(f"{d}: tokenizer has {tokenizer.vocab_size} tokens, config.json vocab_size "
                        f"only {config.vocab_size}")
    return BaseWeights(config=config, state_dict=state, tokenizer=tokenizer, template=template_for(tokenizer),
                       source=d, format="hf", files=[cfg_file, *files])


def hf_config(config: LlamaConfig, state_dict: dict[str, torch.Tensor],
              tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    c = config
    attn_bias = any(re.match(r"^layers\.\d+\.attention\.w[qkvo]\.bias$", k) for k in state_dict)
    mlp_bias = any(re.match(r"^layers\.\d+\.feed_forward\.w[123]\.bias$", k) for k in state_dict)
    dt = state_dict.get("tok_embeddings.weight")
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": c.max_seq_len,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": attn_bias,
        "mlp_bias": mlp_bias,
        "torch_dtype": str(dt.dtype).removeprefix("torch.") if dt is not None else "float32",
    }
    if tokenizer is not None:
        if getattr(tokenizer, "bos_id", None) is not None:
            d["bos_token_id"] = tokenizer.bos_id
        d["eos_token_id"] = tokenizer.eos_id
        d["pad_token_id"] = tokenizer.pad_id
    return d


def save(
    out_dir: str | Path,
    config: LlamaConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Tokenizer | str | Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> list[Path]:
    """Write an HF Llama checkpoint: config.json, model.safetensors (or model-0000i-of-0000n
    .safetensors + model.safetensors.index.json beyond max_shard_bytes) and the tokenizer
    (`tokenizer` is a tokenizer object, a tokenizer.model / tokenizer.json path, or None).

    Optional `.bias` tensors set attention_bias / mlp_bias; HF then expects every bias of that
    group, so missing ones in the group are written as zeros (same function)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in state_dict.items() if not IGNORABLE.match(k)}
    if config.tie_embeddings:
        sd.pop("output.weight", None)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    cfg = hf_config(config, sd, tokenizer)
    groups = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w2", "w3")}
    for mod, names in groups.items():
        if cfg["attention_bias" if mod == "attention" else "mlp_bias"]:
            for i in range(config.n_layers):
                for n in names:
                    k = f"layers.{i}.{mod}.{n}.bias"
                    w = sd.get(f"layers.{i}.{mod}.{n}.weight")
                    if k not in sd and w is not None:
                        sd[k] = torch.zeros(w.shape[0], dtype=w.dtype)
    hf: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _META_LAYER_RE.match(k)
        if m and m.group(2) in ("attention.wq", "attention.wk"):
            v = permute_to_hf(v, config.n_heads if m.group(2) == "attention.wq" else config.n_kv_heads)
        hf[meta_to_hf_name(k)] = v.detach().contiguous()

    # shards in name order (layers numerically)
    def order(k: str) -> tuple:
        m = re.match(r"^model\.layers\.(\d+)\.", k)
        return (1, int(m.group(1)), k) if m else ((0, 0, k) if "embed" in k else (2, 0, k))

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(hf, key=order):
        b = hf[k].numel() * hf[k].element_size()
        if shards[-1] and size + b > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = hf[k]
        size += b
    written: list[Path] = []
    if len(shards) == 1:
        f = out / "model.safetensors"
        save_file(shards[0], str(f), metadata={"format": "pt"})
        written.append(f)
    else:
        wm: dict[str, str] = {}
        n = len(shards)
        for i, s in enumerate(shards):
            f = out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(s, str(f), metadata={"format": "pt"})
            written.append(f)
            wm.update({k: f.name for k in s})
        total = sum(v.numel() * v.element_size() for v in hf.values())
        idx = out / "model.safetensors.index.json"
        idx.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2) + "\n")
        written.append(idx)
    cf = out / "config.json"
    cf.write_text(json.dumps(cfg, indent=2) + "\n")
    written.append(cf)
    if tokenizer is not None:
        written += tokenizer.save(out)
    return written
