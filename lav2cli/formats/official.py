"""The released LLaMA-Adapter V2 checkpoints (BIAS-7B, LORA-BIAS-7B, CAPTION-7B, ...).

A pickled dict {"model": {name: tensor}, "config": {"w_bias", "w_lora", "lora_rank"}}, read
with torch.load(weights_only=True) only. The adapter shapes are inferred from the tensors;
the official model computes the `official` variant: bias without scale, visual tokens added
to every prompt layer, images in BGR order, an all-zero image for text-only requests.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lav2cli.errors import Lav2Error
from lav2cli.fileio import sha256_file
from lav2cli.formats.io import read_checkpoint
from lav2cli.model.config import AdapterConfig, VisualConfig

_SHA_PREFIX = re.compile(r"^([0-9a-f]{64})_")
DEFAULT_CLIP = "ViT-L-14:openai"
VISUAL_HEADS = 16  # not recoverable from the tensors; the released models use 16


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix in (".pth", ".pt", ".bin")


def verify_sha256(path: Path) -> None:
    """Files named '<sha256>_NAME.pth' must hash to that name."""
    m = _SHA_PREFIX.match(path.name)
    if m and sha256_file(path) != m.group(1):
        raise Lav2Error(f"{path}: SHA-256 does not match the one in its file name (corrupt or truncated download)")


def load(path: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(adapter config, adapter tensors under lav2/official names)."""
    path = Path(path)
    if not path.is_file():
        raise Lav2Error(f"{path}: file not found")
    verify_sha256(path)
    obj = read_checkpoint(path, "not a loadable checkpoint")
    if not isinstance(obj, dict):
        raise Lav2Error(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    sd = obj.get("model", obj)
    file_cfg = obj.get("config") or {}
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise Lav2Error(f"{path}: 'model' is not a dict of tensors")
    sd = {("llama." + k[len("llma."):] if k.startswith("llma.") else k): v for k, v in sd.items()}
    if "adapter_query.weight" not in sd:
        raise Lav2Error(f"{path}: no adapter_query.weight: not a LLaMA-Adapter V2 checkpoint")

    lora_l1 = [v for k, v in sd.items() if re.search(r"\.lora_\w+_l1\.weight$", k)]
    w_lora = bool(file_cfg.get("w_lora", bool(lora_l1)))
    rank = int(file_cfg.get("lora_rank", lora_l1[0].shape[0] if lora_l1 else 0)) if w_lora else 0
    w_bias = bool(file_cfg.get("w_bias", any(k.endswith(".bias") and k.startswith("llama.layers.") for k in sd)))

    prompt_len = sd["visual_query.weight"].shape[0] if "visual_query.weight" in sd else 10
    rows = sd["adapter_query.weight"].shape[0]
    if rows % prompt_len:
        raise Lav2Error(f"{path}: adapter_query.weight has {rows} rows, not a multiple of the prompt length {prompt_len}")
    visual = None
    if "clip_proj.weight" in sd:
        width, enc_dim = sd["clip_proj.weight"].shape
        depth = len({k.split(".")[1] for k in sd if k.startswith("visual_blocks.")})
        fc1 = sd.get("visual_blocks.0.mlp.fc1.weight")
        mlp_ratio = fc1.shape[0] / width if fc1 is not None else 4.0
        visual = VisualConfig(encoder_dim=enc_dim, width=width, depth=depth, heads=VISUAL_HEADS,
                              mlp_ratio=mlp_ratio, n_queries=prompt_len)
    L = rows // prompt_len
    cfg = AdapterConfig(variant="official", prompt_len=prompt_len, prompt_layers=L, bias=w_bias, scale=False,
                        lora_rank=rank, new_gate=w_lora, fusion_layers=L, visual=visual, text_only_zero_image=True)
    return cfg, sd
