"""The OpenAI chat-completions protocol as `lav2 serve` speaks it: a request body checked and
turned into one `answer.Question` (with its decoded image), and the response and stream-chunk
objects. Pure: no torch, no server.

Errors are `ApiError`s, answered as `{"error": {"message", "type", "code", "param"}}` with a 4xx
status, as the OpenAI API does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from lav2cli.answer import Question
from lav2cli.errors import Lav2Error
from lav2cli.model.vision import decode_image
from lav2cli.templates import Turn

if TYPE_CHECKING:
    from PIL.Image import Image

MAX_STOPS = 4  # as the OpenAI API
ROLES = ("system", "developer", "user", "assistant")
# accepted only at their neutral value: lav2 has no such feature
NEUTRAL = {"n": 1, "logprobs": False, "top_logprobs": 0,
           "tools": [], "tool_choice": "none", "functions": [], "logit_bias": {}}


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type and code, the parameter."""

    def __init__(self, status: int, message: str, code: str | None, *, type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param=param)


@dataclass
class ChatRequest:
    """A checked chat-completions request."""

    model: str
    question: Question  # the conversation: the last user message, earlier turns, system, image key
    images: dict[str, "Image"]  # decoded images by key (Question.image names one)
    max_tokens: int | None  # None: as many as the server allows
    temperature: float
    top_p: float
    seed: int | None
    stops: tuple[str, ...]
    stream: bool = False
    frequency_penalty: float = 0.0  # as generate.Sampling: over the answer's own tokens
    presence_penalty: float = 0.0
    include_usage: bool = False
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class Limits:
    """What the server allows: its model's name, sampling defaults, where local images may be."""

    model: str
    temperature: float = 0.1  # lav2 ask's defaults, used when a request names none
    top_p: float = 0.75
    local_images: Path | None = None  # --allow-local-images DIR


def _number(data: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = data.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise invalid(f"'{name}' must be a number from {lo:g} to {hi:g}, got {v!r}", name)
    return float(v)


def _integer(data: dict, name: str, lo: int | None = None) -> int | None:
    v = data.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        raise invalid(f"'{name}' must be an integer" + (f" of at least {lo}" if lo is not None else "") + f", got {v!r}",
                      name)
    return v


def _stops(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > MAX_STOPS:
        raise invalid(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    return tuple(s for s in items if s)


def parse_chat_request(data: Any, limits: Limits) -> ChatRequest:
    """Check a decoded JSON body; decode its image. Raises ApiError."""
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    model = data.get("model") or limits.model
    if model != limits.model:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{limits.model}'",
                       "model_not_found", param="model")
    for name, neutral in NEUTRAL.items():
        if data.get(name) not in (None, neutral):
            raise invalid(f"'{name}' is not supported by lav2 serve (only {neutral!r})", name, "unsupported_parameter")
    if data.get("response_format") not in (None, {"type": "text"}):
        raise invalid("'response_format' is not supported by lav2 serve (only text)", "response_format",
                      "unsupported_parameter")
    max_tokens = _integer(data, "max_completion_tokens", 1)
    max_tokens = _integer(data, "max_tokens", 1) if max_tokens is None else max_tokens
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false", "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    question, images = conversation(data.get("messages"), limits)
    return ChatRequest(
        model=model, question=question, images=images, max_tokens=max_tokens,
        temperature=_number(data, "temperature", limits.temperature, 0.0, 2.0),
        top_p=_number(data, "top_p", limits.top_p, 0.0, 1.0), seed=_integer(data, "seed"),
        stops=_stops(data.get("stop")), stream=stream, include_usage=bool(options.get("include_usage")),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0))


def conversation(messages: Any, limits: Limits) -> tuple[Question, dict[str, "Image"]]:
    """The messages as one Question: system and developer messages joined as the system message,
    consecutive messages of one speaker joined, earlier exchanges as history, the last user
    message as the instruction; the one image any user message carries."""
    if messages is None:
        raise invalid("'messages' is required: a list of {role, content} objects", "messages",
                      "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of {role, content} objects", "messages")
    system: list[str] = []
    said: list[tuple[str, str]] = []  # (user|assistant, text), one speaker per entry
    images: dict[str, "Image"] = {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise invalid(f"{where} must be an object with a role of {', '.join(ROLES)}", where)
        role = m["role"]
        if m.get("tool_calls") or m.get("function_call"):
            raise invalid(f"{where}: tool calls are not supported by lav2 serve", where, "unsupported_parameter")
        text = _content(m.get("content"), role, where, limits, images)
        if role in ("system", "developer"):
            system.append(text)
        elif said and said[-1][0] == role:
            said[-1] = (role, f"{said[-1][1]}\n\n{text}".strip())
        else:
            said.append((role, text))
    if not said or said[-1][0] != "user":
        raise invalid("the last message must be the user's: it is what the model answers", "messages")
    if not said[-1][1].strip():
        raise invalid("the last user message has no text: ask a question (with or without an image)", "messages")
    history, pending_user = [], ""
    for role, text in said[:-1]:
        if role == "user":
            pending_user = text
        else:
            history.append(Turn(pending_user, text))
            pending_user = ""
    if len(images) > 1:
        raise invalid(f"the messages carry {len(images)} different images; lav2 models read one image per "
                      "conversation: start a new conversation for another image", "messages", "too_many_images")
    image = next(iter(images), None)
    return Question(image, said[-1][1], history=tuple(history), system="\n\n".join(s for s in system if s)), images


def _content(content: Any, role: str, where: str, limits: Limits, images: dict[str, "Image"]) -> str:
    """A message's text; its image parts decoded into `images` (by content hash)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"].strip())
        elif kind == "image_url":
            if role != "user":
                raise invalid(f"{pw}: only user messages may carry images", pw)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url:
                raise invalid(f"{pw}: image_url must be {{\"url\": \"data:image/png;base64,...\"}}", pw)
            key, image = load_image_url(url, pw, limits.local_images)
            images.setdefault(key, image)
        else:
            raise invalid(f"{pw}: expected a part of type text or image_url", pw)
    return "\n".join(t for t in texts if t)


def load_image_url(url: str, where: str, local_dir: Path | None) -> tuple[str, "Image"]:
    """(key, image) for an image_url: a data: URL (base64), or a local file when the server allows
    a folder; remote URLs are refused (the server fetches nothing). The key is the bytes' hash, so
    the experts read one image once however it arrives."""
    if url.startswith("data:"):
        head, comma, payload = url.partition(",")
        if not comma or not head.endswith(";base64"):
            raise ApiError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", "invalid_image",
                           param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data: URL is not valid base64", "invalid_image", param=where) from None
        name = f"{where} (data: URL)"
    elif urlparse(url).scheme in ("http", "https", "ftp"):
        raise ApiError(400, f"{where}: remote image URLs are refused: this server fetches nothing from the "
                            "network; send the image inline as a data: URL (data:image/png;base64,...)",
                       "remote_image_refused", param=where)
    else:
        data, name = _local_file(url, where, local_dir)
    try:
        image = decode_image(io.BytesIO(data), name)
    except Lav2Error as e:
        raise ApiError(400, f"{e}", "invalid_image", param=where) from None
    return "sha256:" + hashlib.sha256(data).hexdigest(), image


def _local_file(url: str, where: str, local_dir: Path | None) -> tuple[bytes, str]:
    if local_dir is None:
        raise ApiError(400, f"{where}: local image paths are refused: start the server with --allow-local-images DIR "
                            "to allow files in DIR, or send the image inline as a data: URL",
                       "local_image_refused", param=where)
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        raise ApiError(400, f"{where}: unsupported image URL scheme {parsed.scheme!r} (use a data: URL)",
                       "invalid_image", param=where)
    raw = unquote(parsed.path) if parsed.scheme == "file" else url
    root = local_dir.resolve()
    path = (root / raw).resolve()  # an absolute path stays absolute
    if not path.is_relative_to(root):
        raise ApiError(400, f"{where}: {raw} is outside the folder this server may read images from",
                       "local_image_refused", param=where)
    if not path.is_file():
        raise ApiError(400, f"{where}: {raw}: no such image file in the allowed folder", "invalid_image", param=where)
    return path.read_bytes(), os.fspath(raw)


# -- responses ---------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(req: ChatRequest, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A chat.completion object; `extra` adds lav2's own fields (the experts' text)."""
    return {
        "id": req.id, "object": "chat.completion", "created": req.created, "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None, **(extra or {}),
    }


def chunk(req: ChatRequest, delta: dict[str, Any] | None, finish_reason: str | None = None,
          use: dict[str, int] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A chat.completion.chunk: one delta (None: the usage chunk, with no choices)."""
    out: dict[str, Any] = {"id": req.id, "object": "chat.completion.chunk", "created": req.created,
                           "model": req.model, "system_fingerprint": None}
    out["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish_reason}]
    if use is not None or req.include_usage:
        out["usage"] = use
    out.update(extra or {})
    return out


def models(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "lav2"}]}
