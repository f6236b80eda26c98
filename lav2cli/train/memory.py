"""How many blocks to checkpoint: the fewest whose saved activations let a step fit a memory budget.

    measure  one forward pass of a worst-case batch (every row max_tokens long, every token
             supervised) records what autograd keeps for backward, block by block: a
             saved-tensor hook counts each storage once and lets it go when its block ends, so
             the measuring pass holds one block's activations, not all of them
    plan     predicted peak = the model's tensors + gradients and AdamW state of the trainable
             ones + what lives outside the blocks (embeddings, loss) + the activations of the
             blocks that keep theirs + the input of each checkpointed block + one block's
             working set during backward; the fewest checkpointed blocks (the first N, as the
             model checkpoints them) under the budget

Eager activations are measured; compiled blocks keep no more (the compiler's partitioner
recomputes cheap intermediates), so the prediction errs on the safe side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lav2cli.runlog import size

GB = 2**30  # binary, as the peak memory figures (memory_mb) are


@dataclass
class ActivationBytes:
    blocks: list[int]  # kept for backward by each block when it is not checkpointed
    outside: int  # kept by the rest of the forward (embeddings, visual branch, final norm, loss)
    block_input: int  # what a checkpointed block keeps: its input hidden states


@dataclass
class CheckpointPlan:
    blocks: int  # the first N blocks recompute their activations in backward
    peak: int  # predicted bytes at the step's peak
    budget: int
    fixed: int  # the model's tensors, gradients and optimiser state

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def describe(self, n_layers: int) -> str:
        what = ("no block" if self.blocks == 0 else "every block" if self.blocks == n_layers
                else f"the first {self.blocks} of {n_layers} blocks")
        why = ("the fewest whose activations fit" if self.fits
               else "even so the step may not fit")
        return (f"activation checkpointing: {what} ({why} a {size(self.budget)} budget); predicted peak "
                f"{size(self.peak)} ({size(self.fixed)} of weights and optimiser state)")



def measure_activations(model: torch.nn.Module, forward: Callable[[], object]) -> ActivationBytes:
    """Bytes autograd keeps per block of `model.llama.layers` during `forward()` (the model's
    training forward on a worst-case batch, autocast included), with no block checkpointed."""
    layers = list(model.llama.layers)
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    per_block = [0] * len(layers)
    outside = 0
    current = [-1]
    # a storage is counted once per block: held until the block ends, so that a freed one's
    # address, reused by the allocator, is not taken for the same storage
    held: list[torch.Tensor] = []
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        nonlocal outside
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in owned and key not in seen and storage.nbytes() > 0:
            seen.add(key)
            held.append(t)
            if current[0] >= 0:
                per_block[current[0]] += storage.nbytes()
            else:
                outside += storage.nbytes()
        return None  # not kept for backward: this forward is never differentiated

    def scope(i):
        def hook(*_):
            if current[0] >= 0:  # leaving a block: its activations go
                held.clear()
                seen.clear()
            current[0] = i
        return hook

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(scope(i)), layer.register_forward_hook(scope(-1)))]
    saved_blocks, model.llama.checkpoint_blocks = model.llama.checkpoint_blocks, 0
    hidden: list[torch.Tensor] = []
    grab = layers[0].register_forward_pre_hook(lambda m, args: hidden.append(args[0]))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            forward()
    finally:
        for h in (*handles, grab):
            h.remove()
        model.llama.checkpoint_blocks = saved_blocks
        held.clear()
    x = hidden[0]
    return ActivationBytes(per_block, outside, x.numel() * x.element_size())


def most_of(measured: list[ActivationBytes]) -> ActivationBytes:
    """Block by block, the most any of the measured passes (one per stream) kept."""
    return ActivationBytes([max(col) for col in zip(*(m.blocks for m in measured))],
                           max(m.outside for m in measured), max(m.block_input for m in measured))


def fixed_bytes(tensors: list[torch.Tensor], trainable: list[torch.Tensor]) -> int:
    """The tensors on the device, plus a gradient and AdamW's two moments per trainable value."""
    held = sum(t.numel() * t.element_size() for t in tensors)
    return held + sum(p.numel() * (p.element_size() + 8) for p in trainable)


def predicted_peak(act: ActivationBytes, fixed: int, blocks: int) -> int:
    """The step's peak with the first `blocks` blocks checkpointed."""
    kept = sum(act.blocks[blocks:]) + blocks * act.block_input
    working = max(act.blocks) if act.blocks else 0  # one block's activations and gradients in backward
    return fixed + act.outside + kept + working


def plan_checkpointing(act: ActivationBytes, fixed: int, budget: int) -> CheckpointPlan:
    """The fewest checkpointed blocks whose predicted peak fits the budget (all of them when
    none fits: the plan then says it may not)."""
    n_layers = len(act.blocks)
    for blocks in range(n_layers + 1):
        peak = predicted_peak(act, fixed, blocks)
        if peak <= budget:
            return CheckpointPlan(blocks, peak, budget, fixed)
    return CheckpointPlan(n_layers, predicted_peak(act, fixed, n_layers), budget, fixed)


def default_budget(device: torch.device) -> int | None:
    """On CUDA, nine tenths of what this process could hold on the device (free memory plus what
    its allocator holds already: the rest goes to fragmentation and the compiler's workspace);
    elsewhere none."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(0.9 * (free + torch.cuda.memory_reserved(device)))
