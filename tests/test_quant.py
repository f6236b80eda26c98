"""Weight-only quantisation of the frozen base (`--quantize`, `model.quantize`): a quantised
weight stays within half a quantisation step of the float one and its product within a stated
tolerance (the backward pass too); the fused decoding kernels agree with the dequantised product;
a fresh adapter on a quantised base computes the quantised base model; the inference fold leaves
quantised linears alone; an adapter trains on a quantised tiny base, records it, and loads on the
float base; merge folds into the dequantised base and writes float weights; bad values fail in
one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lav2cli import engine
from lav2cli.bench import bench_decode, bench_train
from lav2cli.errors import Lav2Error
from lav2cli.inference.fold import fold_for_inference
from lav2cli.merge import merge
from lav2cli.model.adapter import AdaptedLinear
from lav2cli.model.config import AdapterConfig
from lav2cli.model.quant import (QuantizedLinear, QuantizedWeight, QuantSpec, parse_quantize, quantized_nbytes,
                                 quantized_weights, weight_bytes)
from lav2cli.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": ""}
SPECS = [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64)]
# relative Frobenius error of x W^T for Gaussian W and x, a little above what rounding to the
# grid gives (int8: a step of 2 max|row| / 254, rms error step / sqrt 12, about 0.8% of the
# product; int4: 16 levels over each group's range, 6-9%)
PRODUCT_TOL = {"int8": 0.015, "int4:32": 0.10, "int4:64": 0.12}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lav2cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def base(base_dir) -> Path:
    return base_dir  # the session's tiny base; these tests only read it


def tokens(cfg, n=2, t=11) -> torch.Tensor:
    return torch.randint(3, cfg.vocab_size, (n, t), generator=torch.Generator().manual_seed(5))


# -- the quantised weight ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantized_weight_is_within_half_a_step_and_its_product_within_tolerance(spec):
    g = torch.Generator().manual_seed(0)
    w = 0.05 * torch.randn(192, 576, generator=g)
    qw = QuantizedWeight.from_float(w, spec)
    deq = qw.dequantize()
    if spec.bits == 8:
        step = qw.scales[:, None].expand_as(w)
    else:  # scale per (row, group)
        step = qw.scales[..., 0].t().repeat_interleave(spec.group_size, 1)
    assert bool(((deq - w).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all())
    x = torch.randn(3, 7, 576, generator=g, requires_grad=True)
    y = qw(x)
    assert y.shape == (3, 7, 192)
    assert rel(y, x @ w.t()) < PRODUCT_TOL[str(spec)]
    assert torch.allclose(y, x @ deq.t(), atol=1e-5, rtol=1e-5)  # the product is exactly the dequantised one
    gy = torch.randn(3, 7, 192, generator=g)
    y.backward(gy)
    assert torch.allclose(x.grad, gy @ deq, atol=1e-5, rtol=1e-5)
    # stored bytes: int8 one per weight, int4 half a byte; the scales (zeros) besides, float32 here
    per_row = 576 + 4 if spec.bits == 8 else 576 // 2 + 2 * 4 * 576 // spec.group_size
    assert qw.nbytes() == quantized_nbytes(192, 576, spec, torch.float32) == 192 * per_row


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_fused_decoding_kernels_agree_with_the_dequantised_product(spec):
    """CPU: torch's int8/int4 kernels compute in bfloat16: within 1% of the float32 product."""
    g = torch.Generator().manual_seed(1)
    qw = QuantizedWeight.from_float(0.05 * torch.randn(160, 576, generator=g), spec)
    x = torch.randn(2, 5, 576, generator=g)
    with torch.no_grad():
        plain = qw(x)
        assert qw.pack_for_decoding() == ("cpu-int8" if spec.bits == 8 else "cpu-int4")
        packed = qw(x)
    assert packed.dtype == torch.float32 and rel(packed, plain) < 0.01
    with pytest.raises(RuntimeError, match="packed for decoding"):
        qw(x.requires_grad_())


def test_parse_quantize_and_bad_values():
    assert parse_quantize("none") is None and parse_quantize(None) is None
    assert parse_quantize("int8") == QuantSpec(8)
    assert parse_quantize("int4") == QuantSpec(4, 32) and str(parse_quantize("INT4:128")) == "int4:128"
    for bad in ("int5", "int4:48", "int4:", "fp8", "int8:64"):
        with pytest.raises(Lav2Error, match="expected none, int8, int4 or int4:GROUP"):
            parse_quantize(bad)


# -- a quantised model --------------------------------------------------------------------------------


def test_group_size_that_does_not_divide_is_refused_in_one_line(base):
    with pytest.raises(Lav2Error) as e:
        engine.load(str(base), device="cpu", quantize="int4:64")  # w2 reads hidden_dim 160 columns
    msg = str(e.value)
    assert "\n" not in msg and "feed_forward.w2.weight has 160 input columns" in msg and "int4:32" in msg


@pytest.mark.parametrize("q", ["int8", "int4:32"])
def test_quantized_base_model_stores_quantized_linears_only(base, tiny_llama_config, q):
    plain = engine.load(str(base), device="cpu")
    eng = engine.load(str(base), device="cpu", quantize=q)
    assert eng.config.quantize == q
    qs = quantized_weights(eng.model)
    assert len(qs) == 7 * tiny_llama_config.n_layers
    assert all(isinstance(getattr(layer.attention, n), QuantizedLinear) for layer in eng.model.llama.layers
               for n in ("wq", "wk", "wv", "wo"))
    assert eng.model.llama.tok_embeddings.weight.dtype == torch.float32  # embeddings and head stay float
    assert weight_bytes(eng.model) < weight_bytes(plain.model)
    t = tokens(tiny_llama_config)
    a, b = eng.logits(t), plain.logits(t)
    assert rel(a, b) < (0.02 if q == "int8" else 0.15)


@pytest.mark.parametrize("q", ["int8", "int4:32"])
def test_zero_init_identity_holds_on_a_quantized_base(base, tiny_llama_config, q):
    """A fresh adapter (gates 0, bias 0, scale 1, LoRA's l2 0) on a quantised base computes the
    quantised base model: the same quantised weights, the adapter's arithmetic on top."""
    cfg = AdapterConfig(variant="paper", prompt_layers=2, lora_rank=4, visual=None)
    fresh = engine.load(str(base), device="cpu", adapter=cfg, quantize=q)
    plain = engine.load(str(base), device="cpu", quantize=q)
    assert all(isinstance(m.quantized, QuantizedWeight) for m in fresh.model.modules() if isinstance(m, AdaptedLinear))
    t = tokens(tiny_llama_config)
    assert torch.allclose(fresh.logits(t), plain.logits(t), atol=1e-5, rtol=1e-5)


def _noisy_adapter(base: Path, out: Path, cfg: AdapterConfig, quantize: str | None = None) -> engine.Engine:
    eng = engine.load(str(base), device="cpu", adapter=cfg, quantize=quantize)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in eng.model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    eng.save_adapter(out, training={"stage": "finetune", "quantize": quantize or "none"})
    return eng


def test_inference_fold_leaves_quantized_linears_as_trained(base, tiny_llama_config, tmp_path):
    """fold_for_inference must not write scale or LoRA into quantised weights: they stay on top,
    and the folded model computes what the unfolded one does."""
    cfg = AdapterConfig(variant="paper", prompt_layers=2, lora_rank=4, visual=None)
    eng = _noisy_adapter(base, tmp_path / "a", cfg, quantize="int8")
    t = tokens(tiny_llama_config)
    before = eng.logits(t)
    q_before = [q.qweight.clone() for q in quantized_weights(eng.model)]
    fold_for_inference(eng.model)
    assert [torch.equal(a, q.qweight) for a, q in zip(q_before, quantized_weights(eng.model))] == [True] * len(q_before)
    att = eng.model.llama.layers[0].attention
    assert att.lora_rank == 4 and att.wq.scale is not None
    assert torch.allclose(eng.logits(t), before, atol=1e-5, rtol=1e-5)
    # what `ask` runs: the packed kernels (bfloat16 inside) stay close to the unfolded model
    ask = engine.load(str(tmp_path / "a"), device="cpu", quantize="int8", inference=True)
    assert {q.layout for q in quantized_weights(ask.model)} == {"cpu-int8"}
    assert rel(ask.logits(t), before) < 0.01


# -- training, loading, merging ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_int4(tmp_path_factory, base):
    """A finetune stage on the int4-quantised tiny base (LoRA, bias, scale, prompts)."""
    d = tmp_path_factory.mktemp("qtrain")
    rows = [{"id": f"i{i}", "image": None, "instruction": q, "input": "", "output": a, "kind": "instruction",
             "source": "test"} for i, (q, a) in enumerate([
                 ("what is one plus one", "two"), ("say hello", "hello world"), ("name a color", "red"),
                 ("what sat on the mat", "the cat"), ("count to three", "one two three"), ("say no", "no")])]
    (d / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = d / "run"
    sets = {"model.ref": f'"{base}"', "data.instruction": f'"{d / "instructions.jsonl"}"', "adapter.visual": "false",
            "adapter.prompt_layers": "2", "adapter.lora_rank": "4", "train.base_lr": "5.0", "train.warmup_steps": "0",
            "train.log_every": "1", "train.batch_size": "4", "train.checkpoint_every": "0",
            "model.quantize": '"int4:32"'}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = run_cli("train", "--recipe", str(ROOT / "recipes/tiny.toml"), "--stage", "finetune", "--out", str(out),
                "--max-steps", "12", *args)
    assert r.returncode == 0, r.stderr
    return out


def test_adapter_trains_on_a_quantized_base_and_loads_on_the_float_base(trained_int4, tiny_llama_config):
    losses = [json.loads(ln)["loss"] for ln in (trained_int4 / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0], losses
    training = json.loads((trained_int4 / "lav2.json").read_text())["training"]
    assert training["quantize"] == "int4:32" and training["recipe"]["model"]["quantize"] == "int4:32"
    saved = load_file(str(trained_int4 / "adapter.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())  # the adapter is float
    # a record, not a requirement: the artifact loads on the float base unless asked
    plain = engine.load(str(trained_int4), device="cpu")
    assert plain.config.quantize is None and not quantized_weights(plain.model)
    quant = engine.load(str(trained_int4), device="cpu", quantize="int4:32")
    t = tokens(tiny_llama_config)
    assert rel(plain.logits(t), quant.logits(t)) < 0.15


def test_merge_after_quantized_training_folds_into_the_dequantized_base_and_writes_float(trained_int4, tmp_path,
                                                                                           tiny_llama_config):
    res = merge(str(trained_int4), tmp_path / "m", device="cpu")
    assert res.base_quantize == "int4:32" and res.max_logit_diff is not None and res.max_logit_diff < 1e-3
    sd = load_file(str(tmp_path / "m" / "llama.safetensors"))
    assert {t.dtype for t in sd.values()} == {torch.float32}
    merged = engine.load(str(tmp_path / "m"), device="cpu")  # float weights, whatever lav2.json recorded
    assert not quantized_weights(merged.model)
    trained = engine.load(str(trained_int4), device="cpu", quantize="int4:32")
    t = tokens(tiny_llama_config)
    assert torch.allclose(merged.logits(t), trained.logits(t), atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "m" / "lav2.json").read_text())["merged"]["base_quantize"] == "int4:32"
    # --float-base: into the original float weights, which the float-loaded adapter computes with
    res = merge(str(trained_int4), tmp_path / "f", device="cpu", float_base=True)
    assert res.base_quantize is None and res.max_logit_diff < 1e-3
    # a merged directory is not quantised again when merged or loaded
    assert merge(str(tmp_path / "m"), tmp_path / "mm", device="cpu").base_quantize is None


def test_cli_quantize_and_one_line_errors(base, trained_int4, tmp_path):
    r = run_cli("ask", "none", "hello", "--model", str(trained_int4), "--quantize", "int8", "--max-new-tokens", "3",
                "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert "answer" in json.loads(r.stdout.splitlines()[-1])
    r = run_cli("ask", "none", "hello", "--model", str(base), "--quantize", "int5")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("lav2: error: --quantize 'int5': expected none, int8, int4")
    r = run_cli("ask", "none", "hello", "--model", str(base), "--quantize", "int4:64")
    assert r.returncode == 1 and "not a multiple of the group size 64" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("info", str(trained_int4))
    assert r.returncode == 0 and "quantised int4:32" in r.stdout, r.stderr
    r = run_cli("merge", str(trained_int4), "--out", str(tmp_path / "m"), "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["base_quantize"] == "int4:32" and "not quantised" in r.stderr


def test_recipe_quantize_is_checked_before_anything_loads(tmp_path):
    with pytest.raises(Lav2Error, match="model.quantize 'int3'"):
        load_recipe(ROOT / "recipes/tiny.toml", ["model.quantize=int3", "train.stage=finetune",
                                                 f"data.instruction={ROOT / 'benchmarks/text-facts.jsonl'}"])
    with pytest.raises(Lav2Error, match="train.fsdp"):
        load_recipe(ROOT / "recipes/tiny.toml", ["model.quantize=int8", "train.fsdp=true", "train.stage=finetune",
                                                 f"data.instruction={ROOT / 'benchmarks/text-facts.jsonl'}"])


def test_eval_records_and_checks_the_quantization(base, tmp_path):
    data = ROOT / "benchmarks/text-facts.jsonl"
    out = tmp_path / "p.jsonl"
    r = run_cli("eval", "text", "--data", str(data), "--model", str(base), "--out", str(out), "--limit", "2",
                "--max-new-tokens", "2", "--quantize", "int8", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quantize"] == "int8"
    assert all(json.loads(ln)["quantize"] == "int8" for ln in out.read_text().splitlines())
    r = run_cli("eval", "text", "--data", str(data), "--model", str(base), "--out", str(out), "--limit", "3",
                "--max-new-tokens", "2", "--device", "cpu")
    assert r.returncode == 1 and "made with --quantize int8, not none" in r.stderr


# -- bench ------------------------------------------------------------------------------------------


def test_bench_counts_quantized_bytes_and_runs():
    dev = torch.device("cpu")
    f = bench_decode("tiny", 1, 8, 3, False, "paper", dev, torch.float32)
    q = bench_decode("tiny", 1, 8, 3, False, "paper", dev, torch.float32, quantize="int8")
    assert q["quantize"] == "int8" and q["quantized_layouts"] == {"cpu-int8": 14}
    assert q["weight_bytes"] < f["weight_bytes"]
    t = bench_train("tiny", 2, 16, False, False, "paper", 0, 1, dev, torch.float32, quantize="int4:32")
    assert t["quantize"] == "int4:32" and t["loss"] == t["loss"]


# -- CUDA (skipped without it) ----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_cuda_kernels_agree_with_the_dequantised_product(spec):
    g = torch.Generator().manual_seed(2)
    w = (0.05 * torch.randn(4096, 4096, generator=g)).cuda().bfloat16()
    qw = QuantizedWeight.from_float(w, spec)
    x = torch.randn(3, 4096, generator=g).cuda().bfloat16()
    with torch.no_grad():
        plain = qw(x).float()
        layout = qw.pack_for_decoding()
        packed = qw(x).float()
    assert layout == ("plain" if spec.bits == 8 else "cuda-int4")
    assert rel(packed, plain) < 0.01
    assert rel(plain, (x.float() @ w.float().t())) < PRODUCT_TOL[str(spec)]


# -- the embedded GGUF base ---------------------------------------------------------------------------


@pytest.mark.slow
def test_int4_32_keeps_the_embedded_q4_1_base_exactly():
    """SmolLM2's GGUF stores its linears as Q4_1 (blocks of 32 values, a scale and a minimum):
    every block uses all 16 levels, so int4:32 lands on the file's own grid, weight for weight."""
    f = engine.load("smollm2-135m-instruct", device="cpu")
    q = engine.load("smollm2-135m-instruct", device="cpu", quantize="int4:32")
    n = 0
    for name, p in f.model.named_parameters():
        if ".attention.w" in name or ".feed_forward.w" in name:
            assert torch.equal(q.model.get_submodule(name.removesuffix(".weight")).quantized.dequantize(), p), name
            n += 1
    assert n == 7 * f.config.llama.n_layers
