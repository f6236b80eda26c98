"""Errors that name their file, and inputs that no longer slip through: loaders of tensor files
and of lav2.json / params.json, prepare's bad entries, eval's data file, non-finite adapters.
(tests/test_fuzz_inputs.py runs many more hostile inputs through the record readers.)"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import trained_looking_artifact
from test_prepare import cli
from lav2cli import engine, formats
from lav2cli.data.prepare import prepare
from lav2cli.data.records import read_records
from lav2cli.errors import Lav2Error
from lav2cli.evaluate.runner import EvalOptions, evaluate
from lav2cli.formats import meta as meta_layout
from lav2cli.formats import official
from lav2cli.formats.io import read_checkpoint, read_state_dict
from lav2cli.train import checkpoint



def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lav2: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, base_dir) -> Path:
    """A trained-looking artifact with a visual branch (timm encoder, recorded preprocessing)."""
    return trained_looking_artifact(base_dir, tmp_path_factory.mktemp("art") / "run", seed=0, lora_rank=2,
                                    training={"steps": 1, "seconds": 2.0})


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    return d


# -- 10. loaders: tensor files -----------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent-dir/lav2-pickle-ran"),))


def test_pickle_payload_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Payload()}}, f)
    for read in (read_checkpoint, read_state_dict, official.load):
        with pytest.raises(Lav2Error) as e:
            read(f)
        assert str(e.value).startswith(f"{f}: not a tensor checkpoint: it holds Python objects lav2 will not "
                                       "unpickle"), str(e.value)
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file: 0 bytes"),
    (b"\x80\x02}q\x00(X", "truncated: the file ends early"),
    (b"PK\x03\x04 not really a zip", "PytorchStreamReader failed reading zip archive: not a ZIP archive"),
    (b"hello, not a pickle", "not a PyTorch checkpoint: unreadable pickle data"),
])
def test_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, content, reason):
    f = tmp_path / "x.pt"
    f.write_bytes(content)
    with pytest.raises(Lav2Error) as e:
        read_checkpoint(f)
    assert str(e.value) == f"{f}: cannot read checkpoint ({reason})"


def test_zero_byte_trainer_state_names_the_file(run_dir, tmp_path):
    d = copy_run(run_dir, tmp_path)
    (d / checkpoint.STATE_FILE).write_bytes(b"")
    with pytest.raises(Lav2Error, match=rf"^{d / checkpoint.STATE_FILE}: cannot resume \(empty file: 0 bytes\)$"):
        checkpoint.read(d)


def test_zero_byte_encoder_weights_is_one_line_not_aborted(run_dir, tmp_path, monkeypatch, capsys):
    """An EOFError used to reach click, which printed a bare "Aborted."."""
    d = copy_run(run_dir, tmp_path)
    empty = tmp_path / "effnet.pth"
    empty.write_bytes(b"")
    meta = json.loads((d / "lav2.json").read_text())
    meta["encoder"]["weights"] = str(empty)
    (d / "lav2.json").write_text(json.dumps(meta))
    code, out, err = cli(monkeypatch, capsys, "ask", "none", "hi", "--model", str(d), "--max-new-tokens", "2")
    assert code == 1 and out == ""
    assert one_line(err) == f"lav2: error: {empty}: cannot read encoder weights (empty file: 0 bytes)"


def test_an_eof_error_anywhere_is_one_line(monkeypatch, capsys):
    """Whatever raises EOFError, main() reports it (one line) instead of click's "Aborted!"."""
    from lav2cli import info

    def boom(*a, **k):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(info, "describe", boom, raising=False)
    monkeypatch.setattr(formats, "open", boom)
    code, _, err = cli(monkeypatch, capsys, "info", "none-such-model")
    assert code == 1 and "Aborted" not in err
    assert one_line(err).startswith("lav2: error: EOFError: Ran out of input")


def test_torch_load_is_called_in_one_place_only():
    """Every reader of pickled tensors goes through lav2cli.torchfile (weights_only=True, one-line errors)."""
    root = Path(__file__).parents[1] / "lav2cli"
    callers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     for node in ast.walk(ast.parse(p.read_text()))
                     if isinstance(node, ast.Attribute) and node.attr == "load"
                     and isinstance(node.value, ast.Name) and node.value.id == "torch")
    assert callers == ["torchfile.py", "torchfile.py"]  # the memory-mapped try and the plain one


# -- 10. loaders: lav2.json ---------------------------------------------------------------------


def _set(path: str, value):
    def mutate(meta):
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
        return meta
    return mutate


LAV2_JSON_CASES = [
    ("format-version-text", _set("format_version", "one"), "field format_version must be an integer, not \"one\""),
    ("prompt-len-text", _set("adapter.prompt_len", "ten"), "field adapter.prompt_len must be an integer, not \"ten\""),
    ("preprocess-no-mean", _set("preprocess.mean", KeyError), "field preprocess.mean is missing"),
    ("top-level-array", lambda m: [m], "lav2.json must be a JSON object, not a list"),
    ("top-level-string", lambda m: "lav2", "lav2.json must be a JSON object, not \"lav2\""),
    ("visual-depth-negative", _set("adapter.visual.depth", -1), "field adapter.visual.depth must be at least 0, not -1"),
    ("visual-unknown-field", _set("adapter.visual.colour", 1), "field adapter.visual.colour is not one lav2 knows"),
    ("lora-rank-float", _set("adapter.lora_rank", 1.5), "field adapter.lora_rank must be an integer, not 1.5"),
    ("variant-unknown", _set("adapter.variant", "fancy"), "field adapter.variant must be one of paper, official"),
    ("bias-text", _set("adapter.bias", "yes"), "field adapter.bias must be true or false, not \"yes\""),
    ("adapter-list", _set("adapter", [1]), "field adapter must be a JSON object or null, not a list"),
    ("base-config-dim-text", _set("base.config.dim", "64"), "field base.config.dim must be an integer, not \"64\""),
    ("base-config-no-layers", _set("base.config.n_layers", KeyError), "field base.config.n_layers is missing"),
    ("base-string", _set("base", "llama"), "field base must be a JSON object, not \"llama\""),
    ("std-zero", _set("preprocess.std", [0.5, 0, 0.5]), "field preprocess.std[1] must be a positive number, not 0"),
    ("mean-two", _set("preprocess.mean", [0.5, 0.5]), "field preprocess.mean must hold 3 items, not 2"),
    ("size-null", _set("preprocess.size", None), "field preprocess.size must be an integer, not null"),
    ("crop-zero", _set("preprocess.crop_pct", 0), "field preprocess.crop_pct must be in (0, 1], not 0"),
    ("encoder-kind", _set("encoder.kind", "onnx"), "field encoder.kind must be one of open_clip, timm"),
    ("template-unknown", _set("template", "vicuna"), "field template must be one of alpaca, chatml"),
    ("tensors-string", _set("tensors", "all"), "field tensors must be a list, not \"all\""),
    ("seconds-text", _set("training.seconds", "long"), "field training.seconds must be a finite number"),
    ("surrogate", _set("lav2_version", "\ud800"), "field lav2_version holds a lone surrogate \\ud800"),
]


@pytest.mark.parametrize("mutate,message", [c[1:] for c in LAV2_JSON_CASES], ids=[c[0] for c in LAV2_JSON_CASES])
def test_malformed_lav2_json_names_file_and_field(run_dir, tmp_path, mutate, message):
    d = copy_run(run_dir, tmp_path)
    f = d / "lav2.json"
    f.write_text(json.dumps(mutate(json.loads(f.read_text()))))
    with pytest.raises(Lav2Error) as e:
        formats.open(str(d))
    assert str(e.value).startswith(f"{f}: {message}"), str(e.value)


@pytest.mark.parametrize("text,message", [
    (b'{"format": "lav2-adapter", "x": ' + b"[" * 100_000, ":1: malformed json (nested too deeply)"),
    (b'{"format": "lav2-adapter",\n "template": "\xff"}', ":2: not UTF-8 (byte 0xff at column 15)"),
    (b'{"format": "lav2-adapter", "format_version": 99}', ": format version 99 is newer than this lav2 reads (1)"),
    (b'{"format": "other"}', ": not a lav2 adapter (format \"other\")"),
], ids=["deep", "not-utf8", "newer", "other-format"])
def test_unreadable_lav2_json_names_the_file(run_dir, tmp_path, text, message):
    d = copy_run(run_dir, tmp_path)
    (d / "lav2.json").write_bytes(text)
    with pytest.raises(Lav2Error) as e:
        formats.open(str(d))
    assert str(e.value) == f"{d / 'lav2.json'}{message}"


def test_valid_lav2_json_still_loads(run_dir):
    assert formats.open(str(run_dir)).adapter.lora_rank == 2


def test_malformed_lav2_json_through_the_command_line(run_dir, tmp_path, monkeypatch, capsys):
    d = copy_run(run_dir, tmp_path)
    f = d / "lav2.json"
    f.write_text(json.dumps(_set("adapter.prompt_len", "ten")(json.loads(f.read_text()))))
    code, _, err = cli(monkeypatch, capsys, "info", str(d))
    assert code == 1
    assert one_line(err) == f"lav2: error: {f}: field adapter.prompt_len must be an integer, not \"ten\""


# -- 10. loaders: params.json -------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"ffn_dim_multiplier": "1.3"}, "field ffn_dim_multiplier must be a finite number or null, not \"1.3\""),
    ({"max_seq_len": -5}, "field max_seq_len must be a positive integer, not -5"),
    ({"dim": "64"}, "field dim must be an integer, not \"64\""),
    ({"n_heads": 0}, "field n_heads must be a positive integer, not 0"),
    ({"norm_eps": -1e-5}, "field norm_eps must be a positive number, not -1e-05"),
    ({"n_kv_heads": 2.5}, "field n_kv_heads must be an integer or null, not 2.5"),
    ({"multiple_of": True}, "field multiple_of must be an integer, not true"),
    (["top-level array"], "params.json must be a JSON object, not a list"),
], ids=["ffn-text", "max-seq-negative", "dim-text", "heads-zero", "eps-negative", "kv-float", "multiple-bool", "array"])
def test_malformed_params_json_names_file_and_field(base_dir, tmp_path, change, message):
    d = tmp_path / "base"
    shutil.copytree(base_dir, d)
    f = d / "params.json"
    params = json.loads(f.read_text())
    f.write_text(json.dumps({**params, **change} if isinstance(change, dict) else change))
    with pytest.raises(Lav2Error) as e:
        meta_layout.load(d)
    assert str(e.value) == f"{f}: {message}"


# -- 11. prepare: bad entries are skipped, what is written reads back ----------------------------


def _alpaca(tmp_path, lines: list, name="in.jsonl", prefix=b"") -> Path:
    f = tmp_path / name
    f.write_bytes(prefix + "".join(json.dumps(x) + "\n" for x in lines).encode())
    return f


def test_prepare_skips_entries_that_used_to_abort_the_run(tmp_path):
    ok = {"instruction": "Say hi.", "output": "Hi."}
    f = _alpaca(tmp_path, [ok, {**ok, "output": "\ud800"}, {"id": ["x", 1], **ok}, {"id": None, **ok},
                           {"id": 7, **ok}, {"id": True, **ok}])
    with f.open("ab") as h:
        h.write(b'{"instruction": "\xff", "output": "x"}\n' + b"[" * 100_000 + b"\n")
    out = tmp_path / "out.jsonl"
    m = prepare("alpaca", out, input=f, quiet=True)
    assert [r.id for r in read_records(out)] == ["alpaca-0", "7"]  # no "['x', 1]", "None" or "True"
    by = m["skipped"]["by_reason"]
    assert {k: v["count"] for k, v in by.items()} == {"malformed record": 4, "not UTF-8": 1, "malformed json": 1}
    assert [e["at"] for e in by["malformed record"]["examples"]] == [f"{f}:{n}" for n in (2, 3, 4, 6)]
    assert "lone surrogate" in by["malformed record"]["examples"][0]["detail"]
    assert by["not UTF-8"]["examples"] == [{"at": f"{f}:7", "detail": "byte 0xff at column 18"}]
    assert by["malformed json"]["examples"] == [{"at": f"{f}:8", "detail": "nested too deeply"}]


def test_strict_refuses_an_id_the_reader_would_refuse(tmp_path):
    f = _alpaca(tmp_path, [{"instruction": "a", "output": "b"}, {"id": "", "instruction": "a", "output": "b"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(Lav2Error, match=rf"^{f}:2: malformed record \(id must be a non-empty string or an integer"):
        prepare("alpaca", out, input=f, strict=True, quiet=True)
    assert not out.exists()


def test_a_utf8_bom_keeps_the_first_record(tmp_path):
    f = _alpaca(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}],
                prefix=b"\xef\xbb\xbf")
    m = prepare("alpaca", tmp_path / "out.jsonl", input=f, quiet=True)
    assert m["records"] == 2 and m["skipped"]["total"] == 0


def test_an_object_where_the_list_belongs_is_an_error(tmp_path):
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2))
    with pytest.raises(Lav2Error, match=rf"^{f}: one JSON object; expected a JSON list of entries or JSON lines"):
        prepare("alpaca", tmp_path / "out.jsonl", input=f, quiet=True)


def test_coco_ids_are_typed(tmp_path):
    """`image_id: false` is not image 0, a list id is a skip (not a crash), ids are never reprs."""
    doc = {"images": [{"id": 0, "file_name": "0.jpg"}, {"id": 1, "file_name": "1.jpg"}],
           "annotations": [{"id": 1, "image_id": False, "caption": "a"}, {"id": 2, "image_id": [1], "caption": "b"},
                           {"id": [3], "image_id": 1, "caption": "c"}, {"id": 4, "image_id": 0, "caption": "d"}]}
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / "out.jsonl"
    m = prepare("coco", out, annotations=ann, images=tmp_path, check_images=False, quiet=True)
    assert [(r.id, r.output) for r in read_records(out)] == [("coco-4", "d")]
    examples = m["skipped"]["by_reason"]["malformed record"]["examples"]
    assert [e["at"] for e in examples] == [f"{ann}:annotations[{i}]" for i in range(3)]
    assert examples[0]["detail"] == "image_id must be a non-empty string or an integer, not false"


def test_karpathy_non_string_filepath_is_a_skip(tmp_path):
    doc = {"images": [{"filepath": 5, "filename": "a.jpg", "imgid": 1, "sentences": [{"raw": "A.", "sentid": 1}]},
                      {"filepath": "val", "filename": "b.jpg", "imgid": 2, "sentences": [{"raw": "B.", "sentid": 2}]}]}
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / "out.jsonl"
    m = prepare("coco", out, annotations=ann, images=tmp_path, check_images=False, quiet=True)
    assert [r.id for r in read_records(out)] == ["karpathy-2"]
    assert m["skipped"]["by_reason"]["malformed record"]["examples"][0]["at"] == f"{ann}:images[0]"


# -- 12. eval's data file -----------------------------------------------------------------------


def _rec(id: str, instruction: str = "What colour?", output: str = "red") -> dict:
    return {"id": id, "image": None, "instruction": instruction, "input": "", "output": output, "kind": "vqa",
            "source": "test"}


def _lines(f: Path, objs: list) -> Path:
    f.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return f


def test_duplicate_ids_in_data_are_refused_naming_the_line(tmp_path):
    data = _lines(tmp_path / "d.jsonl", [_rec("a"), _rec("b"), _rec("a")])
    preds = _lines(tmp_path / "p.jsonl", [{"id": "a", "prediction": "red"}, {"id": "b", "prediction": "red"}])
    with pytest.raises(Lav2Error) as e:
        evaluate(EvalOptions(task="vqa", data=data, predictions=preds), log=lambda m: None)
    assert str(e.value) == f"{data}:3: duplicate id 'a' (first on line 1)"


def test_lone_surrogate_is_refused_by_the_reader_naming_the_line(tmp_path):
    data = _lines(tmp_path / "d.jsonl", [_rec("a"), _rec("b", "What \ud800?")])
    with pytest.raises(Lav2Error) as e:
        list(read_records(data))
    assert str(e.value) == f"{data}:2: field instruction holds a lone surrogate \\ud800: not text UTF-8 can encode"


def test_non_utf8_byte_is_reported_on_its_line(tmp_path):
    data = _lines(tmp_path / "d.jsonl", [_rec(c) for c in "abcd"])
    with data.open("ab") as f:
        f.write(b'{"id": "e\xe9"}\n')
    with pytest.raises(Lav2Error) as e:
        list(read_records(data))
    assert str(e.value) == f"{data}:5: not UTF-8 (byte 0xe9 at column 10)"


@pytest.mark.parametrize("link", [False, True])
def test_out_equal_to_data_is_refused_untouched(tmp_path, link):
    data = _lines(tmp_path / "d.jsonl", [_rec("a")])
    before = data.read_bytes()
    out = data
    if link:
        out = tmp_path / "same.jsonl"
        out.symlink_to(data)
    with pytest.raises(Lav2Error) as e:
        evaluate(EvalOptions(task="vqa", data=data, out=out, model="none-such-model"), log=lambda m: None)
    assert str(e.value) == f"--out {out} is the --data file: it would be overwritten; choose another name"
    assert data.read_bytes() == before


# -- 13. non-finite adapters --------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_is_refused_naming_the_tensor(run_dir, tmp_path, value):
    d = copy_run(run_dir, tmp_path)
    f = d / "adapter.safetensors"
    sd = load_file(str(f))
    sd["adapter_query.weight"][0, :3] = value
    save_file(sd, str(f))
    with pytest.raises(Lav2Error) as e:
        engine.load(str(d), device="cpu")
    n = sd["adapter_query.weight"].numel()
    assert str(e.value) == (f"{f}: tensor adapter_query.weight holds 3 non-finite value(s) (NaN or infinity) of {n}: "
                            "a diverged or corrupt adapter")


def test_all_nan_adapter_does_not_answer(run_dir, tmp_path, monkeypatch, capsys):
    d = copy_run(run_dir, tmp_path)
    f = d / "adapter.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(f)).items()}, str(f))
    code, out, err = cli(monkeypatch, capsys, "ask", "none", "hi", "--model", str(d), "--max-new-tokens", "2",
                         "--temperature", "0")
    assert code == 1 and out == ""
    assert "non-finite" in one_line(err) and str(f) in err
