"""Steady-state throughput: what the run does once it is warm.

The first step of a run (or of a resumed one) pays for allocation and kernel selection, and a
step during which torch.compile compiled a graph pays for the compilation; both are counted as
warm-up, reported apart, and left out of tokens/s. A run of mixed lengths must not keep
compiling (the trainer pads lengths to buckets), and `compiles()` is how that is checked.
"""

from __future__ import annotations

from dataclasses import dataclass


def compiles() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class Throughput:
    tokens: int = 0  # steady steps only
    seconds: float = 0.0
    warmup_steps: int = 0
    warmup_seconds: float = 0.0
    steps: int = 0

    def add(self, tokens: int, seconds: float, compiled: int) -> None:
        """One step: its tokens, its wall time and how many graphs were compiled during it."""
        self.steps += 1
        if self.steps == 1 or compiled > 0:
            self.warmup_steps += 1
            self.warmup_seconds += seconds
        else:
            self.tokens += tokens
            self.seconds += seconds

    @property
    def tokens_per_s(self) -> float | None:
        """Tokens per second over the steady steps; None until there is one."""
        return round(self.tokens / self.seconds, 1) if self.seconds > 0 else None
