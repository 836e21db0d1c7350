"""A faithful fake of Ollama's native ``POST /api/chat``, for adapter tests.

``stream`` defaults to true as in Ollama: the answer is ``application/x-ndjson``, one JSON object
per line (``{model, created_at, message{role, content, thinking?, tool_calls?}, done: false}``:
thinking words, then content words, then all tool calls on one line), ending with the
``done: true`` line carrying ``done_reason``, ``prompt_eval_count``, ``eval_count`` and the
``*_duration`` fields (nanoseconds). ``"stream": false`` returns that final object with the whole
message. Tool calls come without ids and with ``arguments`` as an object, unless the scripted
answer says otherwise.

What it answers: the next queued :class:`OllamaAnswer`, else ``answer``, else ``words`` words.
``options.num_predict`` below the answer's word count cuts the content with ``done_reason:
"length"``. Counts: ``prompt_eval_count`` is ``ceil(chars / 4)`` of all message text, ``eval_count``
the words emitted (+1 per tool call), both overridable on the answer.

Validation follows Ollama's Go decoder where our translation could go wrong: message roles,
``content`` a string, ``images`` raw base64 (a data-URL prefix fails like Ollama's "illegal base64
data"), tool-call ``arguments`` an object, ``format`` "json" or a schema object, ``think`` a bool
or a level. Errors are ``{"error": "..."}``; unknown models (when ``models`` is set) are 404.

Knobs: ``fail_next(status, message=...)``, ``truncate_after`` (close the connection after N lines),
``error_after`` (an ``{"error": ...}`` line after N lines, as Ollama reports a failure once the
stream has started). Requests are recorded in ``requests`` with any Authorization redacted.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web

from tests.fakes.server import Failure, FakeServer, RecordedRequest, recorded, write_stream

__all__ = ["FakeOllama", "OllamaAnswer"]

_CREATED_AT: Final = "2025-01-01T00:00:00.000000Z"
_ROLES: Final = {"system", "user", "assistant", "tool"}
_EOF_ERROR: Final = b'{"error":"an error was encountered while running the model: unexpected EOF"}\n'


@dataclass(slots=True)
class OllamaAnswer:
    """One scripted answer. ``tool_calls`` are Ollama tool calls verbatim
    (``{"function": {"name", "arguments": {...}}}``, optionally ``"id"``)."""

    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    done_reason: str = "stop"
    prompt_eval_count: int | None = None
    eval_count: int | None = None


class _Invalid(ValueError):
    pass


class FakeOllama(FakeServer):
    """The fake on ``host:port`` (port 0 picks one). Not thread-safe; exit is idempotent.

    ``base_url`` is the provider ``base_url``, e.g. ``http://127.0.0.1:41234`` (no ``/api``).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, words: int = 5) -> None:
        self.host, self.port, self.words = host, port, words
        self.answer: OllamaAnswer | None = None
        self.models: set[str] | None = None
        self.truncate_after: int | None = None
        self.error_after: int | None = None
        self.requests: list[RecordedRequest] = []
        self._queue: deque[OllamaAnswer] = deque()
        self._failures: deque[Failure] = deque()

    def queue(self, *answers: OllamaAnswer) -> None:
        self._queue.extend(answers)

    def fail_next(self, status: int, *, count: int = 1, message: str | None = None) -> None:
        self._failures.extend(Failure(status, message=message) for _ in range(count))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read() if request.body_exists else b""
        self._record(request, raw)
        if (request.method, request.path) != ("POST", "/api/chat"):
            return web.Response(status=404, text="404 page not found")
        if self._failures:
            failure = self._failures.popleft()
            return _error(failure.status, failure.message or f"fake failure {failure.status}")
        try:
            body = msgspec.json.decode(raw)
            _validate(body)
        except msgspec.DecodeError:
            return _error(400, "invalid character in JSON body")
        except _Invalid as exc:
            return _error(400, str(exc))
        model = body["model"]
        if self.models is not None and model not in self.models:
            return _error(404, f'model "{model}" not found, try pulling it first')
        answer = self._queue.popleft() if self._queue else self.answer or OllamaAnswer(
            content=" ".join(f"word{i}" for i in range(self.words)))
        lines = _lines(answer, body)
        if body.get("stream", True) is False:
            final = lines[-1]
            reply: dict[str, Any] = {"role": "assistant",
                                     "content": "".join(line["message"]["content"] for line in lines)}
            thinking = "".join(line["message"].get("thinking", "") for line in lines)
            if thinking:
                reply["thinking"] = thinking
            if answer.tool_calls:
                reply["tool_calls"] = answer.tool_calls
            return web.json_response({**final, "message": reply})
        frames = [msgspec.json.encode(line) + b"\n" for line in lines]
        return await write_stream(request, "application/x-ndjson", frames, drop_at=self.truncate_after,
                                  error_at=self.error_after, error=_EOF_ERROR)

    def _record(self, request: web.BaseRequest, raw: bytes) -> None:
        auth = request.headers.get("authorization", "")
        self.requests.append(recorded(request, raw, auth, secrets=("authorization",) if auth else (),
                                      mask="Bearer <redacted>"))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _validate(body: Any) -> None:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise _Invalid("model is required")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _Invalid("messages is required")
    for i, msg in enumerate(messages):
        if msg.get("role") not in _ROLES:
            raise _Invalid(f"invalid role: {msg.get('role')!r} (messages[{i}])")
        if not isinstance(msg.get("content", ""), str):
            raise _Invalid("json: cannot unmarshal array into Go struct field Message.messages.content of type string")
        for image in msg.get("images") or []:
            try:
                base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise _Invalid("illegal base64 data at input byte 4") from None
        for call in msg.get("tool_calls") or []:
            if not isinstance((call.get("function") or {}).get("arguments"), dict):
                raise _Invalid("json: cannot unmarshal string into Go struct field ToolCallFunction.messages."
                               "tool_calls.function.arguments of type api.ToolCallFunctionArguments")
    fmt = body.get("format")
    if fmt is not None and fmt != "json" and not isinstance(fmt, dict):
        raise _Invalid(f"invalid format: {fmt!r}")
    think = body.get("think")
    if think is not None and not isinstance(think, bool) and think not in ("low", "medium", "high"):
        raise _Invalid(f"invalid think value: {think!r}")
    if not isinstance(body.get("options", {}), dict):
        raise _Invalid("options must be an object")


def _lines(answer: OllamaAnswer, body: dict[str, Any]) -> list[dict[str, Any]]:
    model = body["model"]

    def line(**message: Any) -> dict[str, Any]:
        return {"model": model, "created_at": _CREATED_AT, "message": {"role": "assistant", **message},
                "done": False}

    words = re.findall(r"\s*\S+\s*", answer.content)
    cap = (body.get("options") or {}).get("num_predict")
    done_reason = answer.done_reason
    if isinstance(cap, int) and 0 < cap < len(words):
        words, done_reason = words[:cap], "length"
    lines = [line(content="", thinking=t) for t in re.findall(r"\s*\S+\s*", answer.thinking)]
    lines += [line(content=w) for w in words]
    if answer.tool_calls:
        lines.append(line(content="", tool_calls=answer.tool_calls))
    chars = sum(len(m.get("content") or "") for m in body["messages"])
    prompt = answer.prompt_eval_count if answer.prompt_eval_count is not None else math.ceil(chars / 4)
    evals = answer.eval_count if answer.eval_count is not None else (
        len(words) + len(answer.thinking.split()) + len(answer.tool_calls))
    final = line(content="")
    final.update(done=True, done_reason=done_reason, total_duration=1_000_000, load_duration=100_000,
                 prompt_eval_count=prompt, prompt_eval_duration=200_000, eval_count=evals, eval_duration=700_000)
    return [*lines, final]
