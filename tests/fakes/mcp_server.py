"""A real MCP server for tests: the official SDK's ``MCPServer`` served over Streamable HTTP by
uvicorn, on a free ``127.0.0.1`` port, in a background thread with its own event loop.

    async with McpTestServer() as srv:
        srv.url                      # "http://127.0.0.1:PORT/mcp"
        srv.calls                    # the tools/call requests it received (tool, arguments, headers)
        srv.requests                 # every HTTP exchange (method, headers, JSON-RPC body, status, answer)

Tools: ``echo(text) -> text``, ``add(a, b) -> a + b``, ``lookup(query) -> str`` (the one tests
price), ``slow(seconds)`` (sleeps, then answers), ``fail()`` (raises: an MCP result with
``isError: true``), ``big(n)`` (``n`` characters).

Faults, for the gateway's failure tests: ``await srv.stop()`` closes the listener (connection
refused, an outage) and ``await srv.start()`` serves again on the same port; ``srv.fault`` set to
``"http_500"`` answers every request 500 with a text body, ``"garbage"`` answers 200
``application/json`` that is not JSON-RPC (a protocol error); ``None`` (default) serves.
``legacy_only=True`` makes it answer the 2026-07-28 ``server/discover`` probe ``-32601`` (method
not found), like a server built with an SDK of the handshake era, so a client falls back to
``initialize``; ``json_response=True`` makes the handshake era's POSTs answer JSON instead of SSE.

The records are kept from the server thread and read from the test's: both are append-only lists
(a test reads them after the client call returned). Headers are recorded as received, credentials
included (tests assert that a configured ``Authorization`` reached the server); header names are
lower-case.

What the SDK's client (``mcp.Client(url)``, mcp 2.3.0, default ``mode="auto"``) exchanges with a
Streamable HTTP server, captured with this fixture's records (tests/fakes/test_mcp_server.py pins
the main points). Every POST carries ``accept: application/json, text/event-stream`` and
``content-type: application/json``, one JSON-RPC message (no batches), integer ids from 1;
``user-agent: python-httpx2/2.16.2``. ``_meta`` below is ``{"io.modelcontextprotocol/
protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientInfo": {"name": "mcp", "version":
"0.1.0"}, "io.modelcontextprotocol/clientCapabilities": {}}``.

Modern server (this one by default; the SDK's server speaks both eras, picked per request by the
``mcp-protocol-version`` header): protocol 2026-07-28, no handshake, no session.
1. ``POST /mcp`` ``{"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta":
   _meta}}``, headers ``mcp-protocol-version: 2026-07-28``, ``mcp-method: server/discover``.
   Answer 200 ``application/json`` (never SSE here): ``result`` = ``{"supportedVersions":
   ["2026-07-28"], "capabilities": {...}, "resultType": "complete", "ttlMs": 0, "cacheScope":
   "private", "_meta": {"io.modelcontextprotocol/serverInfo": {"name": ..., "version": ...}}}``;
   no ``mcp-session-id``.
2. Then one self-contained POST per request, each with ``params._meta`` = _meta and the headers
   ``mcp-protocol-version: 2026-07-28``, ``mcp-method: <method>``, plus ``mcp-name: <tool>`` on a
   ``tools/call``: ``tools/list`` (``params: {"_meta": ...}``; result ``tools``, ``resultType``,
   ``cacheScope``) and ``tools/call`` (``params: {"name", "arguments", "_meta"}``; result
   ``content``, ``isError``, ``structuredContent`` for a typed return, e.g. ``{"result": 3}``,
   ``resultType: "complete"``). All 200 ``application/json``. ``call_tool`` on a tool whose
   schema the client has not cached is followed by a ``tools/list`` (it validates the structured
   result against the tool's output schema). No ``notifications/initialized``, no GET, no DELETE.
   The SDK server's answers to bad requests on this path: unknown method 404 + ``-32601``; a
   missing or mismatched ``mcp-method`` header 400 + ``-32020``; no ``params._meta`` 400 +
   ``-32602``; malformed JSON 400 + ``-32700`` (id null); an unknown version 400 + ``-32022``
   with ``data.supported``; accept without ``text/event-stream`` 406; a notification 202. An
   unknown tool or bad arguments are a 200 result with ``isError: true``.

Handshake-era server (``legacy_only=True``): the probe is answered with an error and the client
falls back on the same connection. Every JSON-RPC error falls back (200 or 4xx with a JSON-RPC
error body, e.g. ``-32601`` or a 2025 server's 400 ``-32600`` "Missing session ID"), and so do a
bare 404 (read as -32601), 405 and 500; only ``-32022`` whose ``data.supported`` lists no
handshake version aborts, and a connection error propagates (no fallback).
1. ``POST`` ``{"id": 2, "method": "initialize", "params": {"protocolVersion": "2025-11-25",
   "capabilities": {}, "clientInfo": {"name": "mcp", "version": "0.1.0"}}}`` with no
   ``mcp-protocol-version`` header. Answer 200 ``text/event-stream`` (one ``event: message`` with
   the result; ``application/json`` with ``json_response=True``) and an ``mcp-session-id``.
2. ``POST`` ``notifications/initialized`` with ``mcp-session-id`` and ``mcp-protocol-version:
   2025-11-25``: 202, empty body. The client then opens ``GET /mcp`` (``cache-control:
   no-store``, the session id and version) and keeps it open for server-initiated messages.
3. ``tools/list`` and ``tools/call`` POSTs with the session id and version header and no
   ``_meta``; answered 200 SSE (or JSON), a ``tools/call`` again followed by a ``tools/list``
   when the schema is not cached. At exit ``DELETE /mcp`` with the session id (200).

A failure while connecting (inside ``async with Client(...)``) reaches the caller wrapped in an
``ExceptionGroup`` (the transport's anyio task groups): ``MCPError`` for an error answer or a body
that is not JSON-RPC, ``httpx2.ConnectError`` for a refused connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import httpx2
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

__all__ = ["HttpExchange", "McpTestServer", "RecordedToolCall", "build_server", "mcp_client"]

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[MutableMapping[str, Any]]],
                    Callable[[MutableMapping[str, Any]], Awaitable[None]]], Awaitable[None]]
FAULTS: Final = (None, "http_500", "garbage")
# Bytes of an answer kept in a record (an SSE stream can be long).
_ANSWER_KEEP = 64 * 1024


@dataclass
class HttpExchange:
    """One HTTP request the server received and what it answered. ``body`` is the request's JSON
    (None when empty or not JSON); ``answer`` the first bytes of the response body."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any = None
    status: int = 0
    answer_headers: dict[str, str] = field(default_factory=dict)
    answer: bytes = b""

    @property
    def rpc_method(self) -> str | None:
        return self.body.get("method") if isinstance(self.body, dict) else None


@dataclass(frozen=True)
class RecordedToolCall:
    """A ``tools/call`` that reached the server: the tool, its arguments and the HTTP headers."""

    tool: str
    arguments: dict[str, Any]
    headers: dict[str, str]


def build_server(name: str = "test-tools") -> MCPServer:
    """The SDK server with the test tools (see the module docstring)."""
    server = MCPServer(name, log_level="WARNING")

    @server.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="Look something up (a priced tool in tests).")
    def lookup(query: str) -> str:
        return f"result for {query}"

    @server.tool(description="Sleep for `seconds`, then answer.")
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool(description="Always fails.")
    def fail() -> str:
        raise ToolError("the tool failed on purpose")

    @server.tool(description="Answer `n` characters.")
    def big(n: int) -> str:
        return "x" * n

    return server


@contextlib.asynccontextmanager
async def mcp_client(url: str, headers: dict[str, str] | None = None, *, timeout_s: float = 30.0,
                     **options: Any) -> AsyncIterator[Client]:
    """The SDK's ``Client`` connected to ``url`` over Streamable HTTP with extra HTTP ``headers``
    on every request (e.g. ``{"Authorization": "Bearer <virtual key>"}`` for the gateway), each
    HTTP request bounded by ``timeout_s``; ``options`` go to ``Client`` (e.g. ``mode="legacy"``)."""
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(timeout_s)) as http, \
            Client(streamable_http_client(url, http_client=http), **options) as client:
        yield client


def _free_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


class McpTestServer:
    """The MCP test server (see the module docstring). ``start``/``stop`` are idempotent;
    ``stop`` then ``start`` serves again on the same port (state and records kept)."""

    def __init__(self, *, name: str = "test-tools", legacy_only: bool = False, json_response: bool = False) -> None:
        self.name = name
        self.legacy_only = legacy_only
        self.json_response = json_response
        self.fault: str | None = None
        self.port = 0
        self.requests: list[HttpExchange] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def calls(self) -> list[RecordedToolCall]:
        out = []
        for ex in list(self.requests):
            if ex.rpc_method == "tools/call" and isinstance(ex.body.get("params"), dict):
                params = ex.body["params"]
                out.append(RecordedToolCall(str(params.get("name")), dict(params.get("arguments") or {}), ex.headers))
        return out

    def called(self, tool: str) -> list[RecordedToolCall]:
        return [c for c in self.calls if c.tool == tool]

    def clear(self) -> None:
        self.requests.clear()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def _start(self) -> None:
        if self._thread is not None:
            return
        sock = _free_socket(self.port)
        self.port = sock.getsockname()[1]
        # A new SDK app each time: its session manager runs once per instance.
        app = build_server(self.name).streamable_http_app(json_response=self.json_response)
        config = uvicorn.Config(self._record(app), log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"mcp-test-{self.port}",
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError("the MCP test server did not start")
            time.sleep(0.01)
        sock.close()  # uvicorn serves on its own duplicate of the listening socket
        self._server, self._thread = server, thread

    def _stop(self) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(3)
        if thread.is_alive():  # an open stream outlived the graceful shutdown
            server.force_exit = True
            thread.join(5)

    # -- recording and faults (ASGI, around the SDK's app) -----------------------------------------

    def _record(self, app: ASGIApp) -> ASGIApp:
        async def asgi(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
                       send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            chunks = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            raw = b"".join(chunks)
            body: Any = None
            with contextlib.suppress(ValueError):
                body = json.loads(raw) if raw else None
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            ex = HttpExchange(scope["method"], scope["path"], headers, body)
            self.requests.append(ex)

            replayed = False

            async def replay() -> MutableMapping[str, Any]:
                nonlocal replayed
                if replayed:  # the body was read: what follows is the disconnect
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}

            async def watch(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    ex.status = int(message["status"])
                    ex.answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                                         for k, v in message.get("headers", [])}
                elif message["type"] == "http.response.body" and len(ex.answer) < _ANSWER_KEEP:
                    ex.answer += message.get("body", b"")[:_ANSWER_KEEP - len(ex.answer)]
                await send(message)

            fault = self.fault
            if fault == "http_500":
                await _answer(watch, 500, b"upstream exploded", "text/plain")
            elif fault == "garbage":
                await _answer(watch, 200, b'{"this is": "not JSON-RPC"', "application/json")
            elif self.legacy_only and (ex.rpc_method == "server/discover"
                                       or headers.get("mcp-protocol-version") == "2026-07-28"):
                rpc_id = body.get("id") if isinstance(body, dict) else None
                error = {"jsonrpc": "2.0", "id": rpc_id,
                         "error": {"code": -32601, "message": f"Method not found: {ex.rpc_method}"}}
                await _answer(watch, 200, json.dumps(error).encode(), "application/json")
            else:
                await app(scope, replay, watch)

        return asgi


async def _answer(send: Callable[[MutableMapping[str, Any]], Awaitable[None]], status: int, body: bytes,
                  content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
