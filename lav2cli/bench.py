"""`lav2 bench`: throughput of decoding and adapter training on random weights of a named
shape, with warm-up excluded.

Decoding reports tokens/s and the weight-read bandwidth it implies (every decoding step reads
every weight once, plus the KV cache so far); training reports tokens/s, model FLOP/s and MFU
counted as 4 x frozen parameters x tokens (forward 2N plus the activation gradients 2N; the
frozen weights need no weight gradients).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lav2cli.errors import Lav2Error
from lav2cli.inference.fold import prepare_for_inference
from lav2cli.inference.generate import Sampling, generate
from lav2cli.model.adapter import LlamaAdapterV2, initial_value, is_adapter_param, param_role
from lav2cli.model.config import AdapterConfig, LlamaConfig

SHAPES: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=160, max_seq_len=4096),
    "smollm2-135m": LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                                norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True, max_seq_len=4096),
    "llama-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008,
                            norm_eps=1e-6, max_seq_len=4096),
    "llama-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000, hidden_dim=13824,
                             norm_eps=1e-6, max_seq_len=4096),
}

# dense bf16 peak FLOP/s and memory bandwidth (bytes/s), by device name
DEVICES = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


def device_peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for key, (flops, bw) in DEVICES.items():
        if key in name:
            return name, flops, bw
    return name, None, None


def shape_config(shape: str) -> LlamaConfig:
    if shape not in SHAPES:
        raise Lav2Error(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")
    return SHAPES[shape]


def random_model(shape: str, variant: str, lora_rank: int, device: torch.device, dtype: torch.dtype) -> LlamaAdapterV2:
    """Random weights in the shape, frozen base in `dtype`, adapter in float32, gates open."""
    cfg = shape_config(shape)
    if variant not in ("paper", "official", "none"):
        raise Lav2Error(f"unknown variant {variant!r} (expected paper, official or none)")
    adapter = None if variant == "none" else AdapterConfig(variant=variant, lora_rank=lora_rank, visual=None)
    with torch.device("meta"):
        model = LlamaAdapterV2(cfg, adapter)
        for name, p in model.named_parameters():
            if not is_adapter_param(name):
                p.data = p.data.to(dtype)  # allocated in their final dtype: no float32 copy first
    needed = _param_bytes(model)
    free = free_memory(device)
    if free is not None and needed > free:
        hint = " (--dtype bfloat16 halves it)" if dtype == torch.float32 else ""
        raise Lav2Error(f"the {shape} shape in {str(dtype).removeprefix('torch.')} needs {needed / 1e9:.1f} GB for "
                        f"its weights alone; {device} has {free / 1e9:.1f} GB free{hint}")
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for name, p in model.named_parameters():
            if param_role(name) == "gate":
                p.fill_(0.1)  # open, so that the prompt path does its real work
            elif is_adapter_param(name):
                p.copy_(initial_value(name, modules[name.rpartition(".")[0]], p.shape))
            else:
                p.normal_(0, 0.02, generator=gen)
    model.llama.extend_rope(cfg.max_seq_len)
    model.freeze_base()
    return model


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device (CUDA) or available to a new allocation (CPU, Linux's
    MemAvailable); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_denormals_off(device: torch.device) -> None:
    """Random weights drive activations into denormal floats, 10x slower on CPU. The flag is
    per thread and worker threads copy it when they start: call before any parallel work."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_busy_share(chrome_trace: dict[str, Any], wall_s: float) -> float | None:
    """The share of `wall_s` the GPU spent in kernels, from a profiler's Chrome trace (events of
    category "kernel", durations in microseconds); None without kernel events (CPU runs). Near 1:
    the device is the limit; well below: the host keeps it waiting (launches, syncs, Python)."""
    kernel_us = sum(e.get("dur", 0) for e in chrome_trace.get("traceEvents", []) if e.get("cat") == "kernel")
    return round(kernel_us / 1e6 / wall_s, 3) if kernel_us else None


def check_trace_path(trace: Path | None) -> None:
    """Fail before the benchmark runs, not after, when the trace cannot be written."""
    if trace is None:
        return
    try:
        trace.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Lav2Error(f"--trace {trace}: cannot create its folder ({e.strerror})") from None
    if trace.is_dir() or not os.access(trace.parent, os.W_OK):
        raise Lav2Error(f"--trace {trace}: not a writable file path")


def profile_once(run: Callable[[], Any], device: torch.device, trace: Path) -> dict[str, Any]:
    """Run once more under torch.profiler (timed runs stay unprofiled), write its Chrome trace
    (chrome://tracing, Perfetto) to `trace` through a temporary name, and return the trace's
    path and the device's busy share."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no alarming "gpuGetDeviceCount failed" on CPU
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        _sync(device)
        wall = time.perf_counter() - t0
    tmp = trace.with_name(trace.name + ".tmp")
    prof.export_chrome_trace(str(tmp))
    busy = device_busy_share(json.loads(tmp.read_text()), wall)
    os.replace(tmp, trace)
    return {"trace": str(trace), "profiled_run_s": round(wall, 4), "device_busy_share": busy}


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bench_decode(shape: str, batch: int, prompt_len: int, new_tokens: int, compile: bool, variant: str,
                 device: torch.device, dtype: torch.dtype, fold: bool = True, trace: Path | None = None) -> dict[str, Any]:
    check_trace_path(trace)
    _cpu_denormals_off(device)
    model = random_model(shape, variant, 0, device, dtype).eval()
    folded, moved = prepare_for_inference(model) if fold else (0, 0)  # as `ask` and `eval` run it
    vocab = model.config.vocab_size
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    run = lambda n: generate(model, prompts, stop_ids=frozenset(), pad_id=0,  # noqa: E731
                             sampling=Sampling(max_new_tokens=n, temperature=0), compile=compile)
    run(new_tokens)  # warm-up, with the timed run's shapes (a compiled step is specialised to them)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    out = run(new_tokens)
    _sync(device)
    seconds = time.perf_counter() - t0
    steps = len(out[0])
    # prefill excluded from the rate: time one prefill-only call and subtract it
    t1 = time.perf_counter()
    run(1)
    _sync(device)
    prefill = time.perf_counter() - t1
    decode_s = max(seconds - prefill, 1e-9)
    tok_s = batch * (steps - 1) / decode_s
    name, _, peak_bw = device_peaks(device)
    cfg = model.config
    kv_bytes = 2 * cfg.n_layers * batch * cfg.n_kv_heads * cfg.head_dim * (prompt_len + steps / 2) * torch.finfo(dtype).bits // 8
    bw = (_param_bytes(model) + kv_bytes) * (steps - 1) / decode_s
    profiled = profile_once(lambda: run(new_tokens), device, trace) if trace is not None else {}
    return {
        "bench": "decode", "shape": shape, "variant": variant, "batch": batch, "prompt_len": prompt_len,
        "new_tokens": steps, "compile": compile, "folded_linears": folded, "column_major_weights": moved, "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_s": round(tok_s, 2), "seconds_per_token": round(decode_s / max(steps - 1, 1), 6),
        "prefill_s": round(prefill, 4), "weight_bytes": _param_bytes(model),
        "bandwidth_gb_s": round(bw / 1e9, 1), "bandwidth_share": round(bw / peak_bw, 3) if peak_bw else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
        "device": name, "torch": torch.__version__, **profiled,
    }


def bench_train(shape: str, batch: int, seq: int, grad_ckpt: bool, compile: bool, variant: str, lora_rank: int,
                steps: int, device: torch.device, dtype: torch.dtype, trace: Path | None = None,
                ckpt_blocks: int = 0) -> dict[str, Any]:
    """`grad_ckpt` checkpoints every block; `ckpt_blocks` > 0 only the first that many."""
    check_trace_path(trace)
    n_layers = shape_config(shape).n_layers
    if ckpt_blocks > n_layers:
        raise Lav2Error(f"--ckpt-blocks {ckpt_blocks}: the {shape} shape has {n_layers} blocks")
    _cpu_denormals_off(device)
    model = random_model(shape, variant, lora_rank, device, dtype).train()
    model.llama.checkpoint_blocks = ckpt_blocks or (model.config.n_layers if grad_ckpt else 0)
    if compile:
        for layer in model.llama.layers:
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda" or None)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(3, vocab, (batch, seq), device=device, generator=gen)
    cuda = device.type == "cuda"

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and dtype == torch.bfloat16):
            prompts = model.prompts(None, None)
            h = model.llama.hidden(tokens, prompt_kv=prompts)
            logits = F.linear(h[:, :-1].reshape(-1, h.shape[-1]), model.llama.head_weight())
        loss = F.cross_entropy(logits.float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(3):  # warm-up (and compilation)
        step()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = time.perf_counter() - t0
    tok_s = batch * seq * steps / seconds
    profiled = profile_once(lambda: [step() for _ in range(min(steps, 3))], device, trace) if trace is not None else {}
    frozen = sum(p.numel() for n, p in model.named_parameters() if not is_adapter_param(n))
    flops = 4 * frozen * tok_s
    name, peak_flops, _ = device_peaks(device)
    return {
        "bench": "train", "shape": shape, "variant": variant, "lora_rank": lora_rank, "batch": batch, "seq": seq,
        "grad_ckpt": model.llama.checkpoint_blocks > 0, "checkpointed_blocks": model.llama.checkpoint_blocks,
        "compile": compile, "steps": steps, "loss": round(float(loss), 4),
        "tokens_per_s": round(tok_s, 1), "model_tflop_s": round(flops / 1e12, 1),
        "mfu": round(flops / peak_flops, 3) if peak_flops else None,
        "trainable_params": sum(p.numel() for p in params), "frozen_params": frozen,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None,
        "device": name, "torch": torch.__version__,
        "flops_note": "4 x frozen parameters x tokens (forward + activation gradients)", **profiled,
    }
