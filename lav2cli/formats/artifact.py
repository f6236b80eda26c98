"""lav2's own adapter artifact: a directory with adapter.safetensors (trainable tensors only,
official names) and lav2.json (everything needed to rebuild the model around them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors.torch import save_file

from lav2cli import __version__
from lav2cli.errors import Lav2Error
from lav2cli.fileio import atomic_dir
from lav2cli.formats.io import read_safetensors
from lav2cli.model.config import LINEAR_MODULES, AdapterConfig, LlamaConfig, Variant
from lav2cli.model.vision import CHANNEL_ORDERS, ENCODER_KINDS, INTERPOLATIONS, RESIZE_MODES, ImagePreprocess
from lav2cli.schema import Field, JSONProblem, SchemaError, at_least, check, nonempty, one_of, parse_json, positive
from lav2cli.templates import TEMPLATES

FORMAT = "lav2-adapter"
FORMAT_VERSION = 1
WEIGHTS = "adapter.safetensors"
META = "lav2.json"
# where the training images lie in the encoder's feature space (lav2cli.answer.FeatureStats),
# written by training; optional
FEATURE_STATS = "feature_stats.safetensors"


def _count(low: int = 1, **kw: Any) -> Field:
    return Field("int", rule=at_least(low), **kw)


# The shapes of lav2.json (read_meta checks a file against LAV2_JSON before anything uses it).
# Fields lav2 does not know are free: a later minor version may add some.
LLAMA_CONFIG = Field("object", fields={
    **{k: _count(required=True) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim")},
    "norm_eps": Field("number", rule=positive),
    "rope_theta": Field("number", rule=positive),
    "tie_embeddings": Field("bool"),
    "max_seq_len": _count(),
    "linear_bias": Field("list", items=Field("str", rule=one_of(*LINEAR_MODULES))),
})
VISUAL_CONFIG = Field("object", null=True, closed=True, fields={  # closed: VisualConfig takes no others
    "encoder_dim": _count(), "width": _count(), "depth": _count(0), "heads": _count(),
    "mlp_ratio": Field("number", rule=positive), "n_queries": _count(0),
})
ADAPTER_CONFIG = Field("object", null=True, fields={
    "variant": Field("str", rule=one_of(*get_args(Variant))),
    "prompt_len": _count(0),
    "prompt_layers": _count(0, null=True),  # 0: bias, scale and norms only
    "bias": Field("bool"),
    "scale": Field("bool", null=True),
    "lora_rank": _count(0),
    "new_gate": Field("bool", null=True),
    "fusion_layers": _count(0, null=True),
    "visual": VISUAL_CONFIG,
    "text_only_zero_image": Field("bool"),
    "prompt_lora_rank": _count(0),
})
ENCODER = Field("object", null=True, fields={
    "kind": Field("str", required=True, rule=one_of(*ENCODER_KINDS)),
    "name": Field("str", required=True, rule=nonempty),
    "pretrained": Field("str", null=True),
    "weights": Field("str", null=True),
    "stage": _count(0, null=True),
})
PREPROCESS = Field("object", null=True, fields={
    "size": _count(required=True),
    "mean": Field("list", required=True, items=Field("number"), length=3),
    "std": Field("list", required=True, items=Field("number", rule=positive), length=3),
    "channel_order": Field("str", rule=one_of(*CHANNEL_ORDERS)),
    "interpolation": Field("str", rule=one_of(*INTERPOLATIONS)),
    "resize_mode": Field("str", rule=one_of(*RESIZE_MODES)),
    "crop_pct": Field("number", rule=lambda v: None if 0 < v <= 1 else "in (0, 1]"),
})
LAV2_JSON = Field("object", fields={
    "format": Field("str", required=True),
    "format_version": _count(0),
    "lav2_version": Field("str"),
    "variant": Field("str", null=True),
    "adapter": ADAPTER_CONFIG,
    "base": Field("object", fields={
        "ref": Field("str", null=True), "format": Field("str", null=True), "config": LLAMA_CONFIG,
    }),
    "encoder": ENCODER,
    "preprocess": PREPROCESS,
    "template": Field("str", null=True, rule=one_of(*TEMPLATES)),
    "training": Field("object", null=True, fields={"seconds": Field("number", null=True, rule=at_least(0))}),
    "tensors": Field("list", items=Field("str")),
    "self_caption": Field("bool"),
    "merged": Field("object", null=True, fields={"format": Field("str")}),
})


def detect(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def compose_meta(adapter: AdapterConfig | None, *, base_ref: str, base_format: str, llama: LlamaConfig,
                 encoder: dict[str, Any] | None, preprocess: ImagePreprocess | None, template: str,
                 training: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """lav2.json's contents for `adapter` on the base `base_ref` (`base_format`, `llama`): all that
    rebuilds the model around the adapter's tensors (`save` adds the list of them); `extra` entries
    follow."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lav2_version": __version__,
        "variant": adapter.variant if adapter else None,
        "adapter": adapter.to_dict() if adapter else None,
        "base": {"ref": base_ref, "format": base_format, "config": llama.to_dict()},
        "encoder": encoder,
        "preprocess": preprocess.to_dict() if preprocess else None,
        "template": template,
        "training": training,
        **extra,
    }


def save(out_dir: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
         extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the artifact atomically (temporary directory, then rename)."""
    out_dir = Path(out_dir)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "lav2_version": __version__, **meta,
            "tensors": sorted(tensors)}  # loading requires exactly these: a lost tensor is an error
    with atomic_dir(out_dir, keep_others=True) as tmp:  # files a user added (eval outputs) survive
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


def read_meta(path: str | Path) -> dict[str, Any]:
    """The artifact's lav2.json, checked against LAV2_JSON: any problem is one Lav2Error naming
    the file and the field."""
    f = Path(path) / META
    try:
        meta = parse_json(f.read_bytes())
    except OSError as e:
        raise Lav2Error(f"{f}: unreadable ({e.strerror or e})") from None
    except JSONProblem as e:
        raise Lav2Error(f"{f}:{e.lineno}: {e}") from None
    try:
        check(meta, Field("object"), "lav2.json")
        if meta.get("format") != FORMAT:
            raise Lav2Error(f"{f}: not a lav2 adapter (format {json.dumps(meta.get('format'))})")
        check(meta, Field("object", fields={"format_version": LAV2_JSON.fields["format_version"]}))
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise Lav2Error(f"{f}: format version {meta['format_version']} is newer than this lav2 reads ({FORMAT_VERSION})")
        check(meta, LAV2_JSON)
    except SchemaError as e:
        raise Lav2Error(f"{f}: {e}") from None
    return meta


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    f = Path(path) / WEIGHTS
    tensors = read_safetensors(f)
    listed = read_meta(path).get("tensors")
    if listed is not None:  # written by lav2 >= 0.1: the file must hold exactly what was saved
        missing, extra = sorted(set(listed) - set(tensors)), sorted(set(tensors) - set(listed))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise Lav2Error(f"{f}: tensor {missing[0]} is missing{more}; lav2.json lists it")
        if extra:
            raise Lav2Error(f"{f}: tensor {extra[0]} is not listed in lav2.json")
    return tensors


def read_feature_stats(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The artifact's FEATURE_STATS tensors, or None when it has none."""
    f = Path(path) / FEATURE_STATS
    return read_safetensors(f) if f.is_file() else None


def feature_stats_file(tensors: dict[str, torch.Tensor]) -> bytes:
    """FEATURE_STATS's contents for `tensors` (for `save(extra_files=...)`)."""
    from safetensors.torch import save

    return save({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()})
