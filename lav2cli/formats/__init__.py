"""Weight layouts in and out, and `open(ref)`: the one place a model reference resolves.

A reference is a registered name (registry.py), a lav2 artifact directory (artifact.py; a
`lav2 merge` output is an artifact whose lav2.json has `merged`, its folded base read by
merged.py), a released LLaMA-Adapter V2 .pth (official.py, given a base), or base weights: a
.gguf file (gguf.py), a Meta directory (meta.py) or a Hugging Face directory (hf.py). Each
base layout module offers `detect(path) -> bool` and `load(path) -> BaseWeights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lav2cli.errors import Lav2Error
from lav2cli.fileio import find_interrupted
from lav2cli.formats import artifact, gguf, hf, merged, official
from lav2cli.formats import meta as meta_layout
from lav2cli.formats.base import BaseWeights
from lav2cli.model.config import AdapterConfig, LlamaConfig
from lav2cli.model.vision import ImagePreprocess, parse_clip_arg
from lav2cli.registry import resolve_named

__all__ = ["BaseWeights", "Resolved", "classify", "load_base", "open"]


@dataclass
class Resolved:
    """What a model reference resolved to: everything read from files, no model built yet."""

    kind: str  # "base", "artifact" (merged directories too) or "official"
    path: Path
    base: BaseWeights
    base_ref: str  # the base as lav2.json records it: a name or an absolute path
    template: str
    adapter: AdapterConfig | None = None
    adapter_tensors: dict[str, torch.Tensor] | None = None
    adapter_file: Path | None = None  # the file adapter_tensors came from
    encoder: dict[str, Any] | None = None  # image encoder spec (`--clip`, lav2.json, or the default)
    preprocess: ImagePreprocess | None = None  # recorded; None: from the encoder once it is built
    channel_order: str = "rgb"  # of a preprocessing taken from the encoder (official checkpoints: bgr)
    meta: dict[str, Any] = field(default_factory=dict)  # lav2.json of an artifact
    files: list[Path] = field(default_factory=list)  # base files, then adapter files
    feature_stats: dict[str, torch.Tensor] | None = None  # an artifact's artifact.FEATURE_STATS


def _locate(ref: str) -> tuple[Path, bool]:
    """(path, whether `ref` is a registered name): the one consultation of the registry."""
    named = resolve_named(ref)
    if named is not None:
        return named, True
    p = Path(ref).expanduser()
    find_interrupted(p)  # a run a kill left between the renames of its checkpoint swap
    if not p.exists():
        raise Lav2Error(f"unknown model reference {ref!r}: not a known name (see `lav2 info --list`) and no such path")
    return p, False


def _kind(p: Path) -> str:
    if artifact.detect(p):
        return "artifact"
    if p.is_file() and p.suffix == ".gguf":
        return "base"
    if official.detect(p):
        return "official"
    return "base"


def classify(ref: str) -> tuple[str, Path]:
    """("artifact" | "official" | "base", path) of a reference; reads no weights."""
    p, _ = _locate(str(ref))
    return _kind(p), p


def _read_base(p: Path, cache_dir: str | Path | None = None) -> BaseWeights:
    if gguf.detect(p):
        return gguf.load(p, cache_dir=cache_dir)
    if meta_layout.detect(p):
        return meta_layout.load(p)
    if hf.detect(p):
        return hf.load(p)
    if p.is_file():
        raise Lav2Error(f"{p}: not a LLaMA weights file (expected a .gguf file or a model directory)")
    raise Lav2Error(
        f"{p}: no LLaMA weights found (expected a .gguf file, params.json + consolidated.*.pth, "
        f"or config.json + *.safetensors / pytorch_model*.bin)"
    )


def load_base(ref: str | Path, cache_dir: str | Path | None = None) -> BaseWeights:
    """Base weights from a registered name, a .gguf file, a Meta directory (params.json +
    consolidated.*.pth, or a folder with one such model subfolder) or a Hugging Face directory
    (config.json + *.safetensors / pytorch_model*.bin)."""
    return _read_base(_locate(str(ref))[0], cache_dir)


def _check_base_matches(meta: dict[str, Any], cfg: LlamaConfig, where: Path, base_ref: str) -> None:
    want = meta.get("base", {}).get("config", {})
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
        if key in want and want[key] != getattr(cfg, key):
            raise Lav2Error(f"{where}: adapter was trained on a base with {key}={want[key]}, "
                            f"but {base_ref} has {key}={getattr(cfg, key)}")


def _open_artifact(path: Path, base: str | None, encoder: dict[str, Any] | None) -> Resolved:
    meta = artifact.read_meta(path)
    base_ref = base or meta.get("base", {}).get("ref")
    if not base_ref:
        raise Lav2Error(f"{path / artifact.META}: no base model recorded; pass --base")
    if meta.get("merged") and not base:  # `lav2 merge` output: the folded base lives beside it
        bw, base_ref = merged.load(path, meta), str(path)
    else:
        bw = load_base(base_ref)
    _check_base_matches(meta, bw.config, path, base_ref)
    adapter = AdapterConfig.from_dict(meta["adapter"]) if meta.get("adapter") else None
    tensors = artifact.load_tensors(path)
    preprocess = ImagePreprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else None
    return Resolved(kind="artifact", path=path, base=bw, base_ref=base_ref, template=meta.get("template") or bw.template,
                    adapter=adapter, adapter_tensors=tensors, adapter_file=path / artifact.WEIGHTS,
                    encoder=encoder or meta.get("encoder"), preprocess=preprocess, meta=meta,
                    files=[*bw.files, path / artifact.META, path / artifact.WEIGHTS],
                    feature_stats=artifact.read_feature_stats(path))


def _open_official(path: Path, base: str | None, encoder: dict[str, Any] | None) -> Resolved:
    if not base:
        raise Lav2Error(f"{path}: an official LLaMA-Adapter checkpoint needs --base (a Meta or HF LLaMA-7B directory)")
    adapter, tensors = official.load(path)
    base_ref = str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base
    bw = load_base(base)
    enc_spec = encoder or parse_clip_arg(official.DEFAULT_CLIP)
    # the release fed its images in BGR order
    return Resolved(kind="official", path=path, base=bw, base_ref=base_ref, template="alpaca",
                    adapter=adapter, adapter_tensors=tensors, adapter_file=path,
                    encoder=enc_spec, channel_order="bgr", files=[*bw.files, path])


def open(ref: str, *, base: str | None = None, clip: str | None = None) -> Resolved:
    """Resolve a model reference and read its files: base weights, and for an adapter its
    config, tensors, encoder spec and preprocessing. `base` overrides (artifact) or supplies
    (official .pth) the base; `clip` (NAME[:PRETRAINED]) overrides the image encoder."""
    ref = str(ref)
    p, named = _locate(ref)
    kind = _kind(p)
    encoder = parse_clip_arg(clip) if clip else None
    if kind == "artifact":
        return _open_artifact(p, base, encoder)
    if kind == "official":
        return _open_official(p, base, encoder)
    if not named:
        p = p.resolve()  # recorded as the base of what is trained on it
    bw = _read_base(p)
    return Resolved(kind="base", path=p, base=bw, base_ref=ref if named else str(p), template=bw.template,
                    encoder=encoder, files=list(bw.files))
