"""The thin engine: a model reference in, the adapted LLaMA + tokenizer + image transform out.

    from lav2cli.engine import load
    eng = load("smollm2-135m-instruct")          # or an artifact dir, a Meta/HF dir, a .gguf,
    logits = eng.logits(tokens)                  # or an official .pth with base=..., clip=...
    print(eng.ask(None, "What is the capital of France?"))

Every command reaches the model through `load`. The model is built on the meta device and
filled from the files, so a 7B base is never randomly initialised first; every tensor is
accounted for (a missing base tensor, a file tensor with no place, a shape mismatch: one line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lav2cli.errors import Lav2Error
from lav2cli.formats import BaseWeights
from lav2cli.model.adapter import LlamaAdapterV2, initial_value, is_adapter_param
from lav2cli.model.config import AdapterConfig, LlamaConfig
from lav2cli.model.vision import ImagePreprocess, build_encoder, parse_clip_arg
from lav2cli.templates import Template, get_template
from lav2cli.tokenizer import Tokenizer


@dataclass
class EngineConfig:
    """What a reference resolved to; `lav2 info` prints it."""

    ref: str
    kind: str  # "base", "artifact" or "official"
    llama: LlamaConfig
    adapter: AdapterConfig | None
    template: str
    base_ref: str
    base_format: str
    encoder: dict[str, Any] | None = None
    preprocess: ImagePreprocess | None = None
    files: list[Path] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # lav2.json of an artifact


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Lav2Error("device cuda requested but CUDA is not available")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise Lav2Error(f"unknown dtype {dtype!r} (expected auto, float32, bfloat16 or float16)")
    return _DTYPES[dtype]


# -- references --------------------------------------------------------------------------------


def load_base_ref(ref: str) -> BaseWeights:
    """A named base (registry) or a path to Meta / HF weights or a GGUF file."""
    from lav2cli.formats.base import load_base
    from lav2cli.registry import resolve_named

    path = resolve_named(ref)
    if path is None:
        path = Path(ref).expanduser()
        if not path.exists():
            raise Lav2Error(f"unknown model reference {ref!r}: not a known name (see `lav2 info --list`) and no such path")
    return load_base(path)


def classify_ref(ref: str) -> tuple[str, Path | None]:
    """('artifact'|'official'|'base', path); named bases resolve later."""
    from lav2cli.formats import artifact, official
    from lav2cli.registry import resolve_named

    named = resolve_named(ref)
    if named is not None:
        return ("artifact", named) if artifact.detect(named) else ("base", named)
    p = Path(ref).expanduser()
    if not p.exists():
        raise Lav2Error(f"unknown model reference {ref!r}: not a known name (see `lav2 info --list`) and no such path")
    if artifact.detect(p):
        return "artifact", p
    if p.is_file() and p.suffix == ".gguf":
        return "base", p
    if official.detect(p):
        return "official", p
    return "base", p


def _check_base_matches(meta: dict, cfg: LlamaConfig, where: Path, base_ref: str) -> None:
    want = meta.get("base", {}).get("config", {})
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
        if key in want and want[key] != getattr(cfg, key):
            raise Lav2Error(f"{where}: adapter was trained on a base with {key}={want[key]}, "
                            f"but {base_ref} has {key}={getattr(cfg, key)}")


# -- assembly ---------------------------------------------------------------------------------


_BASE_BIAS = re.compile(r"^layers\.\d+\.(?:attention|feed_forward)\.(w[qkvo123])\.bias$")


def assemble(cfg: LlamaConfig, adapter: AdapterConfig | None, base: BaseWeights,
             adapter_sd: dict[str, torch.Tensor] | None, adapter_file: Path | None,
             encoder: nn.Module | None, device: torch.device, dtype: torch.dtype,
             strict_adapter: bool = True) -> LlamaAdapterV2:
    """Build the model on the meta device and fill it, accounting for every tensor.

    Base tensors are cast to `dtype`; adapter tensors stay float32 (they are small and train).
    With strict_adapter, every adapter tensor must come from `adapter_sd`; otherwise the
    missing ones start at their identity-preserving initial values.
    """
    biased = sorted({m.group(1) for k in base.state_dict if (m := _BASE_BIAS.match(k))})
    if biased != sorted(cfg.linear_bias):  # a merged base (lav2 merge) carries plain linear biases
        cfg = replace(cfg, linear_bias=biased)
    with torch.device("meta"):
        model = LlamaAdapterV2(cfg, adapter)
    expected = {n: p.shape for n, p in model.named_parameters()}
    filled: dict[str, torch.Tensor] = {}
    for k, t in base.state_dict.items():
        name = "llama." + k
        if name not in expected:
            raise Lav2Error(f"{base.source}: tensor {k} has no place in the model")
        if tuple(t.shape) != tuple(expected[name]):
            raise Lav2Error(f"{base.source}: tensor {k} has shape {tuple(t.shape)}, the model needs {tuple(expected[name])}")
        plain = not is_adapter_param(name) or (adapter is None and name.endswith(".bias"))  # nn.Linear's bias
        filled[name] = t.to(dtype if plain else torch.float32)
    missing_base = [n for n in expected if not is_adapter_param(n) and n not in filled]
    if missing_base:
        raise Lav2Error(f"{base.source}: base tensor {missing_base[0].removeprefix('llama.')} is missing"
                        + (f" (and {len(missing_base) - 1} more)" if len(missing_base) > 1 else ""))
    if adapter_sd is not None:
        for k, t in adapter_sd.items():
            if k not in expected or not is_adapter_param(k):
                raise Lav2Error(f"{adapter_file}: tensor {k} has no place in the model "
                                f"(variant {adapter.variant if adapter else 'none'})")
            if tuple(t.shape) != tuple(expected[k]):
                raise Lav2Error(f"{adapter_file}: tensor {k} has shape {tuple(t.shape)}, the model needs {tuple(expected[k])}")
            filled[k] = t.float()
        if strict_adapter:
            lacking = [n for n in expected if is_adapter_param(n) and n not in adapter_sd]
            if lacking:
                raise Lav2Error(f"{adapter_file}: adapter tensor {lacking[0]} is missing"
                                + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""))
    model.load_state_dict(filled, strict=False, assign=True)
    for mname, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                full = f"{mname}.{pname}" if mname else pname
                module._parameters[pname] = nn.Parameter(initial_value(full, module, p.shape))
    model.llama.extend_rope(cfg.max_seq_len)  # non-persistent buffers were created on meta
    if adapter is not None and adapter.visual is not None:
        model.clip = encoder.to(dtype=dtype) if encoder is not None else None
    model.freeze_base()
    return model.to(device).eval()


# -- the engine -------------------------------------------------------------------------------


@dataclass
class Engine:
    model: LlamaAdapterV2
    tokenizer: Tokenizer
    image_transform: Callable | None
    config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    compile_decode: bool = False  # generate's default: a compiled decode step (`--compile`)

    @property
    def template(self) -> Template:
        return get_template(self.config.template)

    @property
    def can_see(self) -> bool:
        """True when a visual branch exists and its gates are open (trained)."""
        m = self.model
        if not m.has_visual or getattr(m, "clip", None) is None:
            return False
        n, a = m.config.n_layers, m.adapter
        layers = range(n - a.prompt_layers, n - a.prompt_layers + a.fusion_layers)
        return any(bool(m.llama.layers[i].attention.gate.detach().abs().sum() > 0) for i in layers)

    def image_tensor(self, images: list) -> torch.Tensor:
        """PIL images -> the encoder's input batch on the engine's device."""
        if self.image_transform is None:
            raise Lav2Error("this model has no image encoder")
        return torch.stack([self.image_transform(im) for im in images]).to(self.device, self.dtype)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [B, T, vocab] for token ids [B, T] and optional transformed images."""
        tokens = tokens.to(self.device)
        if images is not None:
            images = images.to(self.device, self.dtype if images.dim() == 4 else images.dtype)
        return self.model(tokens, images).float()

    def save_adapter(self, out_dir: str | Path, training: dict[str, Any] | None = None,
                     tensors: dict[str, torch.Tensor] | None = None,
                     extra_files: dict[str, bytes] | None = None, self_caption: bool | None = None) -> Path:
        """Write the adapter as a lav2 artifact (atomic): its tensors (default: all adapter
        tensors) and everything needed to rebuild the model around them. `self_caption` (default:
        as loaded) records that the model was trained to caption an image first and answer with
        its caption as context; `ask` and `eval` then do so."""
        from lav2cli.formats import artifact

        c = self.config
        if c.adapter is None:
            raise Lav2Error(f"{c.ref}: a base model has no adapter to save")
        meta = {
            "variant": c.adapter.variant,
            "adapter": c.adapter.to_dict(),
            "base": {"ref": c.base_ref, "format": c.base_format, "config": c.llama.to_dict()},
            "encoder": c.encoder,
            "preprocess": c.preprocess.to_dict() if c.preprocess else None,
            "template": c.template,
            "training": training or c.meta.get("training"),
            "self_caption": bool(c.meta.get("self_caption")) if self_caption is None else self_caption,
        }
        return artifact.save(out_dir, tensors if tensors is not None else self.model.adapter_state_dict(), meta,
                             extra_files=extra_files)

    def generate(self, prompts: list[list[int]], images: torch.Tensor | None = None,
                 image_mask: torch.Tensor | None = None, sampling=None, on_token=None,
                 compile: bool | None = None) -> list[list[int]]:
        """`generate.generate` with this engine's stop and pad ids; `compile` defaults to
        `compile_decode`, so every pass of a command (a self-caption's too) compiles or none does."""
        from lav2cli.generate import Sampling, generate

        return generate(self.model, prompts, stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id,
                        images=images, image_mask=image_mask, sampling=sampling or Sampling(),
                        on_token=on_token, compile=self.compile_decode if compile is None else compile)


def load(ref: str, *, base: str | None = None, clip: str | None = None,
         device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         adapter: AdapterConfig | None = None, encoder: dict[str, Any] | None = None,
         inference: bool = False, add_lora_rank: int = 0) -> Engine:
    """Resolve a model reference (DESIGN.md section 2) and build the engine.

    `adapter` (with `encoder`, an encoder spec, when it has a visual branch) puts a fresh
    adapter on a base reference: the starting point of training. `add_lora_rank` gives an
    artifact without LoRA fresh LoRA pairs of that rank (second factor zero: the model still
    computes exactly the artifact's function), for a training stage that continues it.
    `inference=True` prepares the model for inference (`prepare_for_inference`: scales and LoRA
    folded into the frozen weights, float32 CPU weights column-major; faster, and the engine can
    then not train or save).
    """
    from lav2cli.formats import artifact, official

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kind, path = classify_ref(str(ref))
    enc_spec = parse_clip_arg(clip) if clip else None
    adapter_cfg: AdapterConfig | None = None
    adapter_sd = None
    preprocess: ImagePreprocess | None = None
    meta: dict[str, Any] = {}
    files: list[Path] = []
    strict = True

    if kind == "artifact":
        meta = artifact.read_meta(path)
        base_ref = base or meta.get("base", {}).get("ref")
        if not base_ref:
            raise Lav2Error(f"{path / artifact.META}: no base model recorded; pass --base")
        if meta.get("merged") and not base:  # `lav2 merge` output: the folded base lives beside it
            from lav2cli.merge import load_folded_base

            bw, base_ref = load_folded_base(path, meta), str(path)
        else:
            bw = load_base_ref(base_ref)
        _check_base_matches(meta, bw.config, path, base_ref)
        adapter_cfg = AdapterConfig.from_dict(meta["adapter"]) if meta.get("adapter") else None
        if add_lora_rank and adapter_cfg is not None and adapter_cfg.lora_rank != add_lora_rank:
            if adapter_cfg.lora_rank:
                raise Lav2Error(f"{path}: its adapter has LoRA of rank {adapter_cfg.lora_rank}; "
                                f"a stage continuing it cannot change that to {add_lora_rank}")
            adapter_cfg = replace(adapter_cfg, lora_rank=add_lora_rank)
        adapter_sd = artifact.load_tensors(path)
        enc_spec = enc_spec or meta.get("encoder")
        if meta.get("preprocess"):
            preprocess = ImagePreprocess.from_dict(meta["preprocess"])
        template = meta.get("template") or bw.template
        files = [path / artifact.META, path / artifact.WEIGHTS]
        strict = False  # a stage saves only what it trained; the rest keeps its initial values
    elif kind == "official":
        if not base:
            raise Lav2Error(f"{path}: an official LLaMA-Adapter checkpoint needs --base (a Meta or HF LLaMA-7B directory)")
        adapter_cfg, adapter_sd, _ = official.load(path)
        base_ref = str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base
        bw = load_base_ref(base)
        enc_spec = enc_spec or parse_clip_arg(official.DEFAULT_CLIP)
        preprocess = ImagePreprocess.for_encoder(enc_spec, channel_order="bgr")
        template = "alpaca"
        files = [path]
    else:
        base_ref = str(Path(ref).expanduser().resolve()) if path is not None and Path(ref).expanduser().exists() else str(ref)
        bw = load_base_ref(base_ref)
        template = bw.template
        adapter_cfg, enc_spec = adapter, encoder or enc_spec
    files = list(bw.files) + files

    if adapter is not None and kind != "base":
        raise Lav2Error(f"{ref}: already an adapter; a fresh adapter goes on a base model")
    if add_lora_rank and kind != "artifact":
        raise Lav2Error(f"{ref}: LoRA is added to a lav2 artifact being continued, not to a {kind} reference")
    encoder = None
    if adapter_cfg is not None and adapter_cfg.visual is not None:
        if enc_spec is None:
            raise Lav2Error(f"{ref}: the adapter has a visual branch but no image encoder is recorded; pass --clip")
        encoder = build_encoder(enc_spec)
        if kind == "base" and not adapter_cfg.visual.encoder_dim:  # a fresh branch sized to its encoder
            adapter_cfg = replace(adapter_cfg, visual=replace(adapter_cfg.visual, encoder_dim=encoder.out_dim))
        if encoder.out_dim != adapter_cfg.visual.encoder_dim:
            raise Lav2Error(f"image encoder {enc_spec.get('name')} gives {encoder.out_dim}-wide tokens, "
                            f"the adapter's clip_proj expects {adapter_cfg.visual.encoder_dim}")
        preprocess = preprocess or ImagePreprocess.for_encoder(enc_spec)

    model = assemble(bw.config, adapter_cfg, bw, adapter_sd, files[-1] if adapter_sd is not None else None,
                     encoder, dev, dt, strict_adapter=strict)
    cfg = EngineConfig(ref=str(ref), kind=kind, llama=model.config, adapter=model.adapter, template=template,
                       base_ref=base_ref, base_format=bw.format, encoder=enc_spec if encoder else None,
                       preprocess=preprocess if encoder else None, files=files, meta=meta)
    transform = preprocess.transform() if (preprocess is not None and encoder is not None) else None
    if inference:
        model.prepare_for_inference()
    return Engine(model, bw.tokenizer, transform, cfg, dev, dt)
