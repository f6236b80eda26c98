"""`lav2 prepare`: each source on small fixtures in its real format, bad inputs, manifest, split,
strict mode, atomic writes, and the record reader."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys

import pytest
from PIL import Image

from lav2cli import __version__
from lav2cli import experts as X
from lav2cli.data.prepare import easyvqa as E
from lav2cli.data.prepare import prepare
from lav2cli.data.prepare.images import find_bad_images
from lav2cli.data.prepare.pipeline import in_val
from lav2cli.data.records import Record, image_ref, read_records
from lav2cli.errors import Lav2Error

CAP = "Generate caption of this image"


# --- helpers ------------------------------------------------------------------------------


def make_image(path, color=(200, 30, 30), size=(16, 12), noise=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise:
        im = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        im = Image.new("RGB", size, color)
    im.save(path)
    return path


def make_truncated_png(path):
    make_image(path, size=(64, 64), noise=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(source, out, **kw):
    return prepare(source, out, quiet=True, **kw)


def rec(id, image, instruction, output, kind, source, input="", **extra):
    return {"id": id, "image": image, "instruction": instruction, "input": input, "output": output,
            "kind": kind, "source": source, **extra}


def reasons(manifest):
    return {k: v["count"] for k, v in manifest["skipped"]["by_reason"].items()}


def cli(monkeypatch, capsys, *args):
    """Run `lav2 ARGS` in-process through main(); returns (exit code, stdout, stderr)."""
    from lav2cli import cli as lav2_cli

    monkeypatch.setattr(sys, "argv", ["lav2", *args])
    monkeypatch.delenv("LAV2_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        lav2_cli.main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture
def coco(tmp_path):
    """A COCO caption file with every kind of bad input, and its images."""
    img = tmp_path / "coco" / "images"
    make_image(img / "1.jpg")
    make_image(img / "2.png", color=(0, 0, 255))
    make_truncated_png(img / "3.png")
    (img / "4.jpg").write_text("not an image at all\n")
    images = [{"id": i, "file_name": n} for i, n in [(1, "1.jpg"), (2, "2.png"), (3, "3.png"), (4, "4.jpg"), (5, "5.jpg")]]
    anns = [
        {"id": 10, "image_id": 1, "caption": "A cat on a mat."},
        {"id": 11, "image_id": 1, "caption": " Another caption \n"},
        {"id": 12, "image_id": 2, "caption": "A blue square."},
        {"id": 13, "image_id": 3, "caption": "Truncated image."},
        {"id": 14, "image_id": 4, "caption": "A text file named jpg."},
        {"id": 15, "image_id": 5, "caption": "The image file is missing."},
        {"id": 16, "image_id": 99, "caption": "Unknown image id."},
        {"id": 17, "image_id": 2, "caption": "   "},
        {"id": 12, "image_id": 2, "caption": "Duplicate id."},
    ]
    ann = write_json(tmp_path / "coco" / "captions.json", {"images": images, "annotations": anns})
    return ann, img


# --- COCO and Karpathy ----------------------------------------------------------------------


def test_coco_exact_records_and_every_bad_input_skipped(tmp_path, coco):
    ann, img = coco
    out = tmp_path / "out.jsonl"
    m = run("coco", out, annotations=ann, images=img)
    assert lines(out) == [
        rec("coco-10", "coco/images/1.jpg", CAP, "A cat on a mat.", "caption", "coco"),
        rec("coco-11", "coco/images/1.jpg", CAP, "Another caption", "caption", "coco"),
        rec("coco-12", "coco/images/2.png", CAP, "A blue square.", "caption", "coco"),
    ]
    assert reasons(m) == {"unreadable image": 2, "missing image": 1, "unknown image id": 1,
                          "empty text": 1, "duplicate id": 1}
    by = m["skipped"]["by_reason"]
    assert [e["at"] for e in by["unreadable image"]["examples"]] == [f"{ann}:annotations[3]", f"{ann}:annotations[4]"]
    assert "3.png" in by["unreadable image"]["examples"][0]["detail"]
    assert "truncated" in by["unreadable image"]["examples"][0]["detail"]
    assert by["missing image"]["examples"][0]["at"] == f"{ann}:annotations[5]"
    assert by["unknown image id"]["examples"] == [{"at": f"{ann}:annotations[6]", "detail": "image_id 99"}]
    assert by["empty text"]["examples"] == [{"at": f"{ann}:annotations[7]"}]
    assert by["duplicate id"]["examples"] == [{"at": f"{ann}:annotations[8]", "detail": "coco-12"}]
    assert m["skipped"]["total"] == 6 and m["records"] == 3 and m["by_kind"] == {"caption": 3}
    assert m["images"] == {"distinct": 5, "checked": True, "bad": 3}


def test_manifest_file_contents(tmp_path, coco):
    ann, img = coco
    out = tmp_path / "sub" / "train.jsonl"
    run("coco", out, annotations=ann, images=img, captions="first", instruction="Describe.")
    m = json.loads((tmp_path / "sub" / "train.manifest.json").read_text())
    assert m["lav2_version"] == __version__ and m["source"] == "coco"
    assert m["inputs"] == [{"path": str(ann), "sha256": hashlib.sha256(ann.read_bytes()).hexdigest()}]
    assert m["options"] == {"annotations": str(ann), "images": str(img), "captions": "first", "instruction": "Describe.",
                            "check_images": True, "strict": False, "val_fraction": 0.0}
    assert m["outputs"] == {"records": {"path": "train.jsonl", "records": 2, "by_kind": {"caption": 2},
                                        "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}}
    assert m["not_selected"] == {"extra caption": 3}  # 1.jpg's second caption, 2.png's blank and duplicate
    recs = lines(out)
    assert [(r["id"], r["output"], r["instruction"]) for r in recs] == [
        ("coco-10", "A cat on a mat.", "Describe."), ("coco-12", "A blue square.", "Describe.")]
    assert recs[0]["image"] == str(img / "1.jpg")  # outside the output folder: absolute


def test_truncated_png_caught_even_if_pil_is_lenient(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = str(make_truncated_png(tmp_path / "t.png"))
    ok = str(make_image(tmp_path / "ok.png"))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    bad = find_bad_images([path, ok, path], workers=2)
    assert list(bad) == [path] and bad[path][0] == "unreadable image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_no_check_images_keeps_unverified_images(tmp_path, coco):
    ann, img = coco
    m = run("coco", tmp_path / "o.jsonl", annotations=ann, images=img, check_images=False)
    assert m["records"] == 6 and reasons(m) == {"unknown image id": 1, "empty text": 1, "duplicate id": 1}
    assert m["images"]["checked"] is False


def test_karpathy_split_file(tmp_path):
    root = tmp_path / "coco"
    make_image(root / "train2014" / "COCO_train2014_1.jpg")
    make_image(root / "val2014" / "COCO_val2014_2.jpg")
    make_image(root / "val2014" / "COCO_val2014_3.jpg")
    images = [
        {"filepath": "train2014", "filename": "COCO_train2014_1.jpg", "split": "train", "imgid": 0,
         "sentences": [{"raw": "A man on a horse.", "sentid": 0}, {"raw": "A rider.", "sentid": 1}]},
        {"filepath": "val2014", "filename": "COCO_val2014_2.jpg", "split": "restval", "imgid": 1,
         "sentences": [{"raw": "Two dogs.", "sentid": 2}]},
        {"filepath": "val2014", "filename": "COCO_val2014_3.jpg", "split": "test", "imgid": 2,
         "sentences": [{"raw": "A test image.", "sentid": 3}]},
    ]
    split_file = write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    out = tmp_path / "k.jsonl"
    m = run("coco", out, annotations=split_file, images=root, split="train,restval")
    assert lines(out) == [
        rec("karpathy-0", "coco/train2014/COCO_train2014_1.jpg", CAP, "A man on a horse.", "caption", "karpathy", split="train"),
        rec("karpathy-1", "coco/train2014/COCO_train2014_1.jpg", CAP, "A rider.", "caption", "karpathy", split="train"),
        rec("karpathy-2", "coco/val2014/COCO_val2014_2.jpg", CAP, "Two dogs.", "caption", "karpathy", split="restval"),
    ]
    assert m["not_selected"] == {"other split": 1} and m["skipped"]["total"] == 0
    run("coco", out, annotations=split_file, images=root, split="test", captions="first")
    assert [r["id"] for r in lines(out)] == ["karpathy-3"]
    with pytest.raises(Lav2Error, match="Karpathy"):  # --split on a plain COCO file
        run("coco", out, annotations=write_json(tmp_path / "c.json", {"images": [], "annotations": []}),
            images=root, split="train")


# --- CSV, Alpaca, LLaVA ---------------------------------------------------------------------


def test_csv_tab_and_comma_tables(tmp_path):
    make_image(tmp_path / "imgs" / "a.png")
    make_image(tmp_path / "imgs" / "sub" / "b.jpg")
    tsv = tmp_path / "lists" / "pretrain.tsv"
    tsv.parent.mkdir()
    tsv.write_text('url\tcaption\na.png\tA red square.\nhttp://example.com/x.jpg\tRemote.\n'
                   'sub/b.jpg\tSays "hello" twice\ta third field\n\nsub/b.jpg\tA "quoted" word.\n', encoding="utf-8")
    out = tmp_path / "out" / "cc.jsonl"
    m = run("csv", out, input=tsv, images=tmp_path / "imgs")
    imgs = tmp_path / "imgs"
    assert lines(out) == [
        rec("csv-2", str(imgs / "a.png"), CAP, "A red square.", "caption", "csv"),
        rec("csv-6", str(imgs / "sub" / "b.jpg"), CAP, 'A "quoted" word.', "caption", "csv"),
    ]
    assert reasons(m) == {"remote image": 1, "malformed row": 1}
    assert m["skipped"]["by_reason"]["malformed row"]["examples"][0]["at"] == f"{tsv}:4"

    table = tmp_path / "imgs" / "pairs.csv"  # comma-separated, paths relative to the table's folder
    table.write_text('id,file,text\n1,a.png,"Red, square."\n2,missing.png,Gone.\n', encoding="utf-8")
    m = run("csv", tmp_path / "imgs" / "pairs.jsonl", input=table, image_column="file", caption_column="text")
    assert lines(tmp_path / "imgs" / "pairs.jsonl") == [rec("csv-2", "a.png", CAP, "Red, square.", "caption", "csv")]
    assert reasons(m) == {"missing image": 1}
    with pytest.raises(Lav2Error, match=r"pairs.csv:1: no image column"):
        run("csv", tmp_path / "x.jsonl", input=table)


def test_alpaca_json_list_and_json_lines(tmp_path):
    data = [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "No output.", "input": "", "output": ""},
        {"instruction": "Bad type.", "output": 3},
    ]
    src = write_json(tmp_path / "alpaca_data.json", data)
    out = tmp_path / "a.jsonl"
    m = run("alpaca", out, input=src)
    assert lines(out) == [
        rec("alpaca-0", None, "Give three tips for staying healthy.", "1. Eat well.", "instruction", "alpaca"),
        rec("alpaca-1", None, "Translate.", "Hello", "instruction", "alpaca", input="Bonjour"),
    ]
    assert reasons(m) == {"empty text": 1, "malformed record": 1}
    assert m["skipped"]["by_reason"]["empty text"]["examples"] == [{"at": f"{src}:[2]"}]

    jsonl = tmp_path / "gpt4.jsonl"
    jsonl.write_text('{"id": "a", "instruction": "Hi", "output": "Hello"}\n\n{"id": "b", "instruction": "x",\n'
                     '{"id": "a", "instruction": "Again", "output": "dup"}\n{"id": "c", "instruction": "Bye", "output": "See you"}\n')
    m = run("alpaca", out, input=jsonl)
    assert [(r["id"], r["input"]) for r in lines(out)] == [("a", ""), ("c", "")]
    assert reasons(m) == {"malformed json": 1, "duplicate id": 1}
    assert m["skipped"]["by_reason"]["malformed json"]["examples"][0]["at"] == f"{jsonl}:3"
    assert m["skipped"]["by_reason"]["duplicate id"]["examples"][0] == {"at": f"{jsonl}:4", "detail": "a"}


@pytest.fixture
def llava_file(tmp_path):
    make_image(tmp_path / "coco" / "000000033471.jpg")
    data = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ]},
        {"id": "text-1", "conversations": [
            {"from": "human", "value": "Write a haiku about rain."},
            {"from": "gpt", "value": "Soft rain on the roof."},
        ]},
        {"id": "bad", "image": "000000033471.jpg", "conversations": [{"from": "gpt", "value": "Answer first?"}]},
    ]
    return write_json(tmp_path / "llava_instruct.json", data), tmp_path / "coco"


def test_llava_multi_turn_text_only_and_history(tmp_path, llava_file):
    src, images = llava_file
    out = tmp_path / "coco" / "llava.jsonl"  # images under the output folder: relative paths
    q1, a1 = "What are the colors of the bus in the image?", "The bus in the image is white and red."
    q2, a2 = "What feature can be seen on the back of the bus?", "The back of the bus features an advertisement."
    m = run("llava", out, input=src, images=images)
    assert lines(out) == [
        rec("llava-000000033471-0", "000000033471.jpg", q1, a1, "instruction", "llava"),
        rec("llava-000000033471-1", "000000033471.jpg", q2, a2, "instruction", "llava"),
        rec("llava-text-1-0", None, "Write a haiku about rain.", "Soft rain on the roof.", "instruction", "llava"),
    ]
    assert reasons(m) == {"malformed record": 1}
    run("llava", out, input=src, images=images, keep_history=True)
    assert lines(out)[1]["input"] == f"Human: {q1}\nAssistant: {a1}"
    assert lines(out)[0]["input"] == ""
    m = run("llava", out, input=src, images=images, turns="first")
    assert [r["id"] for r in lines(out)] == ["llava-000000033471-0", "llava-text-1-0"]
    assert m["not_selected"] == {"later turn": 1}


# --- MME ------------------------------------------------------------------------------------


def test_mme_both_layouts(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    make_image(root / "existence" / "000000006040.jpg")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    make_image(root / "code_reasoning" / "0020.png")
    (root / "code_reasoning" / "0020.txt").write_text(
        "The image shows a python code. Is the output of the code '11'? Please answer yes or no.\tYes\n"
        "The image shows a python code. Is the output of the code '12'? Please answer yes or no.\tNo\n")
    (root / "code_reasoning" / "0021.txt").write_text("An orphan question?\tYes\n")
    make_image(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Is this artwork by Rembrandt? Please answer yes or no.\tmaybe\n"
        "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n")
    (root / "eval_tool" / "Your_Results").mkdir(parents=True)
    (root / "eval_tool" / "Your_Results" / "existence.txt").write_text("x\ty\tz\n")
    out = tmp_path / "mme.jsonl"
    m = run("mme", out, root=tmp_path)  # the folder holding the release folder works too
    base = "MME_Benchmark_release_version"

    def q(id, image, text, ans, subtask, cat, pair):
        return rec(id, f"{base}/{image}", text, ans, "vqa", "mme", subtask=subtask, category=cat, pair=pair)

    assert lines(out) == [
        q("mme-artwork-10002-0", "artwork/images/10002.jpg",
          "Does this artwork exist in the form of painting? Please answer yes or no.", "Yes", "artwork", "perception", "artwork/10002"),
        q("mme-artwork-10002-1", "artwork/images/10002.jpg",
          "Does this artwork exist in the form of glassware? Please answer yes or no.", "No", "artwork", "perception", "artwork/10002"),
        q("mme-code_reasoning-0020-0", "code_reasoning/0020.png",
          "The image shows a python code. Is the output of the code '11'? Please answer yes or no.", "Yes",
          "code_reasoning", "cognition", "code_reasoning/0020"),
        q("mme-code_reasoning-0020-1", "code_reasoning/0020.png",
          "The image shows a python code. Is the output of the code '12'? Please answer yes or no.", "No",
          "code_reasoning", "cognition", "code_reasoning/0020"),
        q("mme-existence-000000006040-0", "existence/000000006040.jpg",
          "Is there a train in this image? Please answer yes or no.", "Yes", "existence", "perception", "existence/000000006040"),
        q("mme-existence-000000006040-1", "existence/000000006040.jpg",
          "Is there a bed in this image? Please answer yes or no.", "No", "existence", "perception", "existence/000000006040"),
    ]
    by = m["skipped"]["by_reason"]
    assert reasons(m) == {"malformed row": 1, "missing image": 1}
    assert by["malformed row"]["examples"][0]["at"] == str(root / "artwork" / "questions_answers_YN" / "10002.txt") + ":2"
    assert by["missing image"]["examples"][0]["at"] == str(root / "code_reasoning" / "0021.txt") + ":1"
    assert m["inputs"][0]["path"] == str(root) and m["inputs"][0]["files"] == 4
    with pytest.raises(Lav2Error, match="no MME subtask"):
        run("mme", out, root=root / "eval_tool")


# --- easy-VQA -------------------------------------------------------------------------------


def test_easyvqa_caption_derivation():
    att = E.easyvqa_attributes
    assert att("what is the blue shape?", "rectangle") == {"blue", "rectangle"}
    assert att("what color is the shape?", "teal") == {"teal"}
    assert att("is there a red shape?", "yes") == {"red"}
    assert att("is there a red shape?", "no") == set()
    assert att("is there not a circle in the image?", "no") == {"circle"}
    assert att("is no gray shape present?", "yes") == set()
    assert att("does the image not contain a triangle?", "no") == {"triangle"}
    assert E.easyvqa_caption({"red", "circle"}) == "a red circle"
    assert E.easyvqa_caption({"red"}) == "a red shape"
    assert E.easyvqa_caption({"circle"}) == "a circle"
    assert E.easyvqa_caption(set()) is None


def test_easyvqa_package(tmp_path):
    import easy_vqa

    out = tmp_path / "ev" / "records.jsonl"
    m = run("easyvqa", out, split="both", kind="both", check_images=False)
    recs = lines(out)
    texts, answers, ids = easy_vqa.get_test_questions()
    test_vqa = [r for r in recs if r["split"] == "test" and r["kind"] == "vqa"]
    assert len(test_vqa) == len(texts) and m["images"]["distinct"] == 5000
    assert test_vqa[0] == rec("easyvqa-test-q0", f"images/test/{ids[0]}.png", texts[0], answers[0], "vqa", "easyvqa",
                              split="test", image_id=ids[0])
    train_ids = {r["id"] for r in recs if r["split"] == "train"}
    assert train_ids and all(i.startswith("easyvqa-train-") for i in train_ids)
    caps = {r["image_id"]: r for r in recs if r["split"] == "test" and r["kind"] == "caption"}
    assert 950 < len(caps) <= 1000 and m["by_kind"]["caption"] + m["not_selected"].get("no shape or colour", 0) == 5000
    # every caption agrees with its image's "what" answers
    for q, a, i in zip(texts, answers, ids):
        if q.startswith("what") and i in caps:
            assert a in caps[i]["output"].split()
    assert caps[ids[0]]["instruction"] == CAP
    with Image.open(out.parent / caps[ids[0]]["image"]) as im:
        assert im.size == (64, 64)
    assert [i["path"].endswith("questions.json") for i in m["inputs"]] == [True, True]
    with pytest.raises(Lav2Error, match="--out FILE"):
        run("easyvqa", "-", split="test")


def test_easyvqa_twin_swaps_the_named_attribute_and_flips_the_answer():
    twin = E.easyvqa_twin
    pick = random.Random(0)
    shown = {"blue", "circle"}
    assert twin("is there a red shape?", "no", shown, pick) == ("is there a blue shape?", "yes")
    assert twin("is there not a circle in the image?", "no", shown, pick) is not None
    q, a = twin("is there not a circle in the image?", "no", shown, pick)
    assert a == "yes" and q.replace("rectangle", "triangle") == "is there not a triangle in the image?"
    assert twin("does the image not contain a triangle?", "yes", shown, pick) == ("does the image not contain a circle?", "no")
    assert twin("what is the blue shape?", "circle", shown, pick) is None
    assert twin("is there a red shape?", "no", {"circle"}, pick) is None  # the image's colour is unknown
    assert twin("is there a red circle?", "no", shown, pick) is None  # two attributes named


def test_easyvqa_yes_no_twins_are_true_to_their_image_and_balance_the_answers(tmp_path):
    out = tmp_path / "ev" / "records.jsonl"
    run("easyvqa", out, split="test", kind="vqa", yes_no_twins=True, check_images=False)
    recs = lines(out)
    shown: dict[int, set[str]] = {}
    for r in recs:
        if r["instruction"].startswith("what"):
            shown.setdefault(r["image_id"], set()).update(E.easyvqa_attributes(r["instruction"], r["output"]))
    twins = [r for r in recs if r["id"].endswith("-twin")]
    assert len(twins) > 2000 and all(recs[recs.index(t) - 1]["id"] == t["twin_of"] for t in twins[:50])
    yes_no = [r for r in recs if r["output"] in ("yes", "no")]
    checked = 0
    for r in yes_no:  # a yes/no answer affirms the attribute it names iff the image shows it
        named = [w for w in re.findall(r"[a-z]+", r["instruction"]) if w in E.EASYVQA_COLOURS + E.EASYVQA_SHAPES]
        vocabulary = E.EASYVQA_COLOURS if named[0] in E.EASYVQA_COLOURS else E.EASYVQA_SHAPES
        own = shown.get(r["image_id"], set()) & set(vocabulary)
        if len(named) == 1 and len(own) == 1:
            assert E.easyvqa_attributes(r["instruction"], r["output"]) == own & {named[0]}, r
            checked += 1
    assert checked > 0.85 * len(yes_no)  # images whose colour and shape a "what" question gives
    yes = sum(r["output"] == "yes" for r in yes_no)
    assert abs(yes / len(yes_no) - 0.5) < 0.02
    with pytest.raises(Lav2Error, match="--kind vqa or both"):
        run("easyvqa", tmp_path / "cap.jsonl", split="test", kind="caption", yes_no_twins=True)


def test_easyvqa_caption_context_is_the_images_caption_as_the_caption_expert_words_it(tmp_path):
    out = tmp_path / "ev" / "records.jsonl"
    run("easyvqa", out, split="test", kind="both", caption_context=True, check_images=False)
    recs = lines(out)
    captions = {r["image_id"]: r["output"] for r in recs if r["kind"] == "caption"}
    questions = [r for r in recs if r["kind"] == "vqa"]
    assert len(captions) > 900
    for r in questions:  # the same paragraph the caption expert puts in a prompt, and no image
        assert r["input"] == X.context([X.ExpertOutput("caption", "", captions[r["image_id"]], 0.0)]), r
        assert r["image"] is None, r
    assert len(questions) > 0.98 * 9673  # those of images without a caption are left out
    assert questions[0]["input"].startswith("Image caption: a ")
    assert all(r["image"] for r in recs if r["kind"] == "caption")
    with pytest.raises(Lav2Error, match="--caption-context .* needs --kind vqa or both"):
        run("easyvqa", tmp_path / "cap.jsonl", split="test", kind="caption", caption_context=True)


# --- common behaviour -----------------------------------------------------------------------


def test_val_fraction_is_deterministic_and_keeps_images_together(tmp_path):
    root = tmp_path / "imgs"
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(40)]
    for i in range(40):
        make_image(root / f"{i}.png", size=(4, 4))
    anns = [{"id": 100 * i + k, "image_id": i, "caption": f"Caption {k} of {i}."} for i in range(40) for k in range(3)]
    ann = write_json(tmp_path / "captions.json", {"images": images, "annotations": anns})
    out = tmp_path / "o" / "cap.jsonl"
    m = run("coco", out, annotations=ann, images=root, val_fraction=0.3)
    train, val = lines(out), lines(tmp_path / "o" / "cap.val.jsonl")
    assert len(train) + len(val) == 120 and 0 < len(val) < 120
    assert m["outputs"]["records"]["records"] == len(train) and m["outputs"]["val"]["records"] == len(val)
    assert {r["image"] for r in train}.isdisjoint({r["image"] for r in val})
    assert all(in_val(r["image"].split("/")[-1], 0.3) for r in val)
    again = run("coco", tmp_path / "o2" / "cap.jsonl", annotations=ann, images=root, val_fraction=0.3)
    assert lines(tmp_path / "o2" / "cap.val.jsonl") == val and again["outputs"] == m["outputs"]


def test_strict_stops_at_first_problem_and_writes_nothing(tmp_path, coco):
    ann, img = coco
    out = tmp_path / "strict.jsonl"
    # annotations[3] (truncated PNG) comes before annotations[6] (unknown id): the first one is reported
    with pytest.raises(Lav2Error, match=r"captions\.json:annotations\[3\]: unreadable image"):
        run("coco", out, annotations=ann, images=img, strict=True)
    with pytest.raises(Lav2Error, match=r"captions\.json:annotations\[6\]: unknown image id"):
        run("coco", out, annotations=ann, images=img, strict=True, check_images=False)
    assert list(tmp_path.glob("strict*")) == []


def test_strict_cli_exit_1_naming_file_and_line(tmp_path, monkeypatch, capsys):
    src = tmp_path / "data.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{oops\n')
    out = tmp_path / "r.jsonl"
    code, _, err = cli(monkeypatch, capsys, "prepare", "alpaca", "--input", str(src), "--out", str(out), "--strict")
    assert code == 1 and err.strip() == f"lav2: error: {src}:3: malformed json (Expecting property name enclosed in double quotes)"
    assert not out.exists() and not (tmp_path / "r.manifest.json").exists()
    code, _, err = cli(monkeypatch, capsys, "prepare", "alpaca", "--input", str(src), "--out", str(out))
    assert code == 0 and "kept 2 records" in err and "malformed json 1" in err
    assert len(lines(out)) == 2


def test_stdout_output_has_absolute_paths_and_no_manifest(tmp_path, monkeypatch, capsys, llava_file):
    src, images = llava_file
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "prepare", "llava", "--input", str(src), "--images", str(images), "--out", "-")
    assert code == 0
    recs = [json.loads(x) for x in out.splitlines()]
    assert [r["image"] for r in recs] == [str(images / "000000033471.jpg")] * 2 + [None]
    assert "kept 3 records" in err and not list(tmp_path.glob("*.manifest.json"))


def test_interrupted_write_leaves_previous_output(tmp_path, coco, monkeypatch):
    ann, img = coco
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    calls = []

    def boom(self, base_dir=None, cache=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"id": self.id}

    monkeypatch.setattr(Record, "to_dict", boom)
    with pytest.raises(KeyboardInterrupt):
        run("coco", out, annotations=ann, images=img)
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "out.jsonl"]  # no temporary files left


def test_cli_end_to_end_subprocess(tmp_path, coco):
    ann, img = coco
    out = tmp_path / "e2e.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lav2cli", "prepare", "coco", "--annotations", str(ann), "--images", str(img),
           "--out", str(out), "--val-fraction", "0.5"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and "skipped 6" in p.stderr and "unreadable image 2" in p.stderr
    assert (tmp_path / "e2e.manifest.json").exists()
    total = len(lines(out)) + len(lines(tmp_path / "e2e.val.jsonl"))
    assert total == 3
    p = subprocess.run(cmd + ["--strict"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert f"{ann}:annotations[3]: unreadable image" in p.stderr and "Traceback" not in p.stderr


# --- the record reader ----------------------------------------------------------------------


def test_read_records_resolves_images_and_validates(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    f = folder / "r.jsonl"
    f.write_text(
        json.dumps(rec("a", "images/1.png", "Describe.", "A cat.", "caption", "coco", split="train")) + "\n\n"
        + json.dumps(rec("b", None, "Hi", "Hello", "instruction", "alpaca")) + "\n"
        + json.dumps(rec("c", "/abs/x.jpg", "Q?", "Yes", "vqa", "mme", subtask="count", pair="count/x")) + "\n")
    a, b, c = read_records(f)
    assert a.image == str(folder / "images" / "1.png") and a.extra == {"split": "train"} and a.input == ""
    assert b.image is None and b.kind == "instruction"
    assert c.image == "/abs/x.jpg" and c.extra == {"subtask": "count", "pair": "count/x"}
    assert c.to_dict(str(tmp_path)) == rec("c", "/abs/x.jpg", "Q?", "Yes", "vqa", "mme", subtask="count", pair="count/x")
    assert a.to_dict(str(folder))["image"] == "images/1.png"
    assert image_ref(str(folder / "images" / "1.png"), str(tmp_path)) == "data/images/1.png"

    bad = folder / "bad.jsonl"
    bad.write_text(json.dumps(rec("a", None, "x", "y", "caption", "s")) + "\n{not json\n")
    with pytest.raises(Lav2Error, match=r"bad\.jsonl:2: malformed json"):
        list(read_records(bad))
    bad.write_text(json.dumps(rec("a", None, "x", "y", "picture", "s")) + "\n")
    with pytest.raises(Lav2Error, match=r'bad\.jsonl:1: field kind must be one of caption, instruction, vqa, not "picture"'):
        list(read_records(bad))
    bad.write_text('{"id": "a", "image": null, "instruction": "x", "kind": "vqa", "source": "s"}\n')
    with pytest.raises(Lav2Error, match=r"bad\.jsonl:1: field output is missing"):
        list(read_records(bad))


def test_prepared_records_read_back(tmp_path, coco):
    ann, img = coco
    out = tmp_path / "rt.jsonl"
    run("coco", out, annotations=ann, images=img)
    recs = list(read_records(out))
    assert [r.image for r in recs] == [str(img / "1.jpg")] * 2 + [str(img / "2.png")]
    assert all(os.path.isfile(r.image) for r in recs)
