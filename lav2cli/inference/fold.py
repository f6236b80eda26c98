"""Folding an adapter into plain weights, written once for inference and for `lav2 merge`.

An adapted linear computes y = s * ((W + B A) x + b) (LoRA A = `lora_<name>_l1`, in -> r, and
B = `lora_<name>_l2`, r -> out); the plain linear that equals it is W' = diag(s) (W + B A),
b' = s b (`folded_linear`). `fold_for_inference` writes it into a loaded model, so that decoding
runs one F.linear per linear; `folded_base` returns it as a base state dict for `lav2 merge`, and
`sidecar` what does not fold (prompts, gates, visual branch).

The adaption prompts' keys and values never saw the token path's LoRA. Once LoRA is folded into a
prompt layer's wk/wv, a prompt-only pair (A, -diag(s) B) takes it back out of the prompt path:
s (W + B A) p + s b - s B A p = s (W p + b)  (`prompt_only_pair`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lav2cli.model.adapter import FOLDED_ROLES, AdaptedAttention, LlamaAdapterV2, param_role
from lav2cli.model.config import LINEAR_MODULES, AdapterConfig
from lav2cli.model.quant import pack_for_decoding


def gates_open(model: LlamaAdapterV2, fusion_only: bool = False) -> bool:
    """True when some adaption prompt's gate is non-zero (trained), so that the prompts change what
    the model computes; with `fusion_only`, only in the layers whose prompts carry the image."""
    a = model.adapter
    if a is None or a.prompt_layers == 0:
        return False
    first = model.config.n_layers - a.prompt_layers
    end = first + a.fusion_layers if fusion_only else model.config.n_layers
    return any(bool(model.llama.layers[i].attention.gate.detach().abs().sum() > 0) for i in range(first, end))


def _f32(p: torch.Tensor) -> torch.Tensor:
    return p.detach().float()


def folded_linear(parent: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 (W', b') of the plain linear that equals `parent`'s adapted linear `name` with its
    LoRA pair, if any: W' = diag(s) (W + B A), b' = s b."""
    lin = getattr(parent, name)
    w = _f32(lin.dense_weight())  # a quantised base: the dequantised weight the adapter was applied to
    if parent.lora_rank:
        w = w + _f32(getattr(parent, f"lora_{name}_l2").weight) @ _f32(getattr(parent, f"lora_{name}_l1").weight)
    b = _f32(lin.bias) if lin.bias is not None else None
    if lin.scale is not None:
        s = _f32(lin.scale)
        w = s[:, None] * w
        b = s * b if b is not None else None
    return w, b


def prompt_only_pair(att: AdaptedAttention, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float32 (l1, l2) of the prompt-only LoRA pair that wk or wv (`name`) needs once
    `folded_linear` replaces it: the pair it already carries (its output now scaled by s, like W),
    stacked with (A, -diag(s) B), which takes the token path's LoRA back out. None: neither."""
    s = getattr(att, name).scale
    s = _f32(s)[:, None] if s is not None else 1.0
    l1s, l2s = [], []
    if att.prompt_lora:
        l1s.append(_f32(getattr(att, f"prompt_lora_{name}_l1").weight))
        l2s.append(s * _f32(getattr(att, f"prompt_lora_{name}_l2").weight))
    if att.lora_rank:
        l1s.append(_f32(getattr(att, f"lora_{name}_l1").weight))
        l2s.append(-s * _f32(getattr(att, f"lora_{name}_l2").weight))
    if not l1s:
        return None
    return torch.cat(l1s, 0), torch.cat(l2s, 1)


# -- inference -----------------------------------------------------------------------------------


def _give_prompts_their_pairs(att: AdaptedAttention) -> None:
    """Before wk/wv fold their LoRA: their prompt path gets the pair that takes it back out."""
    pairs = {name: prompt_only_pair(att, name) for name in ("wk", "wv")}
    for name, pair in pairs.items():
        for suffix, w in zip(("l1", "l2"), pair):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=att.wk.weight_dtype)
            lin.weight.data.copy_(w)
            setattr(att, f"prompt_lora_{name}_{suffix}", lin.requires_grad_(False))
    att.prompt_lora = True


@torch.no_grad()
def fold_for_inference(model: LlamaAdapterV2) -> int:
    """Fold each scale and LoRA pair into its frozen weight and bias (`folded_linear`), so that an
    adapted linear is one F.linear again and eager decoding runs fewer small ops per token. A prompt
    layer's wk/wv whose LoRA folds get the prompt-only pair that takes it back out, as `lav2 merge`
    writes it. LoRA folds only into float32 weights (in bf16 the sum W + B A would round the pair
    away); linears that already carry a prompt-only pair keep theirs unfolded. Quantised linears
    fold nothing: their scale and LoRA stay as trained on top of the quantised weight (folding
    them in would move the weight off the grid it was quantised to, and an adapter trained on a
    quantised base would no longer compute what it trained). Inference only: the model cannot be
    trained or saved afterwards. Returns the number of linears folded."""
    folded = 0
    a = model.adapter
    first_prompt_layer = model.config.n_layers - a.prompt_layers if a is not None else 0
    for layer in model.llama.layers if a is not None else ():
        for mod in ("attention", "feed_forward"):
            parent = getattr(layer, mod)
            names = [n for n, m in LINEAR_MODULES.items() if m == mod]
            lora = parent.lora_rank
            first = getattr(parent, names[0])
            if getattr(parent, "prompt_lora", False) or first.quantized is not None \
                    or (lora and first.weight.dtype != torch.float32):
                continue
            if lora and mod == "attention" and parent.layer_id >= first_prompt_layer:
                _give_prompts_their_pairs(parent)
            for name in names:
                lin = getattr(parent, name)
                if lin.scale is None and not lora:
                    continue
                w, b = folded_linear(parent, name)
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
                lin.scale = None
                folded += 1
            parent.lora_rank = 0  # the pairs are in the weights now
    model.folded_for_inference = True
    return folded


@torch.no_grad()
def lay_out_for_cpu_decoding(model: LlamaAdapterV2) -> int:
    """Store the frozen base's float32 linear weights and head column-major on CPU: still
    [out, in], with strides (1, out). F.linear multiplies by W^T, which is then a contiguous
    matrix, and MKL reads it faster one row at a time (a decoding step reads every weight once).
    bf16 weights read faster row-major, and CUDA weights are left as they are. Values are
    unchanged. Returns the number of weights moved."""
    lookup_only = () if model.config.tie_embeddings else ("llama.tok_embeddings.weight",)  # tied: the head
    moved = 0
    for name, w in model.named_parameters():
        if param_role(name) != "base" or name in lookup_only:
            continue
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.stride(0) != 1:
            w.data = w.data.t().contiguous().t()
            moved += 1
    return moved


def prepare_for_inference(model: LlamaAdapterV2) -> tuple[int, int]:
    """What `ask`, `eval` and `bench decode` run on a loaded model: the CPU layout, then the fold
    (which so writes into the layout's fresh copies, not into memory-mapped weights), then the
    fused kernels' layouts for a quantised base (`model.quant.pack_for_decoding`).
    Returns (linears folded, weights moved)."""
    moved = lay_out_for_cpu_decoding(model)
    folded = fold_for_inference(model)
    pack_for_decoding(model)
    return folded, moved


# -- lav2 merge ----------------------------------------------------------------------------------


def folded_base(model: LlamaAdapterV2) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The folded base of an adapted model (Meta names, float32, on the model's device; the
    trained norms replace the base's) and the list of what was folded in (for the report)."""
    llama = model.llama
    a = model.adapter
    sd: dict[str, torch.Tensor] = {"tok_embeddings.weight": _f32(llama.tok_embeddings.weight)}
    if not model.config.tie_embeddings:
        sd["output.weight"] = _f32(llama.output.weight)
    sd["norm.weight"] = _f32(llama.norm.weight)
    kinds: set[str] = set()
    for i, layer in enumerate(llama.layers):
        sd[f"layers.{i}.attention_norm.weight"] = _f32(layer.attention_norm.weight)
        sd[f"layers.{i}.ffn_norm.weight"] = _f32(layer.ffn_norm.weight)
        for name, mod in LINEAR_MODULES.items():
            parent = getattr(layer, mod)
            lin = getattr(parent, name)
            if parent.lora_rank:
                kinds.add("LoRA")
            if lin.scale is not None:
                kinds.add("scale")
            w, b = folded_linear(parent, name)  # merge refuses a model without an adapter: every linear is adapted
            sd[f"layers.{i}.{mod}.{name}.weight"] = w
            if b is not None:
                sd[f"layers.{i}.{mod}.{name}.bias"] = b
                if a is not None and a.biased(name):
                    kinds.add("bias")
    if a is not None:
        kinds.add("norms")
    order = ["bias", "scale", "LoRA", "norms"]
    return sd, [k for k in order if k in kinds]


def sidecar(model: LlamaAdapterV2) -> tuple[AdapterConfig | None, dict[str, torch.Tensor], list[str]]:
    """(adapter config, tensors, description) of what does not fold beside `folded_base`; (None,
    {}, []) when the adapter is only bias, scale, LoRA and norms (or its prompts are inert: every
    gate 0). Its config has bias, scale and LoRA off: the token path is plain F.linear(x, W, b)."""
    a = model.adapter
    if not gates_open(model):
        return None, {}, []
    n, L = model.config.n_layers, a.prompt_layers
    tensors = {k: v.float() for k, v in model.adapter_state_dict().items() if param_role(k) not in FOLDED_ROLES}
    ranks = []
    for i in range(n - L, n):
        att = model.llama.layers[i].attention
        for name in ("wk", "wv"):
            pair = prompt_only_pair(att, name)
            if pair is not None:
                p = f"llama.layers.{i}.attention.prompt_lora_{name}"
                tensors[f"{p}_l1.weight"], tensors[f"{p}_l2.weight"] = pair
                ranks.append(pair[0].shape[0])
    cfg = replace(a, bias=False, scale=False, lora_rank=0, new_gate=bool(a.new_gate),
                  prompt_lora_rank=ranks[0] if ranks else 0)
    kept = [f"adaption prompts ({L} layer{'s' if L != 1 else ''} x {a.prompt_len})", "gates"]
    if a.new_gate:
        kept[-1] = "gates and new_gate"
    if model.has_visual and a.fusion_layers > 0:
        kept.append("visual branch")
    if ranks:
        kept.append(f"prompt-only LoRA on wk/wv (rank {ranks[0]})")
    return cfg, tensors, kept
