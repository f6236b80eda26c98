"""Batched generation for `lav2 serve`: requests that arrive together are answered in one
`Engine.generate` call, through the answer pipeline (`answer.Pipeline`: experts and
self-captioning included) on one worker thread, the only one that touches the model.

The worker takes the oldest waiting request and every other waiting one that can share its
sampling (all greedy requests; sampled ones with the same temperature and top_p; a request with
a seed and a temperature above 0 is decoded alone, so that its seed alone decides its tokens), up
to `max_batch`. When it was idle it first waits `wait_s` for companions. A row stops when its
client is gone (`Job.cancel`), at a stop string or at its own max_tokens; the batch ends when no
row runs.

A job reports through `Job.emit`: ("start", prompt_tokens, experts), ("text", delta)...,
("end", finish_reason, prompt_tokens, completion_tokens); or ("error", ApiError).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from lav2cli.answer import Pipeline, Question
from lav2cli.engine import Engine
from lav2cli.inference.generate import Sampling
from lav2cli.serve.protocol import ApiError
from lav2cli.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from PIL.Image import Image


class AnswerText:
    """The answer's visible text as pieces arrive: leading and trailing whitespace dropped (as
    `lav2 ask` strips its answer) and cut before the first stop string. `push` returns only text
    no later piece can take back, so a stream's deltas add up to the plain answer."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.raw = ""
        self.shown = ""
        self.stopped = False  # a stop string was found: the rest is not the answer's

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that may be the start of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _show(self, upto: str) -> str:
        new = upto[len(self.shown):]
        self.shown = upto
        return new

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.raw += piece
        text = self.raw.lstrip()
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            return self._show(text[:min(cuts)].rstrip())
        return self._show(text[:len(text) - self._held(text)].rstrip())

    def finish(self) -> str:
        """The rest of the answer, once no piece follows."""
        if self.stopped:
            return ""
        return self._show(self.raw.strip())


@dataclass
class Job:
    """One request in the scheduler."""

    question: Question
    images: dict[str, "Image"]  # decoded images by key (question.image names one)
    max_tokens: int | None  # None: the server's default, within the context
    temperature: float
    top_p: float
    seed: int | None
    stops: tuple[str, ...]
    emit: Callable[[tuple], None]  # called from the worker thread
    penalties: tuple[float, float] = (0.0, 0.0)  # frequency, presence (generate.Sampling)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    # the worker's
    ids: list[int] | None = None
    image_row: torch.Tensor | None = None
    limit: int = 0
    decoder: StreamDecoder | None = None
    text: AnswerText | None = None
    experts: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None

    def cancel(self) -> None:
        """The client is gone: the row stops at its next token (or the job never starts)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def key(self, serial: int) -> tuple:
        """Jobs with equal keys can share one generate call."""
        if self.temperature <= 0:
            return ("greedy", self.penalties)
        if self.seed is not None:
            return ("seeded", serial)
        return ("sampled", self.temperature, self.top_p, self.penalties)


@dataclass
class Stats:
    requests: int = 0  # submitted
    completed: int = 0
    cancelled: int = 0  # clients gone before their answer ended
    errors: int = 0
    batches: int = 0  # generate calls
    largest_batch: int = 0
    completion_tokens: int = 0  # generated, cancelled rows' included


class Scheduler:
    """The worker thread and its queue. `submit` from any thread; `start` and `stop` from the
    server's lifespan."""

    def __init__(self, engine: Engine, pipeline: Pipeline, *, max_batch: int = 8, wait_s: float = 0.02,
                 default_max_tokens: int = 256, log: Callable[[str], None] | None = None):
        self.engine, self.pipeline = engine, pipeline
        self.max_batch, self.wait_s, self.default_max_tokens = max_batch, wait_s, default_max_tokens
        self.context = engine.config.llama.max_seq_len
        self.log = log or (lambda m: None)
        self.stats = Stats()
        self.running = 0
        self._pending: deque[tuple[int, Job]] = deque()
        self._serial = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lav2-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the queued jobs, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def submit(self, job: Job) -> None:
        with self._cond:
            self._serial += 1
            self._pending.append((self._serial, job))
            self.stats.requests += 1
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                idle = not self._pending
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                if idle:  # a first request after a quiet spell: let its companions arrive
                    deadline = time.monotonic() + self.wait_s
                    while len(self._pending) < self.max_batch and not self._stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                jobs = self._take()
                self.running = len(jobs)
            try:
                if jobs:
                    self._serve(jobs)
            except Exception as e:  # the server keeps serving; these requests get a 500
                self.log("lav2 serve: error in a batch:\n" + traceback.format_exc())
                for j in jobs:
                    if j.finish_reason is None:
                        self._fail(j, ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error",
                                               type="server_error"))
            finally:
                self.running = 0

    def _take(self) -> list[Job]:
        """The oldest waiting job and those that can share its batch (called holding the lock)."""
        while self._pending and self._pending[0][1].cancelled:
            self._pending.popleft()
            self.stats.cancelled += 1
        if not self._pending:
            return []
        serial, first = self._pending[0]
        key = first.key(serial)
        taken, kept = [], deque()
        for s, j in self._pending:
            if j.cancelled:
                self.stats.cancelled += 1
            elif len(taken) < self.max_batch and j.key(s) == key:
                taken.append(j)
            else:
                kept.append((s, j))
        self._pending = kept
        return taken

    def _fail(self, job: Job, error: ApiError) -> None:
        job.finish_reason = "error"
        self.stats.errors += 1
        job.emit(("error", error))

    def _serve(self, jobs: list[Job]) -> None:
        ready = [j for j in self._prepare(jobs) if self._fits(j)]
        for j in ready:
            j.emit(("start", len(j.ids), j.experts))
        # rows share one cache: a batch holds its longest prompt plus its longest answer
        group: list[Job] = []
        for j in ready:
            longest = max([len(g.ids) for g in group] + [len(j.ids)])
            budget = max([g.limit for g in group] + [j.limit])
            if group and longest + budget > self.context:
                self._generate(group)
                group = []
            group.append(j)
        if group:
            self._generate(group)

    def _prepare(self, jobs: list[Job]) -> list[Job]:
        """The answer pipeline's prompts (the experts read the images) for the whole batch at
        once; one job at a time when the batch fails, so that one bad request fails alone."""
        try:
            return self._prepare_batch(jobs)
        except Exception:
            if len(jobs) == 1:
                raise
        ok = []
        for j in jobs:
            try:
                ok += self._prepare_batch([j])
            except Exception as e:
                self.log(f"lav2 serve: a request failed in the answer pipeline: {type(e).__name__}: {e}")
                self._fail(j, ApiError(500, f"the answer pipeline failed: {e}", "server_error", type="server_error"))
        return ok

    def _prepare_batch(self, jobs: list[Job]) -> list[Job]:
        loaded = {k: im for j in jobs for k, im in j.images.items()}
        batch = self.pipeline.prepare(self.engine, [j.question for j in jobs], loaded)
        for i, (j, prompt) in enumerate(zip(jobs, batch.prompts)):
            j.ids = prompt.ids
            seen = batch.images is not None and bool(batch.image_mask[i])
            j.image_row = batch.images[i] if seen else None
            j.experts = [e.to_json() for e in prompt.experts]
        return jobs

    def _fits(self, job: Job) -> bool:
        """Set the job's token limit within the context, or fail it (400) when it cannot fit."""
        n, ctx = len(job.ids), self.context
        if n + (job.max_tokens or 1) > ctx:
            asked = f" plus max_tokens {job.max_tokens}" if job.max_tokens else ""
            self._fail(job, ApiError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {n} "
                                          f"tokens (template and experts' context included){asked}. Shorten the "
                                          "messages" + (" or max_tokens." if job.max_tokens else "."),
                                     "context_length_exceeded", param="messages"))
            return False
        job.limit = job.max_tokens or min(self.default_max_tokens, ctx - n)
        return True

    def _generate(self, group: list[Job]) -> None:
        eng = self.engine
        for j in group:
            j.decoder, j.text = StreamDecoder(eng.tokenizer), AnswerText(j.stops)
        images = mask = None
        rows = [j.image_row for j in group]
        if any(r is not None for r in rows):
            shape = next(r for r in rows if r is not None).shape
            images = torch.stack([r if r is not None else torch.zeros(shape, dtype=eng.dtype, device=eng.device)
                                  for r in rows])
            mask = torch.tensor([r is not None for r in rows], device=eng.device)
        first = group[0]
        sampling = Sampling(max_new_tokens=max(j.limit for j in group), temperature=first.temperature,
                            top_p=first.top_p, seed=first.seed, frequency_penalty=first.penalties[0],
                            presence_penalty=first.penalties[1])
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(group))

        def on_token(row: int, ids: list[int]) -> bool:
            j = group[row]
            self.stats.completion_tokens += 1
            j.tokens = len(ids)
            if j.cancelled:
                j.finish_reason = "cancelled"
                return True
            delta = j.text.push(j.decoder.push(ids[-1]))
            if delta:
                j.emit(("text", delta))
            if j.text.stopped:
                j.finish_reason = "stop"
            elif j.tokens >= j.limit:
                j.finish_reason = "length"
            return j.finish_reason is not None

        eng.generate([j.ids for j in group], images=images, image_mask=mask, sampling=sampling, on_token=on_token)
        for j in group:
            if j.finish_reason == "cancelled":
                self.stats.cancelled += 1
                j.emit(("end", "cancelled", len(j.ids), j.tokens))
                continue
            delta = j.text.push(j.decoder.flush()) + j.text.finish()
            if delta:
                j.emit(("text", delta))
            self.stats.completed += 1
            j.emit(("end", j.finish_reason or "stop", len(j.ids), j.tokens))

    def health(self) -> dict[str, Any]:
        return {"queued": self.queued, "running": self.running, "max_batch": self.max_batch,
                "context": self.context, **vars(self.stats)}
