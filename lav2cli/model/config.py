"""Shapes of the base LLaMA and of the LLaMA-Adapter V2 additions (plain dataclasses, JSON-able)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Variant = Literal["paper", "official"]

# The seven linear layers of a block (Meta names) and the submodule of the block that owns each.
LINEAR_MODULES = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                  "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


@dataclass
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # SwiGLU width (LLaMA-7B: 11008)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False  # output head shares tok_embeddings (SmolLM2)
    max_seq_len: int = 2048
    # linears (wq, wk, wv, wo, w1, w2, w3) that carry a plain bias in every layer: a base written
    # by `lav2 merge` with folded adapter biases; the engine sets it from the base's tensors
    linear_bias: list[str] = field(default_factory=list)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class VisualConfig:
    """The trainable visual branch between the frozen encoder and the LLM."""

    encoder_dim: int = 768  # width of the encoder tokens (CLIP ViT-L/14 after proj: 768)
    width: int = 768  # clip_proj output and ViT block width
    depth: int = 8  # number of visual_blocks
    heads: int = 16
    mlp_ratio: float = 4.0
    n_queries: int = 10  # visual_query rows; also the number of visual tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AdapterConfig:
    """What LLaMA-Adapter V2 adds. `paper` and `official` differ as docs/model.md describes."""

    variant: Variant = "paper"
    prompt_len: int = 10  # K
    prompt_layers: int | None = None  # L, the last L layers get prompts; None = n_layers - 1
    bias: bool = True
    scale: bool | None = None  # None = variant default (paper: on, official: off)
    lora_rank: int = 0  # 0 = no LoRA
    new_gate: bool | None = None  # None = on exactly when LoRA is on (official checkpoints)
    fusion_layers: int | None = None  # prompt layers that receive visual tokens; None = variant default
    visual: VisualConfig | None = field(default_factory=VisualConfig)
    text_only_zero_image: bool = False  # official code feeds an all-zero image for text-only requests
    # rank of LoRA pairs on wk/wv of the prompt layers that act on the adaption prompt only: what
    # `lav2 merge` leaves when LoRA is folded into wk/wv (the prompt path never saw LoRA)
    prompt_lora_rank: int = 0

    def resolved(self, n_layers: int) -> "AdapterConfig":
        """A copy with every None default made explicit for a model of n_layers."""
        c = AdapterConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        if c.prompt_layers is None:
            c.prompt_layers = max(n_layers - 1, 1)
        c.prompt_layers = min(c.prompt_layers, n_layers)
        if c.scale is None:
            c.scale = c.variant == "paper"
        if c.new_gate is None:
            c.new_gate = c.lora_rank > 0
        if c.fusion_layers is None:
            c.fusion_layers = 1 if c.variant == "paper" else c.prompt_layers
        c.fusion_layers = min(c.fusion_layers, c.prompt_layers)
        return c

    def biased(self, name: str) -> bool:
        """Whether linear `name` (wq, wk, wv, wo, w1, w2, w3) carries a bias in this variant."""
        if not self.bias:
            return False
        return self.variant == "paper" or name not in ("wk", "wv")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        d = dict(d)
        vis = d.pop("visual", None)
        names = {f.name for f in fields(cls)}
        c = cls(**{k: v for k, v in d.items() if k in names})
        c.visual = VisualConfig(**vis) if vis else None
        return c
