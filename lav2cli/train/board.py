"""TensorBoard event files in the run directory, beside metrics.jsonl: every logged step's loss
(one curve per stream), learning rate, gradient norm, throughput and peak memory, for
`tensorboard --logdir runs/`.

The writer appends to its file by path at every flush, and each logged step is flushed before
the next checkpoint replaces the run directory (which carries the file over), so the curves
continue in the new directory. A resumed run writes a new file that starts by purging the
steps after its checkpoint, which the resumed run logs again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lav2cli.errors import Lav2Error

EVENTS_GLOB = "events.out.tfevents.*"
# metrics.jsonl field -> TensorBoard tag (the loss's tag names the stream)
SCALARS = {"lr": "lr", "grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s", "memory_mb": "memory_mb"}


def _after_existing_files(out: Path) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with its creation
    second (then a per-process counter, compared as text): a new file must start in a later
    second than every file there, or a resumed run's purge and steps could be read before the
    steps they replace. Waits the rest of the second when needed."""
    seconds = [int(p.name.split(".")[3]) for p in out.glob(EVENTS_GLOB) if p.name.split(".")[3].isdigit()]
    if seconds and time.time() < max(seconds) + 1:
        time.sleep(max(seconds) + 1 - time.time())


class Board:
    def __init__(self, out: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # a dependency; named when an install left it out
            raise Lav2Error(f"TensorBoard event files need the tensorboard package ({e}): pip install tensorboard") from e
        _after_existing_files(out)
        self.writer = SummaryWriter(str(out), purge_step=purge_step)

    def log(self, rec: dict[str, Any]) -> None:
        step = int(rec["step"])
        self.writer.add_scalar(f"loss/{rec['stream']}", rec["loss"], step)
        for key, tag in SCALARS.items():
            if rec.get(key) is not None:
                self.writer.add_scalar(tag, rec[key], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
