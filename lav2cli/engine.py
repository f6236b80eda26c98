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

from lav2cli import formats
from lav2cli.errors import Lav2Error
from lav2cli.formats import BaseWeights, artifact
from lav2cli.inference.fold import gates_open, prepare_for_inference
from lav2cli.inference.generate import Sampling, generate
from lav2cli.model.adapter import LlamaAdapterV2, initial_value, is_adapter_param
from lav2cli.model.config import AdapterConfig, LlamaConfig
from lav2cli.model.quant import QuantSpec, check_quantizable, parse_quantize, quantize_base
from lav2cli.model.vision import ImagePreprocess, build_encoder
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
    quantize: str | None = None  # the base linears' quantisation as loaded ("int8", "int4:64"), None: float
    feature_stats: dict[str, torch.Tensor] | None = None  # an artifact's training image statistics


DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device a --device value names (auto: CUDA when there is one, else the CPU);
    the one place device strings are checked, so that a typo is one line naming it."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps"):
            raise Lav2Error(f"unknown device {device!r} (expected {DEVICE_HELP})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Lav2Error(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise Lav2Error(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            "numbered from 0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise Lav2Error(f"device {device!r}: MPS is not available on this machine")
    return dev


# every --dtype name (long and short spellings), for every command: one table
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise Lav2Error(f"unknown dtype {dtype!r} (expected auto, float32, bfloat16 or float16)")
    return DTYPES[dtype]


# -- references --------------------------------------------------------------------------------






# -- assembly ---------------------------------------------------------------------------------


_BASE_BIAS = re.compile(r"^layers\.\d+\.(?:attention|feed_forward)\.(w[qkvo123])\.bias$")


def assemble(cfg: LlamaConfig, adapter: AdapterConfig | None, base: BaseWeights,
             adapter_sd: dict[str, torch.Tensor] | None, adapter_file: Path | None,
             encoder: nn.Module | None, device: torch.device, dtype: torch.dtype,
             strict_adapter: bool = True, quantize: QuantSpec | None = None) -> LlamaAdapterV2:
    """Build the model on the meta device and fill it, accounting for every tensor.

    Base tensors are cast to `dtype`; adapter tensors stay float32 (they are small and train).
    With strict_adapter, every adapter tensor must come from `adapter_sd`; otherwise the
    missing ones start at their identity-preserving initial values. With `quantize`, the base
    linears are quantised one at a time on `device` before the rest moves there.
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
        # the file's names are the released ones: checked as such, then mapped to the model's
        released = model.adapter_state_dict()  # meta tensors: names and shapes only
        for k, t in adapter_sd.items():
            if k not in released:
                raise Lav2Error(f"{adapter_file}: tensor {k} has no place in the model "
                                f"(variant {adapter.variant if adapter else 'none'})")
            if tuple(t.shape) != tuple(released[k].shape):
                raise Lav2Error(f"{adapter_file}: tensor {k} has shape {tuple(t.shape)}, the model needs {tuple(released[k].shape)}")
            # every adapter reaches the model here (artifact, released .pth, a run resumed): a
            # diverged or corrupt one would otherwise answer "" without a word
            bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
            if bad:
                raise Lav2Error(f"{adapter_file}: tensor {k} holds {bad} non-finite value(s) (NaN or infinity) "
                                f"of {t.numel()}: a diverged or corrupt adapter")
        if strict_adapter:
            lacking = [n for n in released if n not in adapter_sd]
            if lacking:
                raise Lav2Error(f"{adapter_file}: adapter tensor {lacking[0]} is missing"
                                + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""))
        filled.update({k: t.float() for k, t in model.from_released(adapter_sd).items()})
    model.load_state_dict(filled, strict=False, assign=True)
    for mname, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                full = f"{mname}.{pname}" if mname else pname
                module._parameters[pname] = nn.Parameter(initial_value(full, module, p.shape))
    model.llama.extend_rope(cfg.max_seq_len)  # non-persistent buffers were created on meta
    if adapter is not None and adapter.visual is not None:
        model.clip = encoder.to(dtype=dtype) if encoder is not None else None
    if quantize is not None:
        quantize_base(model, quantize, device)
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
        return m.has_visual and getattr(m, "clip", None) is not None and gates_open(m, fusion_only=True)

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
                     extra_files: dict[str, bytes] | None = None, self_caption: bool | None = None,
                     feature_stats: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the adapter as a lav2 artifact (atomic): its tensors (default: all adapter
        tensors; saved under the released names) and everything needed to rebuild the model
        around them. `self_caption` (default: as loaded) records that the model was trained to
        caption an image first and answer with its caption as context; `ask` and `eval` then do so.
        `feature_stats` (default: as loaded) are the training images' encoder statistics that
        `lav2cli.answer` tells unfamiliar images by (artifact.FEATURE_STATS)."""
        c = self.config
        if c.adapter is None:
            raise Lav2Error(f"{c.ref}: a base model has no adapter to save")
        meta = artifact.compose_meta(
            c.adapter, base_ref=c.base_ref, base_format=c.base_format, llama=c.llama, encoder=c.encoder,
            preprocess=c.preprocess, template=c.template, training=training or c.meta.get("training"),
            self_caption=bool(c.meta.get("self_caption")) if self_caption is None else self_caption)
        tensors = self.model.to_released(tensors) if tensors is not None else self.model.adapter_state_dict()
        stats = feature_stats or c.feature_stats
        if stats:
            extra_files = {**(extra_files or {}), artifact.FEATURE_STATS: artifact.feature_stats_file(stats)}
        return artifact.save(out_dir, tensors, meta, extra_files=extra_files)

    def generate(self, prompts: list[list[int]], images: torch.Tensor | None = None,
                 image_mask: torch.Tensor | None = None, sampling=None, on_token=None,
                 compile: bool | None = None) -> list[list[int]]:
        """`inference.generate.generate` with this engine's stop and pad ids; `compile` defaults to
        `compile_decode`, so every pass of a command (a self-caption's too) compiles or none does."""
        return generate(self.model, prompts, stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id,
                        images=images, image_mask=image_mask, sampling=sampling or Sampling(),
                        on_token=on_token, compile=self.compile_decode if compile is None else compile)


def load(ref: str, *, base: str | None = None, clip: str | None = None,
         device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         adapter: AdapterConfig | None = None, encoder: dict[str, Any] | None = None,
         inference: bool = False, add_lora_rank: int = 0, quantize: str | QuantSpec | None = None) -> Engine:
    """Resolve a model reference (`formats.open`) and build the engine.

    `adapter` (with `encoder`, an encoder spec, when it has a visual branch) puts a fresh
    adapter on a base reference: the starting point of training. `add_lora_rank` gives an
    artifact without LoRA fresh LoRA pairs of that rank (second factor zero: the model still
    computes exactly the artifact's function), for a training stage that continues it.
    `inference=True` prepares the model for inference (`prepare_for_inference`: scales and LoRA
    folded into the frozen weights, float32 CPU weights column-major; faster, and the engine can
    then not train or save).
    `quantize` ("int8", "int4", "int4:GROUP" or "none"; `model.quant`) stores the frozen base
    linears quantised; the adapter stays float. An artifact loads on the float base unless asked:
    the quantisation it trained with (`training.quantize` in lav2.json) is a record, not a need.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spec = parse_quantize(quantize)
    r = formats.open(str(ref), base=base, clip=clip)
    check_quantizable(r.base.config, spec)
    kind, bw, base_ref, template, files = r.kind, r.base, r.base_ref, r.template, r.files
    adapter_cfg, enc_spec, preprocess = r.adapter, r.encoder, r.preprocess
    if kind == "base":
        adapter_cfg, enc_spec = adapter, encoder or enc_spec

    if adapter is not None and kind != "base":
        raise Lav2Error(f"{ref}: already an adapter; a fresh adapter goes on a base model")
    if add_lora_rank and kind != "artifact":
        raise Lav2Error(f"{ref}: LoRA is added to a lav2 artifact being continued, not to a {kind} reference")
    if add_lora_rank and adapter_cfg is not None and adapter_cfg.lora_rank != add_lora_rank:
        if adapter_cfg.lora_rank:
            raise Lav2Error(f"{r.path}: its adapter has LoRA of rank {adapter_cfg.lora_rank}; "
                            f"a stage continuing it cannot change that to {add_lora_rank}")
        adapter_cfg = replace(adapter_cfg, lora_rank=add_lora_rank)
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
        preprocess = preprocess or ImagePreprocess.for_encoder(encoder, r.channel_order)

    # a stage saves only what it trained: an artifact's other adapter tensors keep their initial values
    model = assemble(bw.config, adapter_cfg, bw, r.adapter_tensors, r.adapter_file, encoder, dev, dt,
                     strict_adapter=kind != "artifact", quantize=spec)
    cfg = EngineConfig(ref=str(ref), kind=kind, llama=model.config, adapter=model.adapter, template=template,
                       base_ref=base_ref, base_format=bw.format, encoder=enc_spec if encoder else None,
                       preprocess=preprocess if encoder else None, files=files, meta=r.meta,
                       quantize=str(spec) if spec else None, feature_stats=r.feature_stats)
    transform = preprocess.transform() if (preprocess is not None and encoder is not None) else None
    if inference:
        prepare_for_inference(model)
    return Engine(model, bw.tokenizer, transform, cfg, dev, dt)
