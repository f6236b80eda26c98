"""`lav2 info`: what a model reference resolves to (files, sizes, shapes, parameter counts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lav2cli import runlog
from lav2cli.answer import self_captions
from lav2cli.engine import Engine
from lav2cli.model.adapter import param_role
from lav2cli.recipe import PATH_FIELDS, in_effect, section_rows


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
        out["training"] = with_final_losses(cfg.meta["training"], _artifact_dir(cfg.files))
    evals = evaluations(cfg.files)
    if evals:
        out["evaluations"] = evals
    return out


def _artifact_dir(files: list) -> Path | None:
    return next((Path(f).parent for f in files if Path(f).name == "lav2.json"), None)


def with_final_losses(training: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """The training record with each stage's final loss per stream (lav2cli.runlog): as
    recorded, or, where a stage recorded only its last step's loss (lav2 before 0.2), derived
    from the stage's log in the artifact (`final_loss_from` names the file)."""
    chain = [dict(st) for st in runlog.stages(training)]
    logs = runlog.stage_logs(run_dir, len(chain)) if run_dir is not None else [None] * len(chain)
    for st, log in zip(chain, logs):
        if not isinstance(st.get("final_loss"), dict) and log is not None:
            losses = runlog.final_losses(runlog.read_metrics(log))
            if losses:
                st["final_loss"], st["final_loss_from"] = losses, log.name
    for earlier, st in zip(chain, chain[1:]):
        st["previous"] = earlier
    return chain[-1]


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
    stages = runlog.stages(tr)
    rows: list[tuple[str, str]] = []
    for i, st in enumerate(stages):
        label = f"stage {i + 1} ({st.get('stage')}): " if len(stages) > 1 else ""
        rows += [(label + k, v) for k, v in _stage_rows(st, continues=i > 0)]
    return rows


def _final_loss(tr: dict[str, Any]) -> str:
    loss = tr.get("final_loss")
    if isinstance(loss, dict):
        window = tr.get("final_loss_window", runlog.FINAL_WINDOW)
        source = f", from {tr['final_loss_from']}" if tr.get("final_loss_from") else ""
        return f"{runlog.format_losses(loss)} (per token, last {window} logged steps of each stream{source})"
    if isinstance(loss, (int, float)):
        return f"{loss:.3g} (the last step's only)"
    return "not recorded"


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "?"


def _stage_rows(tr: dict[str, Any], continues: bool = False) -> list[tuple[str, str]]:
    rows = [("training", f"stage {tr.get('stage')}, {tr.get('step')}/{tr.get('total_steps')} steps"
                         f"{'' if tr.get('complete') else ' (incomplete)'}, global batch {tr.get('global_batch')}, "
                         f"peak lr {_number(tr.get('lr'), '.3g')}"),
            ("final loss", _final_loss(tr))]
    if "seconds" in tr:
        rows.append(("training time", f"{_number(tr['seconds'], ',.0f')} s on {tr.get('device')} "
                                      f"x{tr.get('world_size', 1)}, {_number(tr.get('tokens_per_s'), ',.0f')} tokens/s"
                                      + (f" (steady; {_number(tr['warmup_s'], '.1f')} s warm-up)"
                                         if tr.get("warmup_s") is not None else "")))
        if isinstance(tr.get("peak_memory_mb"), (int, float)):
            planned = (f", {runlog.size(tr['predicted_peak_mb'] * 2**20)} predicted"
                       if isinstance(tr.get("predicted_peak_mb"), (int, float)) else "")
            rows.append(("memory", f"peak {runlog.size(tr['peak_memory_mb'] * 2**20)}{planned}; "
                                   f"{tr.get('checkpointed_blocks')} blocks checkpointed"
                                   f"{', compiled blocks' if tr.get('compiled_blocks') else ''}"))
    if tr.get("quantize", "none") != "none":
        rows.append(("training base", f"quantised {tr['quantize']} (the adapter loads on the float base too)"))
    for grp, n in (tr.get("data") or {}).items():
        rows.append((f"training data: {grp}", f"{n:,} examples per epoch"))
    for grp, n in (tr.get("groups") or {}).items():
        rows.append((f"trained: {grp}", f"{n:,} parameters"))
    recipe = tr.get("recipe") or {}
    if isinstance(recipe, dict) and recipe:
        # a stage continuing an artifact took its adapter and encoder: the rest of the
        # recipe's [model] and [adapter] did not apply (older records still list it)
        for label, text in section_rows(in_effect(recipe, continues)):
            rows.append((f"recipe: {label}", text))
        paths = [recipe.get(sec, {}).get(key) for sec, key in PATH_FIELDS if isinstance(recipe.get(sec), dict)]
        if any(isinstance(v, str) and "/" in v and not Path(v).is_absolute() for v in paths):
            rows.append(("recipe: paths", "relative to the run directory it was trained in"))
    return rows


def render(info: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"lav2 info {info['ref']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")  # long paths wrap instead of ending in "..."
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
