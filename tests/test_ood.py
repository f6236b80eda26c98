"""Images unlike a model's training images: the shipped demo tells real photographs and rendered
signs from easy-VQA's test images by its stored feature statistics, says so, and answers from
the caption and OCR experts instead of its own caption (one rule for ask and eval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from conftest import trained_looking_artifact
from lav2cli import answer as A
from lav2cli import engine
from lav2cli.answer import DOMAIN_THRESHOLD, DomainCheck, FeatureStats, Pipeline
from lav2cli.errors import Lav2Error
from lav2cli.evaluate import EvalOptions, evaluate
from lav2cli.experts import ExpertOptions, Experts
from lav2cli.formats import artifact
from lav2cli.inference.generate import Sampling
from lav2cli.model.vision import ImagePreprocess, build_encoder
from lav2cli.registry import resolve_named
from lav2cli.train.features import record_feature_stats

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LAV2_DEBUG": ""}
# scikit-image's sample photographs (shipped inside the package, no download)
PHOTOS = ("astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "coins", "moon", "clock",
          "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "page", "text")
SIGNS = {"HOTEL": {}, "OPEN 24 HOURS": {"size": (600, 160)}, "STOP": {"bg": "red", "fg": "white", "font": 64},
         "EXIT": {"bg": "green", "fg": "white"}, "NO PARKING\nANY TIME": {"size": (420, 220)},
         "CAFE": {"bg": "black", "fg": "yellow"}, "PUSH": {"size": (200, 200), "font": 40}}


def photo(name: str) -> Image.Image:
    import numpy as np
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def sign(text: str, size=(400, 160), bg="white", fg="black", font=48) -> Image.Image:
    im = Image.new("RGB", size, bg)
    ImageDraw.Draw(im).multiline_text((30, 40), text, fill=fg, font=ImageFont.load_default(size=font))
    return im


# -- the shipped demo on real photographs --------------------------------------------------------


@pytest.fixture(scope="module")
def demo_check():
    """The shipped demo's statistics and a function giving images' distances from them (its
    encoder, without the language model)."""
    demo = resolve_named("demo")
    meta = artifact.read_meta(demo)
    tensors = artifact.read_feature_stats(demo)
    assert tensors is not None, "the shipped demo stores its training images' feature statistics"
    stats = FeatureStats.from_tensors(tensors, meta["adapter"]["visual"]["encoder_dim"], "demo")
    encoder = build_encoder(meta["encoder"])
    transform = ImagePreprocess.from_dict(meta["preprocess"]).transform()

    def distances(images: list[Image.Image]) -> list[float]:
        with torch.no_grad():
            return stats.distance(encoder(torch.stack([transform(im) for im in images]))).tolist()

    return stats, distances


def test_the_demo_flags_real_photos_and_signs_and_no_easyvqa_test_image(demo_check):
    pytest.importorskip("skimage")
    easy_vqa = pytest.importorskip("easy_vqa")
    stats, distances = demo_check
    by_id = easy_vqa.get_test_image_paths()
    paths = [by_id[i] for i in sorted(by_id)][::4]  # 250 of the 1,000 test images (README: all of them)
    easy = [d for i in range(0, len(paths), 50) for d in distances([Image.open(p) for p in paths[i:i + 50]])]
    photos = dict(zip(PHOTOS, distances([photo(n) for n in PHOTOS])))
    signs = dict(zip(SIGNS, distances([sign(t, **kw) for t, kw in SIGNS.items()])))
    assert stats.basis.shape == (64, 192)
    assert max(easy) < DOMAIN_THRESHOLD, max(easy)
    assert min(photos.values()) > DOMAIN_THRESHOLD, photos
    assert min(signs.values()) > DOMAIN_THRESHOLD, signs


# -- the rule, on a small artifact -----------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ood")
    out = {"square": d / "square.png", "square2": d / "square2.png", "sign": d / "sign.png"}
    for name, size in (("square", 96), ("square2", 100)):
        im = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(im).rectangle((20, 20, 70, 70), fill="red")
        im.save(out[name])
    sign("HOTEL").save(out["sign"])
    return out


@pytest.fixture(scope="module")
def captioner(tmp_path_factory, base_dir, images) -> Path:
    """A "trained" self-captioning visual artifact whose training images were the red squares."""
    out = trained_looking_artifact(base_dir, tmp_path_factory.mktemp("ood-model") / "artifact", seed=1,
                                   self_caption=True)
    records = out.parent / "train.jsonl"
    records.write_text("".join(json.dumps({"id": n, "image": str(images[n]), "instruction": "Generate caption of this image",
                                           "input": "", "output": "a red square", "kind": "caption", "source": "test"}) + "\n"
                               for n in ("square", "square2")))
    record_feature_stats(out, [records], device="cpu")
    return out


def stand_in_experts(monkeypatch) -> None:
    """The classifier and OCR experts as stand-ins with fixed text (the rule, not the models)."""
    texts = {"caption": "a photo of a street sign", "ocr": "HOTEL"}
    monkeypatch.setattr(Experts, "model", lambda self, name: (
        self._models[name] if name in self._models else (lambda im, t=texts[name]: t)))


def test_statistics_put_their_own_images_at_distance_one():
    torch.manual_seed(0)
    low_rank = torch.randn(300, 5) @ torch.randn(5, 40)  # images varying in 5 directions ...
    pooled = low_rank + 0.1 * torch.randn(300, 40) + 3.0  # ... and a little in all others
    stats = FeatureStats.fit(pooled, components=5)
    tokens = pooled[:, None, :].expand(-1, 4, -1)  # pooling averages tokens
    assert stats.distance(tokens).square().mean().item() == pytest.approx(1.0, rel=1e-4)
    v = torch.randn(40)
    off = v - stats.basis.T @ (stats.basis @ v)  # a direction the images do not vary in
    along = pooled[:1] + 10 * stats.basis[:1]  # far from the mean, but where the images vary
    across = pooled[:1] + 10 * off / off.norm()
    assert stats.distance(along[:, None]).item() < 3 < stats.distance(across[:, None]).item()
    back = FeatureStats.from_tensors(stats.to_tensors(), 40, "x")
    assert torch.equal(back.basis, stats.basis) and back.scale == pytest.approx(stats.scale, rel=1e-6)


def test_training_statistics_reach_the_artifact(captioner, images):
    tensors = artifact.read_feature_stats(captioner)
    assert tensors["mean"].shape == (1280,) and tensors["basis"].shape == (0, 1280)  # two images: no direction kept
    eng = engine.load(str(captioner), device="cpu", inference=True)
    found = DomainCheck.of(eng).check_files(A.encoder_tokens(eng), [str(images["square"]), str(images["square2"]),
                                                                       str(images["sign"])], Image.open)
    assert [d.unfamiliar for d in found] == [False, False, True]


def test_training_stores_where_its_images_lie_and_a_later_stage_keeps_it(tmp_path, base_dir, images):
    from lav2cli.recipe import load_recipe
    from lav2cli.train import Trainer

    rows = []
    for i, colour in enumerate(("red", "green", "blue", "yellow", "black", "teal")):
        im = Image.new("RGB", (64 + 8 * i, 64), "white")
        ImageDraw.Draw(im).rectangle((10 + i, 12, 50, 48 + i), fill=colour)
        im.save(tmp_path / f"{colour}.png")
        rows.append({"id": f"c{i}", "image": f"{colour}.png", "instruction": "Generate caption of this image",
                     "input": "", "output": f"a {colour} rectangle", "kind": "caption", "source": "test"})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = {"model.ref": f'"{base_dir}"', "data.image_text": f'"{tmp_path / "captions.jsonl"}"',
            "data.instruction": f'"{tmp_path / "captions.jsonl"}"', "train.stage": '"pretrain"',
            "adapter.prompt_layers": "2", "adapter.visual_width": "32", "adapter.visual_depth": "1",
            "adapter.visual_heads": "4", "train.max_steps": "1", "train.batch_size": "2", "train.warmup_steps": "0",
            "train.checkpoint_every": "0", "data.max_tokens": "192"}
    recipe = load_recipe(ROOT / "recipes/tiny.toml", [f"{k}={v}" for k, v in sets.items()])
    (tmp_path / "run").mkdir()
    Trainer(recipe, tmp_path / "run", resume=False, log=lambda m: None, show_progress=False).run()
    tensors = artifact.read_feature_stats(tmp_path / "run")
    assert tensors is not None and tensors["basis"].shape == (2, 1280)  # six images: two directions kept
    eng = engine.load(str(tmp_path / "run"), device="cpu", inference=True)
    found = DomainCheck.of(eng).check_files(A.encoder_tokens(eng), [str(tmp_path / f"{r['image']}") for r in rows]
                                            + [str(images["sign"])], Image.open)
    assert [d.unfamiliar for d in found] == [False] * 6 + [True]
    engine.load(str(tmp_path / "run"), device="cpu").save_adapter(tmp_path / "again")  # keeps what it loaded
    assert all(torch.equal(t, artifact.read_feature_stats(tmp_path / "again")[k]) for k, t in tensors.items())


def test_an_unfamiliar_image_gets_the_caption_and_ocr_experts_a_familiar_one_its_own_caption(
        captioner, images, monkeypatch):
    eng = engine.load(str(captioner), device="cpu", inference=True)
    notes: list[str] = []
    pipeline = Pipeline.make(ExpertOptions(), marked=True, log=notes.append)
    pipeline.load()
    pipeline.bind(eng)
    stand_in_experts(monkeypatch)
    seen = []
    real = eng.generate
    eng.generate = lambda prompts, images=None, **kw: seen.append(images) or real(prompts, images=images, **kw)

    ans = A.answer(eng, pipeline, str(images["sign"]), "What does the sign say?", Sampling(max_new_tokens=2))
    assert ans.domain.unfamiliar and ans.domain.distance > DOMAIN_THRESHOLD
    assert [(e.name, e.source, e.text) for e in ans.experts] == [
        ("caption", "efficientnet_lite0 ImageNet classifier (p >= 0.2)", "a photo of a street sign"),
        ("ocr", "rapidocr", "HOTEL")]
    assert "HOTEL" in ans.prompt and seen == [None]  # no caption pass; the answer reads the experts' text
    out = ans.to_json("m")
    assert out["out_of_domain"] is True and out["domain_distance"] > DOMAIN_THRESHOLD
    [note] = notes
    assert note.startswith("lav2: note: ") and str(images["sign"]) in note and "caption and OCR experts" in note

    seen.clear()
    ans = A.answer(eng, pipeline, str(images["square"]), "What color is it?", Sampling(max_new_tokens=2))
    assert not ans.domain.unfamiliar and ans.to_json("m")["out_of_domain"] is False
    assert [(e.name, e.source) for e in ans.experts] == [("caption", "the model itself")]
    assert len(seen) == 2 and seen[1] is None and len(notes) == 1  # its own caption pass, then the answer
    assert A.answer(eng, pipeline, None, "Hi", Sampling(max_new_tokens=1)).to_json("m")["out_of_domain"] is None


def test_a_model_that_reads_the_image_itself_only_gets_the_note(captioner, images, monkeypatch):
    eng = engine.load(str(captioner), device="cpu", inference=True)
    notes: list[str] = []
    pipeline = Pipeline.make(ExpertOptions(), marked=True, self_caption=False, log=notes.append)
    pipeline.bind(eng)
    ans = A.answer(eng, pipeline, str(images["sign"]), "What does the sign say?", Sampling(max_new_tokens=2))
    assert ans.domain.unfamiliar and ans.experts == [] and len(notes) == 1


def test_eval_records_unfamiliar_images_and_resumes_with_the_experts_they_got(captioner, images, monkeypatch, tmp_path):
    rows = [{"id": f"q{i}", "image": str(images[n]), "instruction": "What color is it?", "input": "", "output": "red",
             "kind": "vqa", "source": "test"} for i, n in enumerate(("square", "sign", "sign"))]
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stand_in_experts(monkeypatch)
    notes: list[str] = []
    opts = dict(data=data, model=str(captioner), device="cpu", max_new_tokens=2, out=tmp_path / "p.jsonl")
    evaluate(EvalOptions("vqa", limit=2, **opts), log=notes.append)
    result = evaluate(EvalOptions("vqa", **opts), log=notes.append)  # resumed: both expert lists are the rule's
    assert result["out_of_domain"] == 2
    preds = [json.loads(ln) for ln in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["out_of_domain"] for p in preds] == [False, True, True]
    assert [[e["source"] for e in p["experts"]] for p in preds] == [
        ["the model itself"], *[["efficientnet_lite0 ImageNet classifier (p >= 0.2)", "rapidocr"]] * 2]
    assert sum("looks unlike" in n for n in notes) == 2  # once per command that met the image
    with pytest.raises(Lav2Error, match="made with experts"):
        evaluate(EvalOptions("vqa", **{**opts, "self_caption": False}), log=notes.append)


def test_statistics_that_do_not_fit_the_encoder_are_a_one_line_error():
    good = {"mean": torch.zeros(4), "basis": torch.zeros(2, 4), "scale": torch.tensor(1.0)}
    assert FeatureStats.from_tensors(good, 4, "x").scale == 1.0
    for bad in ({**good, "mean": torch.zeros(3)}, {**good, "scale": torch.tensor(0.0)}, {"mean": torch.zeros(4)}):
        with pytest.raises(Lav2Error, match="x: feature_stats.safetensors does not hold feature statistics"):
            FeatureStats.from_tensors(bad, 4, "x")
    with pytest.raises(Lav2Error, match="of a 5-channel encoder"):
        FeatureStats.from_tensors(good, 5, "x")


# -- the demo from the command line ----------------------------------------------------------------


@pytest.mark.slow
def test_ask_the_demo_about_a_photo_says_so_and_answers_from_the_experts(tmp_path):
    pytest.importorskip("rapidocr_onnxruntime")
    photo("chelsea").save(tmp_path / "chelsea.png")
    r = subprocess.run([sys.executable, "-m", "lav2cli", "ask", str(tmp_path / "chelsea.png"),
                        "What animal is in the picture?", "--temperature", "0", "--max-new-tokens", "16", "--json"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["out_of_domain"] is True and "cat" in out["answer"].lower(), out
    assert [e["name"] for e in out["experts"]] == ["caption", "ocr"] and "cat" in out["experts"][0]["text"]
    assert "lav2: note: " in r.stderr and "looks unlike the images demo was trained on" in r.stderr
