"""`lav2 eval TASK`: select units from the records, generate (or score) their predictions in
batches, write them as JSON lines as they come, score them and report.

Predictions file (``--out FILE.jsonl``): one JSON object per unit, appended and flushed as each
batch finishes::

    {"id": "easyvqa-test-q3", "image": "...", "prompt": "...", "prediction": "circle",
     "reference": "circle", "score": 1.0, "correct": true, "model": "runs/joint"}

A rerun with the same ``--out`` resumes: units already in the file are not generated again.
The file must belong to the records (every id one of theirs) and to the same ``--model``;
otherwise the run stops with one line. Metrics go to ``FILE.metrics.json`` beside it (written
atomically) and to stdout (a table, or one JSON object with ``--json``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lav2cli import __version__
from lav2cli.answer import Pipeline, Question, image_batch, marked_self_caption
from lav2cli.data.dataset import Example, collate
from lav2cli.data.records import read_records
from lav2cli.engine import Engine, load
from lav2cli.errors import Lav2Error
from lav2cli.evaluate import tasks as T
from lav2cli.experts import ExpertOptions
from lav2cli.fileio import atomic_file
from lav2cli.inference.generate import Sampling
from lav2cli.model.quant import parse_quantize
from lav2cli.registry import DEFAULT_MODEL
from lav2cli.schema import JSONProblem, parse_json

__all__ = ["EvalOptions", "run", "evaluate", "metrics_path", "read_predictions"]


# the tasks that ask questions about images: they take experts, and a model marked
# self_caption captions each image first (answer.Pipeline.make)
QUESTION_TASKS = ("vqa", "mme")


@dataclass
class EvalOptions:
    task: str
    data: Path  # "-": standard input
    model: str | None = None
    base: str | None = None
    clip: str | None = None
    out: Path | None = None
    batch_size: int = 8
    limit: int | None = None
    as_json: bool = False
    max_new_tokens: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None  # a compiled decode step; None: on CUDA
    predictions: Path | None = None
    short_answer: bool = True  # vqa
    suffix: str = ""  # vqa: appended to every question
    exact_match: bool | None = None  # text: None = when every reference is a short answer
    expert: list[str] = field(default_factory=list)  # vqa, mme: experts whose text joins each prompt
    caption_model: str | None = None
    caption_threshold: float = 0.2
    ocr_engine: str = "rapidocr"
    self_caption: bool = True  # vqa, mme: a model marked self_caption captions each image first
    images_root: Path | None = None  # relative image paths resolve here (default: the records' folder)
    quantize: str = "none"  # the frozen base linears: none, int8, int4[:GROUP] (model.quant)
    repetition_penalty: float = 1.0  # generation (inference.generate.Sampling)

    def expert_options(self) -> ExpertOptions:
        """The experts named (checked); the pipeline adds the model's own caption by its rule."""
        return ExpertOptions.make(self.expert, self.caption_model, self.caption_threshold, self.ocr_engine,
                                  self.device, self.dtype)


def metrics_path(predictions: str | os.PathLike) -> Path:
    """FILE.jsonl -> FILE.metrics.json (any other name: NAME.metrics.json)."""
    p = Path(predictions)
    stem = p.name[:-len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(stem + ".metrics.json")


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


# -- the predictions file --------------------------------------------------------------------


def read_predictions(path: Path, owner: dict[str, str], data: Path, *, model: str | None = None,
                     repair: bool = False, log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Predictions by unit id. `owner` maps every id the records know (record ids, and for
    captions the ids of all records of an image) to its unit id (or "" when the record is not
    scored). Refuses, in one line, a file with an id from elsewhere, a duplicate, a line without
    a text ``prediction``, or (with `model`) lines from another model. With `repair`, a last
    line cut off by an interrupted run is dropped from the file, once every other line has been
    read as one of these predictions (any other file is refused untouched)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise Lav2Error(f"{path}: cannot read predictions: {e.strerror or e}") from None
    lines = raw.split(b"\n")
    torn = False  # a last line the previous run did not finish
    if lines and lines[-1].strip() and repair:
        try:
            json.loads(lines[-1])
        except ValueError:
            # only what this eval writes may be cut: a row starts as _predict writes it, and the
            # lines before it are read (and refused, untouched) below before anything is cut
            if not lines[-1].startswith(b'{"id": "'):
                raise Lav2Error(f"{path}:{len(lines)}: not a predictions file of lav2 eval (its last line is not "
                                "a prediction); left untouched: use another --out") from None
            torn = True
    out: dict[str, dict] = {}
    for lineno, line in enumerate(lines[:-1] if torn else lines, 1):
        if not line.strip():
            continue
        try:
            obj = parse_json(line)
        except JSONProblem as e:
            raise Lav2Error(f"{path}:{lineno}: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise Lav2Error(f"{path}:{lineno}: a prediction needs a string \"id\"")
        rid = obj["id"]
        if rid not in owner:
            raise Lav2Error(f"{path}:{lineno}: prediction id {rid!r} is not among the records of {data} "
                            "(predictions from another data file?)")
        if "prediction" in obj and not isinstance(obj["prediction"], str):
            raise Lav2Error(f"{path}:{lineno}: \"prediction\" must be a string")
        if model is not None and obj.get("model") not in (None, model):
            raise Lav2Error(f"{path}:{lineno}: holds predictions of model {obj.get('model')!r}, not {model!r}; "
                            "use another --out to evaluate another model")
        unit = owner[rid]
        if not unit:
            continue  # a record the task does not score (counted among the skips)
        if unit in out:
            raise Lav2Error(f"{path}:{lineno}: a second prediction for {unit!r}")
        out[unit] = obj
    if torn:
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(lines[-1]))
        if log:
            log(f"{path}: dropped an unfinished last line left by an interrupted run")
    elif repair and lines and lines[-1].strip():  # complete but unterminated: appended lines start on their own
        with open(path, "ab") as f:
            f.write(b"\n")
    return out


# -- generation --------------------------------------------------------------------------------


def _generate(engine: Engine, opts: EvalOptions, units: list[T.Unit], max_new: int, pipeline: Pipeline) -> list[dict]:
    questions = [Question(u.image, *T.prompt_parts(opts.task, u, opts.short_answer, opts.suffix)) for u in units]
    batch = pipeline.prepare(engine, questions)
    outs = engine.generate([p.ids for p in batch.prompts], images=batch.images, image_mask=batch.image_mask,
                           sampling=Sampling(max_new_tokens=max_new, temperature=0.0, top_p=1.0,
                                             repetition_penalty=opts.repetition_penalty))
    rows = []
    for u, p, o in zip(units, batch.prompts, outs):
        pred = engine.tokenizer.decode(o).strip()
        rows.append({"id": u.id, "image": u.image, "prompt": p.text, "prediction": pred,
                     "reference": T.reference_field(opts.task, u), **T.judge(opts.task, u, pred)})
        if pipeline.experts:
            rows[-1]["experts"] = [e.to_json() for e in p.experts]
        if p.domain is not None:
            rows[-1].update(p.domain.to_json())
    return rows


def _losses(engine: Engine, units: list[T.Unit]) -> list[tuple[float, int]]:
    """(mean loss over response tokens, response tokens) per unit: the labels of
    templates.encode_example (prompt masked), teacher forcing, right padding."""
    tpl, tok = engine.template, engine.tokenizer
    max_len = engine.config.llama.max_seq_len
    examples = [Example(*tpl.encode_example(tok, u.instruction, u.input, u.references[0], max_tokens=max_len), None)
                for u in units]
    batch = collate(examples, tok.pad_id, image_fn=None)  # right-padded, the training layout
    images, mask = image_batch(engine, [u.image for u in units])
    with torch.no_grad():
        sums, counts = engine.model.response_nll(batch.tokens.to(engine.device), batch.labels.to(engine.device),
                                                 images, mask)
    return [(float(s) / int(c) if int(c) else 0.0, int(c)) for s, c in zip(sums.tolist(), counts.tolist())]


def _predict(engine: Engine, opts: EvalOptions, todo: list[T.Unit], out: Path, exact_match: bool,
             pipeline: Pipeline) -> dict[str, dict]:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    max_new = opts.max_new_tokens or T.DEFAULT_MAX_NEW_TOKENS[opts.task]
    new: dict[str, dict] = {}
    console = _stderr()
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    # a bar on a terminal only (a log file gets the summary line alone); the file is opened
    # with the first batch's predictions, so that a run failing before them leaves no empty file
    with _Appender(out) as f, Progress(*columns, console=console, transient=True,
                                       disable=not console.is_terminal) as bar:
        job = bar.add_task(f"eval {opts.task}", total=len(todo))
        for start in range(0, len(todo), opts.batch_size):
            batch = todo[start:start + opts.batch_size]
            if opts.task == "text":
                gen = _generate(engine, opts, batch, max_new, pipeline) if exact_match else None
                rows = []
                for k, (u, (loss, n)) in enumerate(zip(batch, _losses(engine, batch))):
                    row = {"id": u.id, "image": u.image, "prompt": engine.template.prompt(u.instruction, u.input),
                           "reference": u.references[0], "loss": round(loss, 6), "tokens": n}
                    if gen is not None:
                        row.update(prediction=gen[k]["prediction"], correct=gen[k]["correct"],
                                   contains=gen[k]["contains"])
                    rows.append(row)
            else:
                rows = _generate(engine, opts, batch, max_new, pipeline)
            for row in rows:
                row["model"] = opts.model
                if opts.quantize != "none":
                    row["quantize"] = opts.quantize
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                new[row["id"]] = row
            f.flush()
            bar.advance(job, len(batch))
    dt = time.perf_counter() - t0
    console.print(f"predicted {len(todo)} {'images' if opts.task == 'caption' else 'records'} in {dt:.1f} s "
                  f"({len(todo) / dt:.2f}/s) -> {out}", markup=False, soft_wrap=True)
    return new


# -- the command -------------------------------------------------------------------------------


def evaluate(opts: EvalOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one evaluation (see the module docstring) and return the metrics object it saved."""
    log = log or (lambda m: _stderr().print(m, markup=False, soft_wrap=True))
    if opts.task not in T.TASKS:
        raise Lav2Error(f"unknown task {opts.task!r} (expected one of {', '.join(T.TASKS)})")
    if opts.batch_size < 1:
        raise Lav2Error("--batch-size must be at least 1")
    named = opts.expert_options()
    if named.experts and opts.task not in QUESTION_TASKS:
        raise Lav2Error(f"experts help answer questions about images: vqa and mme take --expert, {opts.task} does not")
    if named.experts and opts.predictions is not None:
        raise Lav2Error("--expert changes the prompts of a model run; it cannot apply to a --predictions file")
    written = opts.predictions or opts.out  # the predictions file, and its metrics beside it
    if written is not None:
        for flag, f in (("--out", opts.out), ("the metrics file", metrics_path(written))):
            if f is not None and _same_file(f, opts.data):
                raise Lav2Error(f"{flag} {f} is the --data file: it would be overwritten; choose another name")
    opts.quantize = str(parse_quantize(opts.quantize) or "none")
    if opts.quantize != "none" and opts.predictions is not None:
        raise Lav2Error("--quantize changes a model run; it cannot apply to a --predictions file")
    records = list(read_records(opts.data, opts.images_root))  # refuses duplicate ids: each unit is scored once
    if not records:
        raise Lav2Error(f"{opts.data}: no records")
    sel = T.select(opts.task, records)
    for reason, n in sel.skipped.items():
        log(f"skipped {n} record(s): {reason} (e.g. {sel.examples[reason]})")
    units = sel.units[:opts.limit] if opts.limit is not None else sel.units
    if not units:
        reasons = "; ".join(f"{n} {r}" for r, n in sel.skipped.items()) or "none"
        raise Lav2Error(f"{opts.data}: no records to evaluate for {opts.task} (left out: {reasons})")
    owner = {r.id: "" for r in records}
    for u in sel.units:
        for rid in u.record_ids:
            owner[rid] = u.id
    exact_match = opts.exact_match if opts.exact_match is not None else T.wants_exact_match(units)
    speed: dict[str, Any] = {}

    if opts.predictions is not None:
        if opts.task == "text":
            raise Lav2Error("text scores losses from the model: it cannot score a --predictions file")
        pipeline = Pipeline.make(named, marked=False)  # no model runs (and no expert is named)
        preds = read_predictions(opts.predictions, owner, opts.data)
        bad = [p["id"] for p in preds.values() if not isinstance(p.get("prediction"), str)]
        if bad:
            raise Lav2Error(f"{opts.predictions}: prediction {bad[0]!r} has no \"prediction\" text")
        source, where = opts.predictions, metrics_path(opts.predictions)
    else:
        if opts.out is None:
            raise Lav2Error("give --out FILE.jsonl for the predictions (metrics go to FILE.metrics.json)")
        model = opts.model or DEFAULT_MODEL
        opts.model = model
        pipeline = Pipeline.make(named, marked=opts.task in QUESTION_TASKS and marked_self_caption(model),
                                 self_caption=opts.self_caption, log=log)
        preds = {}
        if opts.out.exists():
            preds = read_predictions(opts.out, owner, opts.data, model=model, repair=True, log=log)
            if opts.task == "text":
                incomplete = [k for k, p in preds.items() if "loss" not in p or (exact_match and "prediction" not in p)]
                if incomplete:
                    raise Lav2Error(f"{opts.out}: prediction {incomplete[0]!r} lacks loss or prediction; "
                                    "use another --out")
        _check_experts(preds, pipeline, opts.out)
        _check_quantize(preds, opts.quantize, opts.out)
        todo = [u for u in units if u.id not in preds]
        if preds and todo:
            log(f"resuming: {len(units) - len(todo)} of {len(units)} already in {opts.out}")
        if todo:
            _check_images(todo, opts)
            pipeline.load()  # an expert that cannot run fails before the model loads
            engine = _load(opts)
            pipeline.bind(engine)
            if any(u.image for u in todo) and not engine.can_see:
                log("note: this model has no trained visual branch, so it cannot see the images; "
                    "its answers come from the text alone")
            t0 = time.perf_counter()
            preds.update(_predict(engine, opts, todo, opts.out, exact_match, pipeline))
            speed = {"predicted": len(todo), "predicted_per_s": round(len(todo) / (time.perf_counter() - t0), 3),
                     "device": str(engine.device), "compiled_decode": engine.compile_decode}
        source, where = opts.out, metrics_path(opts.out)

    scored = [u for u in units if u.id in preds]
    if not scored:
        raise Lav2Error(f"{source}: no predictions for the selected records of {opts.data}")
    if len(scored) < len(units):
        log(f"{len(units) - len(scored)} of {len(units)} units have no prediction in {source}; scored the rest")
    if opts.task == "mme":  # a pair whose partner has no prediction cannot give acc+
        have = Counter(u.extra["pair"] for u in scored)
        lonely = [u for u in scored if have[u.extra["pair"]] != 2]
        if lonely:
            log(f"skipped {len(lonely)} MME question(s) whose partner question has no prediction "
                f"(e.g. {lonely[0].id})")
            scored = [u for u in scored if have[u.extra["pair"]] == 2]
            if not scored:
                raise Lav2Error(f"{source}: no MME image with predictions for both its questions")
    result: dict[str, Any] = {"task": opts.task, "data": str(opts.data), "model": opts.model,
                              "predictions": str(source), "n": len(scored)}
    if opts.quantize != "none":
        result["quantize"] = opts.quantize
    if pipeline.experts:
        result["experts"] = pipeline.sources()
    unfamiliar = sum(1 for u in scored if preds[u.id].get("out_of_domain"))
    if unfamiliar:  # answered from the caption and OCR experts (lav2cli.answer)
        result["out_of_domain"] = unfamiliar
    result.update(speed)  # this run's predictions (none when all were in --out or --predictions)
    result.update(T.SCORERS[opts.task](scored, preds))
    if opts.task == "text":
        result["exact_match_reported"] = exact_match
    result["skipped"] = dict(sel.skipped)
    result["lav2_version"] = __version__
    with atomic_file(where) as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    result["metrics_file"] = str(where)
    return result


class _Appender:
    """Appends lines to a file that is created (folder included) only when the first line comes."""

    def __init__(self, path: Path) -> None:
        self.path, self.f = path, None

    def write(self, text: str) -> None:
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "a", encoding="utf-8")
        self.f.write(text)

    def flush(self) -> None:
        if self.f is not None:
            self.f.flush()

    def __enter__(self) -> "_Appender":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.f is not None:
            self.f.close()


def _check_images(units: list[T.Unit], opts: EvalOptions) -> None:
    """Every image is there before the model loads; records copied away from their images get
    the option that points back at them."""
    for image in dict.fromkeys(u.image for u in units if u.image):
        if not os.path.isfile(image):
            if opts.images_root is not None:
                where = f"--images-root {opts.images_root}"
            elif str(opts.data) == "-":
                where = "the current folder"
            else:
                where = f"the folder of {opts.data}"
            raise Lav2Error(f"{image}: image not found (relative image paths resolve against {where}; "
                            "--images-root DIR names the folder they are relative to)")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links too, when both exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist yet
        return Path(a).resolve() == Path(b).resolve()


def _check_experts(preds: dict[str, dict], pipeline: Pipeline, out: Path) -> None:
    """A resumed run must use the experts the file was made with (predictions of images record
    theirs; those without an image have none to compare)."""
    want = pipeline.sources()
    for p in preds.values():
        if p.get("image") is None:
            continue
        got = [[e.get("name"), e.get("source")] for e in p.get("experts", [])]
        if not pipeline.accepts(got):
            raise Lav2Error(f"{out}: holds predictions made with experts {_names(got)}, not {_names(want)}; "
                            "use another --out")


def _check_quantize(preds: dict[str, dict], quantize: str, out: Path) -> None:
    """A resumed run must quantise the base as the file's predictions were made."""
    for p in preds.values():
        if p.get("quantize", "none") != quantize:
            raise Lav2Error(f"{out}: holds predictions made with --quantize {p.get('quantize', 'none')}, not "
                            f"{quantize}; use another --out")


def _names(sources: list[list[str]]) -> str:
    return ", ".join(f"{n} ({s})" for n, s in sources) or "none"


def _load(opts: EvalOptions) -> Engine:
    with _stderr().status(f"loading {opts.model} ...", spinner="dots"):
        engine = load(opts.model, base=opts.base, clip=opts.clip, device=opts.device, dtype=opts.dtype, inference=True,
                      quantize=opts.quantize)
    engine.compile_decode = opts.compile if opts.compile is not None else engine.device.type == "cuda"
    return engine


def run(opts: EvalOptions) -> None:
    """The CLI entry: evaluate, then print the metrics (table, or one JSON line with as_json)."""
    result = evaluate(opts)
    if opts.as_json:
        print(json.dumps(result, ensure_ascii=False), flush=True)
    else:
        render(result)


# -- tables ------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def render(result: dict[str, Any], console=None) -> None:
    """The metrics as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    task = result["task"]
    title = f"lav2 eval {task}: {result['n']} {'images' if task == 'caption' else 'records'} ({result['data']})"
    if result.get("experts"):
        title += " with experts " + ", ".join(n for n, _ in result["experts"])
    if task == "vqa":
        t = Table(title=title)
        for c in ("group", "n", "accuracy %"):
            t.add_column(c, justify="right" if c != "group" else "left")
        t.add_row("overall", str(result["n"]), _pct(result["accuracy"]), style="bold")
        for name, key, top in (("answer type", "per_answer_type", None), ("question", "per_question_type", 10),
                               ("answer", "per_answer", 10)):
            rows = list(result[key].items())
            for k, v in rows[:top]:
                t.add_row(f"{name}: {k}", str(v["n"]), _pct(v["accuracy"]))
            if top and len(rows) > top:
                t.add_row(f"{name}: ({len(rows) - top} more in the metrics file)", "", "")
        console.print(t)
    elif task == "caption":
        t = Table(title=title)
        for c in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"):
            t.add_column(c, justify="right")
        t.add_row(*(f"{100 * result[c]:.1f}" for c in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr")))
        console.print(t)
        console.print(f"(x100; note: {result['note']})", markup=False, soft_wrap=True)
    elif task == "mme":
        t = Table(title=title)
        for c in ("subtask", "category", "questions", "acc %", "acc+ %", "score"):
            t.add_column(c, justify="left" if c in ("subtask", "category") else "right")
        for name, s in result["subtasks"].items():
            t.add_row(name, s["category"], str(s["questions"]), _pct(s["acc"]), _pct(s["acc_plus"]), f"{s['score']:.2f}")
        console.print(t)
        p = result["subtasks_present"]
        console.print(f"perception: {result['perception']:.2f} (of {200 * p['perception']}, {p['perception']}/10 subtasks)"
                      f"   cognition: {result['cognition']:.2f} (of {200 * p['cognition']}, {p['cognition']}/4 subtasks)",
                      markup=False, soft_wrap=True)
    else:
        t = Table(title=title)
        for c in ("loss", "perplexity", "response tokens", "exact match %", "contains answer %"):
            t.add_column(c, justify="right")
        ppl = result["perplexity"]
        t.add_row(f"{result['loss']:.4f}", f"{ppl:.2f}" if math.isfinite(ppl) else "inf", str(result["tokens"]),
                  _pct(result["exact_match"]), _pct(result.get("contains_answer")))
        console.print(t)
    console.print(f"metrics: {result['metrics_file']}", markup=False, soft_wrap=True)
