"""Reading a `lav2 merge` output directory back: its folded base, in the layout its lav2.json's
`merged.format` names (lav2, hf or meta), beside the sidecar (lav2.json + adapter.safetensors)
that the artifact reader takes as any other artifact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from lav2cli.errors import Lav2Error
from lav2cli.formats import hf, meta as meta_layout
from lav2cli.formats.artifact import META
from lav2cli.formats.base import BaseWeights, check_state_dict
from lav2cli.formats.io import read_safetensors, read_state_dict
from lav2cli.model.config import LlamaConfig
from lav2cli.tokenizer import load_tokenizer, template_for

FOLDED = "llama.safetensors"  # the lav2 layout's folded base (Meta names)


def load(path: str | Path, meta: dict[str, Any]) -> BaseWeights:
    """The folded base of the merged directory `path` whose lav2.json is `meta`."""
    path = Path(path)
    fmt = (meta.get("merged") or {}).get("format", "lav2")
    if fmt == "hf":
        return hf.load(path)
    if fmt == "meta" and (path / "tokenizer.model").is_file():
        return meta_layout.load(path)
    if fmt not in ("lav2", "meta"):
        raise Lav2Error(f"{path / META}: unknown merged format {fmt!r}")
    try:
        cfg = LlamaConfig.from_dict(meta["base"]["config"])
    except (KeyError, TypeError) as e:
        raise Lav2Error(f"{path / META}: no usable base.config ({e})") from None
    if fmt == "lav2":
        f = path / FOLDED
        sd = read_safetensors(f)
    else:  # meta layout with a BPE tokenizer (tokenizer.json), which meta.load does not read
        f = path / "consolidated.00.pth"
        sd = read_state_dict(f)
        cfg = replace(cfg, tie_embeddings=False)  # Meta checkpoints store output.weight
    check_state_dict(sd, cfg, f)
    tok = load_tokenizer(path)
    template = meta.get("template") or template_for(tok)
    tok_files = [p for p in (path / "tokenizer.model", path / "tokenizer.json") if p.is_file()]
    return BaseWeights(config=cfg, state_dict=sd, tokenizer=tok, template=template, source=path,
                       format=f"merged-{fmt}", files=[f, *tok_files])
