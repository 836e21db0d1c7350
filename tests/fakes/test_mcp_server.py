"""Self-test of the MCP test server through the official ``mcp`` SDK client, pinning the HTTP
exchange its module docstring describes (what the gateway's MCP endpoint has to answer)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx2
import pytest
from mcp import Client, MCPError
from mcp.types import TextContent

from tests.fakes.mcp_server import McpTestServer, mcp_client

MODERN = "2026-07-28"
TOOLS = {"echo", "add", "lookup", "slow", "fail", "big"}


@pytest.fixture
async def srv() -> AsyncIterator[McpTestServer]:
    async with McpTestServer() as server:
        yield server


def _text(result: object) -> str:
    content = getattr(result, "content")  # noqa: B009 (CallToolResult, untyped here on purpose)
    assert isinstance(content[0], TextContent)
    return content[0].text


async def test_sdk_client_lists_and_calls_tools(srv: McpTestServer) -> None:
    assert srv.url == f"http://127.0.0.1:{srv.port}/mcp"
    async with Client(srv.url) as c:
        assert {t.name for t in (await c.list_tools()).tools} == TOOLS
        added = await c.call_tool("add", {"a": 1, "b": 2})
        assert (added.is_error, _text(added), added.structured_content) == (False, "3", {"result": 3})
        assert _text(await c.call_tool("echo", {"text": "héllo"})) == "héllo"
        assert _text(await c.call_tool("lookup", {"query": "weather"})) == "result for weather"
        assert len(_text(await c.call_tool("big", {"n": 5000}))) == 5000
        assert _text(await c.call_tool("slow", {"seconds": 0.05})) == "slept 0.05"
        failed = await c.call_tool("fail", {})
        assert failed.is_error and "the tool failed on purpose" in _text(failed)
    assert [(c.tool, c.arguments) for c in srv.calls] == [
        ("add", {"a": 1, "b": 2}), ("echo", {"text": "héllo"}), ("lookup", {"query": "weather"}), ("big", {"n": 5000}),
        ("slow", {"seconds": 0.05}), ("fail", {})]
    assert srv.called("lookup")[0].arguments == {"query": "weather"}


async def test_modern_exchange_is_stateless_json(srv: McpTestServer) -> None:
    """mode auto against the SDK's server: a `server/discover` probe at 2026-07-28, then one
    self-contained JSON POST per request; no initialize, session, GET or DELETE."""
    async with Client(srv.url) as c:
        await c.call_tool("add", {"a": 2, "b": 3})
    methods = [(ex.method, ex.rpc_method) for ex in srv.requests]
    # The tool's output schema was not cached: the client lists the tools after the call.
    assert methods == [("POST", "server/discover"), ("POST", "tools/call"), ("POST", "tools/list")]
    for ex in srv.requests:
        assert ex.headers["accept"] == "application/json, text/event-stream"
        assert ex.headers["content-type"] == "application/json"
        assert ex.headers["mcp-protocol-version"] == MODERN
        assert ex.headers["mcp-method"] == ex.rpc_method
        assert "mcp-session-id" not in ex.headers and "mcp-session-id" not in ex.answer_headers
        assert ex.body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == MODERN
        assert (ex.status, ex.answer_headers["content-type"]) == (200, "application/json")
    call = srv.requests[1]
    assert call.headers["mcp-name"] == "add"
    assert call.body["params"]["name"] == "add" and call.body["params"]["arguments"] == {"a": 2, "b": 3}
    assert b'"supportedVersions":["2026-07-28"]' in srv.requests[0].answer


async def test_legacy_server_gets_the_initialize_handshake() -> None:
    """A server that answers the probe -32601 gets the 2025 handshake: initialize, initialized,
    a GET stream, requests with the session id, DELETE at the end."""
    async with McpTestServer(legacy_only=True) as srv:
        async with Client(srv.url) as c:
            assert _text(await c.call_tool("echo", {"text": "x"})) == "x"
        methods = [(ex.method, ex.rpc_method) for ex in srv.requests]
        assert methods[:3] == [("POST", "server/discover"), ("POST", "initialize"),
                               ("POST", "notifications/initialized")]
        assert ("POST", "tools/call") in methods and methods[-1] == ("DELETE", None)
        assert ("GET", None) in methods
        init = srv.requests[1]
        assert "mcp-protocol-version" not in init.headers
        assert init.body["params"]["protocolVersion"] == "2025-11-25"
        assert init.answer_headers["content-type"] == "text/event-stream"
        session = init.answer_headers["mcp-session-id"]
        for ex in srv.requests[2:]:
            assert (ex.headers["mcp-session-id"], ex.headers["mcp-protocol-version"]) == (session, "2025-11-25")
        assert srv.requests[2].status == 202


async def test_configured_headers_reach_the_server(srv: McpTestServer) -> None:
    async with mcp_client(srv.url, {"Authorization": "Bearer up-secret", "X-Team": "a"}) as c:
        await c.call_tool("echo", {"text": "hi"})
    (call,) = srv.called("echo")
    assert (call.headers["authorization"], call.headers["x-team"]) == ("Bearer up-secret", "a")
    assert not srv.called("add")


async def test_outage_and_recovery_on_the_same_port(srv: McpTestServer) -> None:
    port = srv.port
    await srv.stop()
    started = time.monotonic()
    # Connection refused: the SDK raises the transport's error (no MCP error, no hang).
    with pytest.RaisesGroup(httpx2.ConnectError, flatten_subgroups=True):
        async with mcp_client(srv.url, timeout_s=5) as c:
            await c.list_tools()
    assert time.monotonic() - started < 5
    await srv.start()
    assert srv.port == port
    async with Client(srv.url) as c:
        assert _text(await c.call_tool("echo", {"text": "back"})) == "back"


@pytest.mark.parametrize("fault", ["http_500", "garbage"])
async def test_faults_are_mcp_errors_not_hangs(srv: McpTestServer, fault: str) -> None:
    srv.fault = fault
    # Raised while connecting, so inside the transport's task groups.
    with pytest.RaisesGroup(MCPError, flatten_subgroups=True):
        async with mcp_client(srv.url, timeout_s=5) as c:
            await c.list_tools()
    srv.fault = None
    async with Client(srv.url) as c:
        assert {t.name for t in (await c.list_tools()).tools} == TOOLS
