"""`lav2 plot`: the loss and learning rate of training runs in one image (matplotlib, Agg).

A run is a run directory or any model reference of a lav2 artifact (`demo`). Its stages are
drawn one after another on one step axis: a run that continued an artifact carries that
artifact's logs (metrics-stageN.jsonl) beside its own metrics.jsonl. Each stream's loss is drawn
as logged (faint) and smoothed (runlog.smoothed: per token over the stream's last N logged
steps, so a curve ends at the final loss that `lav2 info` shows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lav2cli import runlog
from lav2cli.errors import Lav2Error
from lav2cli.fileio import atomic_file
from lav2cli.formats import artifact, classify

FORMATS = ("png", "svg", "pdf")


@dataclass
class Stage:
    label: str  # "stage 2 (finetune)"
    offset: int  # steps of the stages before it
    records: list[dict[str, Any]]
    final_loss: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    name: str  # as given on the command line
    path: Path
    stages: list[Stage]


def run_dir(ref: str) -> Path:
    """The directory of a run: a folder holding metrics.jsonl (a run before its first
    checkpoint too), or a lav2 artifact by any model reference."""
    p = Path(ref).expanduser()
    if p.is_dir() and (p / runlog.METRICS_FILE).is_file():
        return p
    kind, path = classify(ref)
    if kind != "artifact":
        raise Lav2Error(f"{ref}: not a training run (no {runlog.METRICS_FILE}, and not a lav2 artifact)")
    return path


def load_run(ref: str, smooth: int = runlog.FINAL_WINDOW) -> Run:
    """A run's logged stages, the earliest first (the stages it carries no log of left out)."""
    path = run_dir(ref)
    training = artifact.read_meta(path).get("training") if (path / artifact.META).is_file() else None
    chain = runlog.stages(training) or [{}]
    stages, offset = [], 0
    for i, (record, log) in enumerate(zip(chain, runlog.stage_logs(path, len(chain))), start=1):
        records = runlog.read_metrics(log) if log is not None else []
        label = f"stage {i} ({record.get('stage')})" if len(chain) > 1 else str(record.get("stage") or "training")
        if records:
            stages.append(Stage(label, offset, records, runlog.final_losses(records, smooth)))
        last = max((r["step"] for r in records), default=0)
        offset += int(record.get("step") or last)
    if not stages:
        raise Lav2Error(f"{ref}: {path} holds no logged steps ({runlog.METRICS_FILE})")
    return Run(ref, path, stages)


def plot(refs: list[str], out: str | Path, smooth: int = runlog.FINAL_WINDOW, log_y: bool = True) -> list[Run]:
    """Draw the runs' losses (per stream, logged and smoothed) above their learning rate, and
    write the image to `out` (.png, .svg or .pdf) atomically; returns the runs drawn."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    out = Path(out)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise Lav2Error(f"--out {out}: the image format comes from the suffix: .png, .svg or .pdf")
    if smooth < 1:
        raise Lav2Error(f"--smooth must be at least 1 logged step, got {smooth}")
    runs = [load_run(ref, smooth) for ref in refs]
    fig = Figure(figsize=(10, 7), dpi=110, layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    colours = iter(f"C{i % 10}" for i in range(1000))
    for run in runs:
        name = run.name if len(runs) > 1 else ""
        colour: dict[str, str] = {}  # stream -> colour, the same in every stage of a run
        for stage in run.stages:
            for stream, curve in runlog.smoothed(stage.records, smooth).items():
                first = stream not in colour
                c = colour.setdefault(stream, next(colours))
                raw = [(r["step"], r["loss"]) for r in stage.records if str(r.get("stream", "loss")) == stream]
                loss_ax.plot([stage.offset + s for s, _ in raw], [v for _, v in raw], color=c, alpha=0.25, linewidth=0.8)
                loss_ax.plot([stage.offset + s for s, _ in curve], [v for _, v in curve], color=c, linewidth=1.8,
                             label=(f"{name}: {stream}" if name else stream) if first else None)
            lr = [(stage.offset + r["step"], r["lr"]) for r in stage.records if isinstance(r.get("lr"), (int, float))]
            lr_ax.plot([s for s, _ in lr], [v for _, v in lr], linewidth=1.2,
                       color=next(iter(colour.values())) if name else "0.25",
                       label=name if name and stage is run.stages[0] else None)
            if len(run.stages) > 1:  # where each stage starts
                if stage.offset > 0:
                    for ax in (loss_ax, lr_ax):
                        ax.axvline(stage.offset, color="0.6", linestyle=":", linewidth=1)
                loss_ax.annotate(f"{name + ': ' if name else ''}{stage.label}", (stage.offset, 1),
                                 xycoords=("data", "axes fraction"), xytext=(4, -12), textcoords="offset points",
                                 fontsize=8, color="0.35")
    if log_y:
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel(f"loss per token (faint: logged; line: last {smooth} logged steps)")
    loss_ax.legend(fontsize=8, loc="lower left")
    loss_ax.grid(True, which="major", alpha=0.3)
    loss_ax.set_title("lav2 plot: " + ", ".join(r.name for r in runs), loc="left", fontsize=10)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step" + (" (stages one after another)" if any(len(r.stages) > 1 for r in runs) else ""))
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_ax.grid(True, alpha=0.3)
    if len(runs) > 1:
        lr_ax.legend(fontsize=8, loc="upper right")
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format=fmt)
    return runs


def describe(run: Run) -> str:
    """One line: the run, its stages and their final losses."""
    parts = [f"{s.label}: {len(s.records)} logged steps, final loss {runlog.format_losses(s.final_loss)}"
             for s in run.stages]
    return f"{run.name} ({run.path}): " + "; ".join(parts)
