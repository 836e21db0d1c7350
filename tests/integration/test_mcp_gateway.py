"""The MCP gateway end to end (issue 16): the official SDK client against `/mcp/{name}` and `/mcp`,
in front of a real MCP server built with the same SDK (tests/fakes/mcp_server.py), on the stack.

Each test has a workspace of its own (an agent, a key bound to it, the MCP server registered as
`tools`), so its policies, budgets and prices touch nothing else."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import psycopg
import pytest
import pytest_asyncio

from tests.conftest import Gateway, eventually
from tests.fakes.mcp_server import McpTestServer, mcp_client
from tests.integration.test_governance_e2e import applied


@pytest_asyncio.fixture(scope="module")
async def upstream() -> AsyncIterator[McpTestServer]:
    async with McpTestServer() as srv:
        yield srv


@dataclass
class Org:
    gateway: Gateway
    ws: str
    agent: str
    key: str
    server: str
    revision: int = 0

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        out = self.gateway.admin.call(method, path, body)
        if isinstance(out, dict) and out.get("revision"):
            self.revision = max(self.revision, int(out["revision"]))
        return out

    def create(self, kind: str, **body: Any) -> dict[str, Any]:
        created: dict[str, Any] = self.admin("POST", f"/admin/v1/{kind}", {"workspace_id": self.ws, **body})
        return created

    async def synced(self) -> None:
        await applied(self.gateway, self.revision)

    @property
    def root(self) -> str:
        return self.gateway.base_url.removesuffix("/v1")

    def url(self, server: str | None = None) -> str:
        return f"{self.root}/mcp/{server}" if server else f"{self.root}/mcp"

    def headers(self, run: str = "", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Alephant-Agent-Id": self.agent,
                **({"Alephant-Run-Id": run} if run else {}), **extra}


async def make_org(gateway: Gateway, upstream: McpTestServer, tools: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> Org:
    tag = os.urandom(4).hex()
    ws, agent = f"mcp{tag}", f"agent-{tag}"
    org = Org(gateway, ws, agent, "", "tools")
    org.admin("POST", "/admin/v1/workspaces", {"id": ws, "name": "MCP test"})
    org.create("agents", id=agent, name="Tool user")
    org.create("mcp-servers", name="tools", url=upstream.url, headers={"Authorization": "Bearer up-secret"},
               tools=tools or {}, **({"timeout_s": timeout_s} if timeout_s else {}))
    org.key = org.create("virtual-keys", name="mcp", agent_id=agent)["key"]
    await org.synced()
    return org


def text(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


async def journal(gateway: Gateway, type_: str, where: str, value: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute(f"SELECT body FROM event_journal WHERE type = %s AND body->>'{where}' = %s",
                                 (type_, value))
        return [dict(r[0]) for r in await cur.fetchall()]


async def test_the_sdk_client_lists_and_calls_tools_per_server_and_through_the_aggregate(
        gateway: Gateway, upstream: McpTestServer) -> None:
    org = await make_org(gateway, upstream)
    async with mcp_client(org.url("tools"), org.headers()) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"echo", "add", "lookup", "fail"} <= names
        result = await client.call_tool("add", {"a": 2, "b": 3})
        assert not result.is_error and "5" in text(result)
    async with mcp_client(org.url(), org.headers()) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"tools__echo", "tools__add"} <= names
        result = await client.call_tool("tools__echo", {"text": "through the gateway"})
        assert text(result) == "through the gateway"
    # The upstream saw the configured credential, never the client's virtual key.
    call = upstream.called("echo")[-1]
    assert call.headers.get("authorization") == "Bearer up-secret"
    assert org.key not in json.dumps(call.headers)


async def test_a_denied_tool_is_not_listed_and_its_call_is_refused_with_a_policy_record(
        gateway: Gateway, upstream: McpTestServer) -> None:
    org = await make_org(gateway, upstream)
    org.create("policies", scope="workspace", scope_id=org.ws, tools_deny=["tools.fail"])
    await org.synced()
    before = len(upstream.called("fail"))
    async with mcp_client(org.url("tools"), org.headers(run=f"run-deny-{org.ws}")) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "fail" not in names and "echo" in names
        refused = await client.call_tool("fail", {})
    assert refused.is_error and "Refused by Alephant" in text(refused) and "tools.fail" in text(refused)
    assert len(upstream.called("fail")) == before  # never reached the server
    decisions = await eventually(lambda: _nonempty(journal(gateway, "policy.decision", "workspace_id", org.ws)))
    assert any("tools" in (d.get("rule") or "") for d in decisions), decisions


async def _nonempty(rows: Any) -> Any:
    found = await rows
    return found or None


async def test_a_priced_tool_call_is_tool_spend_on_the_run_and_in_the_ledger(
        gateway: Gateway, upstream: McpTestServer) -> None:
    org = await make_org(gateway, upstream, tools={"lookup": {"price_usd": "0.01"}})
    run = f"run-priced-{org.ws}"
    async with mcp_client(org.url(), org.headers(run=run)) as client:
        result = await client.call_tool("tools__lookup", {"query": "weather"})
    assert not result.is_error

    async def booked() -> dict[str, Any] | None:
        status, body = await asyncio.to_thread(gateway.admin.request, "GET",
                                               f"/admin/v1/runs/{run}?workspace_id={org.ws}")
        return body if status == 200 and body.get("tool_cost_usd") == "0.01" else None
    summary = await eventually(booked, timeout=20)
    assert summary["agents"] == [org.agent]
    calls = await journal(gateway, "tool.call", "run_id", run)
    assert [(c["server"], c["tool"], c["status"], c["cost_nanos"]) for c in calls] == [
        ("tools", "lookup", "ok", 10_000_000)]
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT amount, debit_account_id, credit_account_id FROM ledger_transfer "
                                 "WHERE run_id = %s AND workspace_id = %s", (run, org.ws))
        rows = await cur.fetchall()
    assert [(int(a), d, c) for a, d, c in rows] == [
        (10_000_000, f"agent:{org.ws}:{org.agent}:tool_cost", f"vendor:{org.ws}:mcp:tools:payable")]


async def test_a_budget_too_small_for_the_price_refuses_before_the_server_sees_the_call(
        gateway: Gateway, upstream: McpTestServer) -> None:
    org = await make_org(gateway, upstream, tools={"lookup": {"price_usd": "0.01"}})
    org.create("budgets", scope="agent", scope_id=org.agent, period="month", limit_usd="0.005")
    await org.synced()
    before = len(upstream.called("lookup"))
    async with mcp_client(org.url("tools"), org.headers()) as client:
        refused = await client.call_tool("lookup", {"query": "too dear"})
        free = await client.call_tool("echo", {"text": "free still works"})
    assert refused.is_error and "budget_exceeded" in text(refused)
    assert len(upstream.called("lookup")) == before
    assert text(free) == "free still works"


async def test_an_escalated_tool_call_approved_by_an_admin_goes_through_once(
        gateway: Gateway, upstream: McpTestServer) -> None:
    org = await make_org(gateway, upstream, tools={"lookup": {"price_usd": "0.01"}})
    org.create("policies", scope="agent", scope_id=org.agent, escalate_over_usd="0.005")
    await org.synced()
    async with mcp_client(org.url("tools"), org.headers()) as client:
        held = await client.call_tool("lookup", {"query": "needs approval"})
    assert held.is_error and "escalation_required" in text(held)
    found = re.search(r"\besc_[0-9a-f]+\b", text(held))
    assert found
    esc = found.group(0)

    async def pending() -> bool | None:
        status, body = await asyncio.to_thread(gateway.admin.request, "GET", f"/admin/v1/escalations/{esc}")
        return True if status == 200 and body.get("status") == "pending" else None
    await eventually(pending, timeout=20)
    org.admin("POST", f"/admin/v1/escalations/{esc}/approve", {})
    await org.synced()
    before = len(upstream.called("lookup"))
    async with mcp_client(org.url("tools"), org.headers(**{"Alephant-Escalation-Id": esc})) as client:
        retry = await client.call_tool("lookup", {"query": "needs approval"})
        again = await client.call_tool("lookup", {"query": "needs approval"})
    assert not retry.is_error, text(retry)
    assert again.is_error and "escalation_required" in text(again)
    assert len(upstream.called("lookup")) == before + 1


async def test_upstream_failures_are_mcp_errors_never_hangs_and_are_recorded(
        gateway: Gateway, upstream: McpTestServer) -> None:
    org = await make_org(gateway, upstream, timeout_s=1)
    run = f"run-faults-{org.ws}"
    async with mcp_client(org.url("tools"), org.headers(run=run), timeout_s=10) as client:
        failed = await client.call_tool("fail", {})  # the tool itself fails: a result, not a transport error
        assert failed.is_error
        with pytest.raises(Exception, match=r"did not answer|timed out|timeout"):
            await client.call_tool("slow", {"seconds": 3})
        upstream.fault = "garbage"
        try:
            with pytest.raises(Exception, match=r"JSON-RPC"):
                await client.call_tool("echo", {"text": "x"})
        finally:
            upstream.fault = None
        await upstream.stop()
        try:
            with pytest.raises(Exception, match=r"did not answer|unreachable|refused"):
                await client.call_tool("echo", {"text": "x"})
        finally:
            await upstream.start()

    async def recorded() -> list[dict[str, Any]] | None:
        calls = await journal(gateway, "tool.call", "run_id", run)
        return calls if len(calls) >= 4 else None
    calls = await eventually(recorded, timeout=20)
    assert {c["status"] for c in calls} == {"error"}
    assert {c.get("error_code") for c in calls} >= {"tool_error", "mcp_upstream_timeout", "mcp_upstream_protocol",
                                                   "mcp_upstream_unreachable"}
    assert all(c["cost_nanos"] == 0 for c in calls)


async def test_bad_input_gets_clear_json_rpc_or_http_errors(gateway: Gateway, upstream: McpTestServer,
                                                           http: aiohttp.ClientSession) -> None:
    org = await make_org(gateway, upstream)
    auth = {"Authorization": f"Bearer {org.key}", "Accept": "application/json, text/event-stream"}

    async def post(body: bytes | Any, headers: dict[str, str] | None = None,
                   path: str = "tools") -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with http.post(org.url(path), data=io.BytesIO(data), headers={**auth, "Content-Type": "application/json",
                                                               **(headers or {})}) as resp:
            raw = await resp.read()
            return resp.status, json.loads(raw) if raw else None

    status, body = await post(b'{"jsonrpc": "2.0", "id": 1, "method": ')
    assert status == 400 and body["error"]["code"] == -32700
    status, body = await post([{"jsonrpc": "2.0", "id": 1, "method": "ping"}])
    assert status == 400 and body["error"]["code"] == -32600
    status, body = await post({"jsonrpc": "2.0", "id": 2, "method": "resources/teleport"})
    assert status == 200 and body["error"]["code"] == -32601 and body["id"] == 2
    status, body = await post({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                               "params": {"name": "echo", "arguments": {"text": "x" * (2 * 1024 * 1024)}}})
    assert body["error"]["code"] in (-32602, -32600) and status in (200, 413)
    status, body = await post({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"arguments": {}}})
    assert body["error"]["code"] == -32602 and "params.name" in body["error"]["message"]
    status, body = await post({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}, path="no-such-server")
    assert body["error"]["code"] == -32602 and "no-such-server" in body["error"]["message"]
    status, body = await post({"jsonrpc": "2.0", "id": 6, "method": "ping"}, headers={"Authorization": "Bearer nope"})
    assert status == 401 and "error" in body
    status, body = await post({"jsonrpc": "2.0", "id": 7, "method": "ping"})
    assert (status, body["result"]) == (200, {})
    # A server URL on a private network is refused when it is registered.
    code, refused = await asyncio.to_thread(gateway.admin.request, "POST", "/admin/v1/mcp-servers", {
        "workspace_id": org.ws, "name": "internal", "url": "http://10.0.0.7/mcp"})
    assert code == 400 and refused["error"]["param"] == "url"


async def test_tool_arguments_and_results_are_archived_redacted_and_on_the_run_timeline(
        gateway: Gateway, upstream: McpTestServer) -> None:
    org = await make_org(gateway, upstream)
    org.create("log-settings", scope="workspace", scope_id=org.ws, bodies="both",
               redact_patterns=[r"SSN-\d{3}-\d{2}-\d{4}"])
    await org.synced()
    run = f"run-bodies-{org.ws}"
    async with mcp_client(org.url(), org.headers(run=run)) as client:
        result = await client.call_tool("tools__echo", {"text": "customer SSN-123-45-6789 asked"})
    assert text(result) == "customer SSN-123-45-6789 asked"  # the caller gets the answer as the tool gave it

    async def archived() -> dict[str, Any] | None:
        calls = await journal(gateway, "tool.call", "run_id", run)
        if not calls or not calls[0].get("body_key"):
            return None
        status, body = await asyncio.to_thread(gateway.admin.request, "GET",
                                               f"/admin/v1/requests/{calls[0]['request_id']}/body?workspace_id={org.ws}")
        return body if status == 200 else None
    stored = await eventually(archived, timeout=30)
    assert stored["request"]["params"]["arguments"] == {"text": "customer *** asked"}
    assert "***" in json.dumps(stored["response"]) and "SSN-123" not in json.dumps(stored)
    assert org.key not in json.dumps(stored)
    timeline = gateway.admin.call("GET", f"/admin/v1/runs/{run}/timeline?workspace_id={org.ws}")
    [item] = [i for i in timeline["items"] if i["type"] == "tool.call"]
    assert (item["server"], item["tool"], item["status"], item["body_key"]) == (
        "tools", "echo", "ok", stored["key"])


async def test_a_tool_priced_per_unit_books_the_units_its_result_reports(gateway: Gateway,
                                                                         upstream: McpTestServer) -> None:
    # `add` reports {"result": a + b}: priced at $0.001 per unit of `result`, at most 100 units held.
    org = await make_org(gateway, upstream, tools={"add": {"price_usd": "0.0001", "unit_price_usd": "0.001",
                                                           "unit_field": "result", "max_units": 100}})
    shown = org.admin("GET", f"/admin/v1/mcp-servers?workspace_id={org.ws}")["data"][0]["tools"]["add"]
    assert (shown["unit_price_usd"], shown["unit_field"], shown["max_units"]) == ("0.001", "result", 100)
    run = f"run-units-{org.ws}"
    async with mcp_client(org.url("tools"), org.headers(run=run)) as client:
        assert "5" in text(await client.call_tool("add", {"a": 2, "b": 3}))

    async def booked() -> dict[str, Any] | None:
        status, body = await asyncio.to_thread(gateway.admin.request, "GET",
                                               f"/admin/v1/runs/{run}?workspace_id={org.ws}")
        return body if status == 200 and body.get("tool_cost_nanos") else None
    summary = await eventually(booked, timeout=20)
    assert summary["tool_cost_usd"] == "0.0051"  # 0.0001 per call + 5 units of 0.001
    # A budget below the most a call may cost (0.0001 + 100 units) refuses before the server sees it.
    org.create("budgets", scope="agent", scope_id=org.agent, period="month", limit_usd="0.05")
    await org.synced()
    before = len(upstream.called("add"))
    async with mcp_client(org.url("tools"), org.headers(run=run)) as client:
        refused = await client.call_tool("add", {"a": 1, "b": 1})
    assert refused.is_error and "budget_exceeded" in text(refused)
    assert len(upstream.called("add")) == before
    code, bad = await asyncio.to_thread(gateway.admin.request, "POST", "/admin/v1/mcp-servers", {
        "workspace_id": org.ws, "name": "halfway", "url": upstream.url, "tools": {"add": {"unit_price_usd": "0.1"}}})
    assert code == 400 and bad["error"]["code"] == "incomplete_unit_price"


async def test_a_tools_own_limits_hold_across_the_workspaces_keys(gateway: Gateway, upstream: McpTestServer) -> None:
    org = await make_org(gateway, upstream, tools={"echo": {"calls_per_minute": 2},
                                                   "slow": {"max_concurrent": 1}})
    other_key = org.create("virtual-keys", name="second", agent_id=org.agent)["key"]
    await org.synced()
    async with mcp_client(org.url("tools"), org.headers()) as client, \
            mcp_client(org.url("tools"), {**org.headers(), "Authorization": f"Bearer {other_key}"}) as second:
        first = [await client.call_tool("echo", {"text": "one"}), await second.call_tool("echo", {"text": "two"})]
        third = await client.call_tool("echo", {"text": "three"})
        assert not any(r.is_error for r in first)
        assert third.is_error and "rate_limit_exceeded" in text(third) and "tools.echo" in text(third)
        both = await asyncio.gather(client.call_tool("slow", {"seconds": 1}), second.call_tool("slow", {"seconds": 1}))
    refused = [r for r in both if r.is_error]
    assert len(refused) == 1 and "Concurrency limit tool:tools.slow" in text(refused[0])
