"""`lav2 train`: the stages `pretrain`, `finetune` and `joint` in one readable loop.

    setup    recipe -> engine (frozen base + adapter) -> parameter groups -> data streams
             -> AdamW + warmup/cosine schedule; on --resume also their saved states
    train    per step: pick the stream (joint), forward/backward over micro-batches, hand
             only this stream's group to AdamW (others get grad None: they do not move),
             clip, step, log
    save     every N steps and at the end: the adapter artifact plus the trainer state,
             one atomic directory swap

Parameter groups (spec section 5): `image_text` = visual branch + the gates of the visual
layers (+ their prompt rows); `instruction` = the other prompts and gates, bias, scale,
norms, LoRA. `group_of` is the one predicate deciding it, for both variants.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lav2cli.data.dataset import Batch, Stream, collate, load_examples
from lav2cli.engine import Engine, load, resolve_device
from lav2cli.errors import Lav2Error
from lav2cli.formats import artifact
from lav2cli.model.adapter import LlamaAdapterV2, is_adapter_param, param_role
from lav2cli.model.config import AdapterConfig
from lav2cli.model.vision import load_image
from lav2cli.recipe import Recipe, load_recipe
from lav2cli.templates import IGNORE_INDEX

IMAGE_TEXT, INSTRUCTION = "image_text", "instruction"
STAGE_GROUPS = {"pretrain": (IMAGE_TEXT,), "finetune": (INSTRUCTION,), "joint": (IMAGE_TEXT, INSTRUCTION)}
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.toml"



# -- parameter groups --------------------------------------------------------------------------


def group_of(name: str, a: AdapterConfig, n_layers: int) -> str:
    """Which group trains adapter tensor `name`. `adapter_query.weight` of the paper variant is
    split by rows (see prompt_rows); this returns the group of its late rows."""
    role = param_role(name)
    if role == "visual":
        return IMAGE_TEXT
    if role == "prompt":
        return IMAGE_TEXT if a.variant == "official" else INSTRUCTION
    if role in ("gate", "new_gate"):
        if a.variant == "official":  # the release's pretraining trains every gate
            return IMAGE_TEXT
        first, layer = n_layers - a.prompt_layers, int(name.split(".")[2])
        return IMAGE_TEXT if role == "gate" and first <= layer < first + a.fusion_layers else INSTRUCTION
    return INSTRUCTION  # norms, bias, scale, LoRA


def prompt_rows(a: AdapterConfig) -> dict[str, slice] | None:
    """Paper variant: adapter_query rows of the visual (early) prompt layers train with the
    image-text group, the rest with the instruction group."""
    if a.variant == "official" or a.fusion_layers in (0, a.prompt_layers):
        return None
    k = a.fusion_layers * a.prompt_len
    return {IMAGE_TEXT: slice(0, k), INSTRUCTION: slice(k, a.prompt_layers * a.prompt_len)}


@dataclass
class Groups:
    """The stage's trainable tensors by group; `split` holds row-split tensors."""

    names: dict[str, list[str]] = field(default_factory=dict)
    split: dict[str, dict[str, slice]] = field(default_factory=dict)  # tensor -> group -> rows

    def trainable(self) -> list[str]:
        out: list[str] = []
        for names in self.names.values():
            out += [n for n in names if n not in out]
        return out


def make_groups(model: LlamaAdapterV2, stage: str) -> Groups:
    a, n = model.adapter, model.config.n_layers
    g = Groups({grp: [] for grp in STAGE_GROUPS[stage]})
    rows = prompt_rows(a)
    for name, _ in model.named_parameters():
        if not is_adapter_param(name):
            continue
        if name == "adapter_query.weight" and rows is not None:
            g.split[name] = {grp: rows[grp] for grp in STAGE_GROUPS[stage]}
            for grp in STAGE_GROUPS[stage]:
                g.names[grp].append(name)
            continue
        grp = group_of(name, a, n)
        if grp in g.names:
            g.names[grp].append(name)
    return g


# -- optimiser and schedule ----------------------------------------------------------------------


def make_optimizer(params: dict[str, torch.nn.Parameter], lr: float, weight_decay: float, betas, fused: bool,
                   visual_lr_scale: float = 1.0, lora_lr_scale: float = 1.0):
    """AdamW; no decay for 1-D tensors and biases (as the release). The tensors that start from
    scratch may take a larger lr than those that adjust a pretrained model: the visual branch
    (`visual_lr_scale`) and the LoRA pairs (`lora_lr_scale`; a zero-initialised product moves
    slowly at first)."""
    groups = []
    for kind, scale in (("adjust", 1.0), ("visual", visual_lr_scale), ("lora", lora_lr_scale)):
        chosen = {n: p for n, p in params.items() if lr_kind(n) == kind}
        decay = [p for n, p in chosen.items() if p.dim() >= 2 and not n.endswith(".bias")]
        no_decay = [p for n, p in chosen.items() if p.dim() < 2 or n.endswith(".bias")]
        groups += [{"params": ps, "weight_decay": wd, "lr": lr * scale}
                   for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def lr_kind(name: str) -> str:
    """Which lr multiplier a trainable tensor takes: visual, lora or adjust (1)."""
    role = param_role(name)
    return role if role in ("visual", "lora") else "adjust"


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then a half cosine down to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- distributed -------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_hint: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    use_cuda = torch.cuda.is_available() and device_hint != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
    return d


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard_blocks(model: LlamaAdapterV2, device: torch.device, world: int) -> None:
    """FSDP2: shard every transformer block (the frozen base lives there) across the processes;
    the small top-level tensors (embeddings, prompts, visual branch) stay whole on each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in model.llama.layers:
        fully_shard(layer, mesh=mesh)
    model.to(device)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP shard (a collective), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `ref`: sharded the same way when ref is an FSDP shard."""
    if isinstance(ref, DTensor):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements)
    return value


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, d: "Dist") -> float:
    """Clip the gradients' global L2 norm (FSDP shards summed over ranks); returns the norm."""
    plain = torch.zeros((), dtype=torch.float32)
    sharded = torch.zeros((), dtype=torch.float32)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        if isinstance(g, DTensor):
            sharded = sharded.to(g.device) + g.to_local().float().pow(2).sum()
        else:
            plain = plain.to(g.device) + g.float().pow(2).sum()
    if d.world > 1 and any(isinstance(g, DTensor) for g in grads):
        dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
    norm = float((plain.cpu() + sharded.cpu()).sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


# -- images ------------------------------------------------------------------------------------


def feature_cache(engine: Engine, paths: list[str], log: Callable[[str], None]) -> Callable[[str], torch.Tensor]:
    """Encoder features for every image, computed once into a memory-mapped fp16 array on disk
    (keyed by the encoder, the preprocessing and the images' paths, sizes and times) and read
    back lazily: neither encoding nor training holds all features in RAM."""
    import hashlib

    import numpy as np

    from lav2cli.fileio import cache_root

    paths = sorted(set(paths))
    encoder = getattr(engine.model, "clip", None)
    shape = getattr(encoder, "token_layout", None)  # how the encoder turns maps into tokens
    h = hashlib.sha256(json.dumps([engine.config.encoder, engine.config.preprocess.to_dict(), shape]).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    f = cache_root() / "features" / f"{h.hexdigest()[:32]}.npy"
    if f.is_file():
        log(f"image features: {len(paths)} images from the cache {f}")
    else:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npy")  # written aside, renamed when complete
        try:
            encode_all(engine, paths, tmp)
            os.replace(tmp, f)
        finally:
            tmp.unlink(missing_ok=True)
        log(f"image features: {len(paths)} images encoded and cached in {f}")
    feats = np.load(f, mmap_mode="r")
    index = {p: i for i, p in enumerate(paths)}
    return lambda p: torch.from_numpy(np.array(feats[index[p]], dtype=np.float32))


FEATURE_STATS_IMAGES = 1024


@torch.no_grad()
def feature_stats(model: LlamaAdapterV2, image_fn: Callable[[str], torch.Tensor], paths: list[str],
                  device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and 1/std of the encoder's tokens over a fixed sample of the training
    images (`train.standardize_features`). Centring matters most: on easy-VQA every channel's
    mean (the white background) is several times its spread, and a projection of raw features
    spends its updates on that constant."""
    paths = sorted(set(paths))
    paths = random.Random(seed).sample(paths, min(FEATURE_STATS_IMAGES, len(paths)))
    total, squares, n = 0.0, 0.0, 0
    for i in range(0, len(paths), 64):
        x = torch.stack([image_fn(p) for p in paths[i:i + 64]]).to(device)
        f = model.encode_images(x).double().flatten(0, -2)  # [images x tokens, channels]
        total, squares, n = total + f.sum(0), squares + (f * f).sum(0), n + f.shape[0]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt()
    std = std.clamp_min(1e-3 * float(std.max()) + 1e-12)  # a dead channel is not blown up
    return mean.float().cpu(), std.reciprocal().float().cpu()


@torch.no_grad()
def encode_all(engine: Engine, paths: list[str], out: Path, batch: int = 64) -> None:
    """Encode every image into the .npy file `out` ([N, tokens, dim] fp16), batch by batch."""
    import numpy as np
    from rich.console import Console
    from rich.progress import Progress

    array = None
    with Progress(console=Console(stderr=True), transient=True) as bar, ThreadPoolExecutor(4) as pool:
        task = bar.add_task("encoding images", total=len(paths))
        for i in range(0, len(paths), batch):
            ims = list(pool.map(load_image, paths[i:i + batch]))
            feats = engine.model.encode_images(engine.image_tensor(ims)).to("cpu", torch.float16).numpy()
            if array is None:
                array = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=(len(paths), *feats.shape[1:]))
            array[i:i + len(ims)] = feats
            bar.advance(task, len(ims))
    array.flush()
    del array


# -- the trainer -------------------------------------------------------------------------------


@dataclass
class RunInfo:
    out: Path
    steps: int
    final_loss: float
    tokens_per_s: float
    seconds: float


class Trainer:
    def __init__(self, recipe: Recipe, out: Path, resume: bool, log: Callable[[str], None], show_progress: bool = True):
        self.recipe, self.out, self.log, self.show_progress = recipe, out, log, show_progress
        r, t = recipe, recipe.train
        self.dist = init_distributed(t.device)
        torch.manual_seed(t.seed)
        random.seed(t.seed)

        # -- setup: model ----------------------------------------------------------------------
        device = resolve_device(t.device if t.device != "auto" or self.dist.world == 1 else (
            f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"))
        from lav2cli.engine import classify_ref

        # FSDP: build on the CPU, then shard the blocks onto the devices (never the whole base on one)
        self.fsdp = t.fsdp and self.dist.world > 1
        load_device = "cpu" if self.fsdp else device
        dtype = "bfloat16" if device.type == "cuda" and t.precision != "fp32" else "float32"  # of the frozen base
        kind, _ = classify_ref(r.model.ref)
        self.previous_stage = None  # the training record of the artifact this run continues
        if kind == "artifact":  # continue from an earlier stage: its adapter, its encoder
            self.engine = load(r.model.ref, base=r.model.base or None, device=load_device, dtype=dtype,
                               add_lora_rank=r.adapter.lora_rank)  # [adapter] lora_rank > 0 adds LoRA
            self.initial = set(artifact.load_tensors(Path(r.model.ref)))
            self.previous_stage = self.engine.config.meta.get("training")
        else:
            self.engine = load(r.model.ref, device=load_device, dtype=dtype, adapter=r.adapter_config(),
                               encoder=r.encoder_spec())
            self.initial = set()
        eng = self.engine
        if eng.model.adapter is None:
            raise Lav2Error(f"{r.model.ref}: nothing to train (no adapter)")
        if self.fsdp:
            shard_blocks(eng.model, device, self.dist.world)
            eng.device = device
        self.device = eng.device
        self.model = eng.model.train()
        cuda = self.device.type == "cuda"
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda)
        n_layers = self.model.config.n_layers
        if t.grad_ckpt_blocks > n_layers:
            raise Lav2Error(f"train.grad_ckpt_blocks {t.grad_ckpt_blocks}: the model has {n_layers} blocks")
        if t.grad_ckpt == "on" or (t.grad_ckpt == "auto" and cuda):
            self.model.llama.checkpoint_blocks = t.grad_ckpt_blocks or n_layers
        if t.compile:
            for layer in self.model.llama.layers:
                layer.compile()

        # -- setup: groups and optimiser ---------------------------------------------------------
        self.groups = make_groups(self.model, t.stage)
        params = dict(self.model.named_parameters())
        trainable = self.groups.trainable()
        for n, p in params.items():
            p.requires_grad_(n in trainable)
        self.params = {n: params[n] for n in trainable}
        self.global_batch = t.batch_size * t.grad_accum * self.dist.world
        self.lr = t.base_lr * self.global_batch / 256
        self.optimizer = make_optimizer(self.params, self.lr, t.weight_decay, t.betas, fused=cuda,
                                        visual_lr_scale=t.visual_lr_scale, lora_lr_scale=t.lora_lr_scale)

        # -- setup: data -----------------------------------------------------------------------
        tok, tpl = eng.tokenizer, eng.template
        micro = t.batch_size * self.dist.world  # one global micro-batch; each rank takes its slice
        self.streams: dict[str, Stream] = {}
        for grp in STAGE_GROUPS[t.stage]:
            path = getattr(r.data, grp)
            ex = load_examples(path, tok, tpl, r.data.max_tokens)
            if grp == INSTRUCTION and r.data.text:
                ex += load_examples(r.data.text, tok, tpl, r.data.max_tokens) * r.data.text_repeat
            self.streams[grp] = Stream(grp, ex, micro, t.seed + (0 if grp == IMAGE_TEXT else 1))
        # every image the streams read, once: the feature cache and the feature statistics use it
        self.image_paths = sorted({e.image for s in self.streams.values() for e in s.examples if e.image})
        self.image_fn = self._image_fn()
        self.pool = ThreadPoolExecutor(max(1, r.data.workers))  # decodes a batch's images in parallel
        per_epoch = sum(s.batches_per_epoch for s in self.streams.values()) // t.grad_accum
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch))
        warm = t.warmup_steps if t.warmup_steps > 0 else round(t.warmup_epochs * per_epoch)
        min_ratio = t.min_lr / self.lr if self.lr > 0 else 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warm, self.total_steps, min_ratio))
        self.step = 0
        self.last_saved = -1
        self.seconds_before = 0.0  # training time of the run before a --resume
        self.standardize = t.standardize_features and "clip_proj.weight" in self.params and self.image_fn is not None
        if t.standardize_features and not self.standardize:
            self.log("train.standardize_features: no visual branch trains in this run, nothing to standardise")
        if resume:
            self._restore()
        elif self.standardize:
            stats = feature_stats(self.model, self.image_fn, self.image_paths, self.device, seed=t.seed)
            n = min(len(self.image_paths), FEATURE_STATS_IMAGES)
            if "clip_proj.weight" in self.initial:  # trained by the source artifact: same function, new coordinates
                self.model.standardize_trained_clip_proj(*stats)
                self.log(f"features standardised per channel (statistics of {n} training images); "
                         f"the source artifact's clip_proj re-expressed on them")
            else:
                self.model.feature_norm = stats
                self.log(f"features standardised per channel (statistics of {n} training images)")

    # -- helpers -----------------------------------------------------------------------------

    def _image_fn(self) -> Callable[[str], torch.Tensor] | None:
        eng = self.engine
        if not eng.model.has_visual or eng.image_transform is None:
            return None
        paths = self.image_paths
        if not paths:
            return None
        if self.recipe.data.feature_cache:
            shared = self.dist.world > 1  # rank 0 encodes and writes the cache; the others then read it
            if shared and not self.dist.main:
                dist.barrier()
            read = feature_cache(eng, paths, self.log if self.dist.main else (lambda m: None))
            if shared and self.dist.main:
                dist.barrier()
            return read
        transform = eng.image_transform
        return lambda p: transform(load_image(p))

    def pick_stream(self, step: int) -> str:
        names = list(self.streams)
        if len(names) == 1:
            return names[0]
        ratio = self.recipe.data.image_text_ratio
        return IMAGE_TEXT if random.Random(f"{self.recipe.train.seed}:stream:{step}").random() < ratio else INSTRUCTION

    def print_groups(self) -> list[tuple[str, int]]:
        rows = []
        for grp, names in self.groups.names.items():
            n = 0
            for name in names:
                p = self.params[name]
                sl = self.groups.split.get(name, {}).get(grp)
                n += p[sl].numel() if sl is not None else p.numel()
            rows.append((grp, n))
        return rows

    # -- one step ----------------------------------------------------------------------------

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
            micro.append(collate(mine, self.engine.tokenizer.pad_id, self.image_fn, self.pool.map))
        n_tok = torch.tensor(float(sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in micro)))
        total_tok = all_reduce_sum(n_tok.to(self.device), d).item()
        loss_total = torch.zeros((), device=self.device)
        for b in micro:
            b = b.to(self.device, self.engine.dtype)
            loss, _ = self.loss_sum(b)
            (loss / total_tok).backward()
            loss_total += loss.detach()
        mine = set(self.groups.names[grp])
        for n, p in self.params.items():
            if n not in mine:
                p.grad = None  # the other group does not move at all on this step
        active = [p for n, p in self.params.items() if n in mine]
        if d.world > 1:
            for p in active:
                if isinstance(p, DTensor):  # FSDP reduce-scattered it as a mean; we want the sum
                    if p.grad is not None:
                        p.grad.mul_(d.world)
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        for p, mask in self._other_rows(grp):
            if p.grad is not None:
                p.grad[mask] = 0  # those rows are restored after the step: keep them out of the norm
        gnorm = clip_grad_norm(active, t.grad_clip, d) if t.grad_clip > 0 else 0.0
        kept = self._snapshot_other_rows(grp)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.optimizer.step()
        self._restore_rows(kept)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_mean = all_reduce_sum(loss_total, d).item() / max(total_tok, 1.0)
        n_tokens = all_reduce_sum(torch.tensor(float(sum(b.tokens.numel() for b in micro)), device=self.device), d).item()
        return {"step": step + 1, "stream": grp, "loss": loss_mean, "lr": lr,
                "grad_norm": gnorm, "tokens": int(n_tokens), "supervised_tokens": int(total_tok)}

    def _other_rows(self, grp: str):
        """(tensor, row mask) for each row-split tensor's rows that belong to another group."""
        for name, by_group in self.groups.split.items():
            p = self.params[name]
            mask = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
            if by_group.get(grp) is not None:
                mask[by_group[grp]] = False
            if mask.any():
                yield p, mask

    def _snapshot_other_rows(self, grp: str) -> list:
        """Rows of a row-split tensor that belong to another group: keep value and AdamW state.
        (AdamW's step count of the tensor is shared by its groups: a documented approximation.)"""
        kept = []
        for p, mask in self._other_rows(grp):
            state = self.optimizer.state.get(p, {})
            saved = {k: v[mask].clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape}
            kept.append((p, mask, p.detach()[mask].clone(), saved))
        return kept

    def _restore_rows(self, kept: list) -> None:
        with torch.no_grad():
            for p, mask, value, saved in kept:
                p[mask] = value
                for k, v in saved.items():
                    self.optimizer.state[p][k][mask] = v

    # -- checkpoints ---------------------------------------------------------------------------

    def tensors_to_save(self) -> dict[str, torch.Tensor]:
        """Full tensors (FSDP shards gathered: every rank must call this)."""
        keep = set(self.params) | self.initial
        tensors = {n: full_tensor(p.detach()) for n, p in self.model.named_parameters() if n in keep}
        if self.model.feature_norm is not None:  # saved as a plain projection of raw features
            tensors.update(self.model.folded_clip_proj())
        return tensors

    def save(self, complete: bool, summary: dict[str, Any]) -> None:
        tensors = self.tensors_to_save()  # collectives under FSDP: all ranks take part
        opt_state = self.optimizer.state_dict()
        opt_state = {**opt_state, "state": {i: {k: full_tensor(v) for k, v in st.items()}
                                            for i, st in opt_state["state"].items()}}
        if not self.dist.main:
            return
        state = {
            "step": self.step,
            "optimizer": opt_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "streams": {n: s.state() for n, s in self.streams.items()},
        }
        if self.model.feature_norm is not None:  # resume from the unfolded projection: exact
            mean, inv_std = self.model.feature_norm
            state["feature_norm"] = {"mean": mean, "inv_std": inv_std,
                                     **{n: p.detach().cpu() for n, p in self.model.clip_proj.named_parameters()}}
        buf = io.BytesIO()
        torch.save(state, buf)
        metrics = (self.out / METRICS_FILE).read_bytes() if (self.out / METRICS_FILE).exists() else b""
        training = {**summary, "stage": self.recipe.train.stage, "step": self.step, "total_steps": self.total_steps,
                    "complete": complete, "recipe": self.recipe.to_dict(),
                    "data": {n: len(s.examples) for n, s in self.streams.items()},
                    "groups": dict(self.print_groups())}
        if self.previous_stage:
            training["previous"] = self.previous_stage
        # caption_context marks the artifact; otherwise the mark of the artifact continued stays
        self.engine.save_adapter(self.out, training=training, tensors=tensors,
                                 self_caption=self.recipe.data.caption_context or None,
                                 extra_files={STATE_FILE: buf.getvalue(), METRICS_FILE: metrics,
                                              RECIPE_FILE: self.recipe.render_toml().encode()})
        self.last_saved = self.step

    def _restore(self) -> None:
        f = self.out / STATE_FILE
        if not f.is_file():
            raise Lav2Error(f"{self.out}: no {STATE_FILE} to resume from")
        state = torch.load(f, map_location="cpu", weights_only=True)
        saved = artifact.load_tensors(self.out)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in saved:
                    p.copy_(like(saved[n].to(p.dtype), p))
        norm = state.get("feature_norm")
        if (norm is not None) != self.standardize:
            raise Lav2Error(f"{self.out}: train.standardize_features differs from the run being resumed")
        if norm is not None:
            self.model.feature_norm = (norm["mean"], norm["inv_std"])
            with torch.no_grad():
                for n, p in self.model.clip_proj.named_parameters():
                    p.copy_(norm[n].to(p))
        opt = state["optimizer"]
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt["state"] = {i: {k: like(v, order[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in st.items()}
                        for i, st in opt["state"].items()}
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        for n, s in state["streams"].items():
            self.streams[n].restore(s)
        self.step = int(state["step"])
        self.last_saved = self.step
        self.seconds_before = float(artifact.read_meta(self.out).get("training", {}).get("seconds") or 0.0)
        lines = (self.out / METRICS_FILE).read_text().splitlines() if (self.out / METRICS_FILE).exists() else []
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        if self.dist.main:
            (self.out / METRICS_FILE).write_text("".join(ln + "\n" for ln in keep))
        self.log(f"resuming {self.out} at step {self.step} of {self.total_steps}")

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> RunInfo:
        """Train to the end (or checkpoint and return after `stop_after` steps in total; the
        schedule stays that of the full run, so --resume continues it exactly)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        t = self.recipe.train
        end = min(self.total_steps, stop_after) if stop_after else self.total_steps
        start, t0, tokens, last = self.step, time.perf_counter(), 0, {}
        from rich.console import Console

        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                            disable=not (self.show_progress and self.dist.main), transient=False,
                            console=Console(stderr=True))  # stdout carries only the run directory
        with progress:
            task = progress.add_task(f"train {t.stage}", total=self.total_steps, completed=start, status="")
            while self.step < end:
                rec = self.train_step(self.step)
                if not math.isfinite(rec["loss"]):
                    where = (f"the last good checkpoint (step {self.last_saved}) is in {self.out}"
                             if self.last_saved >= 0 else "no checkpoint was written")
                    raise Lav2Error(f"step {rec['step']}: loss is {rec['loss']} ({rec['stream']} batch); stopped; {where}")
                self.step += 1
                tokens += rec["tokens"]
                elapsed = time.perf_counter() - t0
                rec["tokens_per_s"] = round(tokens / elapsed, 1) if elapsed > 0 else 0.0
                last = rec
                if self.dist.main and (self.step % max(1, t.log_every) == 0 or self.step == self.total_steps or self.step == start + 1):
                    with open(self.out / METRICS_FILE, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                progress.update(task, completed=self.step,
                                status=f"loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  {rec['tokens_per_s']:.0f} tok/s")
                if t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save(False, self._summary(last, tokens, t0))
        self.save(self.step >= self.total_steps, self._summary(last, tokens, t0))
        self.pool.shutdown()
        if self.dist.world > 1:
            # leave together and tear the process group down: a rank that exits with gloo's
            # threads still running aborts ("terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()
        return RunInfo(self.out, self.step, last.get("loss", float("nan")), last.get("tokens_per_s", 0.0),
                       time.perf_counter() - t0)

    def _summary(self, last: dict, tokens: int, t0: float) -> dict[str, Any]:
        return {"final_loss": last.get("loss"), "tokens_per_s": last.get("tokens_per_s"),
                "seconds": round(self.seconds_before + time.perf_counter() - t0, 2), "device": str(self.device),
                "world_size": self.dist.world, "global_batch": self.global_batch, "lr": self.lr}


def prepare_out(out: Path, resume: bool, force: bool) -> None:
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


def resolve(recipe_path: str | None, overrides: list[str], out: Path, resume: bool) -> Recipe:
    """The recipe to run: the file plus --set overrides, or on --resume the run's saved recipe."""
    if resume:
        if not (out / STATE_FILE).is_file():
            raise Lav2Error(f"--resume: {out} holds no training checkpoint ({STATE_FILE})")
        return load_recipe(out / RECIPE_FILE, overrides)
    if recipe_path is None:
        raise Lav2Error("--recipe is required (or --resume with a run directory)")
    r = load_recipe(recipe_path, overrides)
    # the saved recipe must work from any directory: paths become absolute
    for section, key in (("model", "ref"), ("model", "base"), ("data", "image_text"), ("data", "instruction"),
                         ("data", "text")):
        value = getattr(getattr(r, section), key)
        if value and Path(value).expanduser().exists():
            setattr(getattr(r, section), key, str(Path(value).expanduser().resolve()))
    return r
