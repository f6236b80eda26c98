"""`lav2 info`: what a model reference resolves to (files, sizes, shapes, parameter counts)."""

from __future__ import annotations

from typing import Any

from lav2cli.engine import Engine
from lav2cli.model.adapter import is_adapter_param


def _group(name: str, has_adapter: bool = True) -> str:
    if name.startswith("clip."):
        return "image encoder (frozen)"
    if not has_adapter or not is_adapter_param(name):
        return "base LLaMA (frozen)"
    if name.startswith(("clip_proj", "visual_")):
        return "adapter: visual branch"
    if name.startswith("adapter_query"):
        return "adapter: prompts"
    if ".lora_" in name:
        return "adapter: LoRA"
    if name.endswith("gate"):
        return "adapter: gates"
    if name.endswith(".bias") or name.endswith(".scale"):
        return "adapter: bias and scale"
    return "adapter: norms"


def describe(engine: Engine) -> dict[str, Any]:
    cfg = engine.config
    counts: dict[str, int] = {}
    has_adapter = cfg.adapter is not None
    for n, p in engine.model.named_parameters():
        g = _group(n, has_adapter)
        counts[g] = counts.get(g, 0) + p.numel()
    adapter_total = sum(v for k, v in counts.items() if k.startswith("adapter"))
    files = [{"path": str(f), "bytes": f.stat().st_size if f.exists() else None} for f in cfg.files]
    out: dict[str, Any] = {
        "ref": cfg.ref, "kind": cfg.kind, "base": cfg.base_ref, "base_format": cfg.base_format,
        "template": cfg.template, "files": files, "llama": cfg.llama.to_dict(),
        "adapter": cfg.adapter.to_dict() if cfg.adapter else None,
        "encoder": cfg.encoder, "preprocess": cfg.preprocess.to_dict() if cfg.preprocess else None,
        "parameters": counts, "adapter_parameters": adapter_total, "can_see": engine.can_see,
        "tokenizer": {"vocab_size": engine.tokenizer.vocab_size, "bos": engine.tokenizer.bos_id,
                      "eos": engine.tokenizer.eos_id, "type": type(engine.tokenizer).__name__},
    }
    if cfg.meta.get("training"):
        out["training"] = cfg.meta["training"]
    return out


def render(info: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"lav2 info {info['ref']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("kind", info["kind"])
    t.add_row("base", f"{info['base']} ({info['base_format']})")
    L = info["llama"]
    t.add_row("shape", f"dim {L['dim']}, {L['n_layers']} layers, {L['n_heads']} heads / {L['n_kv_heads']} kv, "
                       f"ffn {L['hidden_dim']}, vocab {L['vocab_size']}, rope theta {L['rope_theta']:g}, "
                       f"{'tied' if L['tie_embeddings'] else 'separate'} output")
    t.add_row("template", info["template"])
    tk = info["tokenizer"]
    t.add_row("tokenizer", f"{tk['type']}, vocab {tk['vocab_size']}, bos {tk['bos']}, eos {tk['eos']}")
    if info["adapter"]:
        a = info["adapter"]
        t.add_row("adapter", f"variant {a['variant']}, prompts {a['prompt_len']} x {a['prompt_layers']} layers, "
                             f"fusion layers {a['fusion_layers']}, bias {a['bias']}, scale {a['scale']}, "
                             f"LoRA rank {a['lora_rank'] or 'none'}")
    if info["encoder"]:
        e = info["encoder"]
        t.add_row("image encoder", f"{e['kind']} {e['name']} ({e.get('pretrained') or e.get('weights') or 'random'})")
        p = info["preprocess"]
        t.add_row("preprocess", f"{p['size']} px, channel order {p['channel_order']}")
    t.add_row("sees images", "yes" if info["can_see"] else "no (no trained visual branch)")
    for k, v in sorted(info["parameters"].items()):
        t.add_row(f"params: {k}", f"{v:,}")
    t.add_row("params: adapter total", f"{info['adapter_parameters']:,}")
    for f in info["files"]:
        size = f"{f['bytes'] / 2**20:,.1f} MiB" if f["bytes"] is not None else "?"
        t.add_row("file", f"{f['path']} ({size})")
    for k, v in (info.get("training") or {}).items():
        t.add_row(f"training: {k}", str(v))
    console.print(t)
