"""lav2 in a shell: the version, closed pipes, Ctrl-C, one-line errors and notes, records from
stdin, and help that reads well in 80 columns. Pipes and signals are tested on real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

from lav2cli import __version__

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": "", "COLUMNS": "80"}
SIGPIPE_STATUS = 141


def lav2(*args: str, stdin: str | None = None, cwd: Path | None = None, env: dict | None = None,
         ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lav2cli", *args], input=stdin, capture_output=True, text=True,
                          env=env or ENV, cwd=cwd or ROOT, timeout=600)


def popen(*args: str, cwd: Path | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lav2cli", *args], env=ENV, cwd=cwd or ROOT, text=True, **kw)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def assert_one_line(r: subprocess.CompletedProcess, prefix: str, *words: str, status: int = 1) -> str:
    assert r.returncode == status, (r.returncode, r.stderr)
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(prefix), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, base_dir) -> list[str]:
    """`lav2 train` arguments for a fast text-only run on the session's tiny base."""
    d = tmp_path_factory.mktemp("shell-train")
    rows = [{"id": f"t{i}", "image": None, "instruction": f"Say {w}", "input": "", "output": f"{w} {w}.",
             "kind": "instruction", "source": "test"} for i, w in enumerate(["one", "two", "cat", "red", "mat"])]
    (d / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = {"model.ref": f'"{base_dir}"', "data.image_text": "", "data.instruction": f'"{d / "text.jsonl"}"',
            "train.stage": "finetune", "adapter.visual": "false", "adapter.prompt_layers": "2",
            "train.log_every": "1"}
    return ["--recipe", str(ROOT / "recipes/tiny.toml"), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("shell-images")
    out = []
    for i, color in enumerate(["red", "blue", "green"]):
        p = d / f"{i}.png"
        Image.new("RGB", (32, 32), color).save(p)
        out.append(p)
    return out


# -- the version ---------------------------------------------------------------------------------


def test_version_prints_the_version_and_exits_0():
    r = lav2("--version")
    assert r.returncode == 0 and r.stdout.strip() == __version__ and r.stderr == ""


# -- a closed pipe -------------------------------------------------------------------------------


def read_one_line_then_close(p: subprocess.Popen) -> str:
    line = p.stdout.readline()
    p.stdout.close()
    return line


def test_prepare_to_a_closed_pipe_ends_like_a_program_killed_by_sigpipe(tmp_path):
    """`lav2 prepare ... --out - | head -1`: far more records than a pipe holds, the reader
    leaves after one line; lav2 ends quietly with 141, not with a silent 1."""
    src = tmp_path / "alpaca.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Say {i}", "input": "", "output": "x" * 200}) + "\n"
                           for i in range(5000)))
    p = popen("prepare", "alpaca", "--input", str(src), "--out", "-", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(read_one_line_then_close(p))["id"] == "alpaca-0"
    err = p.stderr.read()
    assert p.wait(timeout=120) == SIGPIPE_STATUS, err
    assert "error" not in err and "Traceback" not in err and "Exception" not in err, err


def test_ask_streaming_into_a_closed_pipe_ends_quietly():
    """A streamed answer of several lines, the reader leaves after the first one."""
    p = popen("ask", "none", "List five fruits, one per line.", "--model", "smollm2-135m-instruct",
              "--temperature", "0", "--max-new-tokens", "60", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert read_one_line_then_close(p).strip()
    err = p.stderr.read()
    assert p.wait(timeout=300) == SIGPIPE_STATUS, err
    assert "error" not in err and "Traceback" not in err, err


def test_ask_json_into_a_closed_pipe_ends_quietly(base_dir, images):
    """`ls *.png | lav2 ask - ... --json | head -1`: the second answer finds the reader gone."""
    p = popen("ask", "-", "What is this?", "--json", "--model", str(base_dir), "--max-new-tokens", "3",
              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(f"{images[0]}\n")
    p.stdin.flush()
    assert json.loads(read_one_line_then_close(p))["image"] == str(images[0])
    p.stdin.write(f"{images[1]}\n")
    p.stdin.close()
    err = p.stderr.read()
    assert p.wait(timeout=300) == SIGPIPE_STATUS, err
    assert "error" not in err and "Traceback" not in err, err


# -- Ctrl-C and --stop-after ------------------------------------------------------------------------


def test_ctrl_c_in_training_names_the_checkpoint_and_how_to_resume(text_run, tmp_path):
    out = tmp_path / "run"
    p = popen("train", *text_run, "--out", str(out), "--max-steps", "100000", "--set", "train.checkpoint_every=3",
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (out / "trainer_state.pt").exists():
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    last = error_lines(stderr)[-1]
    m = re.fullmatch(r"lav2: interrupted: training at step (\d+) of 100000; checkpoint at step (\d+): "
                     r"resume with `lav2 train --out (\S+) --resume`", last)
    assert m, last
    saved = json.loads((out / "lav2.json").read_text())["training"]["step"]
    assert int(m[2]) == saved > 0 and int(m[1]) >= saved and m[3] == str(out)
    assert sum("lav2:" in ln for ln in error_lines(stderr)) == 1


def test_stop_after_ends_with_the_resume_hint(text_run, tmp_path):
    out = tmp_path / "run"
    r = lav2("train", *text_run, "--out", str(out), "--max-steps", "6", "--stop-after", "2")
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in error_lines(r.stderr) if ln.startswith("lav2: note:")]
    assert notes == [f"lav2: note: stopped at step 2 of 6; checkpoint at step 2: resume with "
                     f"`lav2 train --out {out} --resume`"], r.stderr


def test_ctrl_c_elsewhere_is_one_line_naming_the_command(base_dir, images):
    """`lav2 ask -` waiting for the next path on stdin, interrupted."""
    p = popen("ask", "-", "What is this?", "--model", str(base_dir), "--max-new-tokens", "2",
              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(f"{images[0]}\n")
    p.stdin.flush()
    assert p.stdout.readline().startswith(f"{images[0]}\t")
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130
    assert error_lines(stderr)[-1] == "lav2: interrupted: ask" and "Traceback" not in stderr


# -- errors and notes in one line -------------------------------------------------------------------


def test_a_recipe_that_is_a_folder(tmp_path):
    assert_one_line(lav2("train", "--recipe", str(tmp_path), "--out", str(tmp_path / "run")),
                    "lav2: error:", str(tmp_path), "a folder")


def test_an_out_that_is_a_file(text_run, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    assert_one_line(lav2("train", *text_run, "--out", str(blocker)), "lav2: error:", str(blocker), "a file")
    assert_one_line(lav2("train", *text_run, "--out", str(blocker / "run")), "lav2: error:", str(blocker), "a file")
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"instruction": "Hi", "input": "", "output": "Hello."}) + "\n")
    assert_one_line(lav2("prepare", "alpaca", "--input", str(src), "--out", str(blocker / "x.jsonl")),
                    "lav2: error:", str(blocker), "a file, where a folder is needed")


def test_an_unknown_device_is_named():
    from lav2cli.engine import resolve_device
    from lav2cli.errors import Lav2Error

    assert_one_line(lav2("bench", "decode", "--shape", "tiny", "--device", "gpu"), "lav2: error:",
                    "unknown device 'gpu'", "cpu, cuda")
    for bad in ("gpu", "cuda:x", "meta", ""):
        with pytest.raises(Lav2Error, match="unknown device"):
            resolve_device(bad)
    assert str(resolve_device("cpu")) == "cpu"


def test_merge_refuses_to_replace_the_current_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    assert_one_line(lav2("merge", "runs/whatever", "--out", ".", "--force", cwd=tmp_path), "lav2: error:",
                    "--out .", "current folder")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_prepare_input_that_is_a_folder(tmp_path):
    assert_one_line(lav2("prepare", "alpaca", "--input", str(tmp_path), "--out", str(tmp_path / "x.jsonl")),
                    "lav2: error:", str(tmp_path), "a folder")


def test_an_unwritable_cache_is_one_note_line(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    r = lav2("info", "smollm2-135m-instruct", "--json", env={**ENV, "LAV2_CACHE": str(blocker / "cache")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["llama"]["dim"] == 576
    lines = error_lines(r.stderr)
    notes = [ln for ln in lines if ln.startswith("lav2: note:")]
    assert len(notes) == 1 and str(blocker) in notes[0] and "cannot write" in notes[0], r.stderr
    assert "Warning" not in r.stderr and ".py:" not in r.stderr, r.stderr


def test_usage_errors_are_one_line_with_status_2(monkeypatch, capsys):
    from lav2cli.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    for args, words in ((["eval", "vqa"], ["missing option '--data'", "lav2 eval vqa --help"]),
                        (["ask", "none", "hi", "--max-new-tokens", "0"], ["--max-new-tokens"]),
                        (["ak"], ["Did you mean 'ask'?"])):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2, (args, err)
        lines = error_lines(err)
        assert len(lines) == 1 and lines[0].startswith("lav2: error: "), (args, err)
        for w in words:
            assert w in lines[0], (w, lines[0])


# -- eval: stdin, an images root, nothing half-written ---------------------------------------------


def test_eval_reads_records_from_stdin_and_from_another_folder(base_dir, images, tmp_path):
    """Records whose relative image paths point at a folder they no longer sit in: refused in
    one line that names --images-root, without an empty predictions file; evaluated with
    --images-root; and read from stdin with paths relative to the current folder."""
    root = images[0].parent
    rows = [{"id": f"q{i}", "image": p.name, "instruction": "What color is it?", "input": "", "output": "red",
             "kind": "vqa", "source": "test"} for i, p in enumerate(images[:2])]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    sliced = tmp_path / "slice" / "records.jsonl"
    sliced.parent.mkdir()
    sliced.write_text(text)
    common = ["--model", str(base_dir), "--device", "cpu", "--json", "--max-new-tokens", "2"]

    preds = tmp_path / "out" / "preds.jsonl"
    r = lav2("eval", "vqa", "--data", str(sliced), "--out", str(preds), *common)
    assert_one_line(r, "lav2: error:", str(sliced.parent / images[0].name), "image not found", "--images-root")
    assert not preds.exists() and not preds.parent.exists()

    r = lav2("eval", "vqa", "--data", str(sliced), "--images-root", str(root), "--out", str(preds), *common)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 2
    assert [json.loads(ln)["image"] for ln in preds.read_text().splitlines()] == [str(p) for p in images[:2]]

    from_stdin = tmp_path / "stdin.jsonl"
    r = lav2("eval", "vqa", "--data", "-", "--out", str(from_stdin), *common, stdin=text, cwd=root)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["n"] == 2 and metrics["data"] == "-"


def test_a_failed_eval_leaves_no_predictions_file(base_dir, tmp_path):
    """An image that exists but cannot be read fails inside generation (the caption expert
    reads it): nothing was predicted, so no predictions file is left behind."""
    fake = tmp_path / "fake.png"
    fake.write_text("not a PNG")
    data = tmp_path / "records.jsonl"
    data.write_text(json.dumps({"id": "q0", "image": "fake.png", "instruction": "What is it?", "input": "",
                                "output": "red", "kind": "vqa", "source": "test"}) + "\n")
    preds = tmp_path / "preds.jsonl"
    r = lav2("eval", "vqa", "--data", str(data), "--out", str(preds), "--model", str(base_dir), "--device", "cpu",
             "--expert", "caption")
    assert r.returncode == 1 and error_lines(r.stderr)[-1].startswith("lav2: error:"), r.stderr
    assert "fake.png" in r.stderr
    assert not preds.exists()


def test_read_records_from_stdin_and_an_images_root(tmp_path, monkeypatch):
    import io

    from lav2cli.data.records import read_records
    from lav2cli.errors import Lav2Error

    line = json.dumps({"id": "a", "image": "x/1.png", "instruction": "Q", "output": "A", "kind": "vqa",
                       "source": "t"}) + "\n"
    f = tmp_path / "sub" / "r.jsonl"
    f.parent.mkdir()
    f.write_text(line)
    assert next(read_records(f)).image == str(f.parent / "x" / "1.png")
    assert next(read_records(f, tmp_path)).image == str(tmp_path / "x" / "1.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(line + "{bad\n"))
    recs = read_records("-")
    assert next(recs).image == str(tmp_path / "x" / "1.png")
    with pytest.raises(Lav2Error, match="<stdin>:2: malformed json"):
        next(recs)
    with pytest.raises(Lav2Error, match="--images-root .*no such folder"):
        next(read_records(f, tmp_path / "missing"))


# -- ask -: which answer belongs to which image -------------------------------------------------------


def test_ask_stdin_plain_text_names_the_image_of_each_answer(base_dir, images, tmp_path):
    missing = tmp_path / "missing.png"
    paths = [images[0], missing, images[1]]
    r = lav2("ask", "-", "What is this?", "--model", str(base_dir), "--max-new-tokens", "3",
             stdin="".join(f"{p}\n" for p in paths))
    assert r.returncode == 1  # the missing image
    rows = [ln.split("\t", 1) for ln in r.stdout.splitlines()]
    assert [row[0] for row in rows] == [str(p) for p in paths]
    assert rows[1][1] == "" and rows[0][1] and "\n" not in rows[0][1]
    assert "image not found" in r.stderr and "reading image paths" not in r.stderr  # stdin is no terminal


def test_ask_stdin_on_a_terminal_says_it_reads_image_paths():
    import io
    from types import SimpleNamespace

    from lav2cli import ask

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    logs: list[str] = []
    status = ask.run(SimpleNamespace(can_see=True), SimpleNamespace(experts=[]), "-", "q", None, as_json=False,
                     show_prompt=False, model_name="m", stdin=Terminal(""), log=logs.append)
    assert status == 0 and logs == ["reading image paths from stdin, one per line (Ctrl-D ends)"]


# -- one set of --dtype names ------------------------------------------------------------------------


def test_every_command_accepts_the_same_dtype_names():
    import typer

    from lav2cli.cli.common import DTYPES_HELP
    from lav2cli.cli.merge import app as merge_app
    from lav2cli.engine import DTYPES, resolve_dtype
    from lav2cli.merge import merge

    merge_dtype = next(p for p in typer.main.get_command(merge_app).params if p.name == "dtype")
    choices = set(re.findall(r"\w+", merge_dtype.display_type(None)))
    assert choices == {"auto", *DTYPES}
    assert all(name in DTYPES_HELP for name in DTYPES)
    for name in DTYPES:  # ask and eval resolve their --dtype here
        assert resolve_dtype(name, __import__("torch").device("cpu")) == DTYPES[name]
    with pytest.raises(Exception, match="expected auto, float32, fp32"):
        merge("x", "y", dtype="half")


# -- help in 80 columns ------------------------------------------------------------------------------


def all_help_pages() -> dict[str, tuple[object, str]]:
    """Every command's --help rendered at 80 columns: {"eval vqa": (click command, text)}."""
    from typer.testing import CliRunner

    from lav2cli.cli import COMMANDS, app, load_command

    runner = CliRunner()
    pages = {}

    def render(words: list[str], command) -> None:
        r = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert r.exit_code == 0, (words, r.output)
        pages[" ".join(words)] = (command, r.stdout)
        for name, sub in getattr(command, "commands", {}).items():
            render([*words, name], sub)

    render([], None)
    for name in COMMANDS:
        render([name], load_command(name))
    return pages


def test_help_reads_well_in_80_columns():
    pages = all_help_pages()
    assert {"", "ask", "eval vqa", "prepare easyvqa", "bench train"} <= set(pages)
    for name, (command, text) in pages.items():
        lines = text.splitlines()
        assert all(len(ln) <= 80 for ln in lines), (name, [ln for ln in lines if len(ln) > 80])
        assert "…" not in text and "<bool>" not in text and "╭" not in text, name
        assert "Examples:" in text, name
        for i, ln in enumerate(lines):  # a folded example continues, indented, on the next line
            if ln.endswith(" \\"):
                assert lines[i + 1].startswith(ln[: len(ln) - len(ln.lstrip())] + "    "), (name, ln)
        for param in getattr(command, "params", []):  # every option's names in full
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-"):
                    assert re.search(rf"(^|[\s,/]){re.escape(opt)}($|[\s,/])", text, re.M), (name, opt)
            if param.required:
                assert re.search(r"\[(.*; )?required\]", text), (name, param.name)
    for name in ("", "eval"):  # a group lists each command's whole summary
        assert "..." not in pages[name][1].split("Commands:")[1], name
    ask = pages["ask"][1]
    assert "pip install 'lav2cli[experts]'" in " ".join(ask.split())
    assert "--no-self-caption asks" in ask  # prose never breaks an option name at a hyphen
    assert "[required]" in pages["eval vqa"][1].split("-d, --data")[1].split("--model")[0]
    for task in ("vqa", "caption", "mme", "text"):  # --out is required where no --predictions can replace it
        out_help = " ".join(pages[f"eval {task}"][1].split("--out <path>")[1].split("--batch-size")[0].split())
        assert ("[required]" if task == "text" else "Required, unless --predictions") in out_help, task
    assert "or - for stdout" not in " ".join(pages["prepare easyvqa"][1].split())
    assert "or - for stdout" in " ".join(pages["prepare alpaca"][1].split())


# -- the repository ----------------------------------------------------------------------------------

DOCS = ["README.md", "benchmarks/README.md", "docs/model.md", "docs/evaluation.md", "CHANGELOG.md"]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_every_reference_in_the_docs_resolves_in_a_clone():
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists() and ROOT in dest.parents, (doc, target)
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest.read_text()), (doc, target)
        for named in re.findall(r"\b((?:recipes|benchmarks|docs|tests|lav2cli)/[\w./-]*\w)", text):
            assert (ROOT / named).exists(), (doc, named)
        assert not re.search(r"\.\./shared|DESIGN\.md|\bissue \d", text), doc


def test_the_licence_pyproject_names_is_in_the_repository():
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) == 202
