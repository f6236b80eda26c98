"""The trainer's speed settings on CPU: the checkpointing plan against a memory budget, the
steady-state throughput, and length buckets that keep compiled blocks from recompiling."""

from __future__ import annotations

import json

import pytest
import torch

from lav2cli.data.dataset import bucket_length
from lav2cli.recipe import load_recipe
from lav2cli.train import Trainer, setup as train_setup
from lav2cli.train.memory import ActivationBytes, measure_activations, plan_checkpointing, predicted_peak
from lav2cli.train.throughput import Throughput, compiles

from test_train import ROOT, overrides, setup  # noqa: F401 (setup: the fixture)


def test_the_plan_checkpoints_the_fewest_blocks_that_fit():
    # eight blocks keeping 100 bytes each; a checkpointed one keeps its 10-byte input
    act = ActivationBytes(blocks=[100] * 8, outside=50, block_input=10)
    # 1000 fixed + 50 outside + kept + 100 for one block's backward
    assert predicted_peak(act, 1000, 0) == 1950
    assert predicted_peak(act, 1000, 3) == 1950 - 3 * 90
    plan = plan_checkpointing(act, 1000, budget=1700)  # 1950 - 90n <= 1700 first at n = 3
    assert (plan.blocks, plan.peak, plan.fits) == (3, 1680, True)
    assert plan_checkpointing(act, 1000, budget=1680).blocks == 3
    assert plan_checkpointing(act, 1000, budget=1679).blocks == 4
    assert plan_checkpointing(act, 1000, budget=10**6).blocks == 0
    hopeless = plan_checkpointing(act, 1000, budget=1000)
    assert (hopeless.blocks, hopeless.fits) == (8, False) and "may not fit" in hopeless.describe(8)
    # blocks keep different amounts: the first N are the ones checkpointed
    uneven = ActivationBytes(blocks=[300, 10, 10, 10], outside=0, block_input=5)
    assert plan_checkpointing(uneven, 0, budget=300 + 30 + 300).blocks == 0
    assert plan_checkpointing(uneven, 0, budget=300 + 30 + 299).blocks == 1


def _trainer(setup, tmp_path, name, **extra):  # noqa: F811
    r = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, train__max_steps=1, **extra))
    (tmp_path / name).mkdir()
    logged: list[str] = []
    return Trainer(r, tmp_path / name, resume=False, log=logged.append, show_progress=False), logged


def test_measured_activations_grow_with_the_batch(setup, tmp_path):  # noqa: F811
    trainer, _ = _trainer(setup, tmp_path, "measure")
    model, pad = trainer.model, trainer.engine.tokenizer.pad_id

    def measure(rows: int, length: int) -> ActivationBytes:
        b = train_setup.worst_case_batches(trainer.streams, pad, trainer.image_fn, rows, length)[0]
        return measure_activations(model, lambda: trainer.loss_sum(b.to(trainer.device, trainer.engine.dtype)))

    one, two, four, longer = measure(1, 128), measure(2, 128), measure(4, 128), measure(2, 256)  # rows are shorter
    dim = model.config.dim
    assert one.block_input == 128 * dim * 4 and four.block_input == 4 * one.block_input
    for i in range(len(one.blocks)):
        # per row the same activations, beside what the block keeps once (the adapter prompts' projections)
        assert four.blocks[i] - two.blocks[i] == 2 * (two.blocks[i] - one.blocks[i]) > 0
        assert longer.blocks[i] > two.blocks[i]
    assert 1.9 * two.outside < four.outside < 2.1 * two.outside  # the loss's rows, the visual branch
    # the measuring pass kept nothing: no parameter has a gradient, no block is left checkpointed
    assert all(p.grad is None for p in model.parameters()) and model.llama.checkpoint_blocks == 0


def test_auto_checkpointing_follows_the_memory_budget(setup, tmp_path, tiny_llama_config):  # noqa: F811
    n_layers = tiny_llama_config.n_layers
    roomy, said = _trainer(setup, tmp_path, "roomy", train__memory_budget_gb=1000)
    assert roomy.model.llama.checkpoint_blocks == 0 and roomy.checkpoint_plan.fits
    assert any(line.startswith("activation checkpointing: no block (the fewest") for line in said)
    # a budget below the weights: every block, and a warning that it may not fit
    tight, said = _trainer(setup, tmp_path, "tight", train__memory_budget_gb=1e-6)
    assert tight.model.llama.checkpoint_blocks == n_layers and not tight.checkpoint_plan.fits
    assert any("may not fit" in line for line in said)
    # a budget between: the plan's own prediction decides, and it is the fewest that fits
    act = tight.activation_bytes()
    peaks = [predicted_peak(act, tight.checkpoint_plan.fixed, n) for n in range(n_layers + 1)]
    budget = (peaks[0] + peaks[-1]) // 2
    middle, _ = _trainer(setup, tmp_path, "middle", train__memory_budget_gb=budget / 2**30 + 1e-12)
    want = next(n for n, p in enumerate(peaks) if p <= budget)
    assert middle.model.llama.checkpoint_blocks == want
    # explicit settings win, and a CPU run without a budget plans nothing
    for name, extra, blocks in (("explicit", {"train__grad_ckpt_blocks": 1, "train__memory_budget_gb": 1e-6}, 1),
                                ("off", {"train__grad_ckpt": '"off"', "train__memory_budget_gb": 1e-6}, 0),
                                ("cpu", {}, 0)):
        trainer, said = _trainer(setup, tmp_path, name, **extra)
        assert trainer.model.llama.checkpoint_blocks == blocks and trainer.checkpoint_plan is None
        assert not any(line.startswith("activation checkpointing") for line in said)


def test_steady_throughput_leaves_out_a_slow_first_step_and_compiling_steps():
    speed = Throughput()
    assert speed.tokens_per_s is None
    speed.add(1000, 30.0, compiled=0)  # the first step: allocation, kernel choice
    assert speed.tokens_per_s is None and speed.warmup_seconds == 30.0
    speed.add(1000, 1.0, compiled=0)
    speed.add(1000, 20.0, compiled=3)  # a new length bucket compiled
    speed.add(1000, 1.0, compiled=0)
    assert speed.tokens_per_s == 1000.0
    assert (speed.warmup_steps, speed.warmup_seconds) == (2, 50.0)


def test_lengths_pad_to_buckets_within_the_limit():
    assert [bucket_length(n, 64, 512) for n in (1, 64, 65, 500, 512)] == [64, 64, 128, 512, 512]
    assert bucket_length(90, 64, 96) == 96  # not past the limit
    assert bucket_length(100, 64, 96) == 100  # nor below the longest row
    assert bucket_length(37, 1) == 37


@pytest.mark.slow
def test_compiled_blocks_do_not_recompile_across_mixed_lengths(setup, tmp_path, monkeypatch):  # noqa: F811
    """Every stream's records have varied lengths. With length buckets, all compilation happens
    in the first steps (one graph per bucket and stream kind) and the rest of the run compiles
    nothing; padding to the longest row instead compiles again at most new lengths."""
    monkeypatch.setattr(train_setup, "COMPILE_BACKEND", "eager")  # dynamo's graphs without code generation
    torch._dynamo.reset()

    def run(name: str, multiple: int) -> list[dict]:
        r = load_recipe(ROOT / "recipes/tiny.toml",
                        overrides(setup, train__max_steps=24, train__compile='"on"', train__pad_multiple=multiple,
                                  train__batch_size=2))
        out = tmp_path / name
        out.mkdir()
        Trainer(r, out, resume=False, log=lambda m: None, show_progress=False).run()
        torch._dynamo.reset()
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    bucketed = run("bucketed", 128)  # two buckets below max_tokens (192)
    assert bucketed[-1]["compiles"] > 0
    assert bucketed[-1]["compiles"] == bucketed[5]["compiles"]  # nothing compiled after the first steps
    assert bucketed[-1]["tokens_per_s"] is not None and bucketed[-1]["warmup_s"] > 0
    exact = run("exact", 1)
    assert exact[-1]["compiles"] > bucketed[-1]["compiles"]
    assert compiles() >= 0
