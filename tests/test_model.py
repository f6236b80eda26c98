"""The model's defining properties: zero-init identity, prompt/visual wiring per variant,
exact tensor names and counts of the released checkpoints, cached = uncached decoding."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lav2cli.inference.fold import fold_for_inference, lay_out_for_cpu_decoding
from lav2cli.inference.generate import Sampling, _prefill_shared_prefix, generate, shared_prefix_len
from lav2cli.model.adapter import LlamaAdapterV2, is_adapter_param
from lav2cli.model.config import AdapterConfig, LlamaConfig, VisualConfig

TINY = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96, max_seq_len=64)
ENC_DIM = 24  # encoder features are passed directly as [B, N, ENC_DIM] tokens


def visual(n_queries: int = 10) -> VisualConfig:
    return VisualConfig(encoder_dim=ENC_DIM, width=32, depth=2, heads=4, n_queries=n_queries)


def fresh_compile_state() -> None:
    """No compiled step, graph or counter left from an earlier test."""
    import torch._dynamo

    from lav2cli.inference import generate as gen

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen._compiled.clear()


def adapted(variant: str, lora: int = 0, seed: int = 0, **kw) -> tuple[LlamaAdapterV2, LlamaAdapterV2]:
    """(base, adapted) sharing the base weights."""
    torch.manual_seed(seed)
    base = LlamaAdapterV2(TINY).eval()
    model = LlamaAdapterV2(TINY, AdapterConfig(variant=variant, lora_rank=lora, visual=visual(), **kw)).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(is_adapter_param(n) for n in missing)
    return base, model


def open_gates(model: LlamaAdapterV2, value: float = 0.7, layers=None) -> None:
    for i, layer in enumerate(model.llama.layers):
        if layers is None or i in layers:
            layer.attention.gate.data.fill_(value)


def perturb_adapter(model: LlamaAdapterV2) -> None:
    """Make every adapter tensor count: biases, scales, LoRA l2, gates away from their init."""
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if is_adapter_param(n) and (n.endswith((".bias", ".scale", "_l2.weight", "gate"))):
            p.data.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("lora", [0, 8])
def test_zero_init_identity(variant, lora):
    base, model = adapted(variant, lora)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    feats = torch.randn(2, 7, ENC_DIM)
    with torch.no_grad():
        ref = base(tokens)
        # a tolerance, not bitwise: a zero bias goes through F.linear's fused bias kernel, which
        # may round differently from the plain product on some CPUs
        torch.testing.assert_close(model(tokens), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(tokens, feats), ref, rtol=0, atol=1e-5)
        open_gates(model)  # the same model with open gates must differ: the check above is not vacuous
        assert (model(tokens, feats) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_bias_scale_lora_change_output_when_trained(variant):
    base, model = adapted(variant, lora=4)
    tokens = torch.randint(0, TINY.vocab_size, (1, 6))
    for n, p in model.named_parameters():
        if n.endswith("_l2.weight"):
            p.data.normal_(0, 0.1)
    with torch.no_grad():
        assert (model(tokens) - base(tokens)).abs().max() > 1e-4


def test_early_fusion_feeds_only_first_prompt_layers():
    _, paper = adapted("paper")  # fusion_layers defaults to 1: the first prompt layer only
    _, official = adapted("official")  # every prompt layer
    tokens = torch.randint(0, TINY.vocab_size, (1, 5))
    f1, f2 = torch.randn(1, 7, ENC_DIM), torch.randn(1, 7, ENC_DIM)
    late = {TINY.n_layers - 1}  # the last layer is a prompt layer but not the first one
    for m in (paper, official):
        open_gates(m, layers=late)
    with torch.no_grad():
        assert torch.equal(paper(tokens, f1), paper(tokens, f2))  # late layers see no image
        assert not torch.equal(official(tokens, f1), official(tokens, f2))
        open_gates(paper, layers={TINY.n_layers - paper.adapter.prompt_layers})
        assert not torch.equal(paper(tokens, f1), paper(tokens, f2))


def test_image_mask_removes_image_per_row():
    _, model = adapted("paper")
    open_gates(model)
    tokens = torch.randint(0, TINY.vocab_size, (2, 5))
    feats = torch.randn(2, 7, ENC_DIM)
    with torch.no_grad():
        masked = model(tokens, feats, image_mask=torch.tensor([True, False]))
        assert torch.allclose(masked[0], model(tokens[:1], feats[:1])[0], atol=1e-5)
        assert torch.allclose(masked[1], model(tokens[1:])[0], atol=1e-6)


def greedy_uncached(model, prompt: list[int], images, n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), images)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_cached_generation_equals_uncached(variant):
    _, model = adapted(variant, lora=4)
    perturb_adapter(model)
    feats = torch.randn(1, 7, ENC_DIM)
    prompt = [5, 17, 3, 44, 9]
    want = greedy_uncached(model, prompt, feats, 12)
    got = generate(model, [prompt], stop_ids=frozenset(), pad_id=0, images=feats,
                   sampling=Sampling(max_new_tokens=12, temperature=0))[0]
    assert got == want


def test_batched_left_padded_generation_equals_one_by_one():
    _, model = adapted("paper", lora=4)
    perturb_adapter(model)
    prompts = [[5, 17, 3, 44, 9, 12, 80], [7, 2], [1, 2, 3, 4]]
    s = Sampling(max_new_tokens=8, temperature=0)
    alone = [generate(model, [p], stop_ids=frozenset(), pad_id=0, sampling=s)[0] for p in prompts]
    batched = generate(model, prompts, stop_ids=frozenset(), pad_id=0, sampling=s)
    assert batched == alone


def test_shared_prefix_len():
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 4, 5], [1, 2, 9]]) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps a token of its own
    assert shared_prefix_len([[1], [1, 2]]) == 0 and shared_prefix_len([[4, 2], [5, 2]]) == 0


def test_a_kept_cache_is_reused_zeroed_and_changes_no_token():
    """generate leaves its cache set aside; the next request of the same shape gets the same
    buffers back, zeroed (its decode slots are empty after the prefill), and the tokens a fresh
    cache gives; another shape gets new buffers, and an uncached forward in between sees none."""
    _, model = adapted("paper", lora=4)
    perturb_adapter(model)
    open_gates(model)
    s = Sampling(max_new_tokens=5, temperature=0)
    caches: list = []  # the cache objects seen, kept alive (so no new one can take an old address)

    def ask(prompts):
        def on_token(row, ids):
            cache = model.llama.layers[0].attention.kv_cache
            if len(ids) == 1 and row == 0:  # right after the prefill: the decode slots are unwritten
                assert not cache.k[:, :, max(map(len, prompts)):].any()
            caches.append(cache)
        return generate(model, prompts, stop_ids=frozenset(), pad_id=0, sampling=s, on_token=on_token)

    first = ask([[5, 17, 3, 44, 9], [7, 2, 8, 1, 1]])
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))  # uncached: it would fail on a cache left attached
    second = ask([[8, 2, 61, 6, 9], [40, 41, 42]])  # same batch and cache length, other padding
    assert all(c is caches[0] for c in caches)
    model.llama._spare_caches = None  # fresh buffers from here on
    caches.clear()
    assert ask([[8, 2, 61, 6, 9], [40, 41, 42]]) == second
    assert ask([[5, 17, 3, 44, 9], [7, 2, 8, 1, 1]]) == first
    ask([[5, 17, 3]])  # another shape
    assert len({id(c) for c in caches}) == 2


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_a_shared_prefix_is_computed_once_and_changes_no_token(variant):
    """Text-only rows sharing 10 tokens, left-padded to different lengths: the prefix goes through
    the model once (batch of one), the batched prefill computes only from the least-padded row's
    first own slot, and every row's tokens are those it gets alone."""
    _, model = adapted(variant, lora=4)
    perturb_adapter(model)
    open_gates(model)
    prefix = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    prompts = [prefix + [5, 17, 3, 44, 9], prefix + [7, 2], prefix + [1, 2, 3, 4], prefix + [7, 3]]
    s = Sampling(max_new_tokens=8, temperature=0)
    alone = [generate(model, [p], stop_ids=frozenset(), pad_id=0, sampling=s)[0] for p in prompts]
    seen = []
    hook = model.llama.tok_embeddings.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    batched = generate(model, prompts, stop_ids=frozenset(), pad_id=0, sampling=s)
    hook.remove()
    assert batched == alone
    assert seen[:2] == [(1, 10), (4, 5)]  # the prefix once, then the rows' own tokens (15 - 10)
    # the first logits of every row, through the shared prefix and through a full prefill
    t0 = max(map(len, prompts))
    pad = [t0 - len(p) for p in prompts]
    tokens = torch.tensor([[0] * n + p for n, p in zip(pad, prompts)])
    logits = []
    prompt_kv = model.prompt_kv(None, None)
    for share in (True, False):
        model.setup_cache(len(prompts), t0 + 1)
        start = _prefill_shared_prefix(model, prompts, pad, prompt_kv) if share else 0
        logits.append(model(tokens[:, start:], input_pos=torch.arange(start, t0), pad=torch.tensor(pad),
                            prompt_kv=prompt_kv, last_only=True))
        model.clear_cache()
    assert torch.allclose(*logits, atol=1e-5), (logits[0] - logits[1]).abs().max()


def test_generation_stops_at_stop_token_and_sampling_is_seeded():
    _, model = adapted("paper")
    prompt = [5, 17, 3]
    full = generate(model, [prompt], stop_ids=frozenset(), pad_id=0, sampling=Sampling(6, temperature=0))[0]
    stopped = generate(model, [prompt], stop_ids={full[2]}, pad_id=0, sampling=Sampling(6, temperature=0))[0]
    assert stopped == full[: full.index(full[2])]
    a = generate(model, [prompt], stop_ids=frozenset(), pad_id=0, sampling=Sampling(10, 1.0, 0.9, seed=3))[0]
    b = generate(model, [prompt], stop_ids=frozenset(), pad_id=0, sampling=Sampling(10, 1.0, 0.9, seed=3))[0]
    assert a == b and len(a) == 10


LLAMA_7B = LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008,
                       norm_eps=1e-6, max_seq_len=512)


def official_7b(lora: int) -> LlamaAdapterV2:
    cfg = AdapterConfig(variant="official", prompt_len=10, prompt_layers=31, lora_rank=lora,
                        visual=VisualConfig(encoder_dim=768, width=768, depth=8, heads=16, n_queries=10))
    with torch.device("meta"):
        return LlamaAdapterV2(LLAMA_7B, cfg)


def test_official_7b_parameter_counts_match_the_release():
    bias = official_7b(0).adapter_state_dict()
    assert sum(t.numel() for t in bias.values()) == 63_095_552  # BIAS-7B (docs/model.md, "Parameter counts")
    lora = official_7b(16).adapter_state_dict()
    assert sum(t.numel() for t in lora.values()) == 103_072_544  # LORA-BIAS-7B
    groups = {
        "visual_blocks.": 56_702_976, "clip_proj": 592_128, "visual_query.": 7_680, "visual_proj": 3_158_016,
        "adapter_query.": 1_269_760,
    }
    for prefix, n in groups.items():
        assert sum(t.numel() for k, t in bias.items() if k.startswith(prefix)) == n, prefix
    assert sum(t.numel() for k, t in bias.items() if k.startswith("llama.") and k.endswith(".bias")) == 1_097_728
    assert sum(t.numel() for k, t in bias.items() if k.endswith("gate")) == 1_024


def test_official_tensor_names():
    names = set(official_7b(16).adapter_state_dict())
    for n in ["llama.layers.0.attention.wq.bias", "llama.layers.0.attention.wo.bias",
              "llama.layers.31.feed_forward.w3.bias", "llama.layers.5.attention.gate",
              "llama.layers.5.attention.new_gate", "llama.layers.5.attention.lora_wk_l1.weight",
              "llama.layers.5.feed_forward.lora_w2_l2.weight", "llama.layers.5.attention_norm.weight",
              "llama.norm.weight", "adapter_query.weight", "visual_query.weight", "clip_proj.weight",
              "clip_proj_norm.bias", "visual_blocks.7.attn.qkv.weight", "visual_blocks.0.mlp.fc2.bias",
              "visual_proj.weight", "visual_proj_norm.weight"]:
        assert n in names, n
    assert "llama.layers.0.attention.wk.bias" not in names  # official: no bias on wk, wv
    assert not any(n.endswith(".scale") for n in names)  # official: no scale
    paper = LlamaAdapterV2(TINY, AdapterConfig(variant="paper", visual=None))
    pn = set(paper.adapter_state_dict())
    assert {"llama.layers.0.attention.wk.bias", "llama.layers.0.attention.wk.scale"} <= pn


@pytest.mark.parametrize("fusion, layers", [(1, 2), (0, 2), (2, 2), (0, 0)],
                         ids=["split", "no-fusion", "all-fusion", "no-prompts"])
def test_prompt_rows_are_two_tensors_saved_as_the_released_one(fusion, layers):
    """The model keeps the fusion layers' prompt rows and the others' apart, an empty part being
    no tensor; files hold them as the one adapter_query.weight [L*K, dim], fusion rows first
    (as [0, dim] without prompt layers), and read back into the same two; layer i's prompt is
    row block i of the released tensor."""
    _, model = adapted("paper", prompt_layers=layers, fusion_layers=fusion)
    K, dim = model.adapter.prompt_len, TINY.dim
    parts = {n: p for n, p in model.named_parameters() if n.startswith("adapter_query")}
    assert {n: tuple(p.shape) for n, p in parts.items()} == {
        n: (rows * K, dim) for n, rows in (("adapter_query_fusion.weight", fusion),
                                           ("adapter_query_late.weight", layers - fusion)) if rows}
    sd = model.adapter_state_dict()
    whole = sd["adapter_query.weight"]
    assert whole.shape == (layers * K, dim) and not set(parts) & set(sd)
    assert set(model.from_released(sd)) == {n for n, _ in model.named_parameters() if is_adapter_param(n)}
    assert all(torch.equal(model.from_released(sd)[n], p) for n, p in parts.items())
    prompts = model.prompts()
    if layers == 0:
        assert prompts is None
        return
    for i in range(layers):
        assert torch.equal(prompts[TINY.n_layers - layers + i][0], whole[i * K:(i + 1) * K])


def test_only_adapter_parameters_get_gradients():
    _, model = adapted("paper", lora=4)
    model.freeze_base()
    open_gates(model)
    tokens = torch.randint(0, TINY.vocab_size, (2, 6))
    model.train()
    logits = model(tokens, torch.randn(2, 7, ENC_DIM))
    logits.float().logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        if is_adapter_param(n):
            assert p.requires_grad, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert model.llama.layers[1].attention.gate.grad is not None


def test_compiled_decoding_equals_eager_and_shares_one_graph():
    """The compiled decode step gives the eager tokens, and requests of other lengths reuse it
    (the cache length is bucketed) instead of compiling again."""
    fresh_compile_state()
    _, model = adapted("paper", lora=4)
    perturb_adapter(model)
    s = Sampling(max_new_tokens=6, temperature=0)
    for prompt in ([5, 17, 3, 44, 9], [7, 2, 8]):
        eager = generate(model, [prompt], stop_ids=frozenset(), pad_id=0, sampling=s)
        assert generate(model, [prompt], stop_ids=frozenset(), pad_id=0, sampling=s, compile=True) == eager
    counters = torch._dynamo.utils.counters["stats"]
    assert counters["unique_graphs"] == 1, dict(counters)


def test_compiled_batches_pad_to_a_power_of_two_and_answer_as_eager():
    """With compile, 3 rows (images, gates open) run as 4: the answers are the eager ones, and a
    batch of 4 then reuses that graph."""
    fresh_compile_state()
    _, model = adapted("paper", lora=4)
    perturb_adapter(model)
    open_gates(model)
    feats = torch.randn(4, 7, ENC_DIM)
    prompts = [[5, 17, 3, 44, 9], [7, 2, 8], [9, 9, 1, 4]]
    s = Sampling(max_new_tokens=6, temperature=0)
    for rows in (3, 4):
        batch = (prompts + [[3, 1]])[:rows]
        eager = generate(model, batch, stop_ids=frozenset(), pad_id=0, images=feats[:rows], sampling=s)
        assert len(eager) == rows
        assert generate(model, batch, stop_ids=frozenset(), pad_id=0, images=feats[:rows], sampling=s,
                        compile=True) == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_checkpointing_some_blocks_keeps_gradients_and_keeps_fewer_activations():
    """checkpoint_blocks = N recomputes the first N blocks in backward: the gradients stay those
    of no checkpointing, and the memory kept for backward (distinct storages packed by the
    saved-tensor hooks: a device-independent measure) shrinks as N grows."""
    _, model = adapted("paper", lora=4)
    perturb_adapter(model)
    open_gates(model)
    model.freeze_base()
    model.train()
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    feats = torch.randn(2, 7, ENC_DIM)
    kept, grads = {}, {}
    for n in (0, 1, TINY.n_layers):
        model.llama.checkpoint_blocks = n
        model.zero_grad(set_to_none=True)
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, feats).float().logsumexp(-1).mean()
        loss.backward()
        kept[n] = sum(storages.values())
        grads[n] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert kept[0] > kept[1] > kept[TINY.n_layers], kept
    assert model.llama.checkpoint_blocks == TINY.n_layers and len(grads[0]) > 20
    for n in (1, TINY.n_layers):
        assert grads[n].keys() == grads[0].keys()
        assert all(torch.allclose(grads[n][k], grads[0][k], atol=1e-6) for k in grads[0]), n


def test_reading_tokens_every_few_steps_changes_no_answer(monkeypatch):
    """With READ_AHEAD (CUDA's default: the host queues steps without reading each token), rows
    that stop at different steps get exactly the answers of reading every step, and at most
    READ_AHEAD - 1 steps run past the last stop."""
    from lav2cli.inference import generate as gen

    _, model = adapted("paper", lora=4)
    perturb_adapter(model)
    open_gates(model)
    prompts = [[5, 17, 3, 44, 9], [7, 2, 8], [9, 9, 1, 4]]
    free = generate(model, prompts, stop_ids=frozenset(), pad_id=0, sampling=Sampling(max_new_tokens=12, temperature=0))
    stops = frozenset({free[0][3], free[2][6]})
    s = Sampling(max_new_tokens=12, temperature=0)
    every_step = generate(model, prompts, stop_ids=stops, pad_id=0, sampling=s)
    assert len(every_step[0]) == 3 and len({len(a) for a in every_step}) == 3  # three stopping points
    steps: list[int] = []
    model.llama.layers[0].register_forward_hook(lambda m, a, o: steps.append(a[0].shape[1]))
    for k in (4, 5, 16):
        monkeypatch.setattr(gen, "READ_AHEAD", {"cpu": k})
        steps.clear()
        assert generate(model, prompts, stop_ids=stops, pad_id=0, sampling=s) == every_step
        needed = max(len(a) for a in every_step) + 1  # tokens sampled, stops included
        assert needed - 1 <= steps.count(1) <= min(needed - 1 + k - 1, 11), (k, steps)


def test_sampling_edge_cases_leave_the_global_rng_alone():
    from lav2cli.inference.generate import sample_next

    logits = torch.tensor([[0.1, 3.0, 0.2, 2.9]])
    assert sample_next(logits, 1.0, 0.0, torch.Generator().manual_seed(0)).tolist() == [1]  # top_p 0 = greedy
    _, model = adapted("paper")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(model, [[5, 6]], stop_ids=frozenset(), pad_id=0, sampling=Sampling(4, 0.8, 0.9))  # no seed given
    assert torch.equal(torch.rand(3), expected)


def test_examples_tokenise_prompt_and_response_together(spm_model_path):
    """The response follows the prompt in one tokenisation (as the official pipeline does), the
    prompt is masked, the response and EOS are supervised."""
    from lav2cli.templates import IGNORE_INDEX, get_template
    from lav2cli.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(spm_model_path)
    tpl = get_template("alpaca")
    ids, labels = tpl.encode_example(tok, "name a color", "", "the red cat")
    prompt = tpl.encode_prompt(tok, "name a color")
    assert ids[: len(prompt)] == prompt and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt) and labels[len(prompt):] == ids[len(prompt):]
    assert ids[:-1] == tok.encode(tpl.prompt("name a color") + "the red cat", bos=True)
    assert tok.decode(ids[len(prompt):-1]).strip() == "the red cat"


@pytest.mark.parametrize("variant, lora, prompt_lora, expected", [
    ("paper", 0, 0, 7 * 3),  # every linear of the 3 layers
    ("paper", 4, 0, 7 * 3),  # LoRA folds too; the prompt layers' wk/wv get the pair back out
    ("paper", 0, 4, 7 * 3 - 4 * 2),  # the 2 prompt layers' attention linears carry a prompt-only LoRA
    ("paper", 4, 4, 7 * 3 - 4 * 2),  # both: those keep their pairs unfolded
    ("official", 0, 0, 0),  # no scales
    ("official", 4, 0, 7 * 3),  # LoRA alone folds
])
def test_folding_scales_for_inference_keeps_logits_and_tokens(variant, lora, prompt_lora, expected):
    """fold_for_inference: W' = diag(s) (W + B A), b' = s b; the logits (with the image, through
    the adaption prompts) and greedy tokens stay those of the unfolded model, and the folded model
    refuses to hand out its (no longer trained) adapter tensors."""
    _, model = adapted(variant, lora=lora, prompt_lora_rank=prompt_lora)
    perturb_adapter(model)
    open_gates(model)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    feats = torch.randn(2, 7, ENC_DIM)
    s = Sampling(max_new_tokens=8, temperature=0)
    with torch.no_grad():
        ref = model(tokens, feats)
    want = generate(model, [[5, 17, 3, 44, 9]], stop_ids=frozenset(), pad_id=0, images=feats[:1], sampling=s)
    assert fold_for_inference(model) == expected
    with torch.no_grad():
        assert torch.allclose(model(tokens, feats), ref, atol=1e-5)
    assert generate(model, [[5, 17, 3, 44, 9]], stop_ids=frozenset(), pad_id=0, images=feats[:1], sampling=s) == want
    with pytest.raises(RuntimeError, match="folded for inference"):
        model.adapter_state_dict()


@pytest.mark.parametrize("tie", [False, True])
def test_cpu_layout_moves_float32_weights_and_keeps_values_logits_and_tokens(tie):
    """lay_out_for_cpu_decoding stores every float32 linear weight and the head column-major,
    values unchanged: logits with the image stay allclose and greedy tokens equal; a second call
    moves nothing, and bf16 weights stay row-major."""
    torch.manual_seed(0)
    model = LlamaAdapterV2(replace(TINY, tie_embeddings=tie),
                           AdapterConfig(variant="paper", lora_rank=4, visual=visual())).eval()
    perturb_adapter(model)
    open_gates(model)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    feats = torch.randn(2, 7, ENC_DIM)
    s = Sampling(max_new_tokens=8, temperature=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(tokens, feats)
    want = generate(model, [[5, 17, 3, 44, 9], [8, 2]], stop_ids=frozenset(), pad_id=0, images=feats, sampling=s)
    assert lay_out_for_cpu_decoding(model) == 7 * 3 + 1  # seven linears a layer, and the head
    head = model.llama.head_weight()
    linears = [m.weight for m in model.llama.modules() if isinstance(m, torch.nn.Linear)]
    for w in [head, model.llama.layers[0].attention.wq.weight, model.llama.layers[2].feed_forward.w2.weight]:
        assert w.stride() == (1, w.shape[0])
    assert all(w.is_contiguous() for w in linears if w is not head)  # LoRA pairs are not moved
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model(tokens, feats), ref, atol=1e-5)
    for compile in (False, True) if tie else (False,):  # one compiled case is enough (~6 s)
        assert generate(model, [[5, 17, 3, 44, 9], [8, 2]], stop_ids=frozenset(), pad_id=0, images=feats,
                        sampling=s, compile=compile) == want
    assert lay_out_for_cpu_decoding(model) == 0
    assert lay_out_for_cpu_decoding(model.to(torch.bfloat16)) == 0


def test_lora_stays_unfolded_on_bfloat16_weights():
    """In bf16, W + B A would round a small pair away: LoRA linears keep scale and pair, and the
    folded model computes what the unfolded one does."""
    _, model = adapted("paper", lora=4)
    perturb_adapter(model)
    open_gates(model)
    model.to(torch.bfloat16)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    feats = torch.randn(2, 7, ENC_DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(tokens, feats)
    assert fold_for_inference(model) == 0
    with torch.no_grad():
        assert torch.equal(model(tokens, feats), ref)
