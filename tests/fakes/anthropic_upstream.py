"""A faithful fake of the Anthropic Messages API, for tests.

Endpoints (the base URL has no ``/v1``, like the Anthropic SDK's ``base_url``):

* ``POST /v1/messages``: a ``message`` body or, with ``"stream": true``, named SSE events in
  Anthropic's order: ``message_start`` (input and cache usage, ``output_tokens: 1``), ``ping``,
  then per block ``content_block_start`` / ``content_block_delta``* / ``content_block_stop``
  (``text_delta``; ``thinking_delta`` + ``signature_delta``; ``tool_use`` with ``input_json_delta``
  fragments, the first one empty as the real API sends), ``message_delta`` (stop reason,
  cumulative ``output_tokens``) and ``message_stop``.
* ``POST /v1/messages/count_tokens``: ``{"input_tokens": N}`` with N = :func:`count_input_tokens`.

Checks like the real API: a key in ``x-api-key`` or ``Authorization: Bearer`` (else 401
``authentication_error``), an ``anthropic-version`` header (else 400), ``model``/``max_tokens``/
``messages`` in message requests, and no ``temperature``/``top_p``/``top_k`` under API version
2026-10-21. Errors use Anthropic's ``{"type":"error","error":{type,message}}`` body and a
``request-id`` header.

What the fake answers is :attr:`FakeAnthropic.answer` (a :class:`FakeAnswer`, read per request).
Knobs: :meth:`FakeAnthropic.fail_next` (status + optional ``retry-after``; 529 is
``overloaded_error``), ``stream_error_after`` (send ``event: error`` after N events of a stream),
``full_delta_usage`` (``message_delta`` repeats input and cache counts, as newer API versions do)
and ``count_tokens`` (override the count). Requests are recorded in ``requests`` with the key
redacted; ``api_key_hint`` keeps its last 4 characters.

The body and event builders (:func:`message_body`, :func:`stream_events`) are pure, so tests
can compare the streamed and non-streamed forms of one answer without a server.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web

from tests.fakes.server import Failure, FakeServer, RecordedRequest, recorded

__all__ = ["FakeAnswer", "FakeAnthropic", "RecordedRequest", "count_input_tokens", "message_body",
           "sse_bytes", "stream_events"]

_encode = msgspec.json.encode
_ERROR_TYPES: Final = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    504: "timeout_error", 529: "overloaded_error",
}
SAMPLING_REMOVED_IN: Final = "2026-10-21"


@dataclass(frozen=True, slots=True)
class FakeAnswer:
    """What the fake says. ``blocks`` are ``{"type": "text", "text"}``, ``{"type": "thinking",
    "thinking", "signature"}`` or ``{"type": "tool_use", "id", "name", "input"}`` dicts."""

    blocks: tuple[dict[str, Any], ...] = ({"type": "text", "text": "Hello from the fake Anthropic upstream."},)
    stop_reason: str = "end_turn"
    input_tokens: int = 25
    output_tokens: int = 12
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    piece_chars: int = 7  # stream fragment size for thinking text and tool-input JSON

    def usage(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens,
        }


def message_body(answer: FakeAnswer, *, msg_id: str, model: str) -> dict[str, Any]:
    """The non-streamed ``message`` for ``answer``."""
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [dict(b) for b in answer.blocks], "stop_reason": answer.stop_reason,
            "stop_sequence": None, "usage": answer.usage()}


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p if i == 0 else " " + p for i, p in enumerate(parts)] if text else []


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), max(1, size))]


def stream_events(answer: FakeAnswer, *, msg_id: str, model: str,
                  full_delta_usage: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, payload)`` pairs of the stream for ``answer``, in the real API's order."""
    start_usage = {**answer.usage(), "output_tokens": 1}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
        ("ping", {"type": "ping"}),
    ]

    def delta(index: int, body: dict[str, Any]) -> None:
        events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": body}))

    for index, block in enumerate(answer.blocks):
        kind = block["type"]
        if kind == "text":
            start: dict[str, Any] = {"type": "text", "text": ""}
        elif kind == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": start}))
        if kind == "text":
            for word in _words(block["text"]):
                delta(index, {"type": "text_delta", "text": word})
        elif kind == "thinking":
            for piece in _pieces(block["thinking"], answer.piece_chars):
                delta(index, {"type": "thinking_delta", "thinking": piece})
            delta(index, {"type": "signature_delta", "signature": block.get("signature", "")})
        else:
            delta(index, {"type": "input_json_delta", "partial_json": ""})
            encoded = _encode(block["input"]).decode() if block["input"] else ""
            for piece in _pieces(encoded, answer.piece_chars):
                delta(index, {"type": "input_json_delta", "partial_json": piece})
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    end_usage: dict[str, int] = answer.usage() if full_delta_usage else {"output_tokens": answer.output_tokens}
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": answer.stop_reason, "stop_sequence": None},
                                     "usage": end_usage}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def sse_bytes(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(payload) + b"\n\n"


def _text_len(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_len(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_len(v) for k, v in value.items() if k not in ("type", "cache_control"))
    return 0


def count_input_tokens(body: dict[str, Any]) -> int:
    """The fake's token count: 3 per message plus ceil(characters / 4) of every string in it,
    the system prompt and the tool definitions."""
    chars = _text_len(body.get("system")) + _text_len(body.get("tools"))
    messages = body.get("messages") or []
    return 3 * len(messages) + math.ceil((chars + _text_len(messages)) / 4)


def error_body(status: int, message: str | None = None) -> bytes:
    kind = _ERROR_TYPES.get(status, "api_error")
    return _encode({"type": "error", "error": {"type": kind, "message": message or f"Fake {kind}."},
                    "request_id": "req_fake"})


@dataclass
class FakeAnthropic(FakeServer):
    """An Anthropic-compatible upstream on ``host:port`` (port 0 picks a free port).

    Use as ``async with FakeAnthropic() as fake: fake.base_url``. Attributes are read on every
    request, so tests may change them between calls. Not thread-safe. Recorded requests have
    ``x-api-key`` / ``authorization`` redacted.
    """

    host: str = "127.0.0.1"
    port: int = 0
    answer: FakeAnswer = field(default_factory=FakeAnswer)
    stream_error_after: int | None = None
    full_delta_usage: bool = False
    count_tokens: int | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    _failures: deque[Failure] = field(default_factory=deque)
    _counter: int = 0

    def fail_next(self, status: int, *, count: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``count`` message/count_tokens requests with ``status`` and an Anthropic error."""
        self._failures.extend(Failure(status, retry_after) for _ in range(count))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        key = (request.headers.get("x-api-key")
               or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        rec = recorded(request, raw, key, secrets=("x-api-key", "authorization"))
        self.requests.append(rec)
        headers, body = rec.headers, rec.body
        if not key:
            return _error(401, "x-api-key header is required")
        if "anthropic-version" not in headers:
            return _error(400, "anthropic-version: header is required")
        if request.method != "POST" or request.path not in ("/v1/messages", "/v1/messages/count_tokens"):
            return _error(404, f"Not found: {request.method} {request.path}")
        if self._failures:
            failure = self._failures.popleft()
            extra = {"retry-after": failure.retry_after} if failure.retry_after else {}
            return _error(failure.status, headers=extra)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body.get("messages"):
            return _error(400, "model: Field required; messages: Field required")
        if request.path.endswith("/count_tokens"):
            count = self.count_tokens if self.count_tokens is not None else count_input_tokens(body)
            return web.json_response({"input_tokens": count})
        if not isinstance(body.get("max_tokens"), int):
            return _error(400, "max_tokens: Field required")
        if headers["anthropic-version"] >= SAMPLING_REMOVED_IN and any(
                k in body for k in ("temperature", "top_p", "top_k")):
            return _error(400, "temperature, top_p and top_k are not supported in this API version")
        self._counter += 1
        msg_id = f"msg_fake{self._counter:08d}"
        if body.get("stream") is not True:
            return web.Response(body=_encode(message_body(self.answer, msg_id=msg_id, model=body["model"])),
                                content_type="application/json", headers={"request-id": f"req_{msg_id}"})
        return await self._stream(request, msg_id, body["model"])

    async def _stream(self, request: web.BaseRequest, msg_id: str, model: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "request-id": f"req_{msg_id}"})
        await resp.prepare(request)
        events = stream_events(self.answer, msg_id=msg_id, model=model, full_delta_usage=self.full_delta_usage)
        if self.stream_error_after is not None:
            events = events[:self.stream_error_after]
            events.append(("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                 "message": "Overloaded"}}))
        await resp.write(b"".join(sse_bytes(name, payload) for name, payload in events))
        await resp.write_eof()
        return resp


def _error(status: int, message: str | None = None, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message), content_type="application/json",
                        headers={"request-id": "req_fake", **(headers or {})})
