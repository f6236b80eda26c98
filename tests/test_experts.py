"""Experts at inference: OCR reads a rendered sentence (and nothing on a blank image), the
caption expert names the cat in scikit-image's chelsea, the experts' text reaches the prompt of
both templates (`lav2 ask` and `lav2 eval`), and a missing engine says what to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from conftest import EFFNET, trained_looking_artifact
from lav2cli import answer as A, engine, experts as X
from lav2cli.answer import Pipeline
from lav2cli.errors import Lav2Error
from lav2cli.evaluate import EvalOptions, evaluate
from lav2cli.experts import ExpertOptions, Experts, Word
from lav2cli.inference.generate import Sampling
from lav2cli.model.config import AdapterConfig, VisualConfig
from lav2cli.templates import get_template

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": ""}
LINES = ["The quick brown fox jumps", "over the lazy dog."]


def lav2(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lav2cli", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=600)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lav2: error:") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def sentence_png(tmp_path_factory) -> Path:
    """Two lines of black text on white, drawn with PIL's bundled TrueType font."""
    font = ImageFont.load_default(size=36)
    im = Image.new("RGB", (760, 220), "white")
    draw = ImageDraw.Draw(im)
    for i, line in enumerate(LINES):
        draw.text((30, 40 + 80 * i), line, fill="black", font=font)
    p = tmp_path_factory.mktemp("ocr") / "sentence.png"
    im.save(p)
    return p


@pytest.fixture(scope="module")
def blank_png(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("blank") / "blank.png"
    Image.new("RGB", (400, 300), "white").save(p)
    return p


@pytest.fixture(scope="module")
def chelsea_png(tmp_path_factory) -> Path:
    skimage_data = pytest.importorskip("skimage.data")
    p = tmp_path_factory.mktemp("chelsea") / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(p)
    return p


def fake_experts(texts: dict[str, str]) -> Experts:
    """Experts whose models are stand-ins returning fixed text (the prompt path, not the models)."""
    return Experts(ExpertOptions(tuple(texts)), {n: (lambda im, t=t: t) for n, t in texts.items()})


# -- OCR ----------------------------------------------------------------------------------------


def test_rapidocr_reads_the_rendered_sentence_in_reading_order(sentence_png):
    pytest.importorskip("rapidocr_onnxruntime")
    text = X.RapidOcr()(Image.open(sentence_png).convert("RGB"))
    assert text.splitlines() == LINES


def test_rapidocr_finds_nothing_on_a_blank_image_and_the_prompt_has_no_empty_section(blank_png):
    pytest.importorskip("rapidocr_onnxruntime")
    outs = Experts(ExpertOptions(("ocr",))).run(Image.open(blank_png).convert("RGB"))
    assert [(o.name, o.source, o.text) for o in outs] == [("ocr", "rapidocr", "")]
    assert outs[0].seconds > 0
    ctx = X.context(outs)
    assert ctx == ""
    assert "### Input" not in get_template("alpaca").prompt("What does it say?", ctx)
    assert "What does it say?<|im_end|>" in get_template("chatml").prompt("What does it say?", ctx)
    assert "<|im_start|>user\nWhat does it say?" in get_template("chatml").prompt("What does it say?", ctx)


def test_reading_order_groups_boxes_into_lines_left_to_right():
    words = [Word("world", 120, 12, 200, 38), Word("second", 10, 60, 90, 85), Word("Hello", 10, 10, 100, 40),
             Word("line", 100, 62, 150, 88)]
    assert X.reading_order(words) == ["Hello world", "second line"]
    assert X.reading_order([]) == []


TSV = "\n".join([
    "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext",
    "1\t1\t0\t0\t0\t0\t0\t0\t760\t220\t-1\t",
    "4\t1\t1\t1\t1\t0\t30\t40\t500\t40\t-1\t",
    "5\t1\t1\t1\t1\t1\t30\t40\t70\t40\t96.1\tThe",
    "5\t1\t1\t1\t1\t2\t110\t40\t90\t40\t95.5\tquick",
    "5\t1\t1\t1\t2\t1\t30\t120\t60\t40\t91.0\tover",
    "5\t1\t1\t1\t2\t2\t100\t120\t60\t40\t-1\t ",
    "5\t1\t1\t1\t2\t3\t170\t120\t60\t40\t90.2\t\"dog.\"",
]) + "\n"


def test_tesseract_tsv_becomes_lines_in_its_reading_order():
    assert X.tesseract_lines(TSV) == ["The quick", 'over "dog."']
    assert X.tesseract_lines(TSV.split("\n")[0] + "\n") == []


def test_tesseract_engine_runs_the_program_on_the_image(tmp_path, monkeypatch, sentence_png):
    """A stand-in `tesseract` on PATH: it must get `stdin stdout tsv` and a PNG on stdin."""
    (tmp_path / "tsv.txt").write_text(TSV)
    prog = tmp_path / "tesseract"
    prog.write_text(f"#!{sys.executable}\nimport sys\n"
                    "assert sys.argv[1:] == ['stdin', 'stdout', 'tsv'], sys.argv\n"
                    "assert sys.stdin.buffer.read(8) == b'\\x89PNG\\r\\n\\x1a\\n'\n"
                    f"sys.stdout.write(open({str(tmp_path / 'tsv.txt')!r}).read())\n")
    prog.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert X.TesseractOcr()(Image.open(sentence_png)) == 'The quick\nover "dog."'


def test_missing_tesseract_is_one_line_naming_what_to_install(tmp_path, sentence_png, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no tesseract
    with pytest.raises(Lav2Error, match="tesseract program.*apt-get install tesseract-ocr"):
        X.TesseractOcr()
    r = lav2("ask", str(sentence_png), "What does it say?", "--expert", "ocr", "--ocr-engine", "tesseract",
             env={**ENV, "PATH": str(tmp_path)})
    line = one_line_error(r)
    assert "tesseract program" in line and "apt-get install tesseract-ocr" in line


def test_missing_rapidocr_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import fails as if not installed
    with pytest.raises(Lav2Error) as e:
        X.RapidOcr()
    assert "\n" not in str(e.value) and "pip install 'lav2cli[experts]'" in str(e.value)


# -- caption ------------------------------------------------------------------------------------


def test_caption_phrase_threshold_articles_and_none():
    classes = [("Egyptian cat", 0.32), ("tabby cat", 0.28), ("tiger cat", 0.25), ("lynx", 0.05)]
    assert X.caption_phrase(classes, 0.2, 3) == "a photo of an Egyptian cat, a tabby cat or a tiger cat"
    assert X.caption_phrase(classes, 0.3, 3) == "a photo of an Egyptian cat"
    assert X.caption_phrase(classes, 0.2, 1) == "a photo of an Egyptian cat"
    assert X.caption_phrase(classes, 0.5, 3) == ""  # nothing sure enough: no caption at all
    assert X.class_name("tabby, tabby cat") == "tabby cat"
    assert X.class_name("web site, website, internet site, site") == "web site"


def test_caption_expert_names_the_cat_in_chelsea(chelsea_png):
    cap = X.ClassifierCaptioner(threshold=0.2, top_k=3)
    im = Image.open(chelsea_png).convert("RGB")
    classes = cap.classes(im)
    assert len(classes) == 3 and all(0 < p <= 1 for _, p in classes)
    assert [p for _, p in classes] == sorted((p for _, p in classes), reverse=True)
    assert all("cat" in name for name, _ in classes), classes  # ImageNet's cat classes, no others
    text = cap(im)
    assert text.startswith("a photo of ") and "cat" in text
    assert cap(Image.new("RGB", (224, 224), "white")) == ""  # a blank image: no class is sure enough


def test_caption_model_must_see(tmp_path, base_dir):
    with pytest.raises(Lav2Error, match="no trained visual branch"):
        X.ModelCaptioner.load(str(base_dir), "cpu", "float32")


def test_caption_model_answers_the_captioning_instruction_about_the_image(tmp_path, base_dir, chelsea_png):
    cfg = AdapterConfig(variant="paper", visual=VisualConfig(encoder_dim=1280, width=32, depth=1, heads=4, n_queries=10))
    eng = engine.load(str(base_dir), adapter=cfg, encoder=EFFNET, device="cpu")
    with torch.no_grad():
        for p in eng.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # open the gates: a "trained" captioner
    eng.save_adapter(tmp_path / "captioner")
    cap = X.ModelCaptioner.load(str(tmp_path / "captioner"), "cpu", "float32", max_new_tokens=5)
    seen = {}
    real = cap.engine.generate

    def spy(prompts, images=None, **kw):
        seen.update(prompt=prompts[0], images=images)
        return real(prompts, images=images, **kw)

    cap.engine.generate = spy
    text = cap(Image.open(chelsea_png).convert("RGB"))
    assert isinstance(text, str)
    tpl, tok = cap.engine.template, cap.engine.tokenizer
    assert tpl.name == "alpaca" and seen["prompt"] == tpl.encode_prompt(tok, "Generate caption of this image")
    assert seen["images"].shape == (1, 3, 224, 224)


def test_options_are_checked():
    assert ExpertOptions.make(["ocr", "caption", "ocr"]).experts == ("ocr", "caption")
    assert ExpertOptions.make([X.Expert.caption], ocr_engine=X.OcrEngine.tesseract).ocr_engine == "tesseract"
    with pytest.raises(Lav2Error, match="--expert caption"):
        ExpertOptions.make(["ocr"], caption_model="runs/cap")
    with pytest.raises(Lav2Error, match="unknown expert"):
        ExpertOptions.make(["depth"])


# -- the prompt, in both templates ------------------------------------------------------------------


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_expert_text_reaches_the_prompt(template, base_dir, sentence_png):
    eng = engine.load(str(base_dir), device="cpu")
    eng.config.template = template
    shown: list[str] = []
    ans = A.answer(eng, Pipeline(fake_experts({"caption": "a photo of a street sign", "ocr": "EXIT 12\nKeep left"})),
                   str(sentence_png), "What does the sign say?", Sampling(max_new_tokens=2), show_prompt=shown.append)
    ctx = "Image caption: a photo of a street sign\n\nText in the image:\nEXIT 12\nKeep left"
    assert shown == [ans.prompt]
    if template == "alpaca":
        assert f"### Instruction:\nWhat does the sign say?\n\n### Input:\n{ctx}\n\n### Response:" in ans.prompt
    else:
        assert f"<|im_start|>user\n{ctx}\n\nWhat does the sign say?<|im_end|>" in ans.prompt
    assert ans.prompt_tokens == len(eng.template.encode_prompt(eng.tokenizer, "What does the sign say?", ctx))
    assert [e["name"] for e in ans.to_json("m")["experts"]] == ["caption", "ocr"]


def test_expert_that_finds_nothing_leaves_no_section(base_dir, blank_png):
    eng = engine.load(str(base_dir), device="cpu")
    ans = A.answer(eng, Pipeline(fake_experts({"ocr": ""})), str(blank_png), "What does it say?", Sampling(max_new_tokens=2))
    assert "### Input" not in ans.prompt and "Text in the image" not in ans.prompt
    assert ans.experts[0].text == ""


def test_eval_vqa_puts_expert_text_in_prompts_and_refuses_mixed_resume(tmp_path, base_dir, monkeypatch):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    rows = [{"id": "q1", "image": "red.png", "instruction": "What color is it?", "input": "", "output": "red",
             "kind": "vqa", "source": "test"},
            {"id": "q2", "image": None, "instruction": "Is ice hot?", "input": "", "output": "no",
             "kind": "vqa", "source": "test"}]
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(Experts, "model", lambda self, name: (lambda im: "a photo of a red square"))
    out = tmp_path / "preds.jsonl"
    opts = dict(data=data, model=str(base_dir), out=out, device="cpu", max_new_tokens=2)
    result = evaluate(EvalOptions("vqa", expert=["caption"], **opts), log=lambda m: None)
    assert result["experts"] == [["caption", "efficientnet_lite0 ImageNet classifier (p >= 0.2)"]]
    preds = {p["id"]: p for p in map(json.loads, out.read_text().splitlines())}
    assert "### Input:\nImage caption: a photo of a red square\n\n### Response:" in preds["q1"]["prompt"]
    assert preds["q1"]["experts"][0]["text"] == "a photo of a red square"
    assert "### Input" not in preds["q2"]["prompt"] and preds["q2"]["experts"] == []  # no image, no expert
    with pytest.raises(Lav2Error, match="made with experts caption .*not none"):
        evaluate(EvalOptions("vqa", **opts), log=lambda m: None)
    with pytest.raises(Lav2Error, match="caption does not"):
        evaluate(EvalOptions("caption", expert=["ocr"], **opts), log=lambda m: None)


# -- the command line ----------------------------------------------------------------------------


def test_expert_needs_an_image():
    assert "IMAGE is none" in one_line_error(lav2("ask", "none", "hi", "--expert", "caption"))


@pytest.mark.slow
def test_ask_chelsea_with_the_caption_expert_answers_cat(chelsea_png):
    # the embedded base (the demo default knows only easy-VQA's shapes): the expert's text is its only sight
    r = lav2("ask", str(chelsea_png), "What animal is in the picture?", "--expert", "caption",
             "--model", "smollm2-135m-instruct", "--temperature", "0", "--max-new-tokens", "30", "--json", "--show-prompt")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    cap = row["experts"][0]
    assert cap["name"] == "caption" and "cat" in cap["text"] and cap["seconds"] > 0
    assert f"Image caption: {cap['text']}\n\nWhat animal is in the picture?" in r.stderr  # --show-prompt
    assert "cat" in row["answer"].lower()


@pytest.mark.slow
def test_ask_reads_the_sign_with_the_ocr_expert(sentence_png):
    pytest.importorskip("rapidocr_onnxruntime")
    r = lav2("ask", str(sentence_png), "What does the text in the image say?", "--expert", "ocr", "--expert",
             "caption", "--model", "smollm2-135m-instruct", "--temperature", "0", "--max-new-tokens", "30", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert [e["name"] for e in row["experts"]] == ["ocr", "caption"]
    assert row["experts"][0]["text"] == "\n".join(LINES)
    assert "fox" in row["answer"].lower()


# -- self_caption: the model as its own caption expert ------------------------------------------


@pytest.fixture(scope="module")
def self_captioner(tmp_path_factory, base_dir) -> Path:
    """A "trained" visual artifact (gates open) marked self_caption."""
    return trained_looking_artifact(base_dir, tmp_path_factory.mktemp("selfcap") / "artifact", seed=1,
                                    self_caption=True)


def test_a_self_captioning_model_captions_first_in_ask_unless_told_not_to(self_captioner, chelsea_png):
    assert json.loads((self_captioner / "lav2.json").read_text())["self_caption"] is True
    common = ["ask", str(chelsea_png), "What animal is this?", "--model", str(self_captioner), "--max-new-tokens", "3",
              "--temperature", "0", "--json", "--show-prompt"]
    r = lav2(*common)
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    [cap] = ans["experts"]
    assert cap["name"] == "caption" and cap["source"] == "the model itself"
    # the caption is what the model answers to the captioning instruction, and it is the prompt's context
    eng = engine.load(str(self_captioner), device="cpu", inference=True)
    assert cap["text"] == X.ModelCaptioner(eng, max_new_tokens=64)(Image.open(chelsea_png).convert("RGB"))
    assert (f"Image caption: {cap['text']}" in r.stderr) == bool(cap["text"].strip())
    r = lav2(*common, "--no-self-caption")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["experts"] == [] and "Image caption:" not in r.stderr
    r = lav2("info", str(self_captioner), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["self_caption"] is True, r.stderr


def test_eval_self_captions_once_per_image_and_a_named_caption_expert_wins(tmp_path, self_captioner, monkeypatch):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    rows = [{"id": f"q{i}", "image": "red.png", "instruction": q, "input": "", "output": "red", "kind": "vqa",
             "source": "test"} for i, q in enumerate(["What color is it?", "Is it red?", "Is it blue?"])]
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    real = X.ModelCaptioner.many
    monkeypatch.setattr(X.ModelCaptioner, "many", lambda self, ims: calls.extend(ims) or real(self, ims))
    opts = dict(data=data, model=str(self_captioner), device="cpu", max_new_tokens=2)
    with monkeypatch.context() as m:  # the answer pass reads the caption, not the image
        m.setattr(A, "image_batch", lambda *a: pytest.fail("a self-captioning answer pass got images"))
        result = evaluate(EvalOptions("vqa", out=tmp_path / "self.jsonl", **opts), log=lambda m: None)
    assert result["experts"] == [["caption", "the model itself"]] and len(calls) == 1
    preds = [json.loads(ln) for ln in (tmp_path / "self.jsonl").read_text().splitlines()]
    assert len({p["experts"][0]["text"] for p in preds}) == 1
    plain = evaluate(EvalOptions("vqa", out=tmp_path / "plain.jsonl", self_caption=False, **opts), log=lambda m: None)
    assert "experts" not in plain and len(calls) == 1
    monkeypatch.setattr(Experts, "model", lambda self, name: (lambda im: "a photo of a red square"))
    named = evaluate(EvalOptions("vqa", out=tmp_path / "named.jsonl", expert=["caption"], **opts), log=lambda m: None)
    assert named["experts"] == [["caption", "efficientnet_lite0 ImageNet classifier (p >= 0.2)"]]
    with pytest.raises(Lav2Error, match="made with experts caption \\(the model itself\\), not none"):
        evaluate(EvalOptions("vqa", out=tmp_path / "self.jsonl", self_caption=False, **opts), log=lambda m: None)


def test_a_self_captioning_model_answers_from_its_caption_alone(self_captioner, chelsea_png):
    eng = engine.load(str(self_captioner), device="cpu", inference=True)
    pipeline = Pipeline.make(ExpertOptions(), marked=True)
    pipeline.bind(eng)
    calls = []
    real = eng.generate
    eng.generate = lambda prompts, images=None, **kw: calls.append(images) or real(prompts, images=images, **kw)
    ans = A.answer(eng, pipeline, str(chelsea_png), "What animal is this?", Sampling(max_new_tokens=2))
    assert len(calls) == 2 and calls[0].shape == (1, 3, 224, 224) and calls[1] is None  # caption pass, answer pass
    assert ans.experts[0].source == "the model itself"


def test_experts_compute_an_image_files_text_once():
    calls = []
    ex = Experts(ExpertOptions(("ocr",)), {"ocr": lambda im: calls.append(1) or "EXIT"})
    im = Image.new("RGB", (8, 8))
    assert ex.run(im, "a.png") == ex.run(im, "a.png") and len(calls) == 1
    ex.run(im, "b.png"), ex.run(im)
    assert len(calls) == 3
    out = ex.run_files(["a.png", "c.png", "c.png", "d.png"], lambda p: im)  # a.png known; c.png once
    assert len(calls) == 5 and out[1] is out[2] and out[0][0].text == "EXIT"


def test_a_model_captioner_captions_a_batch_as_it_captions_each_image(self_captioner, chelsea_png, blank_png):
    eng = engine.load(str(self_captioner), device="cpu", inference=True)
    cap = X.ModelCaptioner(eng, max_new_tokens=8)
    ims = [Image.open(p).convert("RGB") for p in (chelsea_png, blank_png)]
    assert cap.many(ims) == [cap(im) for im in ims]


# -- the rule: a named caption expert on a self-captioning model ---------------------------------


def test_the_rule_decides_the_caption_expert_and_what_the_answer_pass_reads():
    classifier = "efficientnet_lite0 ImageNet classifier (p >= 0.2)"
    cases = {  # (named experts, marked, self-captioning on) -> (sources, answers from the caption)
        ((), True, True): ([["caption", "the model itself"]], True),
        (("ocr",), True, True): ([["caption", "the model itself"], ["ocr", "rapidocr"]], True),
        (("caption",), True, True): ([["caption", classifier]], True),
        (("ocr", "caption"), True, True): ([["ocr", "rapidocr"], ["caption", classifier]], True),
        (("caption",), True, False): ([["caption", classifier]], False),
        ((), True, False): ([], False),
        (("caption",), False, True): ([["caption", classifier]], False),
        ((), False, True): ([], False),
    }
    for (named, marked, on), (sources, from_caption) in cases.items():
        p = Pipeline.make(ExpertOptions.make(list(named)), marked=marked, self_caption=on)
        assert (p.sources(), p.from_caption) == (sources, from_caption), (named, marked, on)


def test_a_named_caption_expert_on_a_self_captioning_model_gives_the_caption_it_answers_from(
        tmp_path, self_captioner, monkeypatch):
    """`--expert caption` on a model marked self_caption: the prompts hold the named expert's
    caption (not the model's), and the answer pass reads it without the image, as the model was
    trained; eval and ask follow the same rule."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    rows = [{"id": "q0", "image": "red.png", "instruction": "What color is it?", "input": "", "output": "red",
             "kind": "vqa", "source": "test"}]
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(Experts, "model", lambda self, name: (lambda im: "a photo of a red square"))
    seen = []
    real = engine.Engine.generate
    monkeypatch.setattr(engine.Engine, "generate",
                        lambda self, prompts, images=None, **kw: seen.append(images) or real(self, prompts, images=images, **kw))
    result = evaluate(EvalOptions("vqa", data=data, model=str(self_captioner), device="cpu", max_new_tokens=2,
                                  out=tmp_path / "named.jsonl", expert=["caption"]), log=lambda m: None)
    assert result["experts"] == [["caption", "efficientnet_lite0 ImageNet classifier (p >= 0.2)"]]
    [pred] = [json.loads(ln) for ln in (tmp_path / "named.jsonl").read_text().splitlines()]
    assert "Image caption: a photo of a red square" in pred["prompt"]
    assert seen == [None]  # one pass, the answer's, and it reads the caption, not the image

    eng = engine.load(str(self_captioner), device="cpu", inference=True)
    pipeline = Pipeline.make(ExpertOptions.make(["caption"]), marked=A.marked_self_caption(str(self_captioner)))
    pipeline.bind(eng)
    seen.clear()
    ans = A.answer(eng, pipeline, str(tmp_path / "red.png"), "What color is it?", Sampling(max_new_tokens=2))
    assert [(e.source, e.text) for e in ans.experts] == [
        ("efficientnet_lite0 ImageNet classifier (p >= 0.2)", "a photo of a red square")]
    assert "Image caption: a photo of a red square" in ans.prompt and seen == [None]


def test_self_captioning_needs_a_model_that_can_see(base_dir):
    eng = engine.load(str(base_dir), device="cpu")  # no visual branch
    with pytest.raises(Lav2Error, match="no trained visual branch.*--no-self-caption or --expert caption"):
        Pipeline.make(ExpertOptions(), marked=True).bind(eng)
    Pipeline.make(ExpertOptions.make(["caption"]), marked=True).bind(eng)  # a named caption: nothing to bind


@pytest.mark.slow
def test_ask_demo_with_the_caption_expert_answers_from_that_caption(chelsea_png):
    # the demo is marked self_caption and knows only easy-VQA's shapes: its own caption of a cat
    # is a coloured shape, the classifier's names the cat, and the named one is what it answers from
    r = lav2("ask", str(chelsea_png), "What animal is in the picture?", "--expert", "caption", "--temperature", "0",
             "--max-new-tokens", "10", "--json", "--show-prompt")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    [cap] = row["experts"]
    assert cap["source"] != "the model itself" and "cat" in cap["text"]
    assert f"Image caption: {cap['text']}\n\nWhat animal is in the picture?" in r.stderr
    assert "cat" in row["answer"].lower()
