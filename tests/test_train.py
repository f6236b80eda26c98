"""`lav2 train` on a tiny base: losses fall, the saved key set is exactly the stage's, the joint
stage moves only the batch's group, resumed runs continue exactly, two processes equal one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lav2cli import engine
from lav2cli.formats import meta
from lav2cli.model.adapter import LlamaAdapterV2
from lav2cli.recipe import load_recipe
from lav2cli.train import IMAGE_TEXT, INSTRUCTION, Trainer, group_of, make_groups

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": ""}
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_config, spm_model_path):
    d = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    base = LlamaAdapterV2(tiny_llama_config)
    meta.save(d / "base", tiny_llama_config, {k.removeprefix("llama."): v for k, v in base.state_dict().items()},
              tokenizer_model_path=spm_model_path)
    (d / "images").mkdir()
    captions, instructions = [], []
    for i, (name, rgb) in enumerate(COLORS.items()):
        for j in range(3):
            p = d / "images" / f"{name}{j}.png"
            Image.new("RGB", (32 + 8 * j, 32), rgb).save(p)
            captions.append({"id": f"c{i}-{j}", "image": f"images/{name}{j}.png", "instruction": "Generate caption of this image",
                             "input": "", "output": f"a {name} square", "kind": "caption", "source": "test"})
    for i, (q, a) in enumerate([("what is one plus one", "two"), ("say hello", "hello world"), ("name a color", "red"),
                                ("what sat on the mat", "the cat"), ("count to three", "one two three"),
                                ("what is the shape", "a circle"), ("is the sky blue", "yes"), ("say no", "no")]):
        instructions.append({"id": f"i{i}", "image": None, "instruction": q, "input": "", "output": a,
                             "kind": "instruction", "source": "test"})
    for name, rows in (("captions.jsonl", captions), ("instructions.jsonl", instructions)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def overrides(d: Path, **extra) -> list[str]:
    sets = {
        "model.ref": f'"{d / "base"}"', "data.image_text": f'"{d / "captions.jsonl"}"',
        "data.instruction": f'"{d / "instructions.jsonl"}"', "adapter.prompt_layers": "2",
        "adapter.visual_width": "32", "adapter.visual_depth": "1", "adapter.visual_heads": "4",
        "data.max_tokens": "192", "data.feature_cache": "true", "train.base_lr": "5.0", "train.warmup_steps": "0",
        "train.log_every": "1", "train.batch_size": "4", "train.checkpoint_every": "0",
    }
    sets.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in sets.items()]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lav2cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=600)


def sets(d: Path, **extra) -> list[str]:
    out = []
    for o in overrides(d, **extra):
        out += ["--set", o]
    return out


def losses(run: Path, stream: str | None = None) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if stream is None or r["stream"] == stream]


def test_pretrain_loss_falls_and_saves_exactly_the_image_text_group(setup, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--recipe", str(ROOT / "recipes/tiny.toml"), "--stage", "pretrain", "--out", str(out),
                "--max-steps", "30", *sets(setup, train__base_lr=20.0))
    assert r.returncode == 0, r.stderr
    ls = losses(out)
    assert sum(ls[-3:]) / 3 < 0.8 * sum(ls[:3]) / 3, ls
    eng = engine.load(str(out), device="cpu")
    a = eng.model.adapter
    expected = {n for n in eng.model.adapter_state_dict() if group_of(n, a, eng.config.llama.n_layers) == IMAGE_TEXT}
    expected.add("adapter_query.weight")  # its visual-layer rows train with the image-text group
    assert set(load_file(str(out / "adapter.safetensors"))) == expected
    info = json.loads((out / "lav2.json").read_text())["training"]
    assert info["complete"] and info["step"] == 30 and info["stage"] == "pretrain"
    r = run_cli("ask", str(setup / "images/red0.png"), "Generate caption of this image", "--model", str(out),
                "--max-new-tokens", "5", "--temperature", "0")
    assert r.returncode == 0 and "cannot see" not in r.stderr, r.stderr


def test_finetune_loss_falls_and_saves_exactly_the_instruction_group(setup, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--recipe", str(ROOT / "recipes/tiny.toml"), "--stage", "finetune", "--out", str(out),
                "--max-steps", "10", *sets(setup, adapter__lora_rank=4))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)  # progress and tables go to stderr; stdout is the result
    ls = losses(out)
    assert ls[-1] < 0.7 * ls[0], ls
    saved = set(load_file(str(out / "adapter.safetensors")))
    assert any(".lora_" in n for n in saved) and any(n.endswith(".scale") for n in saved)
    assert not any(n.startswith(("visual_", "clip_proj")) for n in saved)
    assert "llama.layers.0.attention_norm.weight" in saved and "llama.norm.weight" in saved


def test_joint_step_leaves_the_other_group_bit_identical(setup, tmp_path):
    recipe = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, adapter__lora_rank=4))
    out = tmp_path / "run"
    out.mkdir()
    trainer = Trainer(recipe, out, resume=False, log=lambda m: None, show_progress=False)
    groups = trainer.groups
    assert set(groups.names) == {IMAGE_TEXT, INSTRUCTION}
    rows = groups.split["adapter_query.weight"]
    seen = set()
    for step in range(8):
        grp = trainer.pick_stream(step)
        other = INSTRUCTION if grp == IMAGE_TEXT else IMAGE_TEXT
        before = {n: p.detach().clone() for n, p in trainer.params.items()}
        trainer.train_step(step)
        for n, p in trainer.params.items():
            if n == "adapter_query.weight":
                assert torch.equal(p[rows[other]], before[n][rows[other]]), (step, grp)
                assert not torch.equal(p[rows[grp]], before[n][rows[grp]]), (step, grp)
            elif n in groups.names[other]:
                assert torch.equal(p, before[n]), (step, grp, n)
        moved = [n for n in groups.names[grp] if n != "adapter_query.weight" and not torch.equal(trainer.params[n], before[n])]
        assert moved, grp
        seen.add(grp)
    assert seen == {IMAGE_TEXT, INSTRUCTION}


def test_groups_are_disjoint_and_cover_the_adapter(tiny_llama_config):
    from lav2cli.model.config import AdapterConfig, VisualConfig

    for variant in ("paper", "official"):
        m = LlamaAdapterV2(tiny_llama_config, AdapterConfig(variant=variant, lora_rank=2, visual=VisualConfig(
            encoder_dim=8, width=16, depth=1, heads=2)))
        g = make_groups(m, "joint")
        both = set(g.names[IMAGE_TEXT]) & set(g.names[INSTRUCTION])
        assert both == (set(g.split) if variant == "paper" else set())
        assert set(g.trainable()) == set(m.adapter_state_dict())


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter.safetensors"))


def test_resume_continues_exactly(setup, tmp_path):
    common = ["--recipe", str(ROOT / "recipes/tiny.toml"), *sets(setup, train__checkpoint_every=3)]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli("train", *common, "--out", str(full), "--max-steps", "6").returncode == 0
    assert run_cli("train", *common, "--out", str(part), "--max-steps", "6", "--stop-after", "4").returncode == 0
    assert json.loads((part / "lav2.json").read_text())["training"]["step"] == 4
    (part / "notes.txt").write_text("mine")  # a user's file in the run directory survives checkpoints
    r = run_cli("train", "--out", str(part), "--resume", "--max-steps", "6")
    assert r.returncode == 0, r.stderr
    assert (part / "notes.txt").read_text() == "mine"
    a, b = final_tensors(full), final_tensors(part)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(full) == losses(part)


def test_resume_after_sigkill_between_checkpoints(setup, tmp_path):
    common = ["--recipe", str(ROOT / "recipes/tiny.toml"), *sets(setup, train__checkpoint_every=5)]
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = "40"
    assert run_cli("train", *common, "--out", str(full), "--max-steps", steps).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "lav2cli", "train", *common, "--out", str(killed), "--max-steps", steps],
                            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if (killed / "trainer_state.pt").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((killed / "lav2.json").read_text())["training"]
    assert not state["complete"] and state["step"] < int(steps)
    r = run_cli("train", "--out", str(killed), "--resume")
    assert r.returncode == 0, r.stderr
    a, b = final_tensors(full), final_tensors(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def one_process_run(setup, tmp_path_factory) -> Path:
    one = tmp_path_factory.mktemp("one") / "run"
    r = run_cli("train", "--recipe", str(ROOT / "recipes/tiny.toml"), "--max-steps", "4", "--out", str(one),
                *sets(setup, train__batch_size=4))
    assert r.returncode == 0, r.stderr
    return one


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_equal_one(setup, tmp_path, one_process_run, fsdp):
    one, two = one_process_run, tmp_path / "two"
    common = ["--recipe", str(ROOT / "recipes/tiny.toml"), "--max-steps", "4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "lav2cli", "train", *common, "--out", str(two),
                *sets(setup, train__batch_size=2, train__device='"cpu"', train__fsdp=str(fsdp).lower())]
    r = subprocess.run(torchrun, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = final_tensors(one), final_tensors(two)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    assert json.loads((two / "lav2.json").read_text())["training"]["world_size"] == 2


@pytest.mark.parametrize("args, words", [
    (["--set", "train.bogus=1"], ["unknown key train.bogus"]),
    (["--set", "train.batch_size=\"four\""], ["train.batch_size", "expected int"]),
    (["--set", "model.ref=\"/nonexistent/model\""], ["/nonexistent/model"]),
])
def test_bad_recipe_input_fails_before_training(setup, tmp_path, args, words):
    out = tmp_path / "run"
    r = run_cli("train", "--recipe", str(ROOT / "recipes/tiny.toml"), "--out", str(out), *sets(setup), *args)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("lav2: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0]
    assert not (out / "adapter.safetensors").exists()


def test_data_without_usable_records(setup, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "x", "image": None, "instruction": "hi", "input": "", "output": "yo",
                                 "kind": "instruction", "source": "t"}) + "\n")
    r = run_cli("train", "--recipe", str(ROOT / "recipes/tiny.toml"), "--out", str(tmp_path / "run"),
                *sets(setup), "--set", f'data.instruction="{empty}"')
    assert r.returncode == 1 and "fewer than one batch" in r.stderr and "Traceback" not in r.stderr


def test_fsdp_resume_continues_exactly(setup, tmp_path):
    """Two processes sharding the base (FSDP): stopped, resumed, and equal to an uninterrupted run."""
    def torchrun(*args: str) -> None:  # --standalone: a free port each time
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lav2cli", "train", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]

    common = ["--recipe", str(ROOT / "recipes/tiny.toml"), "--max-steps", "6",
              *sets(setup, train__batch_size=2, train__device='"cpu"', train__fsdp="true", train__checkpoint_every=2,
                    adapter__lora_rank=4)]
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(*common, "--out", str(full))
    torchrun(*common, "--out", str(part), "--stop-after", "3")
    torchrun("--out", str(part), "--resume")
    a, b = final_tensors(full), final_tensors(part)
    assert set(a) == set(b) and any(".lora_" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
