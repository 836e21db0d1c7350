"""A fake OpenAI Responses endpoint on 127.0.0.1, for the native passthrough path.

``POST /v1/responses`` answers with a fixed Response (text ``answer``, usage from ``usage``), or
with ``"stream": true`` a named SSE stream: ``response.created``, ``response.in_progress``, the
message item with one ``output_text.delta`` per word, then ``response.completed``. Its canned
bytes are written here, independently of the gateway's own renderer.

Knobs (attributes): ``fail_status`` (answer with an OpenAI error body, ``retry_after`` adds the
header), ``truncate`` (stream: close after the deltas, with no terminal event), ``error_event``
(stream: send an ``error`` event instead of the terminal one), ``keepalive`` (stream: an SSE
comment between events), ``multiline`` (stream: one event's JSON split over two ``data:``
lines). Requests are recorded as ``(path, headers, body)`` with Authorization redacted.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from tests.fakes.server import FakeServer, redacted_headers

__all__ = ["USAGE", "FakeResponses"]

USAGE: dict[str, Any] = {
    "input_tokens": 120, "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 5},
    "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 12}, "total_tokens": 150,
}


class FakeResponses(FakeServer):
    _base_path = "/v1"

    def __init__(self, *, answer: str = "hello from responses") -> None:
        self.host, self.port = "127.0.0.1", 0
        self.answer = answer
        self.usage = USAGE
        self.fail_status: int | None = None
        self.retry_after: str | None = None
        self.truncate = False
        self.error_event = False
        self.keepalive = False
        self.multiline = False
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.sent: list[bytes] = []  # the stream bytes of the last streamed answer

    def _make_runner(self) -> web.BaseRunner:
        app = web.Application()
        app.router.add_post("/v1/responses", self._handle)
        return web.AppRunner(app, access_log=None)

    def response(self, status: str, text: str | None) -> dict[str, Any]:
        output = [] if text is None else [{
            "type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        return {"id": "resp_fake", "object": "response", "created_at": 1700000000, "status": status,
                "model": "gpt-fake", "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "usage": self.usage if status == "completed" else None}

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = msgspec.json.decode(await request.read())
        headers = redacted_headers(request, ("authorization",))
        self.requests.append((request.path, headers, body))
        if self.fail_status is not None:
            extra = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response({"error": {"message": "fake failure", "type": "server_error", "code": None}},
                                     status=self.fail_status, headers=extra)
        if not body.get("stream"):
            return web.json_response(self.response("completed", self.answer))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.sent = []
        for event in self._events():
            self.sent.append(event)
            await resp.write(event)
            if self.keepalive:
                await resp.write(b": keep-alive\n\n")
        await resp.write_eof()
        return resp

    def _events(self) -> list[bytes]:
        def sse(kind: str, data: dict[str, Any]) -> bytes:
            payload = msgspec.json.encode({"type": kind, **data})
            if self.multiline and kind == "response.in_progress":
                cut = payload.index(b",")  # a JSON value may be split across `data:` lines
                return b"event: " + kind.encode() + b"\ndata: " + payload[:cut] + b"\ndata: " + payload[cut:] + b"\n\n"
            return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

        seq = iter(range(1000))
        words = self.answer.split(" ")
        events = [sse(kind, {"sequence_number": next(seq), "response": self.response("in_progress", None)})
                  for kind in ("response.created", "response.in_progress")]
        for i, word in enumerate(words):
            events.append(sse("response.output_text.delta", {
                "sequence_number": next(seq), "item_id": "msg_fake", "output_index": 0, "content_index": 0,
                "delta": word if i == 0 else " " + word, "logprobs": []}))
        if self.truncate:
            return events
        if self.error_event:
            return [*events, sse("error", {"sequence_number": next(seq), "code": "server_error", "message": "boom",
                                           "param": None})]
        return [*events, sse("response.completed", {"sequence_number": next(seq),
                                                    "response": self.response("completed", self.answer)})]
