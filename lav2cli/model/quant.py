"""Weight-only int8 and int4 quantisation of the frozen base linears (`--quantize`, `model.quantize`).

The seven linears of every block (wq, wk, wv, wo, w1, w2, w3: role "base" by `param_role`) are
stored quantised; everything else stays float: the token embeddings and the output head (a
lookup, and a head that SmolLM2 ties to it), the norms, and every adapter tensor (bias, scale,
prompts, gates, LoRA, the visual branch), which the adapted linear applies on top as before.

Formats (`QuantizedWeight`), for a float weight W [out, in]:

- int8: `qweight` int8 [out, in] and one scale per output row, symmetric: W ~ q * s,
  s = max|W_row| / 127, q in [-127, 127].
- int4: `qweight` uint8 [out, in / 2], two values per byte (the even column in the high nibble),
  and per group of `group_size` input columns a scale and a zero point, asymmetric:
  W ~ (q - 8) * scale + zero, q in [0, 15], stored as `scales_zeros` [in / group, out, 2] (the
  layout torch's int4 kernels read).

Scales keep the dtype of the weights they replace (float32 on CPU, bfloat16 on CUDA). The matmul
dequantises inside an autograd function that saves no dequantised copy, so training through a
quantised base holds only the quantised bytes (the backward pass dequantises again).
`pack_for_decoding` switches a weight to a fused kernel for inference where torch has one:
int8 and int4 on CPU (which compute in bfloat16), int4 on CUDA for a bfloat16 model (tinygemm);
int8 on CUDA stays `F.linear(x, q) * s`, which `torch.compile` fuses into one kernel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lav2cli.errors import Lav2Error
from lav2cli.model.adapter import LlamaAdapterV2, param_role
from lav2cli.model.config import LINEAR_MODULES, LlamaConfig

GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels take
# divides every input width of the named shapes, and on a Q4_1 GGUF base (blocks of 32 with a
# scale and a minimum) it lands on the file's own grid
DEFAULT_GROUP_SIZE = 32
CHOICES = "none, int8, int4 or int4:GROUP (GROUP 32, 64, 128 or 256; int4 alone is int4:32)"


@dataclass(frozen=True)
class QuantSpec:
    """int8 (per output row) or int4 (group-wise along the input)."""

    bits: int
    group_size: int = 0  # int4 only

    def __str__(self) -> str:
        return "int8" if self.bits == 8 else f"int4:{self.group_size}"


def parse_quantize(value: str | QuantSpec | None, where: str = "--quantize") -> QuantSpec | None:
    """"none" (or None, "") -> None; "int8"; "int4" or "int4:GROUP". Anything else: one line."""
    if value is None or isinstance(value, QuantSpec):
        return value
    v = value.strip().lower()
    if v in ("", "none"):
        return None
    if v == "int8":
        return QuantSpec(8)
    m = re.fullmatch(r"int4(?::(\d+))?", v)
    if m is None or (m.group(1) and int(m.group(1)) not in GROUP_SIZES):
        raise Lav2Error(f"{where} {value!r}: expected {CHOICES}")
    return QuantSpec(4, int(m.group(1) or DEFAULT_GROUP_SIZE))


def base_linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each of a block's seven linears."""
    d, h, kv = config.dim, config.hidden_dim, config.n_kv_heads * config.head_dim
    q = config.n_heads * config.head_dim
    return {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (h, d), "w2": (d, h), "w3": (h, d)}


def check_quantizable(config: LlamaConfig, spec: QuantSpec | None) -> None:
    """int4: every linear's input width must be a multiple of the group size (one line otherwise,
    naming the tensor and the group sizes that would fit)."""
    if spec is None or spec.bits != 4:
        return
    shapes = base_linear_shapes(config)
    for name, (_, fan_in) in shapes.items():
        if fan_in % spec.group_size:
            fit = [g for g in GROUP_SIZES if all(i % g == 0 for _, i in shapes.values())]
            hint = f"int4:{' or int4:'.join(map(str, fit))} fit" if fit else "no int4 group size fits; use int8"
            raise Lav2Error(f"quantize {spec}: layers.*.{LINEAR_MODULES[name]}.{name}.weight has {fan_in} input "
                            f"columns, not a multiple of the group size {spec.group_size} ({hint})")


def quantized_nbytes(out_features: int, in_features: int, spec: QuantSpec, dtype: torch.dtype) -> int:
    """Bytes of one quantised [out, in] weight with its scales (zeros) in `dtype`."""
    el = torch.finfo(dtype).bits // 8
    if spec.bits == 8:
        return out_features * in_features + out_features * el
    return out_features * in_features // 2 + 2 * out_features * (in_features // spec.group_size) * el


# -- quantising and dequantising -------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales [out] in w's dtype); computed in float32 with the stored scales."""
    wf = w.detach().float()
    s = (wf.abs().amax(1) / 127).clamp(min=1e-12).to(w.dtype)
    q = torch.round(wf / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 [out, in / 2] two per byte, scales_zeros [in / group, out, 2] in w's dtype)."""
    out_f, in_f = w.shape
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(w.dtype)
    zero = (lo + 8 * scale.float()).to(w.dtype)  # the value at q = 8, the kernels' convention
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((g - (z - 8 * s)) / s).clamp_(0, 15).to(torch.uint8).reshape(out_f, in_f)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    return packed, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] -> the 4-bit values, uint8 [out, in]."""
    return torch.stack((packed >> 4, packed & 15), -1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out_f = packed.shape[0]
    n_groups = scales_zeros.shape[0]
    q = unpack_int4(packed).reshape(out_f, n_groups, -1).to(dtype)
    sz = scales_zeros.to(dtype).transpose(0, 1)  # [out, groups, 2]
    s, z = sz[..., 0:1], sz[..., 1:2]
    return torch.addcmul(z - 8 * s, q, s).reshape(out_f, -1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype when autocast is on (as F.linear would compute)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _Int8Matmul(torch.autograd.Function):
    """y = (x q^T) * s; the backward dequantises again instead of keeping a float copy."""

    @staticmethod
    def forward(ctx, x, q, s):
        dt = _compute_dtype(x)
        ctx.save_for_backward(q, s)
        ctx.dtypes = dt, x.dtype
        return F.linear(x.to(dt), q.to(dt)) * s.to(dt)

    @staticmethod
    def backward(ctx, gy):
        q, s = ctx.saved_tensors
        dt, in_dt = ctx.dtypes
        return ((gy.to(dt) * s.to(dt)) @ q.to(dt)).to(in_dt), None, None


class _Int4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, scales_zeros):
        dt = _compute_dtype(x)
        ctx.save_for_backward(packed, scales_zeros)
        ctx.dtypes = dt, x.dtype
        return F.linear(x.to(dt), dequantize_int4(packed, scales_zeros, dt))

    @staticmethod
    def backward(ctx, gy):
        packed, scales_zeros = ctx.saved_tensors
        dt, in_dt = ctx.dtypes
        return (gy.to(dt) @ dequantize_int4(packed, scales_zeros, dt)).to(in_dt), None, None


# -- the module ------------------------------------------------------------------------------------


class QuantizedWeight(nn.Module):
    """A frozen [out, in] weight, quantised; `forward(x, bias)` is F.linear(x, W, bias).

    `layout` is "plain" (the formats above: dequantisable, trainable through) or, after
    `pack_for_decoding`, the layout of a fused inference kernel."""

    def __init__(self, spec: QuantSpec, qweight: torch.Tensor, scales: torch.Tensor, in_features: int):
        super().__init__()
        self.spec, self.in_features, self.out_features = spec, in_features, qweight.shape[0]
        self.layout = "plain"
        self.kernel_dtype: torch.dtype | None = None  # the activations' dtype inside a fused kernel
        # never saved: lav2 saves adapters, and quantises a base each time it loads one
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)  # int4: scales and zeros

    @classmethod
    def from_float(cls, w: torch.Tensor, spec: QuantSpec) -> "QuantizedWeight":
        q, s = quantize_int8(w) if spec.bits == 8 else quantize_int4(w, spec.group_size)
        return cls(spec, q, s, w.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the weight stands for (its scales')."""
        return self.scales.dtype

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] the quantised one stands for."""
        dtype = dtype or self.dtype
        if self.layout != "plain":
            raise RuntimeError(f"this weight is packed for decoding ({self.layout}): it can no longer be dequantised")
        if self.spec.bits == 8:
            return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]
        return dequantize_int4(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.layout == "plain":
            fn = _Int8Matmul if self.spec.bits == 8 else _Int4Matmul
            y = fn.apply(x, self.qweight, self.scales)
        else:
            if torch.is_grad_enabled() and x.requires_grad:
                raise RuntimeError(f"this weight is packed for decoding ({self.layout}): no gradients through it")
            y = self._kernel(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
            y = y.to(_compute_dtype(x))
        return y if bias is None else y + bias.to(y.dtype)

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(self.kernel_dtype).contiguous()
        if self.layout == "cpu-int8":
            return torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        if self.layout == "cpu-int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.spec.group_size, self.scales)
        return torch.ops.aten._weight_int4pack_mm(x2, self.qweight, self.spec.group_size, self.scales)  # cuda-int4

    @torch.no_grad()
    def pack_for_decoding(self) -> str:
        """Switch to torch's fused kernel for this device where one applies; returns the layout.
        Inference only: a packed weight cannot be dequantised or trained through."""
        if self.layout != "plain":
            return self.layout
        dev, n, k = self.qweight.device.type, self.out_features, self.in_features
        # the CPU kernels compute in bfloat16 (their float32 paths are slow reference loops); the
        # int8 one needs the input width a multiple of 16 (else NaN or a crash), the int4 one the
        # output width a multiple of 16
        cpu_dtype = torch.bfloat16 if self.dtype == torch.float32 else self.dtype
        if dev == "cpu" and self.spec.bits == 8 and k % 32 == 0:
            self.layout, self.kernel_dtype = "cpu-int8", cpu_dtype
            self.scales = self.scales.to(cpu_dtype)
        elif dev == "cpu" and self.spec.bits == 4 and n % 16 == 0:
            self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight).int(), 1)
            self.scales = self.scales.to(cpu_dtype)
            self.layout, self.kernel_dtype = "cpu-int4", cpu_dtype
        elif dev == "cuda" and self.spec.bits == 4 and self.dtype == torch.bfloat16 and n % 8 == 0:
            tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
            if tiles is not None:  # tinygemm: [n/8][k/(16 tiles)][32][tiles/2] int32
                self.qweight = torch.ops.aten._convert_weight_to_int4pack(self.qweight.contiguous(), tiles)
                self.layout, self.kernel_dtype = "cuda-int4", torch.bfloat16
        return self.layout

    def extra_repr(self) -> str:
        return f"{self.spec}, in={self.in_features}, out={self.out_features}, layout={self.layout}"


class QuantizedLinear(nn.Module):
    """Takes an nn.Linear's place in a base model without adapter (its bias stays float)."""

    def __init__(self, quantized: QuantizedWeight, bias: nn.Parameter | None):
        super().__init__()
        self.quantized = quantized
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x, self.bias)


# -- a whole model ---------------------------------------------------------------------------------


def is_base_linear(name: str) -> bool:
    """True for the weights `quantize_base` quantises: the seven linears of every block."""
    return param_role(name) == "base" and not name.endswith(("tok_embeddings.weight", "output.weight"))


@torch.no_grad()
def quantize_base(model: LlamaAdapterV2, spec: QuantSpec, device: torch.device | str | None = None,
                  source: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> int:
    """Replace the float weight of every base linear by its quantised form, quantising on `device`
    (default: where the weight is), one linear at a time, so that the whole float base never sits
    there. `source(name, param)` gives the float weight to quantise (default: the parameter; a
    model on the meta device needs one). An AdaptedLinear keeps its bias, scale and LoRA in float;
    a plain nn.Linear becomes a QuantizedLinear. Returns the number of linears quantised."""
    check_quantizable(model.config, spec)
    n = 0
    for name, p in list(model.named_parameters()):
        if not is_base_linear(name):
            continue
        owner, _, attr = name.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(owner)
        lin = getattr(parent, attr)
        w = source(name, p) if source is not None else p
        qw = QuantizedWeight.from_float(w.to(device) if device is not None else w, spec)
        del w
        if isinstance(lin, nn.Linear):
            setattr(parent, attr, QuantizedLinear(qw, lin.bias))
        else:  # AdaptedLinear: the quantised weight takes the float one's place
            del lin.weight
            lin.quantized = qw
        n += 1
    return n


def pack_for_decoding(model: nn.Module) -> dict[str, int]:
    """`QuantizedWeight.pack_for_decoding` on every quantised weight; counts by layout."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedWeight):
            layout = m.pack_for_decoding()
            counts[layout] = counts.get(layout, 0) + 1
    return counts


def quantized_weights(model: nn.Module) -> list[QuantizedWeight]:
    return [m for m in model.modules() if isinstance(m, QuantizedWeight)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters plus its quantised weights (their buffers)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(q.nbytes() for q in quantized_weights(model))


def model_spec(model: nn.Module) -> QuantSpec | None:
    """The QuantSpec a model's base was quantised with, or None."""
    qs = quantized_weights(model)
    return qs[0].spec if qs else None
