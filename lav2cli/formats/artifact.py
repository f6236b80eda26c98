"""lav2's own adapter artifact: a directory with adapter.safetensors (trainable tensors only,
official names) and lav2.json (everything needed to rebuild the model around them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lav2cli import __version__
from lav2cli.errors import Lav2Error
from lav2cli.fileio import atomic_dir
from lav2cli.formats.io import read_safetensors
from lav2cli.model.config import AdapterConfig, LlamaConfig
from lav2cli.model.vision import ImagePreprocess

FORMAT = "lav2-adapter"
FORMAT_VERSION = 1
WEIGHTS = "adapter.safetensors"
META = "lav2.json"
# where the training images lie in the encoder's feature space (lav2cli.answer.FeatureStats),
# written by training; optional
FEATURE_STATS = "feature_stats.safetensors"


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
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Lav2Error(f"{path / META}: unreadable ({e})") from e
    if meta.get("format") != FORMAT:
        raise Lav2Error(f"{path / META}: not a lav2 adapter (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise Lav2Error(f"{path / META}: format version {meta['format_version']} is newer than this lav2 reads ({FORMAT_VERSION})")
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
