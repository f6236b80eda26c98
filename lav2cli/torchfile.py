"""Reading PyTorch pickle files (.pt, .pth, .bin): the one place lav2 calls `torch.load`, always
with `weights_only=True`, and every failure one line naming the file.

It sits low in the layers so that every reader of such files uses it: base shards and released
adapters (formats), the trainer state (train) and an encoder's weights file (model.vision).
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
from typing import Any

import torch

from lav2cli.errors import Lav2Error

NOT_TENSORS = "not a tensor checkpoint: it holds Python objects lav2 will not unpickle"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_problem(e: BaseException) -> str:
    """What a failed `torch.load(weights_only=True)` says, in a few words: torch's own messages
    run over several lines and advise `weights_only=False`, which lav2 never does."""
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        found = _GLOBAL.search(text)
        return NOT_TENSORS + (f" ({found.group(1)})" if found else "")
    if isinstance(e, (EOFError, struct.error)) or "unexpected EOF" in text:
        return "truncated: the file ends early"
    if isinstance(e, (KeyError, IndexError, ValueError, pickle.UnpicklingError)) and "zip" not in text:
        return "not a PyTorch checkpoint: unreadable pickle data"
    first = text.splitlines()[0] if text else type(e).__name__
    return first.split(". ")[0]  # torch appends sentences of advice after the cause


def read_checkpoint(f: str | os.PathLike[str], problem: str = "cannot read checkpoint", *, mmap: bool = True) -> Any:
    """A pickled checkpoint through torch.load(weights_only=True) only (memory-mapped with `mmap`
    when the file allows it), or a one-line Lav2Error: `FILE: <problem> (<reason>)`, or `FILE: not a
    tensor checkpoint: ...` for a file that holds Python objects."""
    try:
        size = os.path.getsize(f)
    except OSError as e:
        raise Lav2Error(f"{f}: {problem} ({e.strerror or e})") from None
    if size == 0:
        raise Lav2Error(f"{f}: {problem} (empty file: 0 bytes)")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on an unusual pickle protocol
            warnings.simplefilter("ignore")
            try:
                return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:  # legacy (non-zip) pickles cannot be memory-mapped
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError too: click would turn it into a bare "Aborted!"
        reason = load_problem(e)
        if reason.startswith(NOT_TENSORS):
            raise Lav2Error(f"{f}: {reason}") from None
        raise Lav2Error(f"{f}: {problem} ({reason})") from None
