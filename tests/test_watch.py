"""Training you can watch: TensorBoard event files beside metrics.jsonl, `lav2 plot`, a final
loss per stream that does not swing with the last batch, --resume of a finished run that
changes nothing, an extended run whose schedule is said and followed, --quiet, and saved
recipes that name no machine's paths."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
from test_train import ROOT, overrides, run_cli, sets, setup  # noqa: F401 (setup: the fixture)

from lav2cli import plot as plotting
from lav2cli import runlog
from lav2cli.errors import Lav2Error
from lav2cli.recipe import PATH_FIELDS, load_recipe
from lav2cli.registry import resolve_named
from lav2cli.train import Trainer, resolve
from lav2cli.train.setup import lr_factor

TINY = ROOT / "recipes/tiny.toml"


def train(setup: Path, out: Path, stop_after: int | None = None, log=None, **extra) -> Trainer:
    out.mkdir(parents=True, exist_ok=True)
    r = load_recipe(TINY, overrides(setup, **extra))
    t = Trainer(r, out, resume=False, log=log or (lambda m: None), show_progress=False)
    t.run(stop_after=stop_after)
    return t


def resume(out: Path, overrides_: list[str] = (), log=None) -> Trainer:
    r = resolve(recipe_path=None, overrides=list(overrides_), out=out, resume=True)
    return Trainer(r, out, resume=True, log=log or (lambda m: None), show_progress=False)


def cli(*args: str):
    """The command line in this process (no interpreter and torch start-up per call)."""
    from typer.testing import CliRunner

    from lav2cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def digest(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*")) if f.is_file()}


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


# -- TensorBoard -------------------------------------------------------------------------------


def test_training_writes_tensorboard_events_that_tensorboard_reads(setup, tmp_path):
    """Every logged step is in the event files under its stream's loss tag, with lr, grad norm,
    tokens/s and memory, across a checkpoint's directory swap; tensorboard's own reader reads them."""
    out = tmp_path / "run"
    train(setup, out, train__max_steps=6, train__checkpoint_every=2)
    assert list(out.glob("events.out.tfevents.*")), sorted(p.name for p in out.iterdir())
    rows = runlog.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    got = scalars(out)
    assert {"lr", "grad_norm", "tokens_per_s", "memory_mb"} <= set(got), set(got)
    for stream in {r["stream"] for r in rows}:
        want = [(r["step"], r["loss"]) for r in rows if r["stream"] == stream]
        have = got[f"loss/{stream}"]
        assert [s for s, _ in have] == [s for s, _ in want]
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(have, want))  # float32 in the file
    assert [s for s, _ in got["lr"]] == [1, 2, 3, 4, 5, 6]
    assert all(v > 0 for _, v in got["memory_mb"])


def test_a_resumed_run_replaces_the_events_logged_after_its_checkpoint(setup, tmp_path):
    """Steps logged after the last checkpoint (a kill) are logged again on --resume; TensorBoard
    shows each step once, with the resumed run's values."""
    from lav2cli.train.board import Board

    out = tmp_path / "run"
    train(setup, out, stop_after=3, train__max_steps=6)
    stale = Board(out)  # what a killed run had logged after its checkpoint at step 3
    for step in (4, 5):
        stale.log({"step": step, "stream": "image_text", "loss": 99.0, "lr": 9.0})
    stale.close()
    resume(out).run()
    got = scalars(out)
    assert [s for s, _ in got["lr"]] == [1, 2, 3, 4, 5, 6]
    assert all(v < 99.0 for _, v in got["loss/image_text"]) and all(v < 9.0 for _, v in got["lr"])


# -- final loss --------------------------------------------------------------------------------


def test_final_loss_is_per_stream_over_the_last_logged_steps(tmp_path):
    """The figure of each stream is its loss per supervised token over its last N logged steps:
    it does not move with whichever stream or batch came last."""
    rows = []
    for step in range(1, 31):
        stream = "image_text" if step % 2 else "instruction"
        rows.append({"step": step, "stream": stream, "loss": 7.0 if stream == "image_text" else 3.0,
                     "supervised_tokens": 10})
    rows[-1] = {**rows[-1], "loss": 0.0, "supervised_tokens": 1}  # the last batch: an outlier
    got = runlog.final_losses(rows, window=10)
    assert got["image_text"] == pytest.approx(7.0)
    assert got["instruction"] == pytest.approx((9 * 10 * 3.0 + 0.0) / 91)
    assert runlog.smoothed(rows, window=10)["instruction"][-1][1] == pytest.approx(got["instruction"])
    torn = tmp_path / "metrics.jsonl"  # a line cut off by a kill: left out when reading
    torn.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + '{"step": 4, "str')
    assert [r["step"] for r in runlog.read_metrics(torn)] == [1, 2, 3]


def test_training_records_the_final_loss_per_stream(setup, tmp_path):
    out = tmp_path / "run"
    train(setup, out, train__max_steps=8)
    tr = json.loads((out / "lav2.json").read_text())["training"]
    want = runlog.final_losses(runlog.read_metrics(out / "metrics.jsonl"))
    assert set(tr["final_loss"]) == {"image_text", "instruction"}
    assert tr["final_loss"] == pytest.approx(want)
    r = cli("info", out)
    assert r.exit_code == 0, r.output
    assert "final loss" in r.stdout and "image_text" in r.stdout and "instruction" in r.stdout


def test_info_derives_the_final_loss_of_an_older_record(setup, tmp_path):
    """An artifact that recorded only its last step's loss: info derives the figure from its
    metrics.jsonl; the shipped demo shows both stages' (stage 2 was 0.000 before)."""
    out = tmp_path / "run"
    train(setup, out, train__max_steps=6)
    meta = json.loads((out / "lav2.json").read_text())
    meta["training"]["final_loss"] = 0.0001  # as lav2 0.1 wrote it
    (out / "lav2.json").write_text(json.dumps(meta))
    r = cli("info", out, "--json")
    assert r.exit_code == 0, r.output
    tr = json.loads(r.stdout)["training"]
    assert tr["final_loss"] == pytest.approx(runlog.final_losses(runlog.read_metrics(out / "metrics.jsonl")))
    assert tr["final_loss_from"] == "metrics.jsonl"
    (out / "metrics.jsonl").unlink()  # a record with nulls (what --resume of a finished run used to write)
    meta["training"].update(final_loss=None, tokens_per_s=None)
    (out / "lav2.json").write_text(json.dumps(meta))
    r = cli("info", out)
    assert r.exit_code == 0, r.output
    assert "not recorded" in r.stdout

    r = cli("info", "demo", "--json")
    assert r.exit_code == 0, r.output
    second = json.loads(r.stdout)["training"]
    first = second["previous"]
    assert set(first["final_loss"]) == {"image_text", "instruction"} and first["final_loss_from"] == "metrics-stage1.jsonl"
    assert set(second["final_loss"]) == {"instruction"} and second["final_loss"]["instruction"] > 0.01


# -- resume and extend -------------------------------------------------------------------------


def test_resume_of_a_finished_run_changes_nothing(setup, tmp_path):
    out = tmp_path / "run"
    train(setup, out, train__max_steps=4)
    before = digest(out)
    r = cli("train", "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert "already complete (4 of 4 steps)" in r.stderr and r.stdout.strip() == str(out)
    assert digest(out) == before
    # the same answer where the length is known only once the data is read (epochs)
    t = resume(out, ["train.max_steps=0", "train.epochs=0.01"])
    assert t.total_steps <= 4 and t.already_complete
    info = t.run()
    assert info.already_complete and set(info.final_loss) == {"image_text", "instruction"}
    assert digest(out) == before


def test_extending_a_finished_run_says_and_follows_the_longer_schedule(setup, tmp_path):
    """A larger max_steps on --resume: from the next step the learning rate is the longer
    schedule's (the optimiser uses what the log reports), and the run says so."""
    out = tmp_path / "run"
    first = train(setup, out, train__max_steps=6, train__warmup_steps=2)
    lr, min_ratio = first.lr, 0.0
    notes: list[str] = []
    t = resume(out, ["train.max_steps=9"], log=notes.append)
    assert t.step == 6 and t.total_steps == 9
    assert any("planned for 6 steps and now has 9" in n for n in notes), notes
    for group, base in zip(t.optimizer.param_groups, t.scheduler.base_lrs):
        assert group["lr"] == pytest.approx(base * lr_factor(6, 2, 9, min_ratio), rel=1e-12)
    t.run()
    rows = {r["step"]: r for r in runlog.read_metrics(out / "metrics.jsonl")}
    for step in (7, 8, 9):
        assert rows[step]["lr"] == pytest.approx(lr * lr_factor(step - 1, 2, 9, min_ratio), rel=1e-12)
    tr = json.loads((out / "lav2.json").read_text())["training"]
    assert tr["step"] == tr["total_steps"] == 9 and tr["complete"]
    assert tr["final_loss"] and tr["tokens_per_s"]


# -- the command's output ----------------------------------------------------------------------


def test_quiet_drops_the_table_and_the_table_is_compact(setup, tmp_path):
    r = cli("train", "--recipe", TINY, "--out", tmp_path / "a", "--max-steps", "2", *sets(setup))
    assert r.exit_code == 0, r.output
    table = r.stderr.split("train joint")[0]
    assert table.count("[model]") == 1 and "[train]" in table and "trainable" in table
    assert len(table.strip().splitlines()) <= 25, table
    r = cli("train", "--recipe", TINY, "--out", tmp_path / "b", "--max-steps", "2", "--quiet", *sets(setup))
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == "" and r.stdout.strip() == str(tmp_path / "b")


# -- paths and what a continuing stage records --------------------------------------------------


def test_a_run_records_no_absolute_paths_and_resumes_after_a_move(setup, tmp_path, monkeypatch):
    """The saved recipe's paths are relative to the run directory: neither recipe.toml nor
    lav2.json names this machine's folders, and a project moved as a whole resumes."""
    a = tmp_path / "a"
    shutil.copytree(setup, a / "project")
    out = a / "project" / "runs" / "tiny"
    r = cli("train", "--recipe", TINY, *sets(a / "project", train__checkpoint_every=2), "--out", out,
            "--max-steps", "4", "--stop-after", "2")
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "lav2.json").read_text())["training"]["recipe"]
    # (lav2.json's `base` is the reference the artifact loads its base from: not a record)
    assert str(tmp_path) not in (out / "recipe.toml").read_text() + json.dumps(saved)
    assert saved["data"]["instruction"] == "../../instructions.jsonl"
    assert saved["model"]["ref"] == "../../base"
    b = tmp_path / "b"
    shutil.move(a, b)
    moved = b / "project" / "runs" / "tiny"
    monkeypatch.chdir(tmp_path)  # and from another directory
    r = cli("train", "--out", moved, "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads((moved / "lav2.json").read_text())["training"]["step"] == 4


def test_a_continuing_stage_records_what_applied_and_carries_the_logs(setup, tmp_path):
    """A stage continuing an artifact takes its adapter and encoder: its record keeps only the
    recipe fields that applied, `lav2 info` shows no others, and the run carries the earlier
    stage's log, which `lav2 plot` draws first."""
    first, second = tmp_path / "first", tmp_path / "second"
    train(setup, first, train__stage='"pretrain"', train__max_steps=3)
    train(setup, second, model__ref=f'"{first}"', train__stage='"finetune"', adapter__lora_rank=2,
          adapter__visual_width=999, train__max_steps=4)
    recipe = json.loads((second / "lav2.json").read_text())["training"]["recipe"]
    assert recipe["adapter"] == {"lora_rank": 2} and set(recipe["model"]) == {"ref", "base"}
    assert (second / "metrics-stage1.jsonl").read_bytes() == (first / "metrics.jsonl").read_bytes()
    r = cli("info", second)
    assert r.exit_code == 0, r.output
    assert "999" not in r.stdout and "lora_rank=2" in r.stdout
    run = plotting.load_run(str(second))
    assert [s.label for s in run.stages] == ["stage 1 (pretrain)", "stage 2 (finetune)"]
    assert run.stages[1].offset == 3 and run.stages[1].records[0]["step"] == 1


def test_the_shipped_demo_names_no_machine_and_only_what_applied():
    meta = json.loads((resolve_named("demo") / "lav2.json").read_text())
    for st in runlog.stages(meta["training"]):
        for section, key in PATH_FIELDS:
            value = st["recipe"][section].get(key, "")
            assert not Path(value).is_absolute(), (st["stage"], section, key, value)
    r = cli("info", "demo")
    assert r.exit_code == 0, r.output
    row = r.stdout[r.stdout.index("stage 2 (finetune): recipe:"):]
    row = row[:row.index("[data]")]
    assert "lora_rank=8" in row and "visual_width" not in row and "prompt_layers" not in row, row


# -- lav2 plot ---------------------------------------------------------------------------------


def test_plot_draws_runs_to_an_image(setup, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(setup, a, train__max_steps=4)
    train(setup, b, train__max_steps=4, train__base_lr=1.0)
    png = tmp_path / "loss.png"
    r = cli("plot", a, b, "--out", png)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert len(r.stderr.strip().splitlines()) == 2 and "final loss" in r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".loss.png")]  # no temporary left
    svg = tmp_path / "demo.svg"
    r = cli("plot", "demo", "--out", svg, "--linear-y")
    assert r.exit_code == 0, r.output
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg")) and "stage 2 (finetune)" in r.stderr
    run = plotting.load_run("demo")
    assert [s.offset for s in run.stages] == [0, 1200]


@pytest.mark.parametrize("args, words", [
    (["--out", "x.gif"], [".png, .svg or .pdf"]),
    (["--smooth", "0"], ["--smooth"]),
])
def test_plot_refuses_bad_input_in_one_line(setup, tmp_path, args, words):
    r = run_cli("plot", "demo", *args)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_plot_names_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(Lav2Error, match="no such path|not a training run"):
        plotting.load_run(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(Lav2Error, match="not a training run"):
        plotting.load_run(str(tmp_path / "empty"))
