"""A scripted Anthropic Messages upstream for agent-CLI tests: it plays a model that calls one
tool, then reports what the tool answered.

    async with ScriptedClaude(tool="mcp__alephant__tools__echo", arguments={"text": "hi"}) as fake:
        fake.base_url     # "http://127.0.0.1:PORT" (no /v1, like the Anthropic SDK's base URL)
        fake.requests     # every request, credentials redacted (tests.fakes.server.RecordedRequest)

What it answers on ``POST /v1/messages`` (JSON, or SSE with ``"stream": true``, built with the pure
builders of tests/fakes/anthropic_upstream.py, so the wire shape is the one that fake pins):

1. a request whose messages carry the ``tool_result`` of the tool's call: a text that quotes
   the result, ``FINAL_PREFIX`` + the result's text (``stop_reason: "end_turn"``);
2. a request that offers the tool (``tools[].name == tool``): one ``tool_use`` block calling it
   with ``arguments`` (``stop_reason: "tool_use"``);
3. a request that offers ``ToolSearch`` but not the tool, and has no ``ToolSearch`` result yet:
   a ``ToolSearch`` call with ``{"query": "select:<tool>"}``. Claude Code defers MCP tools by
   default (their names only, in a system reminder; the model loads a schema with ToolSearch
   before calling it), so this is how a model reaches them there;
4. anything else (a client's side requests: titles, topic checks, quota probes): a short text.

The choice is made per request from its body alone, so concurrent requests never see each
other's answers. ``POST /v1/messages/count_tokens`` answers the shared fake's estimate. A
request without a key (``x-api-key`` or ``Authorization: Bearer``) is 401, like the real API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web

from tests.fakes.anthropic_upstream import (
    FakeAnswer,
    count_input_tokens,
    error_body,
    message_body,
    sse_bytes,
    stream_events,
)
from tests.fakes.server import FakeServer, RecordedRequest, recorded

__all__ = ["FINAL_PREFIX", "ScriptedClaude", "tool_results"]

FINAL_PREFIX: Final = "The tool answered: "
TOOL_USE_ID: Final = "toolu_alephant_scripted_01"
SEARCH_USE_ID: Final = "toolu_alephant_scripted_search"
TOOL_SEARCH: Final = "ToolSearch"
_SIDE_ANSWER: Final = FakeAnswer(blocks=({"type": "text", "text": "ok"},), input_tokens=20, output_tokens=1)


def tool_results(body: Any, tool_use_id: str = TOOL_USE_ID) -> list[str]:
    """The texts of the ``tool_result`` blocks answering ``tool_use_id`` in a Messages request body."""
    out: list[str] = []
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for block in content:
            if (isinstance(block, dict) and block.get("type") == "tool_result"
                    and block.get("tool_use_id") == tool_use_id):
                out.append(_text_of(block.get("content")))
    return out


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


@dataclass
class ScriptedClaude(FakeServer):
    """See the module docstring. ``tool`` is the tool's name as the client offers it to the model."""

    tool: str
    arguments: dict[str, Any]
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    _counter: int = 0

    def answer_for(self, body: dict[str, Any]) -> FakeAnswer:
        """What the model says to ``body`` (pure in the body; see the module docstring)."""
        results = tool_results(body)
        if results:
            return FakeAnswer(blocks=({"type": "text", "text": FINAL_PREFIX + results[-1]},), input_tokens=1200,
                              output_tokens=30)
        offered = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
        if self.tool in offered:
            return _call(TOOL_USE_ID, self.tool, self.arguments)
        if TOOL_SEARCH in offered and not tool_results(body, SEARCH_USE_ID):
            return _call(SEARCH_USE_ID, TOOL_SEARCH, {"query": f"select:{self.tool}"})
        return _SIDE_ANSWER

    @property
    def offered_tool(self) -> bool:
        """Whether any request so far offered ``tool`` to the model."""
        return any(isinstance(r.body, dict) and any(isinstance(t, dict) and t.get("name") == self.tool
                                                    for t in r.body.get("tools") or [])
                   for r in self.requests)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        key = (request.headers.get("x-api-key")
               or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        rec = recorded(request, raw, key, secrets=("x-api-key", "authorization"))
        self.requests.append(rec)
        body = rec.body
        if not key:
            return _error(401, "x-api-key header is required")
        if request.method != "POST" or request.path not in ("/v1/messages", "/v1/messages/count_tokens"):
            return _error(404, f"Not found: {request.method} {request.path}")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body.get("messages"):
            return _error(400, "model: Field required; messages: Field required")
        if request.path.endswith("/count_tokens"):
            return web.json_response({"input_tokens": count_input_tokens(body)})
        answer = self.answer_for(body)
        self._counter += 1
        msg_id = f"msg_scripted{self._counter:06d}"
        if body.get("stream") is not True:
            return web.Response(body=msgspec.json.encode(message_body(answer, msg_id=msg_id, model=body["model"])),
                                content_type="application/json", headers={"request-id": f"req_{msg_id}"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "request-id": f"req_{msg_id}"})
        await resp.prepare(request)
        events = stream_events(answer, msg_id=msg_id, model=body["model"])
        await resp.write(b"".join(sse_bytes(name, payload) for name, payload in events))
        await resp.write_eof()
        return resp


def _call(use_id: str, tool: str, arguments: dict[str, Any]) -> FakeAnswer:
    return FakeAnswer(blocks=({"type": "tool_use", "id": use_id, "name": tool, "input": arguments},),
                      stop_reason="tool_use", input_tokens=1000, output_tokens=40)


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=error_body(status, message), content_type="application/json",
                        headers={"request-id": "req_scripted"})
