"""`lav2 ask` and `lav2 info` as a user runs them (subprocesses), on the real embedded base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": ""}


def lav2(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lav2cli", *args], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=600)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lav2: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("imgs")
    out = []
    for i, color in enumerate(["red", "blue"]):
        p = d / f"{i}.png"
        Image.new("RGB", (64, 64), color).save(p)
        out.append(p)
    return out


def test_ask_text_only_answers_paris():
    r = lav2("ask", "none", "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "30")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_ask_stdin_json_one_line_per_image(images):
    r = lav2("ask", "-", "What color is this?", "--json", "--max-new-tokens", "8", "--temperature", "0",
             "--model", "smollm2-135m-instruct", stdin="\n".join(str(p) for p in images) + "\n")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.strip().splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in images]
    assert all(isinstance(row["answer"], str) and row["new_tokens"] >= 1 for row in rows)
    assert "cannot see" in r.stderr  # the base model has no trained visual branch: it says so


def test_ask_stdin_bad_line_is_reported_and_others_answered(images, tmp_path):
    r = lav2("ask", "-", "Hi", "--json", "--max-new-tokens", "3", stdin=f"{images[0]}\n{tmp_path / 'nope.png'}\n")
    assert r.returncode == 1
    rows = [json.loads(ln) for ln in r.stdout.strip().splitlines()]
    assert "answer" in rows[0] and "image not found" in rows[1]["error"]


def test_ask_missing_image(tmp_path):
    assert_one_line_error(lav2("ask", str(tmp_path / "missing.jpg"), "hi"), "missing.jpg", "not found")


def test_ask_file_that_is_not_an_image(tmp_path):
    bad = tmp_path / "fake.jpg"
    bad.write_text("this is text, not a JPEG")
    assert_one_line_error(lav2("ask", str(bad), "hi"), "fake.jpg", "not a readable image")


def test_unknown_model_reference():
    assert_one_line_error(lav2("ask", "none", "hi", "--model", "no-such-model-xyz"), "no-such-model-xyz")


def test_train_that_cannot_start_leaves_no_out_directory(tmp_path):
    out = tmp_path / "runs" / "x"
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"id": "t0", "image": None, "instruction": "Hi", "input": "", "output": "Hello.",
                                "kind": "instruction", "source": "test"}) + "\n")
    r = lav2("train", "--recipe", "recipes/tiny.toml", "--set", "model.ref=no-such-model-xyz", "--set",
             "data.image_text=", "--set", f'data.instruction="{text}"', "--set", "train.stage=finetune", "--out", str(out))
    assert_one_line_error(r, "no-such-model-xyz")
    assert not out.exists()


def test_directory_without_weights(tmp_path):
    assert_one_line_error(lav2("info", str(tmp_path)), str(tmp_path), "no LLaMA weights")


def test_info_json_describes_the_base():
    r = lav2("info", "smollm2-135m-instruct", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["llama"]["dim"] == 576 and info["llama"]["n_kv_heads"] == 3 and info["template"] == "chatml"
    assert info["parameters"]["base LLaMA (frozen)"] > 100_000_000 and info["adapter"] is None


def test_help_has_examples():
    for cmd in ([], ["ask"], ["info"], ["train"], ["merge"], ["prepare"], ["prepare", "coco"], ["eval"],
                ["eval", "vqa"], ["bench"], ["bench", "decode"]):
        r = lav2(*cmd, "--help")
        assert r.returncode == 0 and "Examples" in r.stdout, cmd


def test_help_lists_the_commands_without_importing_them():
    """`lav2 --help` stays fast: the command modules (and torch behind them) load only when a
    command runs or shows its own help."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom lav2cli.cli import COMMANDS, app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0 and all(n in r.stdout for n in COMMANDS)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('lav2cli.cli.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_command_table_summaries_are_the_commands_help():
    import typer
    from typer.core import TyperCommand, TyperGroup

    from lav2cli.cli import COMMANDS, app, load_command

    for name, entry in COMMANDS.items():
        command = load_command(name)
        first = " ".join((command.help or "").split("\n\n")[0].split())
        assert entry.summary == first, name
        assert isinstance(command, (TyperCommand, TyperGroup)) and command.name == name
    assert typer.main.get_command(app).list_commands(None) == list(COMMANDS)


def test_a_mistyped_command_gets_a_suggestion():
    r = lav2("ak", "none", "hi")
    assert r.returncode == 2 and "Did you mean 'ask'?" in r.stderr, r.stderr


def test_bench_reports_what_it_measured_and_writes_a_trace(tmp_path):
    """`lav2 bench decode|train --json` on the tiny shape: the documented fields, the weights
    prepared as ask prepares them, and with --trace a Chrome trace of one more run."""
    trace = tmp_path / "traces" / "decode.json"
    r = lav2("bench", "decode", "--shape", "tiny", "--device", "cpu", "--new-tokens", "6", "--json",
             "--trace", str(trace))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["new_tokens"] == 6 and d["tokens_per_s"] > 0 and d["bandwidth_gb_s"] > 0
    assert d["folded_linears"] == 2 * 7 and d["column_major_weights"] == 2 * 7 + 1  # 2 layers, and the head
    assert d["device"] == "cpu" and d["torch"] == __import__("torch").__version__
    assert d["trace"] == str(trace) and d["device_busy_share"] is None  # no kernels on CPU
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::linear" for e in events)
    assert [p.name for p in trace.parent.iterdir()] == ["decode.json"]  # no temporary left
    r = lav2("bench", "decode", "--shape", "tiny", "--device", "cpu", "--trace", str(tmp_path))
    assert_one_line_error(r, "--trace", "not a writable file path")  # said before the benchmark runs
    r = lav2("bench", "decode", "--shape", "tiny", "--device", "cpu", "--variant", "weird")
    assert_one_line_error(r, "unknown variant 'weird'")
    r = lav2("bench", "train", "--shape", "tiny", "--device", "cpu", "--batch", "2", "--seq", "16",
             "--steps", "2", "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    assert t["steps"] == 2 and t["tokens_per_s"] > 0 and t["frozen_params"] > t["trainable_params"] > 0
    assert t["loss"] == t["loss"] and "trace" not in t  # finite, and no profile unless asked


def test_device_busy_share_sums_kernel_time_over_wall_time():
    from lav2cli.bench import device_busy_share

    trace = {"traceEvents": [{"cat": "kernel", "dur": 500}, {"cat": "cpu_op", "dur": 9000},
                             {"cat": "kernel", "dur": 250}, {"ph": "M"}]}
    assert device_busy_share(trace, 0.001) == 0.75
    assert device_busy_share({"traceEvents": [{"cat": "cpu_op", "dur": 10}]}, 1.0) is None


def test_bench_refuses_a_shape_whose_weights_do_not_fit_and_allocates_in_the_final_dtype(monkeypatch):
    import torch

    from lav2cli import bench
    from lav2cli.errors import Lav2Error

    cpu = torch.device("cpu")
    monkeypatch.setattr(bench, "free_memory", lambda device: 10_000_000)
    with pytest.raises(Lav2Error, match=r"the llama-7b shape in float32 needs 27\.0 GB .* 0\.0 GB free \(--dtype bfloat16 halves it\)"):
        bench.random_model("llama-7b", "paper", 0, cpu, torch.float32)
    monkeypatch.setattr(bench, "free_memory", lambda device: None)  # unknown: try
    model = bench.random_model("tiny", "paper", 4, cpu, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["llama.layers.0.attention.wq.weight"] == torch.bfloat16
    assert dtypes["llama.layers.0.attention.wq.bias"] == torch.float32 == dtypes["llama.layers.0.attention.lora_wq_l1.weight"]
