"""The embedded `demo` model: its recipe trains (losses fall), it ships inside the package, it
looks at the image, and it still answers text-only questions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lav2cli.data.prepare import prepare
from lav2cli.data.prepare.easyvqa import EASYVQA_COLOURS, EASYVQA_SHAPES
from lav2cli.registry import resolve_named

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": ""}

pytestmark = pytest.mark.slow


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lav2cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=900, input=stdin)


def easyvqa_images() -> dict[int, tuple[str, str, str]]:
    """Test-split image id -> (path, colour, shape), from the package's own questions."""
    import easy_vqa

    texts, answers, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    colour: dict[int, str] = {}
    shape: dict[int, str] = {}
    for q, a, i in zip(texts, answers, ids):
        if a in EASYVQA_COLOURS and "color" in q:
            colour[i] = a
        if a in EASYVQA_SHAPES:
            shape[i] = a
    return {i: (paths[i], colour[i], shape[i]) for i in sorted(set(colour) & set(shape))}


def test_demo_is_registered_and_shipped():
    d = resolve_named("demo")
    assert d.is_dir() and (d / "lav2.json").is_file() and (d / "adapter.safetensors").is_file()
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"the demo artifact is {size / 2**20:.1f} MiB (limit 20)"
    meta = json.loads((d / "lav2.json").read_text())
    assert meta["base"]["ref"] == "smollm2-135m-instruct" and meta["variant"] == "paper"
    assert meta["encoder"]["name"] == "efficientnet_lite0" and meta["training"]["complete"]
    vqa = json.loads((d / "eval/easyvqa-test.metrics.json").read_text())
    assert vqa["experts"] == [["caption", "the model itself"]], "scored as ask runs it: self-captioned"


def test_info_demo_shows_how_it_was_trained():
    r = run_cli("info", "demo", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    tr = info["training"]  # stage 2 (recipes/demo-stage2.toml) continued stage 1 (recipes/demo.toml)
    assert tr["stage"] == "finetune" and tr["step"] == tr["total_steps"] > 0 and tr["recipe"]["data"]["caption_context"]
    first = tr["previous"]
    assert first["stage"] == "joint" and first["step"] == first["total_steps"] > 0
    assert set(first["data"]) == {"image_text", "instruction"} and min(first["data"].values()) > 0
    assert tr["recipe"]["data"]["text"] and first["recipe"]["data"]["text"], "the text-only data is recorded"
    assert info["self_caption"] and info["adapter"]["lora_rank"] > 0
    tasks = {e["task"]: e for e in info["evaluations"]}
    # the default model must meet the bar it was made default for (recorded by `lav2 eval vqa`)
    assert tasks["vqa"]["n"] == 9673 and 0.95 <= tasks["vqa"]["accuracy"] <= 1.0
    assert "contains_answer" in tasks["text"]
    r = run_cli("info", "demo")
    assert r.returncode == 0 and "eval: vqa" in r.stdout and "recipe: [data]" in r.stdout, r.stdout


def ask_demo(path: str, question: str) -> str:
    r = run_cli("ask", path, question, "--model", "demo", "--temperature", "0", "--max-new-tokens", "10", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["answer"].strip().lower()


def test_demo_looks_at_the_image():
    """Easy-VQA test images whose shape or colour differ get answers that differ accordingly: the
    first test image of each shape is named by its shape, the first of four colours by its colour."""
    images = easyvqa_images()
    by_shape, by_colour = {}, {}
    for i, (path, colour, shape) in images.items():
        by_shape.setdefault(shape, path)
        by_colour.setdefault(colour, path)
    assert len(by_shape) == 3
    shapes = {shape: ask_demo(path, "What shape is in the image?") for shape, path in by_shape.items()}
    assert all(shape in answer for shape, answer in shapes.items()), shapes
    colours = {c: ask_demo(by_colour[c], "What color is the shape?") for c in ("red", "green", "blue", "yellow")}
    assert all(colour in answer for colour, answer in colours.items()), colours


def test_demo_still_answers_text_questions():
    r = run_cli("ask", "none", "What is the capital of France?", "--model", "demo", "--temperature", "0",
                "--max-new-tokens", "30")
    assert r.returncode == 0, r.stderr
    assert "paris" in r.stdout.lower(), r.stdout


def test_demo_recipes_train_and_their_losses_fall(tmp_path):
    """recipes/demo.toml as shipped (base, encoder, variant, stage, text mix), on a small slice of
    easy-VQA and a few text records, for a few steps: both streams' losses fall. Then
    recipes/demo-stage2.toml continues that artifact: LoRA is added, its loss falls, and the
    result is marked self_caption."""
    prepare("easyvqa", tmp_path / "all.jsonl", split="test", kind="both", quiet=True)
    prepare("easyvqa", tmp_path / "read-all.jsonl", split="test", kind="both", yes_no_twins=True,
            caption_context=True, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "all.jsonl").read_text().splitlines()]
    image_ids = sorted({r["image_id"] for r in rows})[:6]  # a few images: the same batches come back
    caps = [r for r in rows if r["kind"] == "caption" and r["image_id"] in image_ids]
    vqa = [r for r in rows if r["kind"] == "vqa" and r["image_id"] in image_ids][:12]
    read = [r for r in map(json.loads, (tmp_path / "read-all.jsonl").read_text().splitlines())
            if r["image_id"] in image_ids][:16]
    assert sum(r["kind"] == "vqa" and r["input"].startswith("Image caption: ") for r in read) >= 10
    text = [{"id": f"t{i}", "image": None, "instruction": q, "input": "", "output": a, "kind": "instruction",
             "source": "test"} for i, (q, a) in enumerate([("What is the capital of France?", "The capital of France is Paris."),
                                                          ("What colour is grass?", "Grass is green.")])]
    for name, recs in (("captions.jsonl", caps), ("vqa.jsonl", vqa), ("text.jsonl", text), ("read.jsonl", read)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "run"
    common = {"data.text": tmp_path / "text.jsonl", "data.text_repeat": 2, "data.feature_cache": "false",
              "train.batch_size": 4, "train.warmup_steps": 2, "train.log_every": 1, "train.checkpoint_every": 0}
    sets = {**common, "data.image_text": tmp_path / "captions.jsonl", "data.instruction": tmp_path / "vqa.jsonl",
            "train.max_steps": 24, "data.image_text_ratio": 0.5}
    r = run_cli("train", "--recipe", str(ROOT / "recipes/demo.toml"), "--out", str(out), *set_args(sets))
    assert r.returncode == 0, r.stderr
    for stream in ("image_text", "instruction"):
        assert_falls(out, stream)

    second = tmp_path / "stage2"
    sets = {**common, "model.ref": out, "data.instruction": tmp_path / "read.jsonl", "train.max_steps": 16}
    r = run_cli("train", "--recipe", str(ROOT / "recipes/demo-stage2.toml"), "--out", str(second), *set_args(sets))
    assert r.returncode == 0, r.stderr
    assert_falls(second, "instruction")
    meta = json.loads((second / "lav2.json").read_text())
    assert meta["self_caption"] and meta["adapter"]["lora_rank"] == 8 and meta["training"]["previous"]["stage"] == "joint"
    assert any(".lora_" in n for n in meta["tensors"]), "stage 2 saves its LoRA pairs"


def set_args(sets: dict) -> list[str]:
    return [a for k, v in sets.items() for a in ("--set", f'{k}="{v}"' if isinstance(v, Path) else f"{k}={v}")]


def assert_falls(run: Path, stream: str) -> None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ls = [x["loss"] for x in rows if x["stream"] == stream]
    assert len(ls) >= 6, (stream, ls)
    assert sum(ls[-3:]) / 3 < 0.7 * sum(ls[:3]) / 3, (stream, ls)
