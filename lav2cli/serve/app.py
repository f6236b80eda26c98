"""The HTTP side of `lav2 serve`: a Starlette app on uvicorn.

- `GET /`: the chat page (plain HTML and JavaScript, `page.html`);
- `GET /health`: liveness and the scheduler's counters;
- `GET /v1/models`, `POST /v1/chat/completions` (OpenAI's chat API, JSON or server-sent events).

With an API key, every /v1 request needs `Authorization: Bearer KEY`. Request bodies above the
limit are refused with 413. Every refusal is OpenAI's JSON error object, and the server keeps
serving. uvicorn turns SIGTERM and SIGINT into a graceful shutdown: no new connections, the
requests in flight finish, then the worker stops.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lav2cli.errors import Lav2Error
from lav2cli.serve import protocol
from lav2cli.serve.protocol import ApiError, ChatRequest, Limits
from lav2cli.serve.scheduler import Job, Scheduler

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# a client that stops reading the body of a refused upload: how much more is read (and dropped)
# so that it still gets the 413 rather than a reset connection
DRAIN_FACTOR = 8


@dataclass(frozen=True)
class Settings:
    limits: Limits
    api_key: str | None = None
    max_body: int = 16 * 2**20  # bytes


def error_response(e: ApiError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class ApiKey:
    """ASGI middleware: /v1 requests need `Authorization: Bearer KEY`."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key and scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
                what = "No API key provided" if not given else "Incorrect API key provided"
                await error_response(ApiError(401, f"{what}: send the server's key as 'Authorization: Bearer KEY'",
                                              "invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or ApiError 413 when it is over `limit` bytes (the rest is read and dropped, up
    to a bound, so that the client reads the answer)."""
    declared = request.headers.get("content-length", "")
    size, parts = 0, []
    over = declared.isdigit() and int(declared) > limit
    async for part in request.stream():
        size += len(part)
        if size > limit:
            over = True
        if over:
            parts.clear()
            if size > DRAIN_FACTOR * limit:
                break
        else:
            parts.append(part)
    if over:
        raise ApiError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-mb)",
                       "request_too_large")
    return b"".join(parts)


class Answer:
    """The ASGI response of one chat completion: waits for the job's first event (an error is
    answered with its status), then JSON or a server-sent event stream. A client that goes away
    cancels the job."""

    def __init__(self, req: ChatRequest, job: Job, events: "asyncio.Queue[tuple]"):
        self.req, self.job, self.events = req, job, events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.job.cancel()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self._respond(scope, receive, send)
            except OSError:  # the client is gone
                pass
            finally:
                self.job.cancel()  # no effect once the job has ended
                tg.cancel_scope.cancel()

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await self.events.get()
        if first[0] == "error":
            await error_response(first[1])(scope, receive, send)
            return
        _, prompt_tokens, experts = first
        extra = {"lav2": {"experts": experts}}
        if not self.req.stream:
            texts = []
            async for event in self._rest():
                if event[0] == "text":
                    texts.append(event[1])
                elif event[0] == "error":
                    await error_response(event[1])(scope, receive, send)
                    return
                else:
                    _, reason, _, completion_tokens = event
            body = protocol.completion(self.req, "".join(texts), reason, prompt_tokens, completion_tokens, extra)
            await JSONResponse(body)(scope, receive, send)
            return
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        headers += [(k.encode(), v.encode()) for k, v in SSE_HEADERS.items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        await event(protocol.chunk(self.req, {"role": "assistant", "content": ""}, extra=extra))
        async for ev in self._rest():
            if ev[0] == "text":
                await event(protocol.chunk(self.req, {"content": ev[1]}))
            elif ev[0] == "error":
                await event(ev[1].body())
                break
            else:
                _, reason, _, completion_tokens = ev
                await event(protocol.chunk(self.req, {}, reason))
                if self.req.include_usage:
                    await event(protocol.chunk(self.req, None, use=protocol.usage(prompt_tokens, completion_tokens)))
                await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _rest(self) -> AsyncIterator[tuple]:
        while True:
            ev = await self.events.get()
            yield ev
            if ev[0] in ("end", "error"):
                return


def create_app(scheduler: Scheduler, settings: Settings) -> Starlette:
    limits = settings.limits
    page = resources.files("lav2cli.serve").joinpath("page.html").read_text(encoding="utf-8")
    created = int(time.time())

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": limits.model, **scheduler.health()})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(protocol.models(limits.model, created))

    async def chat(request: Request) -> Any:
        body = await read_body(request, settings.max_body)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
        req = await run_in_threadpool(protocol.parse_chat_request, data, limits)  # images decode off the loop
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple] = asyncio.Queue()

        def emit(event: tuple) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass

        q = req.question
        job = Job(q, req.images, req.max_tokens, req.temperature, req.top_p, req.seed, req.stops, emit,
                  penalties=(req.frequency_penalty, req.presence_penalty))
        scheduler.submit(job)
        return Answer(req, job, events)

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)  # type: ignore[arg-type]

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        e: HTTPException = exc  # type: ignore[assignment]
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error",
                                       type="server_error"))

    routes = [Route("/", index), Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat, methods=["POST"])]

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = Starlette(routes=routes, lifespan=asynccontextmanager(lifespan),
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.add_middleware(ApiKey, key=settings.api_key)
    return app


def check_port(host: str, port: int) -> None:
    """Fail in one line before the model loads when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Lav2Error(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise Lav2Error(f"cannot listen on {host}:{port}: {e.strerror}") from None


def run(scheduler: Scheduler, settings: Settings, *, host: str, port: int, log_level: str = "info",
        log: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT (uvicorn's graceful shutdown)."""
    app = create_app(scheduler, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=None, server_header=False)
    if log is not None:
        where = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        log(f"lav2 serve: {settings.limits.model} on {where} (chat page: {where}/, API: {where}/v1)")
    uvicorn.Server(config).run()


def local_images_dir(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        raise Lav2Error(f"--allow-local-images {path}: not a folder")
    return p.resolve()
