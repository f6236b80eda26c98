"""Several processes under torchrun: each takes its slice of every global batch; gradients are
summed over the processes. With FSDP2 the frozen base's blocks are sharded across them."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lav2cli.model.adapter import LlamaAdapterV2


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_hint: str) -> Dist:
    """Join the process group torchrun set up (one process: nothing to join)."""
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


def leave(d: Dist) -> None:
    """Leave together and tear the process group down: a rank that exits with gloo's threads
    still running aborts ("terminate called without an active exception")."""
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """The main process runs the block first (it writes a file, say); the others wait, then run it."""
    if d.world > 1 and not d.main:
        dist.barrier()
    yield
    if d.world > 1 and d.main:
        dist.barrier()


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


def sum_grads(params: list[torch.Tensor], d: Dist) -> None:
    """Each gradient summed over the processes (every process calls this with the same tensors)."""
    if d.world <= 1:
        return
    for p in params:
        if isinstance(p, DTensor):  # FSDP reduce-scattered it as a mean; we want the sum
            if p.grad is not None:
                p.grad.mul_(d.world)
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, d: Dist) -> float:
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
