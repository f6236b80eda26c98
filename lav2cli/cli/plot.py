"""`lav2 plot`: training runs' loss and learning rate as an image (lav2cli.plot)."""

from __future__ import annotations

import typer

from lav2cli import plot as plotting
from lav2cli.cli.common import stderr
from lav2cli.runlog import FINAL_WINDOW

app = typer.Typer(add_completion=False)


@app.command()
def plot(
    runs: list[str] = typer.Argument(..., metavar="RUN...", help="Run directories or lav2 artifacts (any model reference, e.g. demo)."),
    out: str = typer.Option("loss.png", "--out", "-o", help="The image: .png, .svg or .pdf (written atomically)."),
    smooth: int = typer.Option(FINAL_WINDOW, "--smooth", min=1, help="Smoothed curves: per token over each stream's last N logged steps (the final loss of `lav2 info` is the curve's end at the default)."),
    log_y: bool = typer.Option(True, "--log-y/--linear-y", help="Loss axis: logarithmic (default) or linear."),
) -> None:
    """Draw the loss (per stream, smoothed) and learning rate of training runs, to compare them.

    A run that continued an artifact shows that artifact's stages first, on one step axis.

    The image goes to --out; its path is printed on stdout, a line per run on stderr.

    Examples:

      lav2 plot demo --out demo-loss.png

      lav2 plot runs/tiny runs/tiny2 --out compare.png

      lav2 plot runs/demo-stage2 --out loss.svg --linear-y --smooth 20
    """
    drawn = plotting.plot(runs, out, smooth=smooth, log_y=log_y)
    err = stderr()
    for run in drawn:
        err.print(plotting.describe(run), markup=False, soft_wrap=True)
    print(out)
