"""`tool.call` events (issue 16: tools called through the gateway's MCP endpoint) on the session
stack: published to the stack's stream, folded by its own projectors, read back through the admin
API (the run's totals and timeline, the ledger balance) and the ledger tables.

One run holds a model call and three tool calls through the MCP endpoint: a priced one, one whose
upstream failed and one the policy refused (both free). Then the priced one is published again,
once with its own message id (the stream's dedup answers) and once under another message id (a
second stream message, as a spool replay outside the dedup window makes): it still books once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import psycopg
import pytest_asyncio

from events.jetstream import connect
from events.publisher import MSG_ID, EventPublisher
from schemas.events import Event, LlmCall, ToolCall, Usage, event_encoder, subject_for
from schemas.ids import uuid7
from tests.conftest import AdminHttp, Gateway, eventually

T = dt.datetime(2026, 10, 2, 9, 0, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)
PRICE = 2_500_000  # $0.0025
MODEL_COST = 1_000_000  # $0.001


@dataclass(frozen=True)
class Seeded:
    ws: str
    run: str
    priced: ToolCall
    free: tuple[ToolCall, ...]


def workload(ws: str, run: str) -> tuple[list[Event], ToolCall]:
    def env(at: dt.datetime, request: str) -> dict[str, Any]:
        return {"event_id": uuid7(), "occurred_at": at, "workspace_id": ws, "run_id": run, "agent_id": "a1",
                "session_id": "s1", "workflow_id": "wf", "request_id": request, "key_id": "vk_t",
                "properties": {"team": "search"}}

    priced = ToolCall(**env(T + SECOND, "req-tool-1"), server="search", tool="lookup", latency_ms=41.5,
                      cost_nanos=PRICE, mcp_server_id="mcp_search")
    return [
        LlmCall(**env(T, "req-llm-1"), provider="mock", model="echo", usage=Usage(input_tokens=10, output_tokens=5),
                cost_nanos=MODEL_COST),
        priced,
        ToolCall(**env(T + 2 * SECOND, "req-tool-2"), server="search", tool="slow", status="error",
                 latency_ms=5000.0, error_code="upstream_timeout", mcp_server_id="mcp_search"),
        ToolCall(**env(T + 3 * SECOND, "req-tool-3"), server="search", tool="delete_all", status="refused",
                 error_code="policy_denied", mcp_server_id="mcp_search"),
    ], priced


async def _run(admin: AdminHttp, ws: str, run: str) -> dict[str, Any] | None:
    status, body, _ = await admin.call("GET", f"/admin/v1/runs/{run}?workspace_id={ws}")
    return body if status == 200 else None


async def _rows(gateway: Gateway, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute(sql, args)
        return await cur.fetchall()


@pytest_asyncio.fixture(scope="module")
async def seeded(gateway: Gateway) -> AsyncIterator[Seeded]:
    ws, run = f"tc{secrets.token_hex(4)}", f"run-{secrets.token_hex(4)}"
    gateway.admin.call("POST", "/admin/v1/workspaces", {"id": ws, "name": "tool.call ledger test"})
    events, priced = workload(ws, run)
    nc = await connect(gateway.nats_url, "alephant-tests")
    try:
        publisher = EventPublisher(nc.jetstream(), stream=gateway.stream, subject_prefix=gateway.subject_prefix)
        for event in events:
            await publisher.publish(event)
    finally:
        await nc.close()
    async with aiohttp.ClientSession() as http:
        admin = AdminHttp(gateway, http)

        async def folded() -> dict[str, Any] | None:
            body = await _run(admin, ws, run)
            return body if body is not None and body["requests"] == 4 else None

        await eventually(folded, timeout=60, interval=0.2)
    yield Seeded(ws, run, priced, tuple(e for e in events if isinstance(e, ToolCall) and e is not priced))


async def test_the_run_counts_the_tool_price_next_to_the_model_cost(admin: AdminHttp, seeded: Seeded) -> None:
    run = await _run(admin, seeded.ws, seeded.run)
    assert run is not None
    assert (run["tool_cost_usd"], run["tool_cost_nanos"]) == ("0.0025", PRICE)
    assert (run["llm_cost_usd"], run["cost_usd"], run["cost_nanos"]) == ("0.001", "0.0035", PRICE + MODEL_COST)
    # One model call and three tool calls; the failed and the refused tool calls are errors.
    assert (run["requests"], run["errors"], run["agents"]) == (4, 2, ["a1"])


async def test_the_priced_call_is_one_transfer_and_the_free_ones_none(gateway: Gateway, seeded: Seeded) -> None:
    ws, run = seeded.ws, seeded.run
    transfers = await _rows(gateway, "SELECT debit_account_id, credit_account_id, amount, currency, code, run_id, "
                                     "agent_id, session_id, workflow_id FROM ledger_transfer WHERE event_id = %s",
                            seeded.priced.event_id)
    assert transfers == [(f"agent:{ws}:a1:tool_cost", f"vendor:{ws}:mcp:search:payable", PRICE, "USD", "tool_call",
                          run, "a1", "s1", "wf")]
    free = [e.event_id for e in seeded.free]
    assert await _rows(gateway, "SELECT count(*) FROM ledger_transfer WHERE event_id = ANY(%s)", free) == [(0,)]
    # Journalled all the same, with what they were.
    journal = await _rows(gateway, "SELECT body->>'tool', body->>'status', body->>'error_code' FROM event_journal "
                                   "WHERE type = 'tool.call' AND workspace_id = %s ORDER BY occurred_at", ws)
    assert journal == [("lookup", "ok", None), ("slow", "error", "upstream_timeout"),
                       ("delete_all", "refused", "policy_denied")]


async def test_the_accounts_hold_the_price_and_the_ledger_balances(
        gateway: Gateway, admin: AdminHttp, seeded: Seeded) -> None:
    ws = seeded.ws
    accounts = await _rows(gateway, "SELECT id, currency, debits_posted, credits_posted FROM ledger_account "
                                    "WHERE id = ANY(%s) ORDER BY id",
                           [f"agent:{ws}:a1:tool_cost", f"vendor:{ws}:mcp:search:payable"])
    assert accounts == [(f"agent:{ws}:a1:tool_cost", "USD", PRICE, 0), (f"vendor:{ws}:mcp:search:payable", "USD", 0,
                                                                        PRICE)]
    balance = await admin.ok("GET", "/admin/v1/ledger/balance")
    usd = next(c for c in balance["currencies"] if c["currency"] == "USD")
    assert usd["balanced"] and usd["debits_nanos"] == usd["credits_nanos"] >= PRICE, balance


async def test_the_timeline_shows_each_tool_call(admin: AdminHttp, seeded: Seeded) -> None:
    view = await admin.ok("GET", f"/admin/v1/runs/{seeded.run}/timeline?workspace_id={seeded.ws}")
    items = view["items"]
    assert [i["type"] for i in items] == ["llm.call", "tool.call", "tool.call", "tool.call"]
    priced, failed, refused = items[1:]
    assert (priced["server"], priced["tool"], priced["status"], priced["latency_ms"], priced["error_code"]) == (
        "search", "lookup", "ok", 41.5, None)
    assert (priced["cost_usd"], priced["cost_nanos"], priced["vendor"], priced["request_id"]) == (
        "0.0025", PRICE, "mcp:search", "req-tool-1")
    assert (failed["tool"], failed["status"], failed["error_code"], failed["cost_usd"]) == (
        "slow", "error", "upstream_timeout", "0")
    assert (refused["tool"], refused["status"], refused["error_code"], refused["cost_usd"]) == (
        "delete_all", "refused", "policy_denied", "0")
    assert sum(i["cost_nanos"] for i in items) == view["totals"]["cost_nanos"] == PRICE + MODEL_COST
    assert view["totals"]["tool_cost_usd"] == "0.0025"


async def test_a_replay_of_the_same_event_books_once(gateway: Gateway, admin: AdminHttp, seeded: Seeded) -> None:
    nc = await connect(gateway.nats_url, "alephant-tests")
    try:
        js = nc.jetstream()
        publisher = EventPublisher(js, stream=gateway.stream, subject_prefix=gateway.subject_prefix)
        assert (await publisher.publish(seeded.priced)).duplicate  # the stream's dedup window
        # Outside the dedup window: a second stream message with the same event.
        ack = await js.publish(subject_for(seeded.priced, gateway.subject_prefix), event_encoder.encode(seeded.priced),
                               stream=gateway.stream, headers={MSG_ID: f"replay-{seeded.priced.event_id}"})
        assert not ack.duplicate
    finally:
        await nc.close()

    async def past_it() -> bool | None:
        rows = await _rows(gateway, "SELECT projector, last_seq FROM projector_checkpoint WHERE stream = %s",
                           gateway.stream)
        seqs = dict(rows)
        return True if all(seqs.get(p, 0) >= ack.seq for p in ("ledger", "finance")) else None

    await eventually(past_it, timeout=30, interval=0.1)
    assert await _rows(gateway, "SELECT count(*), sum(amount) FROM ledger_transfer WHERE event_id = %s",
                       seeded.priced.event_id) == [(1, PRICE)]
    assert await _rows(gateway, "SELECT debits_posted FROM ledger_account WHERE id = %s",
                       f"agent:{seeded.ws}:a1:tool_cost") == [(PRICE,)]
    assert await _rows(gateway, "SELECT count(*) FROM finance_fact WHERE event_id = %s",
                       seeded.priced.event_id) == [(1,)]
    run = await _run(admin, seeded.ws, seeded.run)
    assert run is not None and (run["tool_cost_nanos"], run["requests"]) == (PRICE, 4)
    # `alephant ledger reconcile`: the tool calls' transfers are what their bodies derive, and the
    # finance facts' tool cost equals the ledger's (the shared stack's other checks are not ours).
    found = {f["check"]: f for f in (await asyncio.to_thread(_reconcile, gateway))["findings"]}
    assert (found["transfers"]["status"], found["finance"]["status"]) == ("ok", "ok"), found


def _reconcile(gateway: Gateway) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALEPHANT_", "AWS_"))}
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "--state-dir", str(gateway.stack.state_dir), "ledger",
                           "reconcile", "--no-archive", "--json"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode in (0, 1), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report
