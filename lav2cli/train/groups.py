"""Which adapter tensors a stage trains, in which group, at which learning rate.

Each record stream trains its own group of whole tensors, of the same name:

    image_text   the visual branch, the gates of the fusion layers and their prompts
                 (official variant: every prompt and gate, as the release's pretraining)
    instruction  everything else: the other prompts and gates, bias, scale, norms, LoRA

The groups are disjoint, so a joint step hands AdamW only its stream's group and the other
group's tensors do not move at all.
"""

from __future__ import annotations

import torch

from lav2cli.model.adapter import FUSION_PROMPTS, LlamaAdapterV2, is_adapter_param, param_role
from lav2cli.model.config import AdapterConfig
from lav2cli.recipe import STAGE_STREAMS

IMAGE_TEXT, INSTRUCTION = "image_text", "instruction"
STAGE_GROUPS: dict[str, tuple[str, ...]] = STAGE_STREAMS  # a stream trains the group of its name


def group_of(name: str, a: AdapterConfig, n_layers: int) -> str:
    """The group that trains adapter tensor `name` (a model parameter name) of a model of
    `n_layers` layers with adapter `a` (resolved)."""
    role = param_role(name)
    if role == "visual":
        return IMAGE_TEXT
    if a.variant == "official" and role in ("prompt", "gate", "new_gate"):
        return IMAGE_TEXT
    if role == "prompt":
        return IMAGE_TEXT if name == FUSION_PROMPTS else INSTRUCTION
    if role == "gate":
        first, layer = n_layers - a.prompt_layers, int(name.split(".")[2])
        return IMAGE_TEXT if first <= layer < first + a.fusion_layers else INSTRUCTION
    return INSTRUCTION  # new gates, norms, bias, scale, LoRA


def make_groups(model: LlamaAdapterV2, stage: str) -> dict[str, list[str]]:
    """The stage's trainable tensors by group: {group: [parameter name, ...]}."""
    groups: dict[str, list[str]] = {grp: [] for grp in STAGE_GROUPS[stage]}
    for name, _ in model.named_parameters():
        if is_adapter_param(name) and (grp := group_of(name, model.adapter, model.config.n_layers)) in groups:
            groups[grp].append(name)
    return groups


def lr_kind(name: str) -> str:
    """Which lr multiplier a trainable tensor takes: visual, lora or adjust (1)."""
    role = param_role(name)
    return role if role in ("visual", "lora") else "adjust"


def make_optimizer(params: dict[str, torch.nn.Parameter], lr: float, weight_decay: float, betas, fused: bool,
                   visual_lr_scale: float = 1.0, lora_lr_scale: float = 1.0) -> torch.optim.AdamW:
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
