"""`lav2 info`: what a model reference resolves to (files, sizes, shapes, parameter counts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lav2cli.answer import self_captions
from lav2cli.engine import Engine
from lav2cli.model.adapter import param_role


_ROLE_GROUPS = {"visual": "adapter: visual branch", "prompt": "adapter: prompts", "lora": "adapter: LoRA",
                "prompt_lora": "adapter: LoRA", "gate": "adapter: gates", "new_gate": "adapter: gates",
                "bias": "adapter: bias and scale", "scale": "adapter: bias and scale", "norm": "adapter: norms"}


def _group(name: str, has_adapter: bool = True) -> str:
    role = param_role(name)
    if role == "encoder":
        return "image encoder (frozen)"
    if not has_adapter or role == "base":
        return "base LLaMA (frozen)"
    return _ROLE_GROUPS[role]


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
        "self_caption": self_captions(engine),
        "tokenizer": {"vocab_size": engine.tokenizer.vocab_size, "bos": engine.tokenizer.bos_id,
                      "eos": engine.tokenizer.eos_id, "type": type(engine.tokenizer).__name__},
    }
    if cfg.meta.get("training"):
        out["training"] = cfg.meta["training"]
    evals = evaluations(cfg.files)
    if evals:
        out["evaluations"] = evals
    return out


def evaluations(files: list) -> list[dict[str, Any]]:
    """The metrics an artifact carries: `lav2 eval ... --out ARTIFACT/eval/NAME.jsonl` leaves
    ARTIFACT/eval/NAME.metrics.json, which travels with the artifact."""
    dirs = {Path(f).parent for f in files if Path(f).name == "lav2.json"}
    out = []
    for d in sorted(dirs):
        for f in sorted((d / "eval").glob("*.metrics.json")):
            try:
                m = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(m, dict) and "task" in m:
                out.append({"file": f.name, **{k: m[k] for k in _HEADLINE.get(m["task"], ()) if k in m},
                            "task": m["task"], "data": Path(str(m.get("data", ""))).name, "n": m.get("n")})
    return out


# the numbers `lav2 info` shows for each task's metrics file
_HEADLINE = {"vqa": ("accuracy",), "text": ("contains_answer", "exact_match", "loss"),
             "caption": ("CIDEr", "BLEU-4"), "mme": ("perception", "cognition")}


def _training_rows(tr: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows for each training stage, the earliest first (a stage that continued an artifact
    keeps that artifact's record under `previous`)."""
    stages = []
    while isinstance(tr, dict) and tr:
        stages.append(tr)
        tr = tr.get("previous")
    rows: list[tuple[str, str]] = []
    for i, st in enumerate(reversed(stages)):
        label = f"stage {i + 1} ({st.get('stage')}): " if len(stages) > 1 else ""
        rows += [(label + k, v) for k, v in _stage_rows(st)]
    return rows


def _stage_rows(tr: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("training", f"stage {tr.get('stage')}, {tr.get('step')}/{tr.get('total_steps')} steps"
                         f"{'' if tr.get('complete') else ' (incomplete)'}, global batch {tr.get('global_batch')}, "
                         f"peak lr {tr.get('lr', 0):.3g}, final loss {tr.get('final_loss', float('nan')):.3f}")]
    if "seconds" in tr:
        rows.append(("training time", f"{tr['seconds']:,.0f} s on {tr.get('device')} x{tr.get('world_size', 1)}, "
                                      f"{tr.get('tokens_per_s', 0):,.0f} tokens/s"))
    if tr.get("quantize", "none") != "none":
        rows.append(("training base", f"quantised {tr['quantize']} (the adapter loads on the float base too)"))
    for grp, n in (tr.get("data") or {}).items():
        rows.append((f"training data: {grp}", f"{n:,} examples per epoch"))
    for grp, n in (tr.get("groups") or {}).items():
        rows.append((f"trained: {grp}", f"{n:,} parameters"))
    for section, values in (tr.get("recipe") or {}).items():
        if isinstance(values, dict):
            rows.append((f"recipe: [{section}]", ", ".join(f"{k}={v}" for k, v in values.items())))
    return rows


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
        stage = f", stage {e['stage']}" if e.get("stage") is not None else ""
        t.add_row("image encoder", f"{e['kind']} {e['name']} ({e.get('pretrained') or e.get('weights') or 'random'}{stage})")
        p = info["preprocess"]
        t.add_row("preprocess", f"{p['size']} px, channel order {p['channel_order']}")
    t.add_row("sees images", "yes" if info["can_see"] else "no (no trained visual branch)")
    if info.get("self_caption"):
        t.add_row("self caption", "yes: ask and eval caption each image with this model first and answer with "
                                  "the caption as context (--no-self-caption: ask directly)")
    for k, v in sorted(info["parameters"].items()):
        t.add_row(f"params: {k}", f"{v:,}")
    t.add_row("params: adapter total", f"{info['adapter_parameters']:,}")
    for f in info["files"]:
        size = f"{f['bytes'] / 2**20:,.1f} MiB" if f["bytes"] is not None else "?"
        t.add_row("file", f"{f['path']} ({size})")
    if info.get("training"):
        for k, v in _training_rows(info["training"]):
            t.add_row(k, v)
    for e in info.get("evaluations", []):
        scores = ", ".join(f"{k} {v:.4f}" for k, v in e.items()
                           if k not in ("file", "task", "data", "n") and isinstance(v, (int, float)))
        t.add_row(f"eval: {e['task']}", f"{e['data']} ({e['n']:,} items): {scores}")
    console.print(t, markup=False)
