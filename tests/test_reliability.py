"""Nothing lost: crashes (SIGKILL between the renames of a checkpoint swap and of prepare's
files), full disks (a small tmpfs where mounting is permitted), two writers on one run, outputs
that would replace their inputs, torn and damaged files. After each, the next command finds a
consistent output and leaves no debris."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lav2cli import engine, fileio, formats
from lav2cli.data.prepare import prepare
from lav2cli.data.records import read_records
from lav2cli.errors import Lav2Error
from lav2cli.evaluate import EvalOptions, evaluate, read_predictions
from lav2cli.formats import gguf as gguf_fmt
from lav2cli.merge import merge
from lav2cli.model.adapter import LlamaAdapterV2
from lav2cli.model.config import AdapterConfig
from lav2cli.model.vision import ImagePreprocess
from lav2cli.tokenizer import SentencePieceTokenizer
from lav2cli.train import checkpoint, claim_run
from lav2cli.train import features as feat

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": "", "OMP_NUM_THREADS": "1"}
PAUSE = "LAV2_TEST_PAUSE_IN_SWAP"
QA = [("what is one plus one", "two"), ("say hello", "hello world"), ("name a color", "red"),
      ("what sat on the mat", "the cat"), ("count to three", "one two three"), ("what is the shape", "a circle"),
      ("is the sky blue", "yes"), ("say no", "no")]


def lav2(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lav2cli", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=ROOT, timeout=600)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one `lav2: error:` line of a refused command (and no traceback)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lav2: error:")]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def debris(folder: Path, name: str) -> list[str]:
    """What lav2 may leave beside `name` in `folder` (temporaries, moved-aside copies, journals, locks)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def start_paused(cmd: list[str], marker: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `cmd` with the swap pause hook; return once it sits between its renames."""
    proc = subprocess.Popen(cmd, env={**ENV, **(env or {}), PAUSE: str(marker)}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # a generous bound on the wait, not a measurement
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the command ended without pausing in a swap:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the command did not reach the swap")
        time.sleep(0.05)
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    d = tmp_path / "disk"
    d.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


# -- training runs (text only, on the session's tiny base) -------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_dir) -> Path:
    d = tmp_path_factory.mktemp("runs")
    rows = [{"id": f"i{i}", "image": None, "instruction": q, "input": "", "output": a, "kind": "instruction",
             "source": "test"} for i, (q, a) in enumerate(QA)]
    (d / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def train_args(d: Path, base: Path, **extra) -> list[str]:
    sets = {"model.ref": f'"{base}"', "data.instruction": f'"{d / "instructions.jsonl"}"', "adapter.visual": "false",
            "adapter.prompt_layers": "2", "data.max_tokens": "192", "train.batch_size": "4",
            "train.warmup_steps": "0", "train.checkpoint_every": "1", "train.log_every": "1"}
    sets.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    args = ["--recipe", str(ROOT / "recipes/tiny.toml"), "--stage", "finetune", "--max-steps", "4"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def same_run(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    losses = [[json.loads(ln)["loss"] for ln in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)]
    assert losses[0] == losses[1]


def test_checkpoint_swap_killed_between_renames_is_found_and_finished(runs, base_dir, tmp_path):
    """SIGKILL between the two renames of a checkpoint swap: a second writer is refused meanwhile
    (naming the holder); afterwards the run is found (a plain rerun is refused as not empty),
    --resume finishes the interrupted swap, drops a torn metrics line with a note, continues
    bit-exactly, and nothing is left beside the run."""
    args = train_args(runs, base_dir)
    full, part = tmp_path / "full", tmp_path / "part"
    assert lav2("train", *args, "--out", full).returncode == 0
    assert lav2("train", *args, "--out", part, "--stop-after", 2).returncode == 0
    proc = start_paused([sys.executable, "-m", "lav2cli", "train", "--out", str(part), "--resume"], tmp_path / "paused")

    line = error_line(lav2("train", "--out", part, "--resume"))  # two writers on one run
    assert f"pid {proc.pid} on {socket.gethostname()}" in line and "since" in line and "lav2 train" in line
    kill(proc)
    assert not part.exists() and debris(tmp_path, "part")  # the window: the run lies under other names

    line = error_line(lav2("train", *args, "--out", part))  # no silent fresh start: the run is there again
    assert "not empty" in line
    assert json.loads((part / "lav2.json").read_text())["training"]["step"] == 3  # the swap was finished
    assert debris(tmp_path, "part") == []
    with open(part / "metrics.jsonl", "a") as f:  # an append a full disk cut short
        f.write('{"step": 4, "loss": 1.2')
    r = lav2("train", "--out", part, "--resume")
    assert r.returncode == 0, r.stderr
    assert "metrics.jsonl: dropped unreadable line(s) 4" in r.stderr and "resuming" in r.stderr
    same_run(full, part)
    assert debris(tmp_path, "part") == [] and debris(part, "metrics.jsonl") == []


def test_a_second_writer_is_refused_naming_the_holder(runs, base_dir, tmp_path):
    out = tmp_path / "run"
    with claim_run(out):
        line = error_line(lav2("train", *train_args(runs, base_dir), "--out", out))
        assert f"in use by pid {os.getpid()} on {socket.gethostname()}, since" in line
        r = lav2("merge", "demo", "--out", out, "--force", "--device", "cpu")  # before it loads anything
        assert f"in use by pid {os.getpid()}" in error_line(r) and "loading" not in r.stderr
    assert not out.exists() and debris(tmp_path, "run") == []  # released: the lock file goes too


def test_resume_with_another_world_size_or_learning_rate_is_refused(runs, base_dir, tmp_path):
    """A run of 2 processes resumed by 1 (the global batch and data order would change), and a
    --set that changes the learning rate the restored schedule keeps: refused, said which."""
    ddp = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lav2cli",
                "train", *train_args(runs, base_dir, train__batch_size=2, train__device='"cpu"'), "--out", str(ddp),
                "--stop-after", "2"]
    r = subprocess.run(torchrun, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    before = (ddp / "lav2.json").read_bytes()
    line = error_line(lav2("train", "--out", ddp, "--resume"))
    assert "trained by 2 process(es)" in line and "this run has 1" in line and "refused" in line
    assert "torchrun --nproc_per_node 2" in line
    line = error_line(lav2("train", "--out", ddp, "--resume", "--set", "train.batch_size=4"))  # global batch kept, lr not
    assert "trained by 2 process(es)" in line
    one = tmp_path / "one"
    assert lav2("train", *train_args(runs, base_dir), "--out", one, "--stop-after", 2).returncode == 0
    line = error_line(lav2("train", "--out", one, "--resume", "--set", "train.base_lr=1.0"))
    assert "learning rate was" in line and "refused" in line
    assert (ddp / "lav2.json").read_bytes() == before
    assert json.loads((one / "lav2.json").read_text())["training"]["step"] == 2


def test_torn_metrics_tail_is_dropped_with_a_note(tmp_path):
    torn = b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    kept = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    (tmp_path / "metrics.jsonl").write_bytes(torn)
    checkpoint.keep_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == kept
    (tmp_path / "metrics.jsonl").write_bytes(torn)
    notes = []
    checkpoint.keep_metrics(tmp_path, 2, notes.append)
    assert (tmp_path / "metrics.jsonl").read_text() == kept
    assert len(notes) == 1 and "metrics.jsonl: dropped unreadable line(s) 3" in notes[0]


# -- outputs that would replace an input -------------------------------------------------------


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture
def artifact_on_copy(tmp_path, base_dir) -> tuple[Path, Path]:
    """(an adapter artifact, the copy of the tiny base it names)."""
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    art = tmp_path / "art"
    engine.load(str(base), adapter=AdapterConfig(variant="paper", prompt_layers=1, visual=None),
                device="cpu").save_adapter(art)
    return art, base


def test_train_force_out_the_artifact_it_continues_is_refused(runs, base_dir, artifact_on_copy):
    art, _ = artifact_on_copy
    before = _snapshot(art)
    line = error_line(lav2("train", *train_args(runs, base_dir, model__ref=f'"{art}"'), "--force", "--out", art))
    assert f"--out {art}: would replace the model this run continues" in line
    assert _snapshot(art) == before


def test_merge_force_out_its_base_is_refused(artifact_on_copy, tmp_path):
    art, base = artifact_on_copy
    art_files, base_files = _snapshot(art), _snapshot(base)
    with pytest.raises(Lav2Error, match="would replace the --base model"):
        merge(str(art), base, base=str(base), force=True, device="cpu")
    with pytest.raises(Lav2Error, match="would replace the model file consolidated.00.pth"):  # the base it names
        merge(str(art), base, force=True, device="cpu")
    with pytest.raises(Lav2Error, match="would replace the adapter being merged"):  # a folder holding it
        merge(str(art), tmp_path, force=True, device="cpu")
    assert _snapshot(art) == art_files and _snapshot(base) == base_files
    fileio.refuse_overwrite(base / "merged", {"the --base model": base})  # inside or beside an input is fine
    fileio.refuse_overwrite(tmp_path / "other", {"the --base model": base})


def test_prepare_input_equal_to_out_is_refused(runs, tmp_path):
    src = runs / "instructions.jsonl"
    f = tmp_path / "alpaca.jsonl"
    f.write_bytes(src.read_bytes() + b"not json\n")
    with pytest.raises(Lav2Error, match=r"--out .*alpaca.jsonl: would replace --input") as e:
        prepare("alpaca", f, input=f, quiet=True)
    assert "\n" not in str(e.value) and f.read_bytes() == src.read_bytes() + b"not json\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca.jsonl"]


# -- prepare: the records and the manifest stay a pair -----------------------------------------


def _alpaca(path: Path, tag: str, n: int = 6) -> Path:
    path.write_text(json.dumps([{"instruction": f"{tag} question {i}", "input": "", "output": f"{tag} answer {i}"}
                                for i in range(n)]))
    return path


def _paired(out: Path) -> dict:
    m = json.loads(out.with_suffix(".manifest.json").read_text())
    for o in m["outputs"].values():
        assert o["sha256"] == fileio.sha256_file(out.parent / o["path"]), o
    return m


def test_prepare_killed_between_its_renames_is_finished_by_the_next_write(tmp_path):
    out = tmp_path / "data.jsonl"
    a, b = _alpaca(tmp_path / "a.json", "A"), _alpaca(tmp_path / "b.json", "B")
    cmd = lambda src: ["prepare", "alpaca", "--input", src, "--out", out, "--val-fraction", "0.5"]  # noqa: E731
    assert lav2(*cmd(a)).returncode == 0
    assert _paired(out)["inputs"][0]["path"] == str(a)
    proc = start_paused([sys.executable, "-m", "lav2cli", *map(str, cmd(b))], tmp_path / "paused")
    kill(proc)
    m = json.loads((tmp_path / "data.manifest.json").read_text())
    assert m["inputs"][0]["path"] == str(a) and "B question" in out.read_text()  # a mixed pair, for now
    assert ".data.manifest.json.commit" in debris(tmp_path, "data.manifest.json")

    fileio.recover([out, tmp_path / "data.val.jsonl", tmp_path / "data.manifest.json"])  # what the next write does first
    assert _paired(out)["inputs"][0]["path"] == str(b)
    proc = start_paused([sys.executable, "-m", "lav2cli", *map(str, cmd(a))], tmp_path / "paused2")
    kill(proc)
    r = lav2(*cmd(b))  # the next command: a consistent output, no debris
    assert r.returncode == 0, r.stderr
    assert _paired(out)["inputs"][0]["path"] == str(b) and "B question" in out.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_reader_of_a_killed_prepare_reads_one_run(tmp_path):
    """The next command after a kill between prepare's renames may be a reader (train, eval): it
    reads the records and the validation split of one run, not the new records with the old split."""
    out, val = tmp_path / "data.jsonl", tmp_path / "data.val.jsonl"
    a, b = _alpaca(tmp_path / "a.json", "A"), _alpaca(tmp_path / "b.json", "B")
    cmd = lambda src: ["prepare", "alpaca", "--input", src, "--out", out, "--val-fraction", "0.5"]  # noqa: E731
    assert lav2(*cmd(a)).returncode == 0
    kill(start_paused([sys.executable, "-m", "lav2cli", *map(str, cmd(b))], tmp_path / "paused"))
    assert "B question" in out.read_text() and "A question" in val.read_text()  # the kill's window
    (tmp_path / "paused").unlink()

    assert {r.instruction.split()[0] for r in read_records(val)} == {"B"}
    assert {r.instruction.split()[0] for r in read_records(out)} == {"B"}
    assert _paired(out)["inputs"][0]["path"] == str(b)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- fileio: swaps, journals, leftovers, links, full disks ------------------------------------


_WRITE_DIR = """
import sys
from lav2cli import fileio
with fileio.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "v").write_text("new")
"""
_WRITE_FILES = """
import sys
from lav2cli import fileio
with fileio.atomic_files(sys.argv[1:]) as files:
    for f in files:
        f.write("new")
"""


def test_a_dead_swap_is_finished_or_undone_and_its_leftovers_removed(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "v").write_text("old")
    proc = start_paused([sys.executable, "-c", _WRITE_DIR, str(final)], tmp_path / "paused")
    fileio.sweep(tmp_path)  # the writer is alive: its temporaries are not debris
    assert not final.exists() and len(debris(tmp_path, "run")) == 3  # tmp, old, lock
    kill(proc)
    assert formats.classify(str(final)) == ("base", final)  # a reader finds it: the swap is finished
    assert (final / "v").read_text() == "new" and debris(tmp_path, "run") == []  # the new one was complete

    # only the moved-aside copy is left: it is put back; stray temporaries of any age go
    (final / "v").write_text("old")
    os.replace(final, tmp_path / ".run.old-abc123")
    (tmp_path / ".run.tmp-zzz").mkdir()
    (tmp_path / ".run.tmp-x1.npy").write_text("not mine")  # another name's: untouched
    (tmp_path / ".run.notes").write_text("not lav2's")
    notes = []
    with fileio.claim(final, log=notes.append):
        pass
    assert (final / "v").read_text() == "old" and any("previous version" in n for n in notes)
    assert debris(tmp_path, "run") == [".run.notes", ".run.tmp-x1.npy"]


def test_files_written_together_stay_together_after_a_kill(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "a.manifest.json"
    for f in (a, b):
        f.write_text("old")
    proc = start_paused([sys.executable, "-c", _WRITE_FILES, str(a), str(b)], tmp_path / "paused")
    fileio.sweep(tmp_path)
    assert (a.read_text(), b.read_text()) == ("new", "old")  # the writer still runs: left alone
    kill(proc)
    fileio.sweep(tmp_path)  # a cache folder's sweep, or the next write of these files
    assert (a.read_text(), b.read_text()) == ("new", "new")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_symlinked_folder_in_a_run_stays_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    (target / "sub").mkdir(parents=True)
    (target / "big.bin").write_bytes(b"x" * 10)
    run = tmp_path / "run"
    with fileio.atomic_dir(run) as tmp:
        (tmp / "adapter.safetensors").write_text("1")
    (run / "evals").symlink_to(target, target_is_directory=True)
    (run / "notes.txt").symlink_to(target / "big.bin")
    (run / "mine").mkdir()
    (run / "mine" / "link").symlink_to("../notes.txt")
    for step in (2, 3):  # two checkpoints
        with fileio.atomic_dir(run, keep_others=True) as tmp:
            (tmp / "adapter.safetensors").write_text(str(step))
    assert (run / "evals").is_symlink() and os.readlink(run / "evals") == str(target)
    assert (run / "notes.txt").is_symlink() and (run / "mine" / "link").is_symlink()
    assert (run / "adapter.safetensors").read_text() == "3" and sorted(p.name for p in target.iterdir()) == ["big.bin", "sub"]


def test_a_full_disk_during_a_swap_names_the_output_and_keeps_the_old(tiny_disk):
    final = tiny_disk / "run"
    with fileio.atomic_dir(final) as tmp:
        (tmp / "adapter.safetensors").write_text("old")
    with pytest.raises(Lav2Error, match=r"run: no space left on the device") as e:
        with fileio.atomic_dir(final, keep_others=True) as tmp:
            save_file({"w": torch.zeros(64, 1024)}, str(tmp / "adapter.safetensors"))  # 256 KiB > 64 KiB
    assert isinstance(e.value, OSError) and "\n" not in str(e.value)
    assert (final / "adapter.safetensors").read_text() == "old"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["run"]


def test_train_on_a_full_disk_is_one_line_and_can_simply_be_run_again(runs, base_dir, tiny_disk):
    """The command line names the output (no exception class), and a run that failed before its
    first checkpoint leaves no --out behind that the same command would then refuse as not empty."""
    out = tiny_disk / "run"
    for _ in range(2):
        line = error_line(lav2("train", *train_args(runs, base_dir), "--out", out))
        assert line.startswith(f"lav2: error: {out}: no space left on the device"), line
        assert list(tiny_disk.iterdir()) == []


# -- the GGUF conversion cache and the feature cache -------------------------------------------


@pytest.fixture
def gguf_file(tmp_path, tiny_llama_config, spm_model_path):
    torch.manual_seed(0)
    sd = {k: torch.randn(v.shape) for k, v in _shapes(tiny_llama_config).items()}
    return gguf_fmt.save(tmp_path / "tiny.gguf", tiny_llama_config, sd, SentencePieceTokenizer(spm_model_path)), sd


def _shapes(cfg) -> dict[str, torch.Tensor]:
    return {k.removeprefix("llama."): v for k, v in LlamaAdapterV2(cfg).state_dict().items()}


def test_gguf_cache_on_a_full_disk_warns_and_loads(gguf_file, tiny_disk):
    f, sd = gguf_file
    with pytest.warns(UserWarning, match="cannot write the GGUF cache .*no space left"):
        bw = gguf_fmt.load(f, cache_dir=tiny_disk)
    assert all(torch.equal(bw.state_dict[k], sd[k]) for k in sd)
    assert [p.name for p in (tiny_disk / "gguf").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("damage", ["truncated-safetensors", "bad-config"])
def test_a_damaged_gguf_cache_entry_is_named_and_rebuilt(gguf_file, tmp_path, damage):
    f, sd = gguf_file
    cache = tmp_path / "cache"
    gguf_fmt.load(f, cache_dir=cache)
    entry = next(p for p in (cache / "gguf").iterdir() if p.name != "keys")
    bad = entry / ("model.safetensors" if damage == "truncated-safetensors" else "config.json")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"{bad}: damaged GGUF cache entry"):
        bw = gguf_fmt.load(f, cache_dir=cache)
    assert all(torch.equal(bw.state_dict[k], sd[k]) for k in sd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = gguf_fmt.load(f, cache_dir=cache)
    assert not [w for w in caught if "GGUF cache" in str(w.message)]  # rebuilt: read silently
    assert all(torch.equal(again.state_dict[k], sd[k]) for k in sd)


def _fake_engine(tokens: int = 50, dim: int = 64) -> SimpleNamespace:
    """What feature_cache reads of an engine: an 'encoder' that maps each image to a constant."""
    def encode(x):
        return x.mean(dim=(1, 2, 3))[:, None, None].expand(-1, tokens, dim).clone()

    return SimpleNamespace(config=SimpleNamespace(encoder={"kind": "fake"}, preprocess=ImagePreprocess(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
                           model=SimpleNamespace(encode_images=encode),
                           image_tensor=lambda ims: torch.stack([torch.tensor(float(im.getpixel((0, 0))[0]))
                                                                 .expand(3, 2, 2) for im in ims]))


@pytest.fixture
def images(tmp_path) -> list[str]:
    paths = []
    for i in range(12):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(p)
        paths.append(str(p))
    return paths


def test_feature_cache_on_a_full_disk_fails_in_one_line(images, tiny_disk, monkeypatch):
    monkeypatch.setenv("LAV2_CACHE", str(tiny_disk))
    with pytest.raises(Lav2Error, match=r"features/.*\.npy: no space for the image feature cache \(needs") as e:
        feat.feature_cache(_fake_engine(), images, lambda m: None)  # 12 x 50 x 64 fp16 = 75 KiB > 64 KiB
    assert "\n" not in str(e.value)
    assert list((tiny_disk / "features").iterdir()) == []


def test_feature_cache_without_room_fails_before_encoding(images, tmp_path, monkeypatch):
    """The same without a tmpfs: the preallocation reports ENOSPC."""
    monkeypatch.setenv("LAV2_CACHE", str(tmp_path / "cache"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(Lav2Error, match="no space for the image feature cache"):
        feat.feature_cache(_fake_engine(), images, lambda m: None)
    assert list((tmp_path / "cache" / "features").iterdir()) == []


def test_a_damaged_feature_cache_is_named_and_rebuilt(images, tmp_path, monkeypatch):
    monkeypatch.setenv("LAV2_CACHE", str(tmp_path / "cache"))
    fn = feat.feature_cache(_fake_engine(), images, lambda m: None)
    want = fn(images[3])
    f = next((tmp_path / "cache" / "features").glob("*.npy"))
    f.write_bytes(f.read_bytes()[:-100])
    (f.parent / ".stale.npy.tmp-abc").write_bytes(b"a killed encoding")
    notes = []
    fn = feat.feature_cache(_fake_engine(), images, notes.append)
    assert any(n.startswith(f"{f}: damaged feature cache") for n in notes), notes
    assert torch.equal(fn(images[3]), want)
    assert [p.name for p in f.parent.iterdir()] == [f.name]  # the dead temporary is swept


# -- eval --out: only its own predictions are repaired -----------------------------------------


def test_eval_out_repairs_only_its_own_predictions(tmp_path, base_dir):
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps({"id": f"v{i}", "image": None, "instruction": "Q?", "input": "",
                                        "output": "yes", "kind": "vqa", "source": "t"}) + "\n" for i in (1, 2)))
    owner = {"v1": "v1", "v2": "v2"}
    adapter = tmp_path / "adapter.safetensors"
    save_file({"w": torch.arange(6.0)}, str(adapter))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nthe last line")
    foreign = tmp_path / "foreign.jsonl"  # predictions, but of other records, with a cut last line
    foreign.write_text('{"id": "zz", "prediction": "a"}\n{"id": "v1", "pred')
    for f in (adapter, notes, foreign):
        before = f.read_bytes()
        with pytest.raises(Lav2Error) as e:
            read_predictions(f, owner, data, repair=True)
        assert str(e.value).startswith(f"{f}:") and "\n" not in str(e.value)
        assert f.read_bytes() == before, f
    line = error_line(lav2("eval", "vqa", "--data", data, "--model", base_dir, "--out", adapter))
    assert "not a predictions file" in line and load_file(str(adapter))["w"].tolist() == list(range(6))

    ours = tmp_path / "ours.jsonl"  # this eval's, cut by a kill: the cut line goes
    ours.write_text('{"id": "v1", "prediction": "yes", "model": "m"}\n{"id": "v2", "prompt": "Q')
    logged = []
    assert list(read_predictions(ours, owner, data, model="m", repair=True, log=logged.append)) == ["v1"]
    assert ours.read_text() == '{"id": "v1", "prediction": "yes", "model": "m"}\n' and logged
    with pytest.raises(Lav2Error, match="not a predictions file"):
        evaluate(EvalOptions("vqa", data=data, model=str(base_dir), out=notes), log=lambda m: None)
