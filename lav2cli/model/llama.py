"""The base LLaMA transformer (Meta names and the interleaved RoPE layout).

One readable file: RMSNorm, RoPE, grouped-query attention over a static KV cache, SwiGLU.
Adapters (adapter.py) subclass Attention and FeedForward and override two hooks:
`proj(name, x)` (how a named linear is applied) and `prompt_attention(q, y, prompt_kv)`.

Batches of prompts with different lengths are left-padded. The KV cache has one slot index
per position shared by the whole batch (`input_pos`); row b ignores its first `pad[b]`
slots, and its RoPE positions are `slot - pad[b]`, so a padded row computes exactly what it
would compute alone.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lav2cli.model.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_len, head_dim // 2], float32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (0,1), (2,3), ... of x [B, H, T, D] by cos/sin [B, 1, T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Static cache [B, n_kv_heads, max_len, head_dim]: fixed shapes, so a compiled decode step
    never recompiles."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        dim, hd = config.dim, config.head_dim
        b = config.linear_bias
        self.wq = nn.Linear(dim, self.n_heads * hd, bias="wq" in b)
        self.wk = nn.Linear(dim, self.n_kv_heads * hd, bias="wk" in b)
        self.wv = nn.Linear(dim, self.n_kv_heads * hd, bias="wv" in b)
        self.wo = nn.Linear(self.n_heads * hd, dim, bias="wo" in b)
        self.kv_cache: KVCache | None = None

    def proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x)

    def prompt_attention(self, q: torch.Tensor, y: torch.Tensor, prompt_kv) -> torch.Tensor:
        return y  # the base model has no adaption prompts

    def forward(self, x, cos, sin, mask, input_pos, prompt_kv=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.proj("wq", x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.proj("wk", x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.proj("wv", x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        gqa = self.n_heads != self.n_kv_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        y = self.prompt_attention(q, y, prompt_kv)
        return self.proj("wo", y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int):
        super().__init__()
        b = config.linear_bias
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias="w1" in b)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias="w2" in b)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias="w3" in b)

    def proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj("w2", F.silu(self.proj("w1", x)) * self.proj("w3", x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int, attention: nn.Module | None = None,
                 feed_forward: nn.Module | None = None):
        super().__init__()
        self.attention = attention if attention is not None else Attention(config, layer_id)
        self.feed_forward = feed_forward if feed_forward is not None else FeedForward(config, layer_id)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, prompt_kv=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, prompt_kv)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: LlamaConfig, make_block: Callable[[LlamaConfig, int], nn.Module] = Block):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(make_block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if not config.tie_embeddings:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # training: the first N blocks recompute their activations in backward instead of
        # keeping them (activation checkpointing; N = n_layers: all, 0: none)
        self.checkpoint_blocks = 0
        self._spare_caches: list[KVCache] | None = None  # see setup_cache

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.config.tie_embeddings else self.output.weight

    # -- KV cache ---------------------------------------------------------------------------

    def setup_cache(self, batch: int, max_len: int, dtype=None) -> None:
        """Give every layer a zeroed cache. The set `clear_cache` last detached is reused when its
        shape, dtype and device match: a compiled decode step then reads and writes the same
        buffers in every request (CUDA graphs record again when a static input's address changes)."""
        if max_len > self.config.max_seq_len:
            self.extend_rope(max_len)
        ref = self.tok_embeddings.weight
        dtype = dtype or ref.dtype
        kept, self._spare_caches = self._spare_caches, None
        a = self.layers[0].attention
        if kept is not None and kept[0].k.shape == (batch, a.n_kv_heads, max_len, a.head_dim) \
                and kept[0].k.dtype == dtype and kept[0].k.device == ref.device:
            for layer, cache in zip(self.layers, kept):
                cache.k.zero_()  # as fresh: a masked slot must hold finite values (0 x NaN is NaN)
                cache.v.zero_()
                layer.attention.kv_cache = cache
            return
        del kept  # freed before the new set is allocated
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(batch, a.n_kv_heads, max_len, a.head_dim, dtype, ref.device)

    def clear_cache(self) -> None:
        """Detach the caches (an uncached forward must see none) and keep the set for reuse."""
        caches = [layer.attention.kv_cache for layer in self.layers]
        if all(c is not None for c in caches):
            self._spare_caches = caches
        for layer in self.layers:
            layer.attention.kv_cache = None

    def extend_rope(self, max_len: int) -> None:
        cos, sin = rope_tables(self.config.head_dim, max_len, self.config.rope_theta)
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    # -- forward ----------------------------------------------------------------------------

    def hidden(self, tokens, input_pos=None, pad=None, prompt_kv=None) -> torch.Tensor:
        """Final-normed hidden states [B, T, dim].

        tokens [B, T]; input_pos [T] cache slots (None: no cache, positions 0..T-1, causal);
        pad [B] left-padding per row (only with a cache); prompt_kv: per-layer adapter K/V.
        """
        B, T = tokens.shape
        x = self.tok_embeddings(tokens)
        if input_pos is None:
            if self.rope_cos.shape[0] < T:
                self.extend_rope(T)
            cos, sin = self.rope_cos[:T][None, None], self.rope_sin[:T][None, None]
            mask = None
        else:
            pos = input_pos[None, :] - (pad[:, None] if pad is not None else 0)  # [B, T] or [1, T]
            pos = pos.clamp(min=0)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
            slots = torch.arange(self.layers[0].attention.kv_cache.k.shape[2], device=tokens.device)
            mask = slots[None, :] <= input_pos[:, None]  # [T, S] causal over slots
            if pad is not None:
                # a row ignores its padding slots; a padding query still sees itself, so that
                # no softmax row is empty (an empty row is NaN, and NaN leaks through 0 * V)
                own = slots[None, :] == input_pos[:, None]
                mask = mask[None] & ((slots[None, None, :] >= pad[:, None, None]) | own[None])  # [B, T, S]
            mask = mask[:, None] if mask.dim() == 3 else mask[None, None]
        for i, layer in enumerate(self.layers):
            pkv = prompt_kv[i] if prompt_kv is not None else None
            if i < self.checkpoint_blocks and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, input_pos, pkv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos, pkv)
        return self.norm(x)

    def forward(self, tokens, input_pos=None, pad=None, prompt_kv=None, last_only: bool = False) -> torch.Tensor:
        h = self.hidden(tokens, input_pos, pad, prompt_kv)
        if last_only:  # generation needs only the next-token logits: skip the vocab matmul elsewhere
            h = h[:, -1:]
        return F.linear(h, self.head_weight().to(h.dtype))
