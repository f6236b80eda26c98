"""`lav2 train`: a recipe and its overrides -> an adapter artifact (lav2cli.train)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lav2cli.cli.common import stderr
from lav2cli.train import Trainer, claim_run, prepare_out, resolve

app = typer.Typer(add_completion=False)


@app.command()
def train(
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="TOML recipe (see recipes/)."),
    stage: str | None = typer.Option(None, help="pretrain, finetune or joint (overrides train.stage)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field: SECTION.KEY=VALUE (repeatable)."),
    out: str = typer.Option("runs/lav2", "--out", "-o", help="Run directory: the adapter artifact, checkpoint and metrics."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its last checkpoint stopped."),
    max_steps: int | None = typer.Option(None, help="Stop after this many optimiser steps (overrides train.max_steps)."),
    force: bool = typer.Option(False, "--force", help="Start over in a non-empty --out."),
    stop_after: int | None = typer.Option(None, help="Checkpoint and exit after this many steps in all; the schedule stays the full run's (continue with --resume)."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun: shard the frozen base's blocks across the processes (train.fsdp)."),
) -> None:
    """Train the adapter: stage pretrain (image-text), finetune (instructions) or joint (both).

    Examples:

      lav2 train --recipe recipes/tiny.toml --out runs/tiny

      lav2 train --recipe recipes/tiny.toml --stage finetune --set train.batch_size=8 --out runs/ft

      lav2 train --out runs/ft --resume

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

    def log(msg: str) -> None:
        err.print(msg, markup=False, soft_wrap=True)

    with claim_run(out_dir, log):  # one writer per run directory
        r = resolve(recipe_path=recipe, overrides=overrides, out=out_dir, resume=resume)
        created = not out_dir.exists()
        prepare_out(out=out_dir, resume=resume, force=force,
                    inputs={"the model this run continues": r.model.ref, "the run's base model": r.model.base})
        try:
            trainer = Trainer(recipe=r, out=out_dir, resume=resume, log=log)
        except BaseException:
            if created and not any(out_dir.iterdir()):  # a run that could not start leaves no empty --out
                out_dir.rmdir()
            raise
        if trainer.dist.main:
            table = Table(title="recipe", show_header=False, title_justify="left")
            for sec, values in r.to_dict().items():
                for k, v in values.items():
                    table.add_row(f"{sec}.{k}", str(v))
            for grp, n in trainer.print_groups():
                table.add_row(f"trainable: {grp}", f"{n:,} parameters")
            table.add_row("steps", f"{trainer.total_steps} (lr {trainer.lr:.3g}, global batch {trainer.global_batch})")
            err.print(table)
        info = trainer.run(stop_after=stop_after)
    if trainer.dist.main:
        err.print(f"done: {info.steps} steps, final loss {info.final_loss:.4f}, {info.tokens_per_s:.0f} tok/s, "
                  f"{info.seconds:.1f} s")
        print(info.out)
