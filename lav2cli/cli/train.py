"""`lav2 train`: a recipe and its overrides -> an adapter artifact (lav2cli.train)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lav2cli.cli.common import stderr
from lav2cli.recipe import PATH_FIELDS, Recipe, in_effect, section_rows
from lav2cli.runlog import format_losses
from lav2cli.train import Trainer, claim_run, prepare_out, resolve
from lav2cli.train.checkpoint import drop_unstarted, training_record

app = typer.Typer(add_completion=False)


def resume_hint(saved_step: int, out: str) -> str:
    """How to continue a run that stopped: the step its checkpoint holds and the command."""
    if saved_step < 0:
        return "no checkpoint was written yet (train.checkpoint_every sets how often)"
    return f"checkpoint at step {saved_step}: resume with `lav2 train --out {shlex.quote(out)} --resume`"


@app.command()
def train(
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="TOML recipe (see recipes/)."),
    stage: str | None = typer.Option(None, help="pretrain, finetune or joint (overrides train.stage)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field: SECTION.KEY=VALUE (repeatable)."),
    out: str = typer.Option("runs/lav2", "--out", "-o", help="Run directory: the adapter artifact, checkpoint and metrics."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its last checkpoint stopped (a finished run: nothing to do; a larger --max-steps extends it)."),
    max_steps: int | None = typer.Option(None, help="Stop after this many optimiser steps (overrides train.max_steps)."),
    force: bool = typer.Option(False, "--force", help="Start over in a non-empty --out."),
    stop_after: int | None = typer.Option(None, help="Checkpoint and exit after this many steps in all; the schedule stays the full run's (continue with --resume)."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun: shard the frozen base's blocks across the processes (train.fsdp)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No recipe table, progress bar or notes: errors on stderr, the run directory on stdout."),
) -> None:
    """Train the adapter: stage pretrain (image-text), finetune (instructions) or joint (both).

    Examples:

      lav2 train --recipe recipes/tiny.toml --out runs/tiny

      lav2 train --recipe recipes/tiny.toml --stage finetune --set train.batch_size=8 --out runs/ft

      lav2 train --out runs/ft --resume

      lav2 train --out runs/ft --resume --max-steps 400   # extend a run: says what happens to the schedule

      torchrun --nproc_per_node 2 -m lav2cli train --recipe recipes/tiny.toml --out runs/ddp

      torchrun --nproc_per_node 8 -m lav2cli train --recipe recipes/llama7b-joint.toml --fsdp --out runs/7b
    """
    overrides = list(set_)
    if stage:
        overrides.append(f"train.stage={stage}")
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if fsdp:
        overrides.append("train.fsdp=true")
    out_dir = Path(out)
    err = stderr()
    log = (lambda m: None) if quiet else (lambda m: err.print(m, markup=False, soft_wrap=True))
    with claim_run(out_dir, log):  # one writer per run directory
        r = resolve(recipe_path=recipe, overrides=overrides, out=out_dir, resume=resume)
        done = training_record(out_dir) if resume else {}
        if 0 < r.train.max_steps <= int(done.get("step") or 0):  # known without loading anything
            _already_complete(out_dir, int(done["step"]), r.train.max_steps, quiet, err)
            return
        created = not out_dir.exists()
        prepare_out(out=out_dir, resume=resume, force=force,
                    inputs={"the model this run continues": r.model.ref, "the run's base model": r.model.base})
        try:
            trainer = Trainer(recipe=r, out=out_dir, resume=resume, log=log, show_progress=not quiet)
        except BaseException:
            if created:  # a run that could not start leaves no --out
                drop_unstarted(out_dir)
            raise
        if trainer.already_complete:
            trainer.run()  # releases what the trainer holds; writes nothing
            if trainer.dist.main:
                _already_complete(out_dir, trainer.step, trainer.total_steps, quiet, err)
            return
        if trainer.dist.main and not quiet and not resume:  # a resumed run's recipe is its recipe.toml
            err.print(_recipe_table(r, trainer))
        try:
            info = trainer.run(stop_after=stop_after)
        except BaseException as e:
            if created and trainer.dist.main:  # nor one that failed before its first checkpoint
                drop_unstarted(out_dir)
            if not isinstance(e, KeyboardInterrupt):
                raise
            if trainer.dist.main:
                err.print(f"lav2: interrupted: training at step {trainer.step} of {trainer.total_steps}; "
                          f"{resume_hint(trainer.last_saved, out)}", markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
    if trainer.dist.main and info.steps < trainer.total_steps:  # --stop-after
        err.print(f"lav2: note: stopped at step {info.steps} of {trainer.total_steps}; "
                  f"{resume_hint(trainer.last_saved, out)}", markup=False, soft_wrap=True)
    if trainer.dist.main:
        if not quiet:
            speed = f"{info.tokens_per_s:.0f} tok/s steady, " if info.tokens_per_s is not None else ""
            if info.warmup_s:
                speed += f"{info.warmup_s:.1f} s warm-up{f' ({info.compiles} graphs compiled)' if info.compiles else ''}, "
            err.print(f"done: {info.steps}/{info.total_steps} steps, {speed}{info.seconds:.1f} s; final loss "
                      f"{format_losses(info.final_loss)} (per stream: per token over its last logged steps)",
                      markup=False, soft_wrap=True)
        print(info.out)


def _already_complete(out: Path, step: int, total: int, quiet: bool, err: Console) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 speaks
        return
    if not quiet:
        err.print(f"{out}: already complete ({step} of {total} steps); nothing changed. A larger --max-steps "
                  f"continues it.", markup=False, soft_wrap=True)
    print(out)


def _shown_path(value: str) -> str:
    """A path inside the current directory relative to it; others as they are."""
    if not value or not Path(value).is_absolute():
        return value
    rel = os.path.relpath(value)
    return value if rel.startswith("..") else rel


def _recipe_table(r: Recipe, trainer: Trainer) -> Table:
    """The recipe in effect, one row per section, then what trains and for how long."""
    shown = r.to_dict()
    for section, key in PATH_FIELDS:
        shown[section][key] = _shown_path(shown[section][key])
    table = Table(title="recipe", show_header=False, title_justify="left", box=None, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for label, text in section_rows(in_effect(shown, continues=bool(trainer.initial))):
        table.add_row(Text(label), Text(text))  # plain text: "[model]" is no markup
    table.add_row("trainable", ", ".join(f"{grp} {n:,}" for grp, n in trainer.print_groups()) + " parameters")
    table.add_row("steps", f"{trainer.total_steps} (lr {trainer.lr:.3g}, global batch {trainer.global_batch})")
    return table
