"""The gateway as an MCP client of an upstream MCP server (issue 16), over Streamable HTTP.

JSON-RPC messages are built and read as the MCP SDK's protocol types define them (`mcp_types`);
the HTTP exchange runs on the worker's own aiohttp session (`providers.upstream.send`), so an
upstream MCP server gets what every upstream gets: the SSRF guard at connect time, no redirects
followed, the worker's timeouts, and errors that name it.

Per worker and server, one MCP session: `initialize` (handshake protocol
LATEST_HANDSHAKE_VERSION), then `notifications/initialized`, and its `Mcp-Session-Id` (when the
server assigns one) on every later request; a 404 on a request that carried the session id means
the server forgot it, and the request is retried once on a new session. A server may answer a
request with JSON or with an SSE stream (`text/event-stream`): the answer is the stream's message
with the request's id. Tool lists are cached per server for LIST_TTL_S.

Failures (down, slow, an HTTP error, a body that is not JSON-RPC, a JSON-RPC error) raise
`McpUpstreamError` with a code: `mcp_upstream_unreachable`, `mcp_upstream_timeout`,
`mcp_upstream_status`, `mcp_upstream_protocol`, `mcp_upstream_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from mcp_types.version import LATEST_HANDSHAKE_VERSION

from dataplane.providers.upstream import read_whole, send
from schemas.entities import McpServer
from schemas.errors import UpstreamError

MAX_ANSWER = 8 * 1024 * 1024
LIST_TTL_S = 30.0
CLIENT_INFO = {"name": "alephant-gateway", "version": "1"}
_ids = itertools.count(1)


class McpUpstreamError(UpstreamError):
    """An upstream MCP server failed a request; `rpc_code` is its JSON-RPC error code, if it sent one."""

    def __init__(self, message: str, *, code: str, rpc_code: int | None = None, status: int = 502) -> None:
        super().__init__(message, code=code, status=status)
        self.rpc_code = rpc_code


@dataclass
class _Session:
    id: str | None = None
    protocol: str = LATEST_HANDSHAKE_VERSION
    ready: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class McpClients:
    """A worker's sessions with upstream MCP servers and their cached tool lists."""

    sessions: dict[str, _Session] = field(default_factory=dict)
    tools: dict[str, tuple[float, str, list[dict[str, Any]]]] = field(default_factory=dict)

    def forget(self, server: McpServer) -> None:
        self.sessions.pop(server.id, None)
        self.tools.pop(server.id, None)


def sse_messages(body: bytes) -> list[Any]:
    """The JSON messages of an SSE body (each event's `data:` lines joined)."""
    out: list[Any] = []
    data: list[str] = []
    for line in [*body.decode("utf-8", "replace").splitlines(), ""]:
        if not line:
            if data:
                with contextlib.suppress(ValueError):
                    out.append(json.loads("\n".join(data)))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return out


async def _post(session: Any, server: McpServer, headers: dict[str, str], message: dict[str, Any],
                state: _Session) -> tuple[int, dict[str, str], Any]:
    """One JSON-RPC message POSTed; (status, headers, the answer with the message's id or None).
    The whole exchange is bounded too (twice the server's timeout): a server that trickles an
    answer never holds a call forever."""
    try:
        async with asyncio.timeout(server.timeout_s * 2):
            return await _exchange(session, server, headers, message, state)
    except TimeoutError:
        raise McpUpstreamError(f"MCP server '{server.name}' did not finish its answer within "
                               f"{server.timeout_s * 2:g} s.", code="mcp_upstream_timeout", status=504) from None


async def _exchange(session: Any, server: McpServer, headers: dict[str, str], message: dict[str, Any],
                    state: _Session) -> tuple[int, dict[str, str], Any]:
    what = f"MCP server '{server.name}'"
    hdrs = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": state.protocol, **headers}
    if state.id:
        hdrs["Mcp-Session-Id"] = state.id
    body = json.dumps(message, separators=(",", ":")).encode()
    try:
        up = await send(session, f"mcp:{server.name}", "POST", server.url, body, hdrs, server.timeout_s)
    except UpstreamError as exc:
        code = "mcp_upstream_timeout" if exc.code == "upstream_timeout" else "mcp_upstream_unreachable"
        raise McpUpstreamError(f"{what} did not answer: {exc.message}", code=code, status=exc.status) from None
    started = time.monotonic()
    try:
        raw = await read_whole(up, MAX_ANSWER, what)
    except UpstreamError as exc:  # the answer began, then stalled past the timeout or broke off
        if time.monotonic() - started >= server.timeout_s * 0.9:
            raise McpUpstreamError(f"{what} did not answer within {server.timeout_s:g} s.",
                                   code="mcp_upstream_timeout", status=504) from None
        raise McpUpstreamError(exc.message, code="mcp_upstream_unreachable") from None
    answer_headers = {k.lower(): v for k, v in up.headers.items()}
    if 300 <= up.status < 400:
        raise McpUpstreamError(f"{what} answered with a redirect ({up.status}); the gateway does not follow "
                               "redirects.", code="mcp_upstream_status")
    if "id" not in message or up.status == 202:
        return up.status, answer_headers, None
    if up.status >= 400:
        return up.status, answer_headers, None
    kind = answer_headers.get("content-type", "")
    try:
        candidates = sse_messages(raw) if kind.startswith("text/event-stream") else [json.loads(raw)]
    except ValueError:
        candidates = []
    found = next((m for m in candidates if isinstance(m, dict) and m.get("id") == message["id"]), None)
    if found is None:
        raise McpUpstreamError(f"{what} answered with no JSON-RPC response to the request ({kind or 'no type'}, "
                               f"{len(raw)} bytes).", code="mcp_upstream_protocol")
    return up.status, answer_headers, found


def _request(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": next(_ids), "method": method}
    if params is not None:
        message["params"] = params
    return message


async def _open(session: Any, server: McpServer, headers: dict[str, str], state: _Session) -> None:
    state.id, state.protocol, state.ready = None, LATEST_HANDSHAKE_VERSION, False
    status, answer_headers, answer = await _post(session, server, headers, _request("initialize", {
        "protocolVersion": LATEST_HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}), state)
    result = _result(server, status, answer)
    state.id = answer_headers.get("mcp-session-id") or None
    state.protocol = str(result.get("protocolVersion") or LATEST_HANDSHAKE_VERSION)
    await _post(session, server, headers, {"jsonrpc": "2.0", "method": "notifications/initialized"}, state)
    state.ready = True


def _result(server: McpServer, status: int, answer: Any) -> dict[str, Any]:
    what = f"MCP server '{server.name}'"
    if status >= 400:
        raise McpUpstreamError(f"{what} answered HTTP {status}.", code="mcp_upstream_status")
    if not isinstance(answer, dict):
        raise McpUpstreamError(f"{what} sent no JSON-RPC answer.", code="mcp_upstream_protocol")
    error = answer.get("error")
    if isinstance(error, dict):
        rpc = error.get("code")
        raise McpUpstreamError(f"{what} refused the request: {str(error.get('message', ''))[:500]}",
                               code="mcp_upstream_error", rpc_code=rpc if isinstance(rpc, int) else None)
    result = answer.get("result")
    if not isinstance(result, dict):
        raise McpUpstreamError(f"{what} answered without a result object.", code="mcp_upstream_protocol")
    return result


async def request(clients: McpClients, http: Any, server: McpServer, headers: dict[str, str], method: str,
                  params: dict[str, Any] | None) -> dict[str, Any]:
    """`method` on the server's session (opened or renewed as needed); the JSON-RPC result."""
    state = clients.sessions.setdefault(server.id, _Session())
    for attempt in (1, 2):
        async with state.lock:
            if not state.ready:
                await _open(http, server, headers, state)
        had_session = state.id is not None
        status, _, answer = await _post(http, server, headers, _request(method, params), state)
        if status == 404 and had_session and attempt == 1:
            state.ready = False  # the server forgot the session: a new one, once
            continue
        return _result(server, status, answer)
    raise AssertionError("unreachable")


async def list_tools(clients: McpClients, http: Any, server: McpServer,
                     headers: dict[str, str]) -> list[dict[str, Any]]:
    """The server's tools (every page), cached for LIST_TTL_S per server and its config."""
    cached = clients.tools.get(server.id)
    now = time.monotonic()
    if cached is not None and cached[0] > now and cached[1] == server.url:
        return cached[2]
    tools: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(20):  # pages
        result = await request(clients, http, server, headers, "tools/list", {"cursor": cursor} if cursor else None)
        page = result.get("tools")
        if not isinstance(page, list):
            raise McpUpstreamError(f"MCP server '{server.name}' listed no tools array.", code="mcp_upstream_protocol")
        tools += [t for t in page if isinstance(t, dict) and isinstance(t.get("name"), str)]
        cursor = result.get("nextCursor") if isinstance(result.get("nextCursor"), str) else None
        if not cursor:
            break
    clients.tools[server.id] = (now + LIST_TTL_S, server.url, tools)
    return tools
