"""Reading tensor files safely: every failure is one Lav2Error line naming the file."""

from __future__ import annotations

from pathlib import Path

import torch

from lav2cli.errors import Lav2Error
from lav2cli.torchfile import read_checkpoint

__all__ = ["read_checkpoint", "read_safetensors", "read_state_dict", "read_tensors", "stored_dtype"]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_safetensors(f: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or a one-line Lav2Error naming the file."""
    from safetensors.torch import load_file

    f = Path(f)
    if not f.is_file():
        raise Lav2Error(f"{f}: missing")
    try:
        return load_file(str(f))
    except Exception as e:
        raise Lav2Error(f"{f}: unreadable safetensors ({_first_line(e)})") from None


def read_state_dict(f: str | Path) -> dict[str, torch.Tensor]:
    """read_checkpoint that must hold a flat dict of tensors."""
    sd = read_checkpoint(f)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise Lav2Error(f"{f}: not a state dict of tensors")
    return sd


def read_tensors(f: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file or a pickled state dict, by the file's suffix."""
    return read_safetensors(f) if f.suffix == ".safetensors" else read_state_dict(f)


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The dtype base weights were stored in: the first safetensors file's, or a Meta shard's
    tok_embeddings (float32 when it cannot be told cheaply)."""
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        return _SAFETENSORS_DTYPES.get(h.get_slice(k).get_dtype(), torch.float32)
            if f.suffix == ".pth" and f.name.startswith("consolidated."):
                sd = read_checkpoint(f)
                t = sd.get("tok_embeddings.weight")
                if t is not None:
                    return t.dtype if t.dtype in (torch.bfloat16, torch.float16) else torch.float32
        except Exception:
            pass
    return torch.float32
