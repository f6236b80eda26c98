"""LLaMA-Adapter V2 on top of llama.py (docs/model.md describes the model).

- AdaptedLinear: y = s * (W x + lora(x) + b); bias and scale optional per variant.
- AdaptedAttention / AdaptedFeedForward: swap their linears for AdaptedLinear, own the LoRA
  pairs (official names `lora_wq_l1`, ...), and (attention) the per-head gate and the
  separate-softmax attention over adaption prompts.
- LlamaAdapterV2: the whole model: `llama` (the adapted transformer), the adaption prompts
  (`adapter_query_fusion`, `adapter_query_late`) and the visual branch (`clip` encoder,
  `clip_proj`, `visual_query`, `visual_blocks`, `visual_proj`). Tensor names are those of the
  released checkpoints, but for the prompts: the model keeps the fusion layers' rows and the
  other layers' rows apart (they train in different groups), files hold them as the one
  released `adapter_query.weight` (`to_released` / `from_released` map the names).

`param_role(name)` is the one rule that decides what each tensor is: trainable and saved or
frozen, its training group, whether merge folds it, its initial value.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from lav2cli.model.config import AdapterConfig, LlamaConfig
from lav2cli.model.llama import Attention, Block, FeedForward, RMSNorm, Transformer
from lav2cli.model.vision import ViTBlock
from lav2cli.templates import IGNORE_INDEX

# Every parameter name has exactly one role. The role decides whether a tensor trains and is
# saved (everything but "encoder" and "base"), which training group and learning-rate multiplier
# it takes, whether `lav2 merge` folds it into plain weights, and its initial value.
_ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((role, re.compile(p)) for role, p in (
    ("encoder", r"^clip\."),
    ("base", r"^llama\.(tok_embeddings|output)\.weight$"
             r"|^llama\.layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight$"),
    ("norm", r"^llama\.(norm|layers\.\d+\.(attention_norm|ffn_norm))\.weight$"),
    ("bias", r"^llama\.layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.bias$"),
    ("scale", r"^llama\.layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.scale$"),
    ("lora", r"^llama\.layers\.\d+\.(attention\.lora_w[qkvo]|feed_forward\.lora_w[123])_l[12]\.weight$"),
    ("prompt_lora", r"^llama\.layers\.\d+\.attention\.prompt_lora_w[kv]_l[12]\.weight$"),
    ("gate", r"^llama\.layers\.\d+\.attention\.gate$"),
    ("new_gate", r"^llama\.layers\.\d+\.attention\.new_gate$"),
    ("prompt", r"^adapter_query(_fusion|_late)?\.weight$"),  # the model's two parts, the released whole
    ("visual", r"^(clip_proj|clip_proj_norm|visual_query|visual_blocks\.\d+\.[\w.]+|visual_proj|visual_proj_norm)\.(weight|bias)$"),
))
ROLES = tuple(role for role, _ in _ROLE_PATTERNS)
RELEASED_PROMPTS = "adapter_query.weight"  # files: every prompt layer's rows, the fusion layers' first
FUSION_PROMPTS = "adapter_query_fusion.weight"  # the model: the fusion layers' rows,
LATE_PROMPTS = "adapter_query_late.weight"  # and the other prompt layers' rows
PROMPT_PARTS = (FUSION_PROMPTS, LATE_PROMPTS)
FROZEN_ROLES = frozenset({"encoder", "base"})
FOLDED_ROLES = frozenset({"norm", "bias", "scale", "lora", "prompt_lora"})  # `lav2 merge` folds these


def param_role(name: str) -> str:
    """The role of parameter `name` (one of ROLES); ValueError for a name no role claims."""
    for role, pattern in _ROLE_PATTERNS:
        if pattern.match(name):
            return role
    raise ValueError(f"parameter {name} has no role")


def is_adapter_param(name: str) -> bool:
    """True for the tensors LLaMA-Adapter V2 trains and an adapter file holds."""
    return param_role(name) not in FROZEN_ROLES


def initial_value(name: str, module: nn.Module, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The float32 starting value of adapter tensor `name` (owned by `module`) when no file gives
    one: everything inside the LLaMA preserves the base model's function (gates 0, bias 0,
    scale and new_gate 1, norms 1, LoRA's second factor 0); the rest takes torch's defaults."""
    role, pname = param_role(name), name.rsplit(".", 1)[-1]
    t = torch.empty(shape, dtype=torch.float32)
    if role in ("scale", "new_gate") or (isinstance(module, (RMSNorm, nn.LayerNorm)) and pname == "weight"):
        return t.fill_(1.0)
    if role in ("gate", "bias") or name.endswith("_l2.weight") or isinstance(module, (RMSNorm, nn.LayerNorm)):
        return t.zero_()
    if isinstance(module, nn.Embedding):
        return nn.init.normal_(t)
    if pname == "weight":
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    if pname == "bias":  # nn.Linear's default bias
        bound = 1 / math.sqrt(module.weight.shape[1])
        return nn.init.uniform_(t, -bound, bound)
    raise AssertionError(f"no initial value rule for {name}")


class AdaptedLinear(nn.Module):
    """A frozen linear with an optional bias (init 0) and scale (init 1) of the output size.

    Its frozen weight is either the float `weight` or, once `model.quant.quantize_base` has
    replaced it, `quantized` (a QuantizedWeight module computing the same product); bias, scale
    and LoRA apply on top either way, in float."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scale: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = nn.Parameter(torch.ones(out_features)) if scale else None
        self.quantized: nn.Module | None = None

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the frozen weight computes in (a quantised weight's scales')."""
        return self.weight.dtype if self.quantized is None else self.quantized.dtype

    def dense_weight(self) -> torch.Tensor:
        """The frozen weight as a float tensor [out, in] (dequantised when quantised)."""
        return self.weight if self.quantized is None else self.quantized.dequantize()

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        q = self.quantized
        if delta is None and self.scale is None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight, bias) if q is None else q(x, bias)
        y = F.linear(x, self.weight) if q is None else q(x)
        if delta is not None:
            y = y + delta
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.scale is not None:
            y = y * self.scale.to(y.dtype)
        return y


class _Adapted:
    """Shared by attention and feed-forward: adapted linears plus sibling LoRA pairs."""

    def _adapt(self, names_shapes: dict[str, tuple[int, int]], a: AdapterConfig, base_bias=()) -> None:
        for name, (fan_in, fan_out) in names_shapes.items():
            setattr(self, name, AdaptedLinear(fan_in, fan_out, a.biased(name) or name in base_bias, bool(a.scale)))
            if a.lora_rank:
                l1 = nn.Linear(fan_in, a.lora_rank, bias=False)
                l2 = nn.Linear(a.lora_rank, fan_out, bias=False)
                nn.init.zeros_(l2.weight)
                setattr(self, f"lora_{name}_l1", l1)
                setattr(self, f"lora_{name}_l2", l2)
        self.lora_rank = a.lora_rank

    def proj(self, name: str, x: torch.Tensor, lora: bool = True) -> torch.Tensor:
        delta = None
        if lora and self.lora_rank:
            l1, l2 = getattr(self, f"lora_{name}_l1"), getattr(self, f"lora_{name}_l2")
            delta = F.linear(F.linear(x, l1.weight.to(x.dtype)), l2.weight.to(x.dtype))
        return getattr(self, name)(x, delta)


class AdaptedAttention(_Adapted, Attention):
    def __init__(self, config: LlamaConfig, layer_id: int, a: AdapterConfig):
        super().__init__(config, layer_id)
        hd, d = config.head_dim, config.dim
        self._adapt(
            {"wq": (d, self.n_heads * hd), "wk": (d, self.n_kv_heads * hd),
             "wv": (d, self.n_kv_heads * hd), "wo": (self.n_heads * hd, d)}, a, config.linear_bias)
        self.gate = nn.Parameter(torch.zeros(1, self.n_heads, 1, 1))
        self.new_gate = nn.Parameter(torch.ones(1, 1, 1, 1)) if a.new_gate else None
        self.prompt_lora = bool(a.prompt_lora_rank) and layer_id >= config.n_layers - a.prompt_layers
        if self.prompt_lora:  # prompt-only LoRA on wk/wv (left by `lav2 merge`), l2 init 0
            for name, fan_out in (("wk", self.n_kv_heads * hd), ("wv", self.n_kv_heads * hd)):
                setattr(self, f"prompt_lora_{name}_l1", nn.Linear(d, a.prompt_lora_rank, bias=False))
                setattr(self, f"prompt_lora_{name}_l2", nn.Linear(a.prompt_lora_rank, fan_out, bias=False))
                nn.init.zeros_(getattr(self, f"prompt_lora_{name}_l2").weight)

    def _prompt_proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if not self.prompt_lora:
            return self.proj(name, x, lora=False)
        l1, l2 = getattr(self, f"prompt_lora_{name}_l1"), getattr(self, f"prompt_lora_{name}_l2")
        return getattr(self, name)(x, F.linear(F.linear(x, l1.weight.to(x.dtype)), l2.weight.to(x.dtype)))

    def prompt_kv(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of an adaption prompt [B, K, dim]: the layer's own wk/wv (with bias and
        scale, never the token path's LoRA; with the prompt-only LoRA where present), no RoPE.
        Computed once per request at inference."""
        B, K, _ = prompt.shape
        prompt = prompt.to(self.wk.weight_dtype)  # prompts train in fp32; a bf16 base computes in bf16
        kp = self._prompt_proj("wk", prompt).view(B, K, self.n_kv_heads, self.head_dim).transpose(1, 2)
        vp = self._prompt_proj("wv", prompt).view(B, K, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return kp, vp

    def prompt_attention(self, q, y, prompt_kv):
        """prompt_kv: (keys, values) computed once per request, or the prompt [B, K, dim] itself."""
        if prompt_kv is None:
            return y
        kp, vp = self.prompt_kv(prompt_kv) if torch.is_tensor(prompt_kv) else prompt_kv
        if kp.shape[0] != q.shape[0]:
            kp, vp = kp.expand(q.shape[0], -1, -1, -1), vp.expand(q.shape[0], -1, -1, -1)
        # a separate softmax over the K prompt slots: every query sees every slot
        yp = F.scaled_dot_product_attention(q, kp.to(q.dtype), vp.to(q.dtype), enable_gqa=self.n_heads != self.n_kv_heads)
        g = torch.tanh(self.gate)
        if self.new_gate is not None:
            g = g * self.new_gate
        return y + g.to(yp.dtype) * yp


class AdaptedFeedForward(_Adapted, FeedForward):
    def __init__(self, config: LlamaConfig, layer_id: int, a: AdapterConfig):
        super().__init__(config, layer_id)
        d, h = config.dim, config.hidden_dim
        self._adapt({"w1": (d, h), "w2": (h, d), "w3": (d, h)}, a, config.linear_bias)


class LlamaAdapterV2(nn.Module):
    """The adapted model. With `adapter=None` it is the plain base LLaMA behind the same API."""

    def __init__(self, config: LlamaConfig, adapter: AdapterConfig | None = None, encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.folded_for_inference = False  # set by inference.fold.fold_for_inference
        # set only while training with `train.standardize_features`: (mean, 1/std) per encoder
        # channel; clip_proj then reads standardised features and `folded_clip_proj` turns it
        # back into a plain projection of raw features for saving (not a saved tensor)
        self.feature_norm: tuple[torch.Tensor, torch.Tensor] | None = None
        self.adapter = a = adapter.resolved(config.n_layers) if adapter is not None else None
        if a is None:
            self.llama = Transformer(config)
            return

        def make_block(c: LlamaConfig, i: int) -> Block:
            return Block(c, i, AdaptedAttention(c, i, a), AdaptedFeedForward(c, i, a))

        self.llama = Transformer(config, make_block)
        # the prompts of the fusion layers (the first prompt layers, which add the visual tokens)
        # and of the others; an empty part is no parameter
        fusion_rows, late_rows = a.fusion_layers * a.prompt_len, (a.prompt_layers - a.fusion_layers) * a.prompt_len
        self.adapter_query_fusion = nn.Embedding(fusion_rows, config.dim) if fusion_rows else None
        self.adapter_query_late = nn.Embedding(late_rows, config.dim) if late_rows else None
        v = a.visual
        if v is not None:
            if v.n_queries != a.prompt_len:
                raise ValueError(f"visual n_queries {v.n_queries} must equal prompt_len {a.prompt_len}")
            self.clip = encoder
            self.clip_proj = nn.Linear(v.encoder_dim, v.width)
            self.clip_proj_norm = nn.LayerNorm(v.width)
            self.visual_query = nn.Embedding(v.n_queries, v.width)
            # small, as ViT position embeddings: at N(0, 1) the queries would outweigh what they
            # read from the image, and the branch would start out all but blind
            nn.init.normal_(self.visual_query.weight, std=0.02)
            self.visual_blocks = nn.ModuleList(ViTBlock(v.width, v.heads, v.mlp_ratio) for _ in range(v.depth))
            self.visual_proj = nn.Linear(v.width, config.dim)
            self.visual_proj_norm = nn.LayerNorm(config.dim)

    @property
    def has_visual(self) -> bool:
        return self.adapter is not None and self.adapter.visual is not None

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor under its released name (what an adapter file holds)."""
        if self.folded_for_inference:
            raise RuntimeError("this model's scales were folded for inference: its adapter tensors are no longer the trained ones")
        return self.to_released({n: p.detach() for n, p in self.named_parameters() if is_adapter_param(n)})

    def freeze_base(self) -> None:
        for n, p in self.named_parameters():
            p.requires_grad_(is_adapter_param(n))

    # -- visual branch ----------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> encoder tokens [B, N, encoder_dim]; 3-D input is taken as
        already-computed encoder tokens (a feature cache)."""
        if images.dim() == 3:
            return images
        if getattr(self, "clip", None) is None:
            raise ValueError("this model has no image encoder: pass encoder features [B, N, C]")
        with torch.no_grad():
            return self.clip(images)

    def visual_tokens(self, images: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, n_queries, dim]. Rows where image_mask is False carry no image (zeros), except
        for imported official checkpoints, which see an all-zero image there as the original did."""
        a = self.adapter
        if image_mask is not None and a.text_only_zero_image and images.dim() == 4:
            images = images * image_mask.view(-1, 1, 1, 1).to(images.dtype)
        feats = self.encode_images(images).to(self.clip_proj.weight.dtype)
        if self.feature_norm is not None:
            mean, inv_std = self.feature_norm
            feats = (feats - mean.to(feats)) * inv_std.to(feats)
        x = self.clip_proj_norm(self.clip_proj(feats))
        x = torch.cat([self.visual_query.weight.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.visual_blocks:
            x = blk(x)
        x = self.visual_proj_norm(self.visual_proj(x[:, : a.visual.n_queries]))
        if image_mask is not None and not a.text_only_zero_image:
            x = x * image_mask.view(-1, 1, 1).to(x.dtype)
        return x

    def folded_clip_proj(self) -> dict[str, torch.Tensor]:
        """clip_proj as it acts on raw encoder features: with standardised inputs
        W (x - m) * s + b = (W diag s) x + (b - (W diag s) m)."""
        w, b = self.clip_proj.weight.detach(), self.clip_proj.bias.detach()
        if self.feature_norm is None:
            return {"clip_proj.weight": w, "clip_proj.bias": b}
        mean, inv_std = (t.to(w.device, torch.float64) for t in self.feature_norm)
        folded = w.double() * inv_std
        return {"clip_proj.weight": folded.to(w.dtype), "clip_proj.bias": (b.double() - folded @ mean).to(b.dtype)}

    @torch.no_grad()
    def standardize_trained_clip_proj(self, mean: torch.Tensor, inv_std: torch.Tensor) -> None:
        """Switch a trained clip_proj to standardised inputs without changing what it computes (the
        inverse of folded_clip_proj): W' = W diag(1/s), b' = b + W m."""
        w, b = self.clip_proj.weight, self.clip_proj.bias
        m, s = mean.to(w.device, torch.float64), inv_std.to(w.device, torch.float64)
        w64 = w.double()
        b.copy_((b.double() + w64 @ m).to(b.dtype))
        w.copy_((w64 / s).to(w.dtype))
        self.feature_norm = (mean, inv_std)

    def _zero_image(self) -> torch.Tensor:
        """One all-zero image [1, 3, H, W]: what every text-only row of an imported official
        checkpoint sees (one suffices: its prompts broadcast over the batch)."""
        size = int(getattr(self.clip, "image_size", 224))
        ref = self.clip_proj.weight
        return torch.zeros(1, 3, size, size, device=ref.device, dtype=ref.dtype)

    # -- prompts ----------------------------------------------------------------------------

    def to_released(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` under the released names: the two prompt parts become `adapter_query.weight`
        [prompt_layers * prompt_len, dim], the fusion layers' rows first, wherever `tensors`
        holds a part (a part it lacks is the model's current one). A model without prompt layers
        writes it as [0, dim], the one tensor's shape then. Other names, released ones too, pass."""
        present = [n for n in PROMPT_PARTS if n in tensors]
        if not present:
            if self.adapter is None or self._prompt_parts() or RELEASED_PROMPTS in tensors:
                return dict(tensors)
            return {**tensors, RELEASED_PROMPTS: torch.empty(0, self.config.dim)}
        device = tensors[present[0]].device
        whole = torch.cat([tensors[n] if n in tensors else self.get_parameter(n).detach().to(device)
                           for n in self._prompt_parts()])
        out: dict[str, torch.Tensor] = {}
        for n, t in tensors.items():  # the whole takes the place of its first part
            if n == present[0]:
                out[RELEASED_PROMPTS] = whole
            elif n not in PROMPT_PARTS:
                out[n] = t
        return out

    def from_released(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` under the model's names: `adapter_query.weight` is cut into the fusion
        layers' rows and the other layers' rows (an empty part is left out). Its shape is the
        caller's to check. Other names pass."""
        out = {n: t for n, t in tensors.items() if n != RELEASED_PROMPTS}
        if RELEASED_PROMPTS in tensors:
            whole, first = tensors[RELEASED_PROMPTS], self.adapter.fusion_layers * self.adapter.prompt_len
            for name, rows in zip(PROMPT_PARTS, (whole[:first], whole[first:])):
                if rows.shape[0]:
                    out[name] = rows
        return out

    def _prompt_parts(self) -> list[str]:
        """The names of the prompt parts this model has, in row order."""
        return [n for n in PROMPT_PARTS if getattr(self, n.removesuffix(".weight"), None) is not None]

    def prompts(self, images: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> list | None:
        """Per-layer adaption prompts [B, K, dim] (None for layers without prompts): the static
        prompt of each layer, plus the visual tokens in the fusion layers. Without images they
        are [1, K, dim] and broadcast over any batch."""
        a = self.adapter
        if a is None or a.prompt_layers == 0:  # no adapter, or a bias/scale/norm-only one
            return None
        n, L, K = self.config.n_layers, a.prompt_layers, a.prompt_len
        if images is None and a.text_only_zero_image and self.has_visual and getattr(self, "clip", None) is not None:
            images = self._zero_image()
        vis = self.visual_tokens(images, image_mask) if images is not None and self.has_visual else None
        parts = (self.adapter_query_fusion, self.adapter_query_late)
        queries = [q for part in parts if part is not None for q in part.weight.view(-1, K, self.config.dim)]
        out: list = [None] * (n - L)
        for i in range(L):
            p = queries[i][None]
            if vis is not None and i < a.fusion_layers:
                p = p + vis.to(p.dtype)
            out.append(p)  # a static prompt stays [1, K, dim]: its K/V are computed once, then broadcast
        return out

    def prompt_kv(self, images: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> list | None:
        """Per-layer prompt keys and values, computed once per request for generation."""
        ps = self.prompts(images, image_mask)
        if ps is None:
            return None
        return [None if p is None else layer.attention.prompt_kv(p) for p, layer in zip(ps, self.llama.layers)]

    # -- forward ----------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, images: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                pad: torch.Tensor | None = None, prompt_kv: list | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] ([B, 1, vocab] with last_only). Pass `prompt_kv` (from
        `prompt_kv()`) to reuse prompt K/V across decoding steps; otherwise the prompts come
        from `images` here and each layer projects its own (inside its forward, as FSDP needs)."""
        if prompt_kv is None:
            prompt_kv = self.prompts(images, image_mask)
        return self.llama(tokens, input_pos, pad, prompt_kv, last_only)

    def response_nll(self, tokens: torch.Tensor, labels: torch.Tensor, images: torch.Tensor | None = None,
                     image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL per row over the supervised positions (labels != IGNORE_INDEX),
        and their counts. Only those positions go through the vocabulary projection, so the
        [B, T, vocab] logits never exist (training and `eval text` share this)."""
        h = self.llama.hidden(tokens, prompt_kv=self.prompts(images, image_mask))
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = F.linear(h[:, :-1][keep], self.llama.head_weight())
        nll = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        sums = torch.zeros(tokens.shape[0], device=nll.device, dtype=nll.dtype)
        return sums.index_add(0, keep.nonzero()[:, 0], nll), keep.sum(1)

    def setup_cache(self, batch: int, max_len: int, dtype=None) -> None:
        self.llama.setup_cache(batch, max_len, dtype)

    def clear_cache(self) -> None:
        self.llama.clear_cache()
