"""`lav2 bench`: throughput of decoding and adapter training on random weights of a named
shape, with warm-up excluded, and what quantising a real model's base costs in quality.

Decoding reports tokens/s and the weight-read bandwidth it implies (every decoding step reads
every weight once, plus the KV cache so far); training reports tokens/s, model FLOP/s and MFU
counted as 4 x frozen parameters x tokens (forward 2N plus the activation gradients 2N; the
frozen weights need no weight gradients). Both take `quantize` (weight bytes then count the
quantised weights and their scales). `bench_quality` compares a model's logits and greedy
answers with its base quantised against the float model on fixed prompts.
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

from lav2cli.data.records import read_records
from lav2cli.engine import load
from lav2cli.errors import Lav2Error
from lav2cli.inference.fold import prepare_for_inference
from lav2cli.inference.generate import Sampling, generate
from lav2cli.model.adapter import LlamaAdapterV2, initial_value, is_adapter_param, param_role
from lav2cli.model.config import AdapterConfig, LlamaConfig
from lav2cli.model.quant import (QuantSpec, check_quantizable, is_base_linear, parse_quantize, quantize_base,
                                 quantized_nbytes, quantized_weights, weight_bytes)

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


def random_model(shape: str, variant: str, lora_rank: int, device: torch.device, dtype: torch.dtype,
                 quantize: QuantSpec | None = None) -> LlamaAdapterV2:
    """Random weights in the shape, frozen base in `dtype`, adapter in float32, gates open. With
    `quantize`, each base linear is drawn and quantised in turn (no float copy of the base)."""
    cfg = shape_config(shape)
    if variant not in ("paper", "official", "none"):
        raise Lav2Error(f"unknown variant {variant!r} (expected paper, official or none)")
    check_quantizable(cfg, quantize)
    adapter = None if variant == "none" else AdapterConfig(variant=variant, lora_rank=lora_rank, visual=None)
    with torch.device("meta"):
        model = LlamaAdapterV2(cfg, adapter)
        for name, p in model.named_parameters():
            if not is_adapter_param(name):
                p.data = p.data.to(dtype)  # allocated in their final dtype: no float32 copy first
    needed = sum(quantized_nbytes(*p.shape, quantize, dtype) if quantize and is_base_linear(n) else p.nbytes
                 for n, p in model.named_parameters())
    free = free_memory(device)
    if free is not None and needed > free:
        hint = " (--dtype bfloat16 halves it)" if dtype == torch.float32 else ""
        raise Lav2Error(f"the {shape} shape in {str(dtype).removeprefix('torch.')}"
                        f"{f' ({quantize})' if quantize else ''} needs {needed / 1e9:.1f} GB for "
                        f"its weights alone; {device} has {free / 1e9:.1f} GB free{hint}")
    gen = torch.Generator(device=device).manual_seed(0)
    if quantize is not None:
        quantize_base(model, quantize, device, source=lambda _, p: torch.empty(
            p.shape, device=device, dtype=dtype).normal_(0, 0.02, generator=gen))
    _materialize(model, device)
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


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) every parameter still on the meta device; quantised weights,
    already real, stay as they are (`to_empty` would replace them too)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)


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


def _layouts(model: nn.Module) -> dict[str, int]:
    """How many quantised weights use each layout (plain, or a fused kernel's)."""
    out: dict[str, int] = {}
    for q in quantized_weights(model):
        out[q.layout] = out.get(q.layout, 0) + 1
    return out


def bench_decode(shape: str, batch: int, prompt_len: int, new_tokens: int, compile: bool, variant: str,
                 device: torch.device, dtype: torch.dtype, fold: bool = True, trace: Path | None = None,
                 quantize: str | QuantSpec | None = None) -> dict[str, Any]:
    check_trace_path(trace)
    spec = parse_quantize(quantize)
    _cpu_denormals_off(device)
    model = random_model(shape, variant, 0, device, dtype, spec).eval()
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
    bw = (weight_bytes(model) + kv_bytes) * (steps - 1) / decode_s
    profiled = profile_once(lambda: run(new_tokens), device, trace) if trace is not None else {}
    return {
        "bench": "decode", "shape": shape, "variant": variant, "batch": batch, "prompt_len": prompt_len,
        "new_tokens": steps, "compile": compile, "folded_linears": folded, "column_major_weights": moved, "dtype": str(dtype).removeprefix("torch."),
        "quantize": str(spec) if spec else "none", "quantized_layouts": _layouts(model),
        "tokens_per_s": round(tok_s, 2), "seconds_per_token": round(decode_s / max(steps - 1, 1), 6),
        "prefill_s": round(prefill, 4), "weight_bytes": weight_bytes(model),
        "bandwidth_gb_s": round(bw / 1e9, 3), "bandwidth_share": round(bw / peak_bw, 3) if peak_bw else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
        "device": name, "torch": torch.__version__, **profiled,
    }


def bench_train(shape: str, batch: int, seq: int, grad_ckpt: bool, compile: bool, variant: str, lora_rank: int,
                steps: int, device: torch.device, dtype: torch.dtype, trace: Path | None = None,
                ckpt_blocks: int = 0, quantize: str | QuantSpec | None = None) -> dict[str, Any]:
    """`grad_ckpt` checkpoints every block; `ckpt_blocks` > 0 only the first that many."""
    check_trace_path(trace)
    spec = parse_quantize(quantize)
    n_layers = shape_config(shape).n_layers
    if ckpt_blocks > n_layers:
        raise Lav2Error(f"--ckpt-blocks {ckpt_blocks}: the {shape} shape has {n_layers} blocks")
    _cpu_denormals_off(device)
    model = random_model(shape, variant, lora_rank, device, dtype, spec).train()
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
    frozen += sum(q.in_features * q.out_features for q in quantized_weights(model))
    flops = 4 * frozen * tok_s
    name, peak_flops, _ = device_peaks(device)
    return {
        "bench": "train", "shape": shape, "variant": variant, "lora_rank": lora_rank, "batch": batch, "seq": seq,
        "grad_ckpt": model.llama.checkpoint_blocks > 0, "checkpointed_blocks": model.llama.checkpoint_blocks,
        "compile": compile, "quantize": str(spec) if spec else "none", "weight_bytes": weight_bytes(model),
        "steps": steps, "loss": round(float(loss), 4),
        "tokens_per_s": round(tok_s, 1), "model_tflop_s": round(flops / 1e12, 1),
        "mfu": round(flops / peak_flops, 3) if peak_flops else None,
        "trainable_params": sum(p.numel() for p in params), "frozen_params": frozen,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None,
        "device": name, "torch": torch.__version__,
        "flops_note": "4 x frozen parameters x tokens (forward + activation gradients)", **profiled,
    }


def bench_quality(ref: str, data: Path, quantize: list[str], limit: int = 60, new_tokens: int = 32,
                  batch_size: int = 16, device: str = "auto", dtype: str = "auto", base: str | None = None,
                  clip: str | None = None, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The float model against its base quantised each way in `quantize`, on the text prompts of
    the first `limit` records of `data` (images are not read), as `ask` runs them (inference=True):

    - mean |logit difference| and top-1 agreement, teacher-forced on the float model's greedy
      answers (every position that predicts an answer token, the whole vocabulary);
    - the share of prompts whose greedy answer (`new_tokens` at most) is token for token the same.
    """
    specs = [parse_quantize(q) for q in quantize]
    if not specs or any(s is None for s in specs):
        raise Lav2Error("--quantize: name int8 and/or int4[:GROUP] to compare with the float model")
    records = list(read_records(data))[:limit]
    if not records:
        raise Lav2Error(f"{data}: no records")
    sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0)

    def answers(eng) -> list[list[int]]:
        out: list[list[int]] = []
        for i in range(0, len(prompts), batch_size):
            out += eng.generate(prompts[i:i + batch_size], sampling=sampling)
        return out

    log(f"float: {ref} on {len(records)} prompts ...")
    eng = load(ref, base=base, clip=clip, device=device, dtype=dtype, inference=True)
    prompts = [eng.template.encode_prompt(eng.tokenizer, r.instruction, r.input) for r in records]
    float_answers = answers(eng)
    seqs = [p + a for p, a in zip(prompts, float_answers)]

    def answer_logits(e) -> list[torch.Tensor]:  # the rows that predict each answer token
        return [e.logits(torch.tensor([s]))[0, len(p) - 1:len(s) - 1].cpu() for s, p in zip(seqs, prompts)]

    ref_logits = answer_logits(eng)
    result: dict[str, Any] = {"bench": "quality", "model": ref, "data": str(data), "prompts": len(records),
                              "new_tokens": new_tokens, "answer_tokens": sum(len(a) for a in float_answers),
                              "dtype": str(eng.dtype).removeprefix("torch."), "device": str(eng.device),
                              "torch": torch.__version__, "float_weight_bytes": weight_bytes(eng.model), "quantized": {}}
    del eng
    for spec in specs:
        log(f"{spec}: {ref} on {len(records)} prompts ...")
        q = load(ref, base=base, clip=clip, device=device, dtype=dtype, inference=True, quantize=spec)
        q_logits = answer_logits(q)
        diffs = [(a - b).abs() for a, b in zip(ref_logits, q_logits)]
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref_logits, q_logits))
        q_answers = answers(q)
        n_rows = sum(d.shape[0] for d in diffs)
        result["quantized"][str(spec)] = {
            "weight_bytes": weight_bytes(q.model),
            "mean_abs_logit_diff": round(float(sum(d.sum() for d in diffs)) / max(sum(d.numel() for d in diffs), 1), 5),
            "max_abs_logit_diff": round(max((float(d.max()) for d in diffs if d.numel()), default=0.0), 4),
            "top1_agreement": round(agree / max(n_rows, 1), 4),
            "same_greedy_answer": round(sum(a == b for a, b in zip(float_answers, q_answers)) / len(records), 4),
        }
        del q
    return result
