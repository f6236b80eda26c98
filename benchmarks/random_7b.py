"""Write what a real `lav2 train` at the LLaMA-7B shape needs, without downloading anything: a
random bf16 base in the Meta layout (params.json, consolidated.00.pth, a sentencepiece
tokenizer trained here on generated text), random images, and records of about 420 tokens for
both streams (image-text captions and text instructions), plus 2,374 easy questions about the
images, as many as MME asks, for an eval at that shape.

    python benchmarks/random_7b.py OUT_DIR [--device cuda]

Then, e.g.:
    lav2 train --recipe recipes/llama7b-joint.toml --out OUT_DIR/run --set model.ref=OUT_DIR/base \
        --set model.encoder=open_clip:ViT-L-14 --set data.image_text=OUT_DIR/captions.jsonl \
        --set data.instruction=OUT_DIR/instructions.jsonl --set train.max_steps=60
(`open_clip:ViT-L-14` without a pretrained tag is a randomly initialised encoder.)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from lav2cli.formats import meta
from lav2cli.model.config import LlamaConfig

WORDS = ("the a cat dog sat on mat red blue green shape circle square triangle image picture what is color of "
         "there in this how many yes no small large photo shows answer question llama adapter vision language "
         "model token text hello world one two three four five six seven eight nine street tree house car").split()
QUESTIONS = 2374  # MME's question count


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def tokenizer(out: Path, rng: random.Random) -> Path:
    import sentencepiece as spm

    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(sentence(rng, rng.randint(4, 16)) for _ in range(20000)) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=500,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    return out / "tokenizer.model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--records", type=int, default=2000, help="records per stream")
    ap.add_argument("--layers", type=int, default=32, help="blocks (fewer: a quick check of this script)")
    args = ap.parse_args()
    out, rng, t0 = args.out, random.Random(0), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    spm_path = tokenizer(out, rng)
    config = LlamaConfig(dim=4096, n_layers=args.layers, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008,
                         norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=False, max_seq_len=2048)
    g = torch.Generator(device=args.device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=args.device, dtype=torch.bfloat16) * 0.02).cpu()

    d, h = config.dim, config.hidden_dim
    state = {"tok_embeddings.weight": rand(config.vocab_size, d), "norm.weight": torch.ones(d, dtype=torch.bfloat16),
             "output.weight": rand(config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            state[f"{p}attention.{name}.weight"] = rand(d, d)
        state[f"{p}feed_forward.w1.weight"] = rand(h, d)
        state[f"{p}feed_forward.w2.weight"] = rand(d, h)
        state[f"{p}feed_forward.w3.weight"] = rand(h, d)
        state[f"{p}attention_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        state[f"{p}ffn_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    meta.save(out / "base", config, state, tokenizer_model_path=spm_path)
    del state
    from PIL import Image

    (out / "images").mkdir(exist_ok=True)
    images = []
    for i in range(64):
        p = out / "images" / f"{i}.png"
        Image.new("RGB", (224, 224), tuple(rng.randrange(256) for _ in range(3))).save(p)
        images.append(f"images/{i}.png")
    # about 420 tokens each: a long instruction and a long answer
    captions = [{"id": f"c{i}", "image": images[i % len(images)], "instruction": "Generate caption of this image",
                 "input": "", "output": " ".join(sentence(rng, 12) for _ in range(32)), "kind": "caption",
                 "source": "random"} for i in range(args.records)]
    instructions = [{"id": f"i{i}", "image": None, "instruction": " ".join(sentence(rng, 12) for _ in range(15)),
                     "input": "", "output": " ".join(sentence(rng, 12) for _ in range(17)), "kind": "instruction",
                     "source": "random"} for i in range(args.records)]
    questions = [{"id": f"q{i}", "image": images[i % len(images)], "instruction": "Is there a cat in the image?",
                  "input": "", "output": rng.choice(["yes", "no"]), "kind": "vqa", "source": "random"}
                 for i in range(QUESTIONS)]
    for name, rows in (("captions.jsonl", captions), ("instructions.jsonl", instructions),
                       ("questions.jsonl", questions)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: random LLaMA-7B base (Meta layout), {len(images)} images, {args.records} records per stream, "
          f"{QUESTIONS} questions in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
