"""Generation penalties: what each one changes, that neutral values change nothing, and that a
generation stuck in a loop leaves it."""

from __future__ import annotations

import pytest
import torch

from lav2cli.errors import Lav2Error
from lav2cli.inference.generate import Sampling, apply_penalties, generate
from lav2cli.model.adapter import LlamaAdapterV2
from lav2cli.model.config import LlamaConfig

TINY = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96, max_seq_len=64)
PROMPT = [5, 17, 3]  # greedy on the seed-0 model below falls into a six-token cycle


def tiny_model() -> LlamaAdapterV2:
    torch.manual_seed(0)
    return LlamaAdapterV2(TINY).eval()


def greedy(model: LlamaAdapterV2, prompts: list[list[int]], n: int = 40, **penalties: float) -> list[list[int]]:
    return generate(model, prompts, stop_ids=frozenset(), pad_id=0,
                    sampling=Sampling(n, temperature=0, **penalties))


def repeated_ngrams(ids: list[int], n: int = 4) -> int:
    """How many n-grams of `ids` occurred earlier in it (0: it never repeats itself)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


def test_each_penalty_changes_the_logits_of_generated_tokens_as_documented():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[1.0, 2.0, 0.0, 0.0]])  # tokens 0 and 1 were generated, 1 twice
    got = apply_penalties(logits, counts, Sampling(repetition_penalty=2.0))
    assert got.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # positive halved, negative doubled, unseen kept
    got = apply_penalties(logits, counts, Sampling(frequency_penalty=0.5))
    assert got.tolist() == [[1.5, -2.0, 0.5, 3.0]]  # 0.5 per occurrence
    got = apply_penalties(logits, counts, Sampling(presence_penalty=0.25))
    assert got.tolist() == [[1.75, -1.25, 0.5, 3.0]]  # once per token seen
    assert apply_penalties(logits, counts, Sampling(repetition_penalty=0.5)).tolist() == [[4.0, -0.5, 0.5, 3.0]]


def test_neutral_penalties_change_nothing_bitwise():
    logits, counts = torch.randn(3, 101), torch.randint(0, 3, (3, 101)).float()
    neutral = Sampling(repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    assert torch.equal(apply_penalties(logits, counts, neutral), logits)
    model = tiny_model()
    assert greedy(model, [PROMPT, [9, 9, 9, 1]]) == greedy(model, [PROMPT, [9, 9, 9, 1]], repetition_penalty=1.0,
                                                          frequency_penalty=0.0, presence_penalty=0.0)
    sampled = [generate(model, [PROMPT], stop_ids=frozenset(), pad_id=0, sampling=s)[0] for s in (
        Sampling(30, temperature=1.0, top_p=0.9, seed=4),
        Sampling(30, temperature=1.0, top_p=0.9, seed=4, repetition_penalty=1.0, presence_penalty=0.0))]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 2.0}, {"frequency_penalty": 0.5},
                                     {"presence_penalty": 1.0}])
def test_a_looping_generation_stops_looping(penalty):
    model = tiny_model()
    [plain] = greedy(model, [PROMPT])
    assert repeated_ngrams(plain) > 20  # the loop this test is about
    [penalised] = greedy(model, [PROMPT], **penalty)
    assert repeated_ngrams(penalised) == 0
    assert penalised[:6] == plain[:6]  # nothing was repeated yet, so nothing changed yet


def test_penalties_count_each_rows_own_tokens():
    model = tiny_model()
    prompts = [PROMPT, [9, 9, 9, 1], [4]]
    batched = greedy(model, prompts, 24, repetition_penalty=1.5, frequency_penalty=0.2)
    alone = [greedy(model, [p], 24, repetition_penalty=1.5, frequency_penalty=0.2)[0] for p in prompts]
    assert batched == alone


def test_the_repetition_penalty_must_be_positive():
    with pytest.raises(Lav2Error, match="repetition penalty 0"):
        Sampling(repetition_penalty=0.0)
