"""A training run's log, read back: `metrics.jsonl` (one JSON object per logged step: step,
stream, loss, lr, grad_norm, tokens, supervised_tokens; tokens_per_s over the steady steps so far,
warmup_s of the steps left out of it, compiles (graphs compiled so far), memory_mb: the peak) and, in a run
that continued an earlier artifact, that artifact's logs as `metrics-stageN.jsonl`.

The final loss of a stream is the mean loss per supervised token over the stream's last
FINAL_WINDOW logged steps: a step's loss is itself a mean over its batch's supervised tokens, so
weighting the steps by those tokens gives the loss of all their tokens together. It is computed
per stream because the streams' losses differ by their task, not by how far training got; the
last step alone swings with whichever stream and batch came last. `lav2 train` records it,
`lav2 info` shows it (derived from the logs for artifacts that recorded only the last step's
loss), and `lav2 plot`'s smoothed curves end at it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lav2cli.fileio import atomic_file

METRICS_FILE = "metrics.jsonl"
FINAL_WINDOW = 10  # logged steps per stream
STAGE_GLOB = "metrics-stage*.jsonl"


def size(n_bytes: float) -> str:
    """Memory for people, in binary units as the peak figures (memory_mb) are: GB from one up, MB below."""
    return f"{n_bytes / 2**30:.1f} GB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MB"


def stage_file(n: int) -> str:
    """The name under which a run keeps the log of stage n (1-based) of the artifact it continued."""
    return f"metrics-stage{n}.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The logged steps of one metrics file, in file order. Lines that are not a step record
    (a line cut off by a kill or a full disk) are left out: this is for reading, not resuming."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and isinstance(rec.get("loss"), (int, float)):
            out.append(rec)
    return out


def _weight(rec: dict[str, Any]) -> float:
    n = rec.get("supervised_tokens")
    return float(n) if isinstance(n, (int, float)) and n > 0 else 1.0


def smoothed(records: list[dict[str, Any]], window: int = FINAL_WINDOW) -> dict[str, list[tuple[int, float]]]:
    """Per stream, (step, loss per supervised token over the stream's last `window` logged
    steps up to this one) for each of its logged steps."""
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_stream.setdefault(str(rec.get("stream", "loss")), []).append(rec)
    out: dict[str, list[tuple[int, float]]] = {}
    for stream, recs in by_stream.items():
        curve = []
        for i, rec in enumerate(recs):
            win = recs[max(0, i + 1 - max(1, window)):i + 1]
            total = sum(_weight(r) for r in win)
            curve.append((rec["step"], sum(r["loss"] * _weight(r) for r in win) / total))
        out[stream] = curve
    return out


def final_losses(records: list[dict[str, Any]], window: int = FINAL_WINDOW) -> dict[str, float]:
    """{stream: final loss} (the module's definition); empty without records."""
    return {stream: curve[-1][1] for stream, curve in sorted(smoothed(records, window).items())}


def format_losses(losses: dict[str, float]) -> str:
    """"image_text 0.078, instruction 0.327" ("none logged" for no stream)."""
    return ", ".join(f"{stream} {value:.3g}" for stream, value in losses.items()) or "none logged"


def stages(training: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The training records of a run's stages, the earliest first (a stage that continued an
    artifact keeps that artifact's record under `previous`)."""
    chain = []
    while isinstance(training, dict) and training:
        chain.append(training)
        training = training.get("previous")
    return chain[::-1]


def stage_logs(run_dir: str | Path, n_stages: int) -> list[Path | None]:
    """For each of a run's `n_stages` stages, the earliest first, its metrics file in
    `run_dir` (None where the run does not carry it)."""
    run_dir = Path(run_dir)
    names = [stage_file(i) for i in range(1, n_stages)] + [METRICS_FILE]
    return [run_dir / n if (run_dir / n).is_file() else None for n in names[-max(1, n_stages):]]


def carry_history(source: str | Path, n_stages: int, out: str | Path) -> list[str]:
    """Copy the logs of an artifact with `n_stages` stages into `out` as metrics-stage1..N.jsonl,
    where a run that continues it keeps them; returns the names written."""
    written = []
    for i, src in enumerate(stage_logs(source, n_stages), start=1):
        if src is not None:
            with atomic_file(Path(out) / stage_file(i), "wb") as f:
                f.write(src.read_bytes())
            written.append(stage_file(i))
    return written
