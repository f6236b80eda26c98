"""The Trainer: set up from a recipe (setup.py's steps), then the loop.

    per step  pick the stream (joint), forward/backward over its micro-batches, hand only this
              stream's group to AdamW (the other group gets grad None: it does not move),
              clip, step, log
    save      every train.checkpoint_every steps and at the end (checkpoint.py)
"""

from __future__ import annotations

import math
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lav2cli import runlog
from lav2cli.data.dataset import Batch, collate
from lav2cli.errors import Lav2Error
from lav2cli.formats import classify
from lav2cli.recipe import Recipe, in_effect
from lav2cli.templates import IGNORE_INDEX
from lav2cli.train import checkpoint
from lav2cli.train.board import Board
from lav2cli.train.distributed import all_reduce_sum, clip_grad_norm, init_distributed, leave, sum_grads
from lav2cli.train.features import (feature_norm_state, image_reader, raw_clip_proj, restore_feature_norm,
                                    standardizes, start_standardized, training_feature_stats)
from lav2cli.train.groups import IMAGE_TEXT, INSTRUCTION, make_groups, make_optimizer
from lav2cli.train.memory import ActivationBytes, CheckpointPlan, measure_activations, most_of
from lav2cli.train.setup import (checkpoint_blocks, compile_blocks, compiles_blocks, image_paths, load_engine,
                                 make_schedule, make_streams, pad_multiple, seed_all, select_trainable, uses_bf16,
                                 worst_case_batches)
from lav2cli.train.throughput import Throughput, compiles


try:
    import resource  # peak memory of the process (POSIX)
except ImportError:
    resource = None


@dataclass
class RunInfo:
    out: Path
    steps: int
    final_loss: dict[str, float]  # per stream (lav2cli.runlog)
    tokens_per_s: float | None
    seconds: float
    total_steps: int = 0
    already_complete: bool = False  # --resume of a finished run: nothing was done or written
    warmup_s: float | None = None  # the first step and steps that compiled: apart from tokens_per_s
    compiles: int | None = None  # graphs torch.compile compiled during the run


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory so far: on CUDA what tensors took on the device, on CPU the process's peak
    resident set."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


class Trainer:
    def __init__(self, recipe: Recipe, out: Path, resume: bool, log: Callable[[str], None], show_progress: bool = True):
        self.recipe, self.out, self.log, self.show_progress = recipe, out, log, show_progress
        t = recipe.train
        self.dist = init_distributed(t.device)
        seed_all(t.seed)
        # the model
        self.engine, self.initial, self.previous_stage = load_engine(recipe, self.dist)
        self.device, self.model = self.engine.device, self.engine.model.train()
        self.bf16 = uses_bf16(t, self.device)
        # what trains, and how
        self.groups = make_groups(self.model, t.stage)
        self.params = select_trainable(self.model, self.groups)
        self.global_batch = t.batch_size * t.grad_accum * self.dist.world
        self.lr = t.base_lr * self.global_batch / 256
        self.optimizer = make_optimizer(self.params, self.lr, t.weight_decay, t.betas, fused=self.device.type == "cuda",
                                        visual_lr_scale=t.visual_lr_scale, lora_lr_scale=t.lora_lr_scale)
        # the data
        self.streams = make_streams(recipe, self.engine, self.dist)
        self.image_paths = image_paths(self.streams)
        self.image_fn = image_reader(self.engine, self.image_paths, recipe.data.feature_cache, self.dist, log)
        self.pool = ThreadPoolExecutor(max(1, recipe.data.workers))  # decodes a batch's images in parallel
        self.total_steps, self.scheduler = make_schedule(self.optimizer, t, self.lr, self.streams)
        # speed: checkpointed blocks (measured against a budget), compiled blocks, length buckets
        self.checkpoint_plan = self._checkpointing()
        self.compiled = compiles_blocks(t, self.device)
        self.pad_multiple = pad_multiple(t, self.compiled)
        if self.compiled:
            compile_blocks(self.model, -(-recipe.data.max_tokens // self.pad_multiple))
        # where it starts
        self.step, self.last_saved = 0, -1
        self.seconds_before = 0.0  # training time of the run before a --resume
        self.already_complete = False
        self.standardize = standardizes(t, self.params, self.image_fn, log)
        if resume:
            self._restore()
        elif self.standardize:
            start_standardized(self.model, self.image_fn, self.image_paths, self.device, t.seed,
                               clip_proj_trained="clip_proj.weight" in self.initial, log=log)
        if self.previous_stage and not resume and self.dist.main:  # the continued stages' logs travel on
            runlog.carry_history(classify(recipe.model.ref)[1], len(runlog.stages(self.previous_stage)), out)
        # saved with the artifact: how ask and eval tell images unlike the training images
        self.feature_stats = (training_feature_stats(self.model, self.image_fn, self.image_paths, self.device,
                                                     t.seed).to_tensors()
                              if self.image_fn is not None and self.dist.main and not self.already_complete else None)

    def activation_bytes(self) -> ActivationBytes:
        """What a step keeps for backward at most, per block: every stream's worst-case batch measured."""
        batches = worst_case_batches(self.streams, self.engine.tokenizer.pad_id, self.image_fn,
                                     self.recipe.train.batch_size, self.recipe.data.max_tokens)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return most_of([measure_activations(
                self.model, lambda b=b: self.loss_sum(b.to(self.device, self.engine.dtype))) for b in batches])

    def _checkpointing(self) -> CheckpointPlan | None:
        t = self.recipe.train
        fsdp = t.fsdp and self.dist.world > 1
        blocks, plan = checkpoint_blocks(self.model, t, self.device, fsdp, self.activation_bytes,
                                         list(self.params.values()), self.log if self.dist.main else lambda _: None)
        self.model.llama.checkpoint_blocks = blocks
        return plan

    def print_groups(self) -> list[tuple[str, int]]:
        """(group, number of trainable values) for each group of the stage."""
        return [(grp, sum(self.params[n].numel() for n in names)) for grp, names in self.groups.items()]

    # -- one step ----------------------------------------------------------------------------

    def pick_stream(self, step: int) -> str:
        names = list(self.streams)
        if len(names) == 1:
            return names[0]
        ratio = self.recipe.data.image_text_ratio
        return IMAGE_TEXT if random.Random(f"{self.recipe.train.seed}:stream:{step}").random() < ratio else INSTRUCTION

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over supervised tokens; only those rows of the hidden states go
        through the vocabulary projection (memory-lean)."""
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            sums, counts = self.model.response_nll(batch.tokens, batch.labels, batch.images, batch.image_mask)
        return sums.sum(), int(counts.sum())

    def train_step(self, step: int) -> dict[str, Any]:
        t, d = self.recipe.train, self.dist
        grp = self.pick_stream(step)
        stream = self.streams[grp]
        micro = []
        for _ in range(t.grad_accum):
            examples = stream.next()
            mine = examples[d.rank * t.batch_size:(d.rank + 1) * t.batch_size]
            micro.append(collate(mine, self.engine.tokenizer.pad_id, self.image_fn, self.pool.map,
                                 self.pad_multiple, self.recipe.data.max_tokens))
        n_tok = torch.tensor(float(sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in micro)))
        total_tok = all_reduce_sum(n_tok.to(self.device), d).item()
        loss_total = torch.zeros((), device=self.device)
        for b in micro:
            b = b.to(self.device, self.engine.dtype)
            loss, _ = self.loss_sum(b)
            (loss / total_tok).backward()
            loss_total += loss.detach()
        mine = set(self.groups[grp])
        for n, p in self.params.items():
            if n not in mine:
                p.grad = None  # the other group does not move at all on this step
        active = [p for n, p in self.params.items() if n in mine]
        sum_grads(active, d)
        gnorm = clip_grad_norm(active, t.grad_clip, d) if t.grad_clip > 0 else 0.0
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_mean = all_reduce_sum(loss_total, d).item() / max(total_tok, 1.0)
        n_tokens = all_reduce_sum(torch.tensor(float(sum(b.tokens.numel() for b in micro)), device=self.device), d).item()
        return {"step": step + 1, "stream": grp, "loss": loss_mean, "lr": lr,
                "grad_norm": gnorm, "tokens": int(n_tokens), "supervised_tokens": int(total_tok)}

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> RunInfo:
        """Train to the end (or checkpoint and return after `stop_after` steps in total; the
        schedule stays that of the full run, so --resume continues it exactly)."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        t = self.recipe.train
        if self.already_complete:  # --resume of a finished run: nothing to do, nothing written
            self.pool.shutdown()
            leave(self.dist)
            losses = runlog.final_losses(runlog.read_metrics(self.out / runlog.METRICS_FILE))
            return RunInfo(self.out, self.step, losses, checkpoint.training_record(self.out).get("tokens_per_s"), 0.0,
                           self.total_steps, already_complete=True)
        end = min(self.total_steps, stop_after) if stop_after else self.total_steps
        start, t0, last = self.step, time.perf_counter(), {}
        speed, compiled_before = Throughput(), compiles()
        # resumed: the new event file purges the steps after the checkpoint, logged again
        board = Board(self.out, purge_step=start + 1 if start else None) if self.dist.main else None
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                            disable=not (self.show_progress and self.dist.main), transient=False,
                            console=Console(stderr=True))  # stdout carries only the run directory
        with progress:
            task = progress.add_task(f"train {t.stage}", total=self.total_steps, completed=start, status="")
            while self.step < end:
                step_t0, graphs = time.perf_counter(), compiles()
                rec = self.train_step(self.step)
                speed.add(rec["tokens"], time.perf_counter() - step_t0, compiles() - graphs)
                if not math.isfinite(rec["loss"]):
                    where = (f"the last good checkpoint (step {self.last_saved}) is in {self.out}"
                             if self.last_saved >= 0 else "no checkpoint was written")
                    raise Lav2Error(f"step {rec['step']}: loss is {rec['loss']} ({rec['stream']} batch); stopped; {where}")
                self.step += 1
                rec["tokens_per_s"] = speed.tokens_per_s  # steady state: warm-up and compilation apart
                rec["warmup_s"] = round(speed.warmup_seconds, 2)
                rec["compiles"] = compiles() - compiled_before
                rec["memory_mb"] = peak_memory_mb(self.device)
                last = rec
                if self.dist.main and (self.step % max(1, t.log_every) == 0 or self.step == self.total_steps or self.step == start + 1):
                    checkpoint.append_metrics(self.out, rec)
                    board.log(rec)
                progress.update(task, completed=self.step, status=self._status(rec))
                if t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save(False, self._summary(last, t0))
        summary = self._summary(last, t0)
        self.save(self.step >= self.total_steps, summary)
        if board is not None:
            board.close()
        self.pool.shutdown()
        leave(self.dist)
        return RunInfo(self.out, self.step, summary["final_loss"], last.get("tokens_per_s"),
                       time.perf_counter() - t0, self.total_steps, warmup_s=last.get("warmup_s"),
                       compiles=last.get("compiles"))

    def _status(self, rec: dict[str, Any]) -> str:
        speed = f"{rec['tokens_per_s']:.0f} tok/s" if rec["tokens_per_s"] is not None else "warming up"
        memory = f"  peak {rec['memory_mb'] / 1024:.1f} GB" if rec.get("memory_mb") is not None else ""
        return f"loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  {speed}{memory}"

    def _summary(self, last: dict, t0: float) -> dict[str, Any]:
        # the final loss from the whole log (steps before a --resume included): rank 0 writes it
        losses = runlog.final_losses(runlog.read_metrics(self.out / runlog.METRICS_FILE)) if self.dist.main else {}
        plan = self.checkpoint_plan
        return {"final_loss": losses, "final_loss_window": runlog.FINAL_WINDOW,
                "tokens_per_s": last.get("tokens_per_s"),  # steady state
                "warmup_s": last.get("warmup_s"), "compiles": last.get("compiles"),
                "peak_memory_mb": last.get("memory_mb"),
                "checkpointed_blocks": self.model.llama.checkpoint_blocks, "compiled_blocks": self.compiled,
                "pad_multiple": self.pad_multiple,
                "predicted_peak_mb": round(plan.peak / 2**20, 1) if plan else None,
                "seconds": round(self.seconds_before + time.perf_counter() - t0, 2), "device": str(self.device),
                "world_size": self.dist.world, "global_batch": self.global_batch, "lr": self.lr}

    # -- checkpoints -------------------------------------------------------------------------

    def tensors_to_save(self) -> dict[str, torch.Tensor]:
        """The stage's tensors and those of the artifact it continues, released names (FSDP
        shards gathered: every rank must call this)."""
        tensors = checkpoint.tensors_to_save(self.model, set(self.params) | self.initial)
        return {**tensors, **raw_clip_proj(self.model)}

    def save(self, complete: bool, summary: dict[str, Any]) -> None:
        tensors = self.tensors_to_save()  # collectives under FSDP: all ranks take part
        state = checkpoint.trainer_state(self.step, self.optimizer, self.scheduler, self.streams,
                                         feature_norm_state(self.model))
        if not self.dist.main:
            return
        # the recipe as saved: paths relative to the run directory, only the fields that apply
        saved = self.recipe.relative_paths(self.out)
        training = {**summary, "stage": self.recipe.train.stage, "step": self.step, "total_steps": self.total_steps,
                    "complete": complete, "recipe": in_effect(saved.to_dict(), continues=bool(self.initial)),
                    "data": {n: len(s.examples) for n, s in self.streams.items()},
                    "groups": dict(self.print_groups()),
                    "quantize": self.engine.config.quantize or "none"}  # a record: the adapter loads on any base
        if self.previous_stage:
            training["previous"] = self.previous_stage
        checkpoint.write(self.out, self.engine, tensors, state, training, saved, self.feature_stats)
        self.last_saved = self.step

    def _restore(self) -> None:
        checkpoint.check_resumable(self.out, self.dist.world, self.global_batch)
        state, saved = checkpoint.read(self.out)
        checkpoint.restore_tensors(self.model, saved)
        restore_feature_norm(self.model, state.get("feature_norm"), self.standardize, self.out)
        self.step = checkpoint.restore_trainer_state(state, self.optimizer, self.scheduler, self.streams)
        self.last_saved = self.step
        if self.step >= self.total_steps:
            self.already_complete = True  # run() returns at once; nothing in the run changes
            return
        self.seconds_before = checkpoint.seconds_trained(self.out)
        if self.dist.main:
            checkpoint.keep_metrics(self.out, self.step, self.log)
        self.log(f"resuming {self.out} at step {self.step} of {self.total_steps}")
        planned = checkpoint.training_record(self.out).get("total_steps")
        before = self.optimizer.param_groups[0]["lr"]  # the rate the saved schedule gives the next step
        # the rates of this run's schedule at this step (the same ones, unless its length changed)
        self.scheduler.last_epoch -= 1
        self.scheduler.step()
        if isinstance(planned, int) and planned != self.total_steps:
            self.log(f"the run was planned for {planned} steps and now has {self.total_steps}: from step "
                     f"{self.step + 1} the learning rate follows the {self.total_steps}-step schedule (its cosine "
                     f"reaches train.min_lr at step {self.total_steps}): {self.scheduler.get_last_lr()[0]:.3g} at "
                     f"step {self.step + 1}, where the {planned}-step schedule gave {before:.3g}")
