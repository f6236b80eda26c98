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
from lav2cli.errors import Lav2Error
from lav2cli.formats import meta
from lav2cli.model.adapter import FUSION_PROMPTS, LATE_PROMPTS, LlamaAdapterV2, is_adapter_param
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
    m = engine.load(str(out), device="cpu").model
    group = {n: p for n, p in m.named_parameters()
             if is_adapter_param(n) and group_of(n, m.adapter, m.config.n_layers) == IMAGE_TEXT}
    assert FUSION_PROMPTS in group and LATE_PROMPTS not in group
    # the fusion layers' prompts are saved as the whole released adapter_query.weight
    assert set(load_file(str(out / "adapter.safetensors"))) == set(m.to_released(group))
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
    assert set(groups) == {IMAGE_TEXT, INSTRUCTION}
    assert FUSION_PROMPTS in groups[IMAGE_TEXT] and LATE_PROMPTS in groups[INSTRUCTION]
    seen = set()
    for step in range(8):
        grp = trainer.pick_stream(step)
        other = INSTRUCTION if grp == IMAGE_TEXT else IMAGE_TEXT
        before = {n: p.detach().clone() for n, p in trainer.params.items()}
        trainer.train_step(step)
        for n in groups[other]:
            assert torch.equal(trainer.params[n], before[n]), (step, grp, n)
        prompts = FUSION_PROMPTS if grp == IMAGE_TEXT else LATE_PROMPTS
        assert not torch.equal(trainer.params[prompts], before[prompts]), (step, grp)
        moved = [n for n in groups[grp] if not torch.equal(trainer.params[n], before[n])]
        assert len(moved) > 1, grp
        seen.add(grp)
    assert seen == {IMAGE_TEXT, INSTRUCTION}


def test_groups_are_disjoint_and_cover_the_adapter(tiny_llama_config):
    """Every adapter tensor trains in exactly one group; the paper variant's prompts are split
    between them (fusion layers: image_text), the official variant's all train with image_text.
    An empty part (every prompt layer a fusion layer, or none) is no tensor, and the file keeps
    the one released adapter_query.weight either way."""
    from lav2cli.model.config import AdapterConfig, VisualConfig

    n_layers = tiny_llama_config.n_layers
    visual = VisualConfig(encoder_dim=8, width=16, depth=1, heads=2)
    for variant, fusion, parts in (("paper", None, {FUSION_PROMPTS: IMAGE_TEXT, LATE_PROMPTS: INSTRUCTION}),
                                   ("paper", 0, {LATE_PROMPTS: INSTRUCTION}),
                                   ("paper", n_layers, {FUSION_PROMPTS: IMAGE_TEXT}),
                                   ("official", None, {FUSION_PROMPTS: IMAGE_TEXT})):
        m = LlamaAdapterV2(tiny_llama_config, AdapterConfig(variant=variant, lora_rank=2, prompt_layers=n_layers,
                                                            fusion_layers=fusion, visual=visual))
        g = make_groups(m, "joint")
        assert not set(g[IMAGE_TEXT]) & set(g[INSTRUCTION])
        names = {n for n, _ in m.named_parameters() if is_adapter_param(n)}
        assert set(g[IMAGE_TEXT]) | set(g[INSTRUCTION]) == names
        assert {n: grp for grp in g for n in g[grp] if n in (FUSION_PROMPTS, LATE_PROMPTS)} == parts, (variant, fusion)
        sd = m.adapter_state_dict()
        a = m.adapter
        assert sd["adapter_query.weight"].shape == (a.prompt_layers * a.prompt_len, tiny_llama_config.dim)
        assert not {FUSION_PROMPTS, LATE_PROMPTS} & set(sd)
        back = m.from_released(sd)
        assert set(back) == names and all(torch.equal(back[n], p) for n, p in m.named_parameters() if n in names)


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter.safetensors"))


@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized-features"])
def test_resume_continues_exactly(setup, tmp_path, standardize):
    common = ["--recipe", str(ROOT / "recipes/tiny.toml"),
              *sets(setup, train__checkpoint_every=3, train__standardize_features=str(standardize).lower())]
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


def test_prepare_distill_keeps_the_models_own_finished_answers(setup, tmp_path):
    """`lav2 prepare distill`: one record per prompt holding the model's greedy answer; answers cut
    by --max-new-tokens are not selected; JSON lines prompts work; a bad line is skipped."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nwhat is the color of the shape\n\nsay hello\ncount to three\n")
    out = tmp_path / "distill.jsonl"
    r = run_cli("prepare", "distill", "--model", str(setup / "base"), "--prompts", str(prompts), "--out", str(out),
                "--max-new-tokens", "40")
    assert r.returncode == 0, r.stderr
    eng = engine.load(str(setup / "base"), device="cpu")
    from lav2cli.inference.generate import Sampling

    recs = [json.loads(x) for x in out.read_text().splitlines()]
    manifest = json.loads((tmp_path / "distill.manifest.json").read_text())
    kept = {r["instruction"]: r for r in recs}
    unfinished = manifest["not_selected"].get("unfinished answer", 0)
    assert len(recs) + unfinished == 3 and manifest["inputs"][0]["path"] == str(prompts)
    for q in ("what is the color of the shape", "say hello", "count to three"):
        ids = eng.generate([eng.template.encode_prompt(eng.tokenizer, q)], sampling=Sampling(max_new_tokens=40, temperature=0))[0]
        if len(ids) < 40:
            assert kept[q]["output"] == eng.tokenizer.decode(ids).strip()
            assert kept[q]["kind"] == "instruction" and kept[q]["image"] is None
        else:
            assert q not in kept
    # one new token: every answer that does not end at once is cut, so not selected
    r = run_cli("prepare", "distill", "--model", str(setup / "base"), "--prompts", str(prompts), "--out", str(out),
                "--max-new-tokens", "1")
    assert r.returncode == 0, r.stderr
    assert "unfinished answer" in r.stderr
    jl = tmp_path / "prompts.jsonl"
    jl.write_text('{"instruction": "say hello"}\n{"instruction": 3}\nnot json\n')
    r = run_cli("prepare", "distill", "--model", str(setup / "base"), "--prompts", str(jl), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "malformed json 1" in r.stderr and "malformed record 1" in r.stderr
    r = run_cli("prepare", "distill", "--model", str(setup / "base"), "--prompts", str(jl), "--out", str(out), "--strict")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "prompts.jsonl:2" in r.stderr, r.stderr


def test_text_records_join_the_instruction_stream(setup, tmp_path):
    """data.text adds its records text_repeat times to the instruction stream; vqa-kind records
    train with the short-answer prompt that `lav2 eval vqa` asks with, others without."""
    from lav2cli.data.dataset import load_examples
    from lav2cli.templates import get_template

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"id": f"t{i}", "image": None, "instruction": f"say {w}", "input": "",
                                        "output": w, "kind": "instruction", "source": "test"}) + "\n"
                            for i, w in enumerate(["one", "two", "three"])))
    recipe = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, data__text=f'"{text}"', data__text_repeat=4))
    trainer = Trainer(recipe, tmp_path / "run", resume=False, log=lambda m: None, show_progress=False)
    n_instruction = len((setup / "instructions.jsonl").read_text().splitlines())
    assert len(trainer.streams[INSTRUCTION].examples) == n_instruction + 3 * 4
    eng = trainer.engine
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text(json.dumps({"id": "q", "image": None, "instruction": "is the sky blue", "input": "", "output": "yes",
                               "kind": "vqa", "source": "test"}) + "\n")
    tpl = get_template("chatml")
    (ex,) = load_examples(vqa, eng.tokenizer, tpl, 512)
    prompt = [t for t, lab in zip(ex.ids, ex.labels) if lab == -100]
    assert prompt == eng.tokenizer.encode(tpl.prompt("is the sky blue", short_answer=True), bos=tpl.add_bos)
    (ex,) = load_examples(text, eng.tokenizer, tpl, 512)[:1]
    prompt = [t for t, lab in zip(ex.ids, ex.labels) if lab == -100]
    assert prompt == eng.tokenizer.encode(tpl.prompt("say one"), bos=tpl.add_bos)
    with pytest.raises(Lav2Error, match="data.text: /no/such.jsonl: file not found"):
        load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, data__text='"/no/such.jsonl"'))


def test_lr_scales_apply_to_the_visual_branch_and_the_lora_pairs_only():
    """train.visual_lr_scale multiplies the lr of the visual branch's tensors, train.lora_lr_scale
    that of the LoRA pairs (schedule included), and nothing else; weight decay still skips 1-D
    tensors and biases."""
    from lav2cli.train import make_optimizer

    want = {"visual_proj.weight": 0.03, "clip_proj.bias": 0.03, "llama.layers.0.attention.wq.bias": 0.01,
            "adapter_query_late.weight": 0.01, "llama.layers.0.attention.lora_wq_l2.weight": 0.05,
            "llama.layers.0.feed_forward.lora_w1_l1.weight": 0.05,
            "llama.layers.0.attention.prompt_lora_wk_l1.weight": 0.01}
    params = {n: torch.nn.Parameter(torch.zeros(4) if n.endswith(".bias") else torch.zeros(3, 4)) for n in want}
    opt = make_optimizer(params, 0.01, 0.02, (0.9, 0.95), fused=False, visual_lr_scale=3.0, lora_lr_scale=5.0)
    by_tensor = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in params.items():
        g = by_tensor[id(p)]
        assert g["lr"] == pytest.approx(want[name]), name
        assert g["weight_decay"] == (0.02 if p.dim() >= 2 else 0.0), name
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert sorted(sched.get_last_lr()) == pytest.approx([0.005, 0.005, 0.015, 0.015, 0.025])


def test_encoder_stage_gives_mid_level_tokens(setup):
    """model.encoder_stage = 3: EfficientNet-Lite0's 4th stage (80 channels, pooled to 7 x 7 at 224 px) as
    tokens, recorded in the encoder spec; a stage the net lacks, or a stage for open_clip, is an error."""
    from lav2cli.model.vision import build_encoder

    r = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, model__encoder_stage=3))
    spec = r.encoder_spec()
    assert spec["stage"] == 3
    enc = build_encoder(spec)
    tokens = enc(torch.zeros(2, 3, 224, 224))
    assert enc.out_dim == 80 and tokens.shape == (2, 49, 80)  # pooled to the last 7 x 7 grid
    full = build_encoder({**spec, "stage": None})
    assert full.out_dim == 1280 and full(torch.zeros(1, 3, 224, 224)).shape == (1, 49, 1280)
    with pytest.raises(Lav2Error, match="no stage 99"):
        build_encoder({**spec, "stage": 99})
    bad = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, model__encoder_stage=2,
                                                              model__encoder='"open_clip:ViT-B-32"'))
    with pytest.raises(Lav2Error, match="timm encoders only"):
        bad.encoder_spec()


def test_standardized_features_fold_into_a_plain_clip_proj(setup, tmp_path):
    """train.standardize_features: the saved clip_proj acts on raw features exactly as the trained
    one did on standardised features (fold == unfolded), the saved key set is the usual one, and
    the statistics are those of the training images."""
    r = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, train__standardize_features="true", train__max_steps=3))
    (tmp_path / "run").mkdir()
    trainer = Trainer(r, tmp_path / "run", resume=False, log=lambda m: None, show_progress=False)
    model = trainer.model
    mean, inv_std = model.feature_norm
    paths = sorted({e.image for s in trainer.streams.values() for e in s.examples if e.image})
    feats = torch.stack([trainer.image_fn(p) for p in paths]).flatten(0, 1)
    assert torch.allclose(mean, feats.mean(0), atol=1e-4)
    assert torch.allclose(inv_std, 1 / feats.std(0, unbiased=False).clamp_min(1e-3 * feats.std(0).max()), rtol=1e-3)
    trainer.run()
    images = torch.stack([trainer.image_fn(p) for p in paths[:4]])
    model.eval()
    with torch.no_grad():
        trained = model.visual_tokens(images)
        for n, t in model.folded_clip_proj().items():
            model.get_parameter(n).copy_(t)
        model.feature_norm = None
        folded = model.visual_tokens(images)
    assert torch.allclose(trained, folded, atol=1e-4), (trained - folded).abs().max()
    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert torch.equal(saved["clip_proj.weight"], model.clip_proj.weight) and torch.equal(saved["clip_proj.bias"], model.clip_proj.bias)
    plain = Trainer(load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, train__max_steps=1)), tmp_path / "plain",
                    resume=False, log=lambda m: None, show_progress=False)
    assert plain.model.feature_norm is None and set(plain.tensors_to_save()) == set(saved)


def test_standardizing_a_trained_visual_branch_keeps_its_function(setup, tmp_path):
    """A stage that continues an artifact with train.standardize_features starts from the same
    visual tokens: its trained clip_proj is re-expressed on standardised features, not reused
    as if it had been trained on them."""
    first = tmp_path / "pretrain"
    r = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, train__stage='"pretrain"', train__max_steps=2))
    first.mkdir()
    Trainer(r, first, resume=False, log=lambda m: None, show_progress=False).run()
    r2 = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, model__ref=f'"{first}"', train__stage='"pretrain"',
                                                          train__standardize_features="true", train__max_steps=1))
    (tmp_path / "again").mkdir()
    again = Trainer(r2, tmp_path / "again", resume=False, log=lambda m: None, show_progress=False)
    assert again.model.feature_norm is not None
    source = engine.load(str(first), device="cpu").model
    inputs = torch.stack([again.image_fn(p) for p in sorted(again.image_paths)[:4]])  # cached encoder features
    with torch.no_grad():
        want, got = source.visual_tokens(inputs), again.model.visual_tokens(inputs)
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()


def test_a_stage_continuing_an_artifact_keeps_its_record(setup, tmp_path):
    """finetune from a pretrain artifact: lav2.json keeps the pretrain record under `previous`,
    and `lav2 info` shows both stages, the earliest first."""
    first, second = tmp_path / "pretrain", tmp_path / "finetune"
    common = ["--recipe", str(ROOT / "recipes/tiny.toml"), *sets(setup)]
    assert run_cli("train", *common, "--stage", "pretrain", "--out", str(first), "--max-steps", "2").returncode == 0
    r = run_cli("train", *common, "--stage", "finetune", "--out", str(second), "--max-steps", "2",
                "--set", f'model.ref="{first}"')
    assert r.returncode == 0, r.stderr
    tr = json.loads((second / "lav2.json").read_text())["training"]
    assert tr["stage"] == "finetune" and tr["previous"]["stage"] == "pretrain" and tr["previous"]["step"] == 2
    r = run_cli("info", str(second))
    assert r.returncode == 0, r.stderr
    assert r.stdout.index("stage 1 (pretrain): training") < r.stdout.index("stage 2 (finetune): training"), r.stdout


def test_a_stage_can_add_lora_to_an_artifact(setup, tmp_path):
    """[adapter] lora_rank on a stage continuing an artifact without LoRA adds fresh pairs: the
    model starts as the artifact's function exactly, the pairs train, the saved set is the
    artifact's plus the stage's group; data.caption_context marks the artifact self_caption,
    and a later stage keeps the mark. A rank that differs from the artifact's is refused."""
    first, second, third = tmp_path / "pretrain", tmp_path / "lora", tmp_path / "third"
    for d in (first, second, third):
        d.mkdir()
    r = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, train__stage='"pretrain"', train__max_steps=2))
    Trainer(r, first, resume=False, log=lambda m: None, show_progress=False).run()
    r2 = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, model__ref=f'"{first}"', train__stage='"finetune"',
                                                          adapter__lora_rank=4, data__caption_context="true",
                                                          train__max_steps=3))
    t = Trainer(r2, second, resume=False, log=lambda m: None, show_progress=False)
    assert t.model.adapter.lora_rank == 4 and any(".lora_wq_l1." in n for n in t.params)
    source = engine.load(str(first), device="cpu")
    tokens = torch.randint(3, 200, (2, 12))
    images = source.image_tensor([Image.open(setup / "images" / "red0.png").convert("RGB")] * 2)
    assert source.can_see
    with torch.no_grad():  # two code paths (one adds the zero LoRA product): equal up to rounding
        want, got = source.logits(tokens, images), t.engine.logits(tokens, images)
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()
    t.run()
    saved = load_file(second / "adapter.safetensors")
    lora = {n for n in saved if ".lora_" in n}
    assert set(saved) == set(load_file(first / "adapter.safetensors")) | set(t.model.to_released(t.params)) and lora
    assert any(saved[n].abs().sum() > 0 for n in lora if n.endswith("_l2.weight"))  # the pairs trained
    meta2 = json.loads((second / "lav2.json").read_text())
    assert meta2["adapter"]["lora_rank"] == 4 and meta2["self_caption"] is True
    assert json.loads((first / "lav2.json").read_text())["self_caption"] is False
    r3 = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, model__ref=f'"{second}"', train__stage='"finetune"',
                                                          train__max_steps=1))
    Trainer(r3, third, resume=False, log=lambda m: None, show_progress=False).run()
    assert json.loads((third / "lav2.json").read_text())["self_caption"] is True
    r4 = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, model__ref=f'"{second}"', train__stage='"finetune"',
                                                          adapter__lora_rank=8, train__max_steps=1))
    with pytest.raises(Lav2Error, match="LoRA of rank 4; a stage continuing it cannot change that to 8"):
        Trainer(r4, tmp_path / "fourth", resume=False, log=lambda m: None, show_progress=False)
    with pytest.raises(Lav2Error, match="LoRA is added to a lav2 artifact"):
        engine.load(str(setup / "base"), add_lora_rank=4)


def test_grad_ckpt_blocks_checkpoints_that_many_blocks_or_is_refused(setup, tmp_path, tiny_llama_config):
    """train.grad_ckpt = "on" checkpoints every block, with grad_ckpt_blocks = N only the first N;
    more blocks than the model has is refused in one line; off checkpoints none."""
    n_layers = tiny_llama_config.n_layers
    for ckpt, blocks, want in (("on", 0, n_layers), ("on", 1, 1), ("off", 1, 0)):
        r = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, train__grad_ckpt=f'"{ckpt}"',
                                                                train__grad_ckpt_blocks=blocks, train__max_steps=1))
        (tmp_path / f"{ckpt}{blocks}").mkdir()
        trainer = Trainer(r, tmp_path / f"{ckpt}{blocks}", resume=False, log=lambda m: None, show_progress=False)
        assert trainer.model.llama.checkpoint_blocks == want
    r = load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, train__grad_ckpt='"on"', train__grad_ckpt_blocks=n_layers + 1))
    with pytest.raises(Lav2Error, match=f"grad_ckpt_blocks {n_layers + 1}: the model has {n_layers} blocks"):
        Trainer(r, tmp_path / "bad", resume=False, log=lambda m: None, show_progress=False)
    with pytest.raises(Lav2Error, match="grad_ckpt_blocks must be at least 0"):
        load_recipe(ROOT / "recipes/tiny.toml", overrides(setup, train__grad_ckpt_blocks=-1))
