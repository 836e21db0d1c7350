"""A scripted upstream for replaying what OpenAI-compatible providers really send.

Unlike `tests.fakes.upstream.FakeUpstream` (a faithful OpenAI, used by the benchmark), this one
answers whatever the test scripted: a status, headers, a JSON body, or raw SSE bytes, including
comments, error chunks, missing terminators or a dropped connection. Requests are recorded
(`requests`, with the parsed JSON body and the path) so tests can assert what the gateway sent.

    async with ScriptedUpstream() as up:
        up.reply(body={"id": "x", ...})                     # next request, any path
        up.reply(sse=[b": OPENROUTER PROCESSING\\n\\n", b"data: {...}\\n\\n"], path="/v1/chat/completions")
        provider = Provider(..., base_url=up.base_url)

Replies are consumed in order (per path when `path` is given, else by any request); a request
with no scripted reply gets 500. Not thread-safe; use it from the loop that started it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from tests.fakes.server import FakeServer, drop_connection, parse_body, redacted_headers


@dataclass(slots=True)
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    sse: list[bytes] | None = None  # written one by one, as a text/event-stream
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection after the SSE bytes, without a clean end
    path: str | None = None


@dataclass(slots=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class ScriptedUpstream(FakeServer):
    _base_path = "/v1"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.requests: list[Seen] = []
        self._replies: deque[Reply] = deque()

    def reply(self, *, status: int = 200, body: Any = None, sse: list[bytes] | None = None,
              headers: dict[str, str] | None = None, drop: bool = False, path: str | None = None) -> None:
        self._replies.append(Reply(status, body, sse, headers or {}, drop, path))

    def _take(self, path: str) -> Reply | None:
        for i, r in enumerate(self._replies):
            if r.path is None or r.path == path:
                del self._replies[i]
                return r
        return None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        body = parse_body(raw, invalid=raw)
        self.requests.append(Seen(request.method, request.path, redacted_headers(request), body))
        reply = self._take(request.path)
        if reply is None:
            return web.Response(status=500, text='{"error":{"message":"nothing scripted"}}',
                                content_type="application/json")
        if reply.sse is None:
            data = reply.body if isinstance(reply.body, bytes) else msgspec.json.encode(reply.body)
            return web.Response(status=reply.status, body=data, content_type="application/json",
                                headers=reply.headers)
        resp = web.StreamResponse(status=reply.status, headers={"Content-Type": "text/event-stream", **reply.headers})
        await resp.prepare(request)
        for chunk in reply.sse:
            await resp.write(chunk)
        if reply.drop:
            drop_connection(request)
            return resp
        await resp.write_eof()
        return resp
