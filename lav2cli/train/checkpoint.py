"""The run directory: the adapter artifact, plus what --resume needs to continue exactly.

    adapter.safetensors, lav2.json   the artifact (the stage's tensors, released names)
    trainer_state.pt                 step, AdamW and schedule state, RNG states, stream positions
    metrics.jsonl                    one line per logged step
    recipe.toml                      the recipe the run uses (--resume reads it)

Every checkpoint writes them all in one atomic directory swap.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import torch

from lav2cli.data.dataset import Stream
from lav2cli.engine import Engine
from lav2cli.errors import Lav2Error
from lav2cli.formats import artifact
from lav2cli.model.adapter import LlamaAdapterV2
from lav2cli.recipe import Recipe
from lav2cli.train.distributed import full_tensor, like

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.toml"


def prepare_out(out: Path, resume: bool, force: bool) -> None:
    """Check the run directory: --resume needs a checkpoint there, a fresh run an empty (or,
    with --force, cleared) directory."""
    if resume:
        if not (out / STATE_FILE).is_file():
            raise Lav2Error(f"--resume: {out} holds no training checkpoint ({STATE_FILE})")
        return
    if out.exists() and any(out.iterdir()) and not force:
        raise Lav2Error(f"{out} exists and is not empty: pass --resume to continue it or --force to start over")
    out.mkdir(parents=True, exist_ok=True)
    # --force: the previous run's files go (a crash before the first checkpoint must not leave
    # its state for --resume to pick up); files of the user's own stay
    for name in (METRICS_FILE, STATE_FILE, RECIPE_FILE, artifact.WEIGHTS, artifact.META):
        (out / name).unlink(missing_ok=True)


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
                                     RECIPE_FILE: recipe.render_toml().encode()})


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


# -- restore -----------------------------------------------------------------------------------


def read(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(trainer state, saved tensors under the released names) of the run in `out`."""
    f = out / STATE_FILE
    if not f.is_file():
        raise Lav2Error(f"{out}: no {STATE_FILE} to resume from")
    return torch.load(f, map_location="cpu", weights_only=True), artifact.load_tensors(out)


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


def keep_metrics(out: Path, step: int) -> None:
    """Drop the metrics lines after `step` (logged after the checkpoint resumed from)."""
    lines = (out / METRICS_FILE).read_text().splitlines() if (out / METRICS_FILE).exists() else []
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    (out / METRICS_FILE).write_text("".join(ln + "\n" for ln in keep))
