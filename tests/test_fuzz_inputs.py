"""Hostile inputs for every record reader and prepare source: a table of cases, each run through
the real entry points (prepare(...), evaluate(...) with a predictions file, and a few through the
`lav2` command in a subprocess).

The contract each case checks: the input is kept, skipped with a reason prepare names, or refused
by one Lav2Error line naming the file (and the line, where the input has lines); never another
exception, and never a records file that lav2's own reader refuses. Each case also states which of
the three it expects."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lav2cli.data.prepare import items as I
from lav2cli.data.prepare import prepare
from lav2cli.data.records import read_records
from lav2cli.errors import Lav2Error
from lav2cli.evaluate.runner import EvalOptions, evaluate

# every reason prepare may name for a skipped input
REASONS = {v for k, v in vars(I).items() if k.isupper() and isinstance(v, str)}
BOM = b"\xef\xbb\xbf"
DEEP = 100_000  # deeper than the JSON parser's recursion allows


def J(obj: Any) -> str:
    """One JSON text; lone surrogates come out as \\udXXX escapes, as a hostile file holds them."""
    return json.dumps(obj)


def jl(*objs: Any) -> bytes:
    return "".join((o if isinstance(o, str) else J(o)) + "\n" for o in objs).encode()


def alp(instruction: str = "Say hi.", output: str = "Hi.", **kw: Any) -> dict:
    return {"instruction": instruction, "input": "", "output": output, **kw}


@dataclass
class Case:
    id: str
    source: str  # alpaca, llava, coco, karpathy, csv, mme, data (eval --data), predictions
    content: Any  # bytes of the input file (mme: {relative path: bytes})
    expect: str  # "keep N", "skip REASON" or "refuse REGEX" ({f}: the input file)
    options: dict[str, Any] = field(default_factory=dict)


# -- the table --------------------------------------------------------------------------------

ALPACA = [
    Case("alpaca-baseline", "alpaca", jl(alp(), alp("Say bye.", "Bye.")), "keep 2"),
    Case("alpaca-surrogate-instruction", "alpaca", jl(alp("\ud800 hi"), alp()), "skip malformed record"),
    Case("alpaca-surrogate-output", "alpaca", jl(alp(output="x\udc00"), alp("b")), "skip malformed record"),
    Case("alpaca-surrogate-id", "alpaca", jl(alp(id="a\udfff"), alp()), "skip malformed record"),
    Case("alpaca-surrogate-input", "alpaca", jl({**alp(), "input": "\ud83d"}), "skip malformed record"),
    Case("alpaca-non-utf8-line-2", "alpaca", jl(alp()) + b'{"instruction": "\xff", "output": "x"}\n' + jl(alp("b")),
         "skip not UTF-8"),
    Case("alpaca-latin1-file", "alpaca", '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"), "skip not UTF-8"),
    Case("alpaca-bom-jsonl", "alpaca", BOM + jl(alp(), alp("b")), "keep 2"),
    Case("alpaca-bom-list", "alpaca", BOM + J([alp(), alp("b")]).encode(), "keep 2"),
    Case("alpaca-deep-line", "alpaca", jl(alp()) + b"[" * DEEP + b"\n", "skip malformed json"),
    Case("alpaca-deep-value", "alpaca", jl(alp()) + b'{"instruction": ' + b"[" * DEEP + b"\n", "skip malformed json"),
    Case("alpaca-deep-list", "alpaca", b"[" + b"[" * DEEP, "refuse {f}:1: malformed json"),
    Case("alpaca-id-list", "alpaca", jl(alp(id=["x", 1]), alp()), "skip malformed record"),
    Case("alpaca-id-object", "alpaca", jl(alp(id={"a": 1}), alp()), "skip malformed record"),
    Case("alpaca-id-null", "alpaca", jl(alp(id=None), alp()), "skip malformed record"),
    Case("alpaca-id-true", "alpaca", jl(alp(id=True), alp()), "skip malformed record"),
    Case("alpaca-id-float", "alpaca", jl(alp(id=1.5), alp()), "skip malformed record"),
    Case("alpaca-id-empty", "alpaca", jl(alp(id=""), alp()), "skip malformed record"),
    Case("alpaca-id-blank", "alpaca", jl(alp(id="  "), alp()), "skip malformed record"),
    Case("alpaca-id-int", "alpaca", jl(alp(id=7), alp(id="x")), "keep 2"),
    Case("alpaca-id-empty-strict", "alpaca", jl(alp(), alp(id="")), "refuse {f}:2: malformed record", {"strict": True}),
    Case("alpaca-surrogate-strict", "alpaca", jl(alp(), alp("\udbff")), "refuse {f}:2: malformed record",
         {"strict": True}),
    Case("alpaca-non-utf8-strict", "alpaca", jl(alp()) + b"\x80\n", "refuse {f}:2: not UTF-8", {"strict": True}),
    Case("alpaca-duplicate-id", "alpaca", jl(alp(id="a"), alp(id="a")), "skip duplicate id"),
    Case("alpaca-object-not-list", "alpaca", json.dumps({"data": [alp()]}, indent=2).encode(),
         "refuse {f}: one JSON object; expected a JSON list"),
    Case("alpaca-scalar-line", "alpaca", jl(42, alp()), "skip malformed record"),
    Case("alpaca-list-of-strings", "alpaca", J(["a", "b"]).encode(), "skip malformed record"),
    Case("alpaca-truncated-last-line", "alpaca", jl(alp()) + b'{"instruction": "x', "skip malformed json"),
    Case("alpaca-nul-text", "alpaca", jl(alp("a\u0000b")), "keep 1"),
    Case("alpaca-huge-integer", "alpaca", jl(alp()) + b'{"id": ' + b"9" * 5000 + b"}\n", "skip malformed json"),
    Case("alpaca-nan-output", "alpaca", jl(alp()) + b'{"instruction": "x", "output": NaN}\n', "skip malformed record"),
    Case("alpaca-input-list", "alpaca", jl({**alp(), "input": ["a"]}, alp("b")), "skip malformed record"),
    Case("alpaca-empty-file", "alpaca", b"", "keep 0"),
    Case("alpaca-blank-output", "alpaca", jl(alp(output="   "), alp()), "skip empty text"),
    Case("alpaca-crlf", "alpaca", jl(alp(), alp("b")).replace(b"\n", b"\r\n"), "keep 2"),
    Case("alpaca-long-line", "alpaca", jl(alp("x" * 1_000_000)), "keep 1"),
    Case("alpaca-u2028-in-text", "alpaca", jl(alp("a\u2028b\u0085c")), "keep 1"),
    Case("alpaca-bad-list", "alpaca", b'[{"instruction": "x", "output": "y"},\n{oops}]', "refuse {f}:2: malformed json"),
    Case("alpaca-non-utf8-list", "alpaca", b'[\n{"instruction": "x", "output": "y"},\n{"instruction": "\xfe"}]',
         "refuse {f}:3: not UTF-8"),
]


def llava(value: str = "<image>\nWhat is it?", answer: str = "A cat.", **kw: Any) -> dict:
    return {"id": "s1", "image": "a.png", "conversations": [{"from": "human", "value": value},
                                                           {"from": "gpt", "value": answer}], **kw}


LLAVA = [
    Case("llava-baseline", "llava", J([llava(), llava(id="s2")]).encode(), "keep 2"),
    Case("llava-id-list", "llava", J([llava(id=["x", 1]), llava(id="s2")]).encode(), "skip malformed record"),
    Case("llava-id-null", "llava", J([llava(id=None), llava(id="s2")]).encode(), "skip malformed record"),
    Case("llava-id-object", "llava", J([llava(id={}), llava(id="s2")]).encode(), "skip malformed record"),
    Case("llava-odd-turns", "llava", J([{**llava(), "conversations": [{"from": "human", "value": "q"}]}]).encode(),
         "skip malformed record"),
    Case("llava-value-not-text", "llava", J([llava(value=5)]).encode(), "skip malformed record"),
    Case("llava-image-list", "llava", J([llava(image=["a.png"])]).encode(), "skip malformed record"),
    Case("llava-image-empty", "llava", J([llava(image="")]).encode(), "skip malformed record"),
    Case("llava-image-nul", "llava", J([llava(image="a\u0000.png"), llava(id="s2")]).encode(), "skip malformed record"),
    Case("llava-image-surrogate", "llava", J([llava(image="a\udcff.png"), llava(id="s2")]).encode(),
         "skip malformed record"),
    Case("llava-surrogate-answer", "llava", J([llava(answer="\ud800"), llava(id="s2")]).encode(), "skip malformed record"),
    Case("llava-unknown-role", "llava", J([{**llava(), "conversations": [{"from": "system", "value": "q"},
                                                                        {"from": "gpt", "value": "a"}]}]).encode(),
         "skip malformed record"),
    Case("llava-conversations-object", "llava", J([{**llava(), "conversations": {"from": "human"}}]).encode(),
         "skip malformed record"),
    Case("llava-object-file", "llava", json.dumps(llava(), indent=1).encode(), "refuse {f}: one JSON object"),
    Case("llava-bom-list", "llava", BOM + J([llava()]).encode(), "keep 1"),
    Case("llava-non-utf8-list", "llava", b'[\n{"id": "\xc3\x28"}]', "refuse {f}:2: not UTF-8"),
    Case("llava-deep-list", "llava", b"[" + b'{"conversations": ' + b"[" * DEEP, "refuse {f}:1: malformed json"),
    Case("llava-jsonl-non-utf8", "llava", jl(llava()) + b"\xff\xfe\n" + jl(llava(id="s3")), "skip not UTF-8"),
]


def coco_doc(anns: list, images: list | None = None) -> bytes:
    return J({"images": [{"id": 0, "file_name": "0.jpg"}, {"id": 1, "file_name": "1.jpg"}] if images is None else images,
              "annotations": anns}).encode()


def cap(image_id: Any = 1, caption: str = "A cat.", **kw: Any) -> dict:
    return {"image_id": image_id, "caption": caption, **kw}


COCO = [
    Case("coco-baseline", "coco", coco_doc([cap(id=1), cap(0, id=2)]), "keep 2"),
    Case("coco-image-id-false", "coco", coco_doc([cap(False, id=1), cap(1, id=2)]), "skip malformed record"),
    Case("coco-image-id-true", "coco", coco_doc([cap(True, id=1), cap(0, id=2)]), "skip malformed record"),
    Case("coco-image-id-list", "coco", coco_doc([cap([1], id=1), cap(1, id=2)]), "skip malformed record"),
    Case("coco-image-id-object", "coco", coco_doc([cap({"a": 1}, id=1), cap(1, id=2)]), "skip malformed record"),
    Case("coco-image-id-string", "coco", coco_doc([cap("1", id=1), cap(1, id=2)]), "skip unknown image id"),
    Case("coco-image-id-float", "coco", coco_doc([cap(1.0, id=1), cap(1, id=2)]), "skip malformed record"),
    Case("coco-ann-id-list", "coco", coco_doc([cap(id=["x", 1]), cap(0, id=2)]), "skip malformed record"),
    Case("coco-ann-id-null", "coco", coco_doc([cap(id=None), cap(0, id=2)]), "skip malformed record"),
    Case("coco-ann-id-object", "coco", coco_doc([cap(id={"k": "v"}), cap(0, id=2)]), "skip malformed record"),
    Case("coco-image-entry-id-list", "coco", coco_doc([cap(id=1)], [{"id": [1], "file_name": "x.jpg"},
                                                                    {"id": 1, "file_name": "1.jpg"}]),
         "skip malformed record"),
    Case("coco-caption-surrogate", "coco", coco_doc([cap(caption="\ud800", id=1), cap(id=2)]), "skip malformed record"),
    Case("coco-caption-number", "coco", coco_doc([cap(caption=5, id=1), cap(id=2)]), "skip malformed record"),
    Case("coco-file-name-surrogate", "coco", coco_doc([cap(id=1), cap(0, id=2)], [{"id": 0, "file_name": "\udc80.jpg"},
                                                                               {"id": 1, "file_name": "1.jpg"}]),
         "skip malformed record"),
    Case("coco-annotation-not-object", "coco", coco_doc(["a caption", cap(id=2)]), "skip malformed record"),
    Case("coco-annotations-object", "coco", J({"images": [], "annotations": {"a": 1}}).encode(),
         "refuse {f}: annotations must be a list"),
    Case("coco-images-object", "coco", J({"images": {"0": "0.jpg"}, "annotations": [cap(id=1)]}).encode(),
         "refuse {f}: images must be a list"),
    Case("coco-top-level-array", "coco", J([cap()]).encode(), "refuse {f}: neither a COCO caption file"),
    Case("coco-deep", "coco", b'{"annotations": ' + b"[" * DEEP, "refuse {f}:1: malformed json"),
    Case("coco-non-utf8", "coco", b'{"images": [],\n"annotations": ["\xff"]}', "refuse {f}:2: not UTF-8"),
    Case("coco-bom", "coco", BOM + coco_doc([cap(id=1)]), "keep 1"),
    Case("coco-empty-file", "coco", b"", "refuse {f}:1: malformed json"),
]


def kp(sentences: list | None = None, **kw: Any) -> dict:
    return {"filepath": "val2014", "filename": "x.jpg", "imgid": 3, "split": "train",
            "sentences": [{"raw": "A dog.", "sentid": 30}] if sentences is None else sentences, **kw}


def kp_doc(*images: dict) -> bytes:
    return J({"images": list(images), "dataset": "coco"}).encode()


KARPATHY = [
    Case("karpathy-baseline", "karpathy", kp_doc(kp(), kp(sentences=[{"raw": "B.", "sentid": 31}])), "keep 2"),
    Case("karpathy-filepath-int", "karpathy", kp_doc(kp(filepath=5), kp(sentences=[{"raw": "B.", "sentid": 31}])),
         "skip malformed record"),
    Case("karpathy-filepath-list", "karpathy", kp_doc(kp(filepath=["a"]), kp(sentences=[{"raw": "B.", "sentid": 31}])),
         "skip malformed record"),
    Case("karpathy-split-list", "karpathy", kp_doc(kp(split=["train"]), kp(sentences=[{"raw": "B.", "sentid": 31}])),
         "skip malformed record", {"split": "train"}),
    Case("karpathy-sentid-list", "karpathy", kp_doc(kp(sentences=[{"raw": "A.", "sentid": [1]}, {"raw": "B.", "sentid": 2}])),
         "skip malformed record"),
    Case("karpathy-sentid-null", "karpathy", kp_doc(kp(sentences=[{"raw": "A.", "sentid": None}, {"raw": "B.", "sentid": 2}])),
         "skip malformed record"),
    Case("karpathy-imgid-object", "karpathy", kp_doc(kp(imgid={"a": 1}, sentences=[{"raw": "A."}]),
                                                     kp(sentences=[{"raw": "B.", "sentid": 31}])),
         "skip malformed record"),
    Case("karpathy-raw-surrogate", "karpathy", kp_doc(kp(sentences=[{"raw": "\udc00", "sentid": 1}, {"raw": "B.", "sentid": 2}])),
         "skip malformed record"),
    Case("karpathy-filename-int", "karpathy", kp_doc(kp(filename=7), kp(sentences=[{"raw": "B.", "sentid": 31}])),
         "skip malformed record"),
    Case("karpathy-sentence-string", "karpathy", kp_doc(kp(sentences=["A dog.", {"raw": "B.", "sentid": 2}])),
         "skip malformed record"),
    Case("karpathy-sentences-object", "karpathy", kp_doc(kp(sentences={"raw": "A."}), kp(sentences=[{"raw": "B.", "sentid": 31}])),
         "skip malformed record"),
    Case("karpathy-split-surrogate", "karpathy", kp_doc(kp(split="tr\ud800"), kp(sentences=[{"raw": "B.", "sentid": 31}])),
         "skip malformed record"),
]


def table(*rows: str, sep: str = "\t") -> bytes:
    return "".join(r.replace("|", sep) + "\n" for r in ("image|caption", *rows)).encode()


CSV = [
    Case("csv-baseline-tab", "csv", table("a.jpg|A cat.", "b.jpg|A dog."), "keep 2"),
    Case("csv-baseline-comma", "csv", b'image,caption\na.jpg,"A cat, sitting."\nb.jpg,A dog.\n', "keep 2"),
    Case("csv-bom", "csv", BOM + table("a.jpg|A cat."), "keep 1"),
    Case("csv-non-utf8-row-3", "csv", table("a.jpg|A cat.") + b"b.jpg\tA \xe9t\xe9 dog.\n" + table("c.jpg|C.")[14:],
         "skip not UTF-8"),
    Case("csv-non-utf8-image", "csv", table("a.jpg|A cat.") + b"\xff.jpg\tA dog.\n", "skip not UTF-8"),
    Case("csv-field-count", "csv", table("a.jpg|A cat.|extra", "b.jpg|B."), "skip malformed row"),
    Case("csv-url", "csv", table("http://x/a.jpg|A cat.", "b.jpg|B."), "skip remote image"),
    Case("csv-empty-image", "csv", table(" |A cat.", "b.jpg|B."), "skip missing image"),
    Case("csv-empty-caption", "csv", table("a.jpg| ", "b.jpg|B."), "skip empty text"),
    Case("csv-header-only", "csv", table(), "keep 0"),
    Case("csv-no-caption-column", "csv", b"image\tlabel\na.jpg\tcat\n", "refuse {f}:1: no caption column"),
    Case("csv-empty-file", "csv", b"", "refuse {f}: empty table"),
    Case("csv-huge-field", "csv", b"image,caption\na.jpg," + b"x" * 200_000 + b"\n", "refuse {f}:2: unreadable table"),
    Case("csv-nul-in-image", "csv", table("a\x00.jpg|A cat.", "b.jpg|B."), "skip malformed record"),
    Case("csv-quoted-newline", "csv", b'image,caption\na.jpg,"two\nlines"\nb.jpg,B.\n', "keep 2"),
    Case("csv-unclosed-quote", "csv", b'image,caption\na.jpg,"open\nb.jpg,B.\n', "keep 1"),
]


def mme_tree(lines: bytes, image: bool = True) -> dict[str, bytes]:
    tree = {"existence/q1.txt": lines}
    if image:
        tree["existence/q1.jpg"] = b""
    return tree


MME_OK = b"Is there a cat?\tYes\nIs there a dog?\tNo\n"
MME = [
    Case("mme-baseline", "mme", mme_tree(MME_OK), "keep 2"),
    Case("mme-non-utf8-line-2", "mme", mme_tree(b"Is there a cat?\tYes\nIs there a \xff?\tNo\nA?\tNo\n"), "skip not UTF-8"),
    Case("mme-bom", "mme", mme_tree(BOM + MME_OK), "keep 2"),
    Case("mme-crlf", "mme", mme_tree(MME_OK.replace(b"\n", b"\r\n")), "keep 2"),
    Case("mme-no-tab", "mme", mme_tree(b"Is there a cat? Yes\n" + MME_OK), "skip malformed row"),
    Case("mme-maybe", "mme", mme_tree(b"Is there a cat?\tMaybe\n" + MME_OK), "skip malformed row"),
    Case("mme-three-fields", "mme", mme_tree(b"Is\tthere\tYes\n" + MME_OK), "skip malformed row"),
    Case("mme-vertical-tab", "mme", mme_tree(b"Is there a \x0bcat?\tYes\nIs there a dog?\tNo\n"), "keep 2"),
    Case("mme-no-image", "mme", mme_tree(MME_OK, image=False) | {"existence/other.jpg": b""}, "skip missing image"),
    Case("mme-empty-folder", "mme", {"readme.md": b"x"}, "refuse {f}: no MME subtask folders"),
]


def rec(id: Any = "v1", instruction: str = "What colour?", output: str = "red", **kw: Any) -> dict:
    return {"id": id, "image": None, "instruction": instruction, "input": "", "output": output, "kind": "vqa",
            "source": "test", **kw}


DATA = [
    Case("data-baseline", "data", jl(rec(), rec("v2")), "keep 2"),
    Case("data-duplicate-id", "data", jl(rec(), rec("v2"), rec()), "refuse {f}:3: duplicate id 'v1' \\(first on line 1\\)"),
    Case("data-surrogate", "data", jl(rec(), rec("v2", "\ud800?")), "refuse {f}:2: field instruction holds a lone surrogate"),
    Case("data-surrogate-extra-key", "data", jl(rec(), {**rec("v2"), "\udc00": 1}), "refuse {f}:2: .*lone surrogate"),
    Case("data-surrogate-nested-extra", "data", jl(rec(), rec("v2", answers=["red", ["\ud83d"]])),
         "refuse {f}:2: field answers\\[1\\]\\[0\\] holds a lone surrogate"),
    Case("data-non-utf8-line-5", "data", jl(rec("a"), rec("b"), rec("c"), rec("d")) + b'{"id": "\xff"}\n', "refuse {f}:5: not UTF-8"),
    Case("data-bom", "data", BOM + jl(rec(), rec("v2")), "keep 2"),
    Case("data-deep", "data", jl(rec()) + b"[" * DEEP + b"\n", "refuse {f}:2: malformed json \\(nested too deeply\\)"),
    Case("data-empty-id", "data", jl(rec("")), "refuse {f}:1: field id must be a non-empty string"),
    Case("data-id-int", "data", jl(rec(5)), "refuse {f}:1: field id must be a string"),
    Case("data-image-empty", "data", jl(rec(image="")), "refuse {f}:1: field image"),
    Case("data-image-nul", "data", jl(rec(image="a\u0000b.png")), "refuse {f}:1: field image"),
    Case("data-kind", "data", jl(rec(kind="picture")), "refuse {f}:1: field kind must be one of"),
    Case("data-array-line", "data", jl([rec()]), "refuse {f}:1: a record must be a JSON object"),
    Case("data-missing-output", "data", jl({k: v for k, v in rec().items() if k != "output"}), "refuse {f}:1: field output is missing"),
    Case("data-answers-number", "data", jl(rec(answers=5), rec("v2")), "keep 2"),
    Case("data-blank", "data", b"\n  \n", "refuse {f}: no records"),
    Case("data-huge-integer", "data", b'{"id": ' + b"1" * 5000 + b"}\n", "refuse {f}:1: malformed json"),
    Case("data-truncated", "data", jl(rec()) + b'{"id": "v2", "ima', "refuse {f}:2: malformed json"),
    Case("data-nan-output", "data", b'{"id": "v", "image": null, "instruction": "q", "output": NaN, "kind": "vqa", "source": "s"}\n',
         "refuse {f}:1: field output must be a string, not NaN"),
]


def pred(id: Any = "v1", prediction: Any = "red", **kw: Any) -> dict:
    return {"id": id, "prediction": prediction, **kw}


PREDICTIONS = [
    Case("pred-baseline", "predictions", jl(pred(), pred("v2")), "keep 2"),
    Case("pred-unknown-id", "predictions", jl(pred(), pred("zz")), "refuse {f}:2: prediction id 'zz' is not among"),
    Case("pred-duplicate", "predictions", jl(pred(), pred()), "refuse {f}:2: a second prediction"),
    Case("pred-not-text", "predictions", jl(pred(), pred("v2", 5)), "refuse {f}:2: \"prediction\" must be a string"),
    Case("pred-deep", "predictions", jl(pred()) + b"[" * DEEP + b"\n", "refuse {f}:2: malformed json"),
    Case("pred-non-utf8", "predictions", jl(pred()) + b'{"id": "v2", "prediction": "\xff"}\n', "refuse {f}:2:"),
    Case("pred-array-line", "predictions", jl([pred()]), "refuse {f}:1: a prediction needs a string \"id\""),
    Case("pred-id-int", "predictions", jl(pred(1)), "refuse {f}:1: a prediction needs a string \"id\""),
    Case("pred-null-line", "predictions", b"null\n", "refuse {f}:1: a prediction needs"),
    Case("pred-empty", "predictions", b"", "refuse {f}: no predictions"),
    Case("pred-surrogate-text", "predictions", jl(pred(prediction="\ud800"), pred("v2")), "keep 2"),
    Case("pred-huge-integer", "predictions", b'{"id": "v1", "x": ' + b"1" * 5000 + b"}\n", "refuse {f}:1: malformed json"),
    Case("pred-missing-prediction", "predictions", jl({"id": "v1"}, pred("v2")), "refuse {f}: prediction 'v1' has no"),
]

CASES = ALPACA + LLAVA + COCO + KARPATHY + CSV + MME + DATA + PREDICTIONS


def test_the_table_is_large_enough():
    per = {}
    for c in CASES:
        per[c.source] = per.get(c.source, 0) + 1
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)
    assert set(per) == {"alpaca", "llava", "coco", "karpathy", "csv", "mme", "data", "predictions"}


# -- running a case ---------------------------------------------------------------------------


def _write_input(case: Case, d: Path) -> Path:
    """The input file (mme: the folder) of a case."""
    if case.source == "mme":
        root = d / "MME"
        for rel, data in case.content.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root
    suffix = {"csv": ".tsv", "coco": ".json", "karpathy": ".json"}.get(case.source, ".jsonl")
    f = d / f"input{suffix}"
    f.write_bytes(case.content)
    return f


def _run(case: Case, inp: Path, d: Path) -> tuple[int, dict]:
    """(units kept, the manifest or the metrics): the real entry point of the case's source."""
    if case.source in ("data", "predictions"):
        data = inp if case.source == "data" else d / "data.jsonl"
        if case.source == "predictions":
            data.write_bytes(jl(rec(), rec("v2")))
            preds = inp
        else:  # a prediction for every id the data holds, so that a readable file is scored
            preds = d / "preds.jsonl"
            preds.write_bytes(jl(*(pred(r.id) for r in read_records(inp))) if _readable(inp) else b"")
        result = evaluate(EvalOptions(task="vqa", data=data, predictions=preds), log=lambda m: None)
        return result["n"], result
    out = d / "out" / "records.jsonl"
    opts: dict[str, Any] = {"check_images": False, **case.options}
    if case.source == "alpaca" or case.source == "llava":
        opts["input"] = inp
    elif case.source in ("coco", "karpathy"):
        opts.update(annotations=inp, images=d / "images")
    elif case.source == "csv":
        opts["input"] = inp
    elif case.source == "mme":
        opts["root"] = inp
    source = "coco" if case.source == "karpathy" else case.source
    manifest = prepare(source, out, quiet=True, **opts)
    # whatever prepare writes, lav2's own reader reads back
    assert len(list(read_records(out))) == manifest["records"]
    for reason, entry in manifest["skipped"]["by_reason"].items():
        assert reason in REASONS, reason
        assert all(e["at"].startswith(str(inp)) for e in entry["examples"]), entry
    return manifest["records"], manifest


def _readable(f: Path) -> bool:
    try:
        list(read_records(f))
        return True
    except Lav2Error:
        return False


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_kept_skipped_or_refused_in_one_line(case: Case, tmp_path):
    inp = _write_input(case, tmp_path)
    verb, _, arg = case.expect.partition(" ")
    try:
        kept, result = _run(case, inp, tmp_path)
    except Lav2Error as e:
        message = str(e)
        assert "\n" not in message, message
        assert str(inp) in message, f"the message names no input file: {message}"
        assert verb == "refuse", f"refused, expected {case.expect}: {message}"
        assert re.match(arg.replace("{f}", re.escape(str(inp))), message), message
        return
    assert verb != "refuse", f"expected {case.expect}, got {kept} kept"
    if verb == "keep":
        assert kept == int(arg)
        if case.source not in ("data", "predictions"):
            assert result["skipped"]["total"] == 0, result["skipped"]
    else:
        assert arg in result["skipped"]["by_reason"], result["skipped"]


# -- through the command line ------------------------------------------------------------------


def _lav2(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LAV2_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lav2cli", *args], env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(r: subprocess.CompletedProcess, *names: str) -> str:
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lav2: error: "), r.stderr
    assert "--debug" not in lines[0] and "Traceback" not in r.stderr, r.stderr  # not the generic catch-all
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def test_command_line_contract(tmp_path):
    """Exit 1 with one `lav2: error:` line naming the file for a refusal; exit 0 with the skip
    counted for a bad entry."""
    bad = tmp_path / "obj.json"
    bad.write_text(json.dumps({"data": [alp()]}, indent=2))
    _one_line_error(_lav2("prepare", "alpaca", "--input", str(bad), "--out", str(tmp_path / "a.jsonl")),
                    str(bad))

    ann = tmp_path / "captions.json"
    ann.write_bytes(coco_doc([cap([1], id=1), cap(False, id=2), cap(1, id=3)]))
    r = _lav2("prepare", "coco", "--annotations", str(ann), "--images", str(tmp_path), "--no-check-images",
              "--out", str(tmp_path / "c.jsonl"))
    assert r.returncode == 0, r.stderr
    assert "kept 1 records" in r.stderr and "malformed record 2" in r.stderr

    tsv = tmp_path / "t.tsv"
    tsv.write_bytes(table("a.jpg|A cat.") + b"b.jpg\t\xe9t\xe9\n")
    r = _lav2("prepare", "csv", "--input", str(tsv), "--no-check-images", "--strict", "--out", str(tmp_path / "t.jsonl"))
    assert _one_line_error(r, f"{tsv}:3") == f"lav2: error: {tsv}:3: not UTF-8 (byte 0xe9)"

    data = tmp_path / "d.jsonl"
    data.write_bytes(jl(rec(), rec("v2"), rec()))
    preds = tmp_path / "p.jsonl"
    preds.write_bytes(jl(pred(), pred("v2")))
    r = _lav2("eval", "vqa", "--data", str(data), "--predictions", str(preds))
    _one_line_error(r, f"{data}:3: duplicate id 'v1'")
