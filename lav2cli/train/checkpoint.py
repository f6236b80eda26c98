"""The run directory: the adapter artifact, plus what --resume needs to continue exactly.

    adapter.safetensors, lav2.json   the artifact (the stage's tensors, released names)
    trainer_state.pt                 step, AdamW and schedule state, RNG states, stream positions
    metrics.jsonl                    one line per logged step (lav2cli.runlog reads it)
    recipe.toml                      the recipe the run uses (--resume reads it), paths relative to the run
    events.out.tfevents.*            the same steps for TensorBoard (board.py), carried over by each swap
    metrics-stageN.jsonl             the logs of the stages of the artifact the run continued

Every checkpoint writes them all in one atomic directory swap (fileio.atomic_dir: a crash
between its renames is finished by the next command). A command that writes the run holds it
(`claim_run`): a second one is refused, naming the holder.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from lav2cli.data.dataset import Stream
from lav2cli.engine import Engine
from lav2cli.errors import Lav2Error
from lav2cli.fileio import atomic_file, claim, refuse_overwrite
from lav2cli.formats import artifact
from lav2cli.model.adapter import LlamaAdapterV2
from lav2cli.recipe import Recipe
from lav2cli.runlog import METRICS_FILE, STAGE_GLOB
from lav2cli.train.board import EVENTS_GLOB
from lav2cli.torchfile import read_checkpoint
from lav2cli.train.distributed import full_tensor, like

STATE_FILE = "trainer_state.pt"
RECIPE_FILE = "recipe.toml"
RECIPE_HEADER = "# The recipe of this run (lav2 train --resume reads it). Paths are relative to this directory.\n\n"


def claim_run(out: Path, log: Callable[[str], None] | None = None) -> ContextManager[None]:
    """Hold the run directory `out` for the block (fileio.claim): another command writing it is
    refused in one line naming its pid, host and start time, and a checkpoint a crash cut between
    its renames is finished first. Under torchrun the main process (RANK 0) holds it: the
    others write nothing there."""
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return claim(out, wait=False, log=log)


def prepare_out(out: Path, resume: bool, force: bool, inputs: dict[str, str | None] | None = None) -> None:
    """Check the run directory: --resume needs a checkpoint there, a fresh run an empty (or,
    with --force, cleared) directory that is none of the run's `inputs` ({what: path}: the
    artifact it continues, its base)."""
    if not resume:
        refuse_overwrite(out, inputs or {})
    if resume:
        if not (out / STATE_FILE).is_file():
            raise Lav2Error(f"--resume: {out} holds no training checkpoint ({STATE_FILE})")
        return
    if out.exists() and any(out.iterdir()) and not force:
        raise Lav2Error(f"{out} exists and is not empty: pass --resume to continue it or --force to start over")
    out.mkdir(parents=True, exist_ok=True)
    # --force: the previous run's files go (a crash before the first checkpoint must not leave
    # its state for --resume to pick up); files of the user's own stay
    clear_run_files(out)


def clear_run_files(out: Path) -> None:
    """Remove the files a run writes in `out` (a user's own files stay)."""
    for name in (METRICS_FILE, STATE_FILE, RECIPE_FILE, artifact.WEIGHTS, artifact.META):
        (out / name).unlink(missing_ok=True)
    for f in [*out.glob(EVENTS_GLOB), *out.glob(STAGE_GLOB)]:
        f.unlink()


def drop_unstarted(out: Path) -> None:
    """A run directory this command created and then failed in before its first checkpoint (a
    full disk, a bad record): what it logged goes, and the directory if nothing else is there,
    so that the same command can simply be run again."""
    if (out / STATE_FILE).exists():
        return
    with contextlib.suppress(OSError):
        clear_run_files(out)
        out.rmdir()  # not empty: the user's own files stay


# -- save --------------------------------------------------------------------------------------


def tensors_to_save(model: LlamaAdapterV2, names: set[str]) -> dict[str, torch.Tensor]:
    """Whole tensors (FSDP shards gathered: every rank must call this) of the parameters
    `names`, under the released names."""
    return model.to_released({n: full_tensor(p.detach()) for n, p in model.named_parameters() if n in names})


def trainer_state(step: int, optimizer: torch.optim.Optimizer, scheduler, streams: dict[str, Stream],
                  feature_norm: dict[str, Any] | None) -> dict[str, Any]:
    """Everything besides the tensors that --resume restores (FSDP shards of the optimizer
    state gathered: every rank must call this)."""
    opt_state = optimizer.state_dict()
    opt_state = {**opt_state, "state": {i: {k: full_tensor(v) for k, v in st.items()}
                                        for i, st in opt_state["state"].items()}}
    state = {
        "step": step,
        "optimizer": opt_state,
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "streams": {n: s.state() for n, s in streams.items()},
    }
    if feature_norm is not None:
        state["feature_norm"] = feature_norm
    return state


def write(out: Path, engine: Engine, tensors: dict[str, torch.Tensor], state: dict[str, Any],
          training: dict[str, Any], recipe: Recipe, feature_stats: dict[str, torch.Tensor] | None = None) -> None:
    """The artifact with its training record (and its training images' feature statistics), the
    trainer state, the metrics so far and the recipe: one atomic directory swap."""
    buf = io.BytesIO()
    torch.save(state, buf)
    metrics = (out / METRICS_FILE).read_bytes() if (out / METRICS_FILE).exists() else b""
    # caption_context marks the artifact; otherwise the mark of the artifact continued stays
    engine.save_adapter(out, training=training, tensors=tensors, self_caption=recipe.data.caption_context or None,
                        feature_stats=feature_stats,
                        extra_files={STATE_FILE: buf.getvalue(), METRICS_FILE: metrics,
                                     RECIPE_FILE: (RECIPE_HEADER + recipe.render_toml()).encode()})


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    try:
        with open(out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full disk, say: the line may be cut, which --resume drops
        raise Lav2Error(f"{out / METRICS_FILE}: cannot append ({e.strerror or e}); the run's last checkpoint "
                        f"stays in {out}: make room and continue with --resume") from e


# -- restore -----------------------------------------------------------------------------------


def read(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(trainer state, saved tensors under the released names) of the run in `out`."""
    f = out / STATE_FILE
    if not f.is_file():
        raise Lav2Error(f"{out}: no {STATE_FILE} to resume from")
    return read_checkpoint(f, "cannot resume", mmap=False), artifact.load_tensors(out)


@torch.no_grad()
def restore_tensors(model: LlamaAdapterV2, saved: dict[str, torch.Tensor]) -> None:
    """Copy the saved tensors (released names) into the model, sharded as its parameters are."""
    saved = model.from_released(saved)
    for n, p in model.named_parameters():
        if n in saved:
            p.copy_(like(saved[n].to(p.dtype), p))


def restore_trainer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler,
                          streams: dict[str, Stream]) -> int:
    """Put back what trainer_state saved; returns the step to continue from."""
    fresh, saved = list(scheduler.base_lrs), state["scheduler"].get("base_lrs")
    if saved is not None and (len(saved) != len(fresh) or not all(math.isclose(a, b, rel_tol=1e-6)
                                                                 for a, b in zip(saved, fresh))):
        # the restored schedule would keep the saved rates while lav2.json recorded the new ones
        raise Lav2Error(f"--resume: the run's learning rate was {saved[0]:.6g}, this run's is {fresh[0]:.6g} "
                        f"(train.base_lr x global batch / 256); refused: resume with the run's own "
                        f"train.base_lr, batch size and number of processes")
    opt = state["optimizer"]
    order = [p for g in optimizer.param_groups for p in g["params"]]
    opt["state"] = {i: {k: like(v, order[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in st.items()}
                    for i, st in opt["state"].items()}
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    for n, s in state["streams"].items():
        streams[n].restore(s)
    return int(state["step"])


def seconds_trained(out: Path) -> float:
    """Training time recorded by the run in `out` so far."""
    return float(artifact.read_meta(out).get("training", {}).get("seconds") or 0.0)


def training_record(out: Path) -> dict[str, Any]:
    """The training record of the run's last checkpoint (lav2.json `training`; {} without one)."""
    if not (out / artifact.META).is_file():
        return {}
    record = artifact.read_meta(out).get("training")
    return record if isinstance(record, dict) else {}


def check_resumable(out: Path, world: int, global_batch: int) -> None:
    """Refuse to resume the run in `out` with another number of processes or global batch: the
    data order, the schedule and the learning rate would silently change."""
    prev = artifact.read_meta(out).get("training") or {}
    was_world, was_batch = prev.get("world_size"), prev.get("global_batch")
    if was_world is not None and was_world != world:
        raise Lav2Error(f"--resume: {out} was trained by {was_world} process(es) (global batch {was_batch}), "
                        f"this run has {world} (global batch {global_batch}); refused: the global batch, the data "
                        f"order and the learning rate would change. Resume it with {was_world} process(es)"
                        + (f" (torchrun --nproc_per_node {was_world})" if was_world > 1 else " (without torchrun)"))
    if was_batch is not None and was_batch != global_batch:
        raise Lav2Error(f"--resume: {out} was trained with global batch {was_batch}, this run's is {global_batch} "
                        f"(train.batch_size x train.grad_accum x processes); refused: resume with the run's own "
                        f"batch settings")


def keep_metrics(out: Path, step: int, log: Callable[[str], None] | None = None) -> None:
    """Drop the metrics lines after `step` (logged after the checkpoint resumed from), and a
    line an interrupted append cut short (a kill, a full disk), with a note."""
    f = out / METRICS_FILE
    lines = f.read_bytes().split(b"\n") if f.exists() else []
    keep, cut = [], []
    for lineno, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            cut.append(lineno)
            continue
        if rec.get("step", 0) <= step:
            keep.append(ln.decode() + "\n")
    if cut and log:
        log(f"{f}: dropped unreadable line(s) {', '.join(map(str, cut))} (cut short by an interrupted append)")
    with atomic_file(f) as w:
        w.writelines(keep)
