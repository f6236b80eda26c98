"""Setting a training run up, step by step (Trainer.__init__ takes them in this order):

    resolve        the recipe: the file plus --set overrides, or the run's saved one on --resume
    load_engine    recipe -> engine: a fresh adapter on a base, or an artifact to continue
    uses_bf16      precision
    (groups.py)    the stage's trainable tensors by group, and their AdamW
    make_streams   the stage's record streams
    make_schedule  the run's length; linear warmup, then a half cosine
    checkpoint_blocks  activation checkpointing (auto: the fewest blocks that fit a memory
                   budget, measured on worst_case_batches; memory.py)
    compile_blocks compiled blocks; pad_multiple buckets the batch lengths they see
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable

import torch

from lav2cli.data.dataset import Batch, Stream, collate, load_examples
from lav2cli.engine import Engine, load, resolve_device
from lav2cli.errors import Lav2Error
from lav2cli.formats import artifact, classify
from lav2cli.model.adapter import LlamaAdapterV2
from lav2cli.recipe import PATH_FIELDS, STAGE_STREAMS, Recipe, TrainSection, load_recipe
from lav2cli.train.checkpoint import RECIPE_FILE, STATE_FILE
from lav2cli.train.distributed import Dist, shard_blocks
from lav2cli.train.groups import IMAGE_TEXT, INSTRUCTION
from lav2cli.train.memory import (GB, ActivationBytes, CheckpointPlan, default_budget, fixed_bytes,
                                  plan_checkpointing)


def resolve(recipe_path: str | None, overrides: list[str], out: Path, resume: bool) -> Recipe:
    """The recipe to run: the file plus --set overrides, or on --resume the run's saved recipe."""
    if resume:
        if not (out / STATE_FILE).is_file():
            raise Lav2Error(f"--resume: {out} holds no training checkpoint ({STATE_FILE})")
        # the saved recipe's paths are relative to the run directory (Recipe.relative_paths)
        r = load_recipe(out / RECIPE_FILE, overrides, paths_from=out.resolve())
    else:
        if recipe_path is None:
            raise Lav2Error("--recipe is required (or --resume with a run directory)")
        r = load_recipe(recipe_path, overrides)
    # while it runs, paths are absolute: the recipe works whatever the current directory
    for section, key in PATH_FIELDS:
        value = getattr(getattr(r, section), key)
        if value and Path(value).expanduser().exists():
            setattr(getattr(r, section), key, str(Path(value).expanduser().resolve()))
    return r


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def load_engine(r: Recipe, d: Dist) -> tuple[Engine, set[str], dict[str, Any] | None]:
    """(engine, the parameters the continued artifact holds, its training record). The frozen
    base is bfloat16 on CUDA unless train.precision is fp32, its linears quantised as
    model.quantize says. Under FSDP the model is built on the CPU and its blocks sharded onto
    the devices: the whole base never sits on one."""
    t = r.train
    device = resolve_device(t.device if t.device != "auto" or d.world == 1 else (
        f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu"))
    fsdp = t.fsdp and d.world > 1
    load_device = "cpu" if fsdp else device
    dtype = "bfloat16" if device.type == "cuda" and t.precision != "fp32" else "float32"
    kind, path = classify(r.model.ref)
    initial: set[str] = set()
    previous = None
    if kind == "artifact":  # continue from an earlier stage: its adapter, its encoder
        engine = load(r.model.ref, base=r.model.base or None, device=load_device, dtype=dtype,
                      add_lora_rank=r.adapter.lora_rank,  # [adapter] lora_rank > 0 adds LoRA
                      quantize=r.model.quantize)
        initial = set(engine.model.from_released(artifact.load_tensors(path)))
        previous = engine.config.meta.get("training")
    else:
        engine = load(r.model.ref, device=load_device, dtype=dtype, adapter=r.adapter_config(),
                      encoder=r.encoder_spec(), quantize=r.model.quantize)
    if engine.model.adapter is None:
        raise Lav2Error(f"{r.model.ref}: nothing to train (no adapter)")
    if fsdp:
        shard_blocks(engine.model, device, d.world)
        engine.device = device
    return engine, initial, previous


def uses_bf16(t: TrainSection, device: torch.device) -> bool:
    """Whether the forward pass autocasts to bfloat16 (by default on CUDA)."""
    return t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")


def compiles_blocks(t: TrainSection, device: torch.device) -> bool:
    return t.compile == "on" or (t.compile == "auto" and device.type == "cuda")


def pad_multiple(t: TrainSection, compiled: bool) -> int:
    """Batch lengths round up to this: a compiled block then meets a few lengths, each compiled
    once, instead of a new one at most steps."""
    return t.pad_multiple or (64 if compiled else 1)


def worst_case_batches(streams: dict[str, Stream], pad_id: int, image_fn: Callable[[str], torch.Tensor] | None,
                       batch_size: int, max_tokens: int) -> list[Batch]:
    """Per stream, a micro-batch of its records padded to max_tokens with every token
    supervised: the most a step of that stream can keep for backward."""
    batches = []
    for s in streams.values():
        rows = (s.examples * -(-batch_size // len(s.examples)))[:batch_size]
        b = collate(rows, pad_id, image_fn, pad_multiple=max_tokens, max_len=max_tokens)
        batches.append(Batch(b.tokens, b.tokens.clone(), b.images, b.image_mask))
    return batches


def checkpoint_blocks(model: LlamaAdapterV2, t: TrainSection, device: torch.device, fsdp: bool,
                      measure: Callable[[], ActivationBytes], trainable: list[torch.Tensor],
                      log: Callable[[str], None]) -> tuple[int, CheckpointPlan | None]:
    """(how many blocks, from the first, recompute their activations in backward; the plan when
    grad_ckpt auto chose it). Explicit settings win: grad_ckpt off, on (all blocks) or
    grad_ckpt_blocks N. auto plans against train.memory_budget_gb, by default on CUDA only."""
    n_layers = model.config.n_layers
    if t.grad_ckpt_blocks > n_layers:
        raise Lav2Error(f"train.grad_ckpt_blocks {t.grad_ckpt_blocks}: the model has {n_layers} blocks")
    if t.grad_ckpt == "off":
        return 0, None
    if t.grad_ckpt_blocks > 0:
        return t.grad_ckpt_blocks, None
    if t.grad_ckpt == "on":
        return n_layers, None
    budget = int(t.memory_budget_gb * GB) if t.memory_budget_gb > 0 else default_budget(device)
    if budget is None:  # a CPU or MPS run without a budget: nothing to plan against
        return 0, None
    if fsdp:  # the measuring pass would gather every shard: keep the safe choice
        log("activation checkpointing: every block (FSDP: no memory plan)")
        return n_layers, None
    tensors = [*model.parameters(), *model.buffers()]
    plan = plan_checkpointing(measure(), fixed_bytes(tensors, trainable), budget)
    log(plan.describe(n_layers))
    return plan.blocks, plan


COMPILE_BACKEND = "inductor"  # torch.compile's default; tests count dynamo's graphs with "eager"


def compile_blocks(model: LlamaAdapterV2, lengths: int) -> None:
    """torch.compile each transformer block. One graph per length bucket, with and without
    images and checkpointing: the recompile limit covers them, so that none falls back to eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * lengths + 8)
    for layer in model.llama.layers:
        layer.compile(dynamic=False, backend=COMPILE_BACKEND)


def select_trainable(model: LlamaAdapterV2, groups: dict[str, list[str]]) -> dict[str, torch.nn.Parameter]:
    """The groups' tensors, by name; they alone require gradients."""
    trainable = [n for names in groups.values() for n in names]
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in trainable)
    return {n: params[n] for n in trainable}


def make_streams(r: Recipe, engine: Engine, d: Dist) -> dict[str, Stream]:
    """The stage's record streams. A stream's batch is one global micro-batch; each process
    takes its slice."""
    t, tok, tpl = r.train, engine.tokenizer, engine.template
    streams: dict[str, Stream] = {}
    for name in STAGE_STREAMS[t.stage]:
        examples = load_examples(getattr(r.data, name), tok, tpl, r.data.max_tokens)
        if name == INSTRUCTION and r.data.text:
            examples += load_examples(r.data.text, tok, tpl, r.data.max_tokens) * r.data.text_repeat
        streams[name] = Stream(name, examples, t.batch_size * d.world, t.seed + (0 if name == IMAGE_TEXT else 1))
    return streams


def image_paths(streams: dict[str, Stream]) -> list[str]:
    """Every image the streams read, once."""
    return sorted({e.image for s in streams.values() for e in s.examples if e.image})


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then a half cosine down to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_schedule(optimizer: torch.optim.Optimizer, t: TrainSection, lr: float,
                  streams: dict[str, Stream]) -> tuple[int, torch.optim.lr_scheduler.LambdaLR]:
    """(total steps, the lr schedule): train.max_steps or train.epochs over all the streams'
    batches; warmup_steps or warmup_epochs."""
    per_epoch = sum(s.batches_per_epoch for s in streams.values()) // t.grad_accum
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch))
    warm = t.warmup_steps if t.warmup_steps > 0 else round(t.warmup_epochs * per_epoch)
    min_ratio = t.min_lr / lr if lr > 0 else 0.0
    return total, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warm, total, min_ratio))
