"""Run and session timelines (issue 13) end to end on the session stack: traffic on one run and
one session through the data plane (priced model calls, a cache hit, a policy refusal, a tool
spend, a second run in the same session), read back through `GET /admin/v1/runs/{id}/timeline`,
`GET /admin/v1/sessions/{id}` and the CLI, with totals checked against the finance run view."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import psycopg
import pytest_asyncio

from deploy.admin_cli import show_usd
from tests.conftest import AdminHttp, Gateway, eventually, run_cli
from tests.integration.test_governance_e2e import Org, chat, make_org, uid
from tests.integration.test_spend_api import SPEND, post

MONEY_KEYS = ("cost", "llm_cost", "tool_cost", "payments_out", "revenue", "margin", "cache_savings")
TOTAL_KEYS = ("requests", "errors", "input_tokens", "output_tokens",
              *(f"{m}_{unit}" for m in MONEY_KEYS for unit in ("usd", "nanos")))


@dataclass
class Traffic:
    org: Org
    run: str
    other_run: str
    session: str
    calls: list[str]  # request ids of the run's model calls (misses and hits)
    hit: str
    refused: str
    spent: str
    other: str  # the other run's call


async def _until_hit(http: aiohttp.ClientSession, gateway: Gateway, org: Org, headers: dict[str, str],
                     calls: list[str]) -> str:
    """Ask the same question until the cache answers it (the store is off the request path)."""
    async def once() -> str | None:
        ans = await chat(http, gateway, org.key, org.model, max_tokens=5, headers=headers)
        assert ans.status == 200, ans.body
        calls.append(ans.request_id)
        return ans.request_id if ans.headers.get("Alephant-Cache") == "hit" else None

    return await eventually(once, timeout=10, interval=0.1)


@pytest_asyncio.fixture(scope="module")
async def traffic(gateway: Gateway) -> Traffic:
    org = make_org(gateway)
    org.create("policies", scope="agent", scope_id=org.agent, models_deny=[f"{org.provider}/forbidden-*"])
    await org.synced()
    run, other_run, session = f"run-{uid()}", f"run-{uid()}", f"sess-{uid()}"
    headers = {"Alephant-Run-Id": run, "Alephant-Session-Id": session, "Alephant-Cache-Ttl": "60"}
    calls: list[str] = []
    async with aiohttp.ClientSession() as http:
        first = await chat(http, gateway, org.key, org.model, max_tokens=5, headers=headers)
        assert first.status == 200, first.body
        calls.append(first.request_id)
        hit = await _until_hit(http, gateway, org, headers, calls)
        refused = await chat(http, gateway, org.key, f"{org.provider}/forbidden-1", max_tokens=5, headers=headers)
        assert refused.status == 403, refused.body
        spent = await post(http, gateway, org.key, SPEND, {"amount_usd": "0.25", "vendor": "serpapi",
                                                             "tool": "web_search"},
                           idempotency_key=f"idem-{uid()}", headers=headers)
        assert spent.status == 201, spent.body
        other = await chat(http, gateway, org.key, org.model, max_tokens=3,
                           headers={"Alephant-Run-Id": other_run, "Alephant-Session-Id": session})
        assert other.status == 200, other.body
    return Traffic(org, run, other_run, session, calls, hit, refused.request_id, spent.request_id,
                   other.request_id)


def _consistent(view: dict[str, Any], expected_requests: set[str]) -> bool:
    """Both projectors have folded the traffic: every request is in the items, the finance totals
    count every model call, and the items' costs add up to them."""
    items = view["items"]
    seen = {i["request_id"] for i in items}
    calls = sum(1 for i in items if i["type"] == "llm.call")
    return (expected_requests <= seen and view["totals"]["requests"] == calls
            and sum(i["cost_nanos"] for i in items) == view["totals"]["cost_nanos"])


async def _settled(admin: AdminHttp, path: str, ws: str, expected: set[str]) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        status, view, _ = await admin.call("GET", f"{path}?workspace_id={ws}")
        return view if status == 200 and _consistent(view, expected) else None

    return await eventually(check, timeout=30, interval=0.2)


async def _journal(gateway: Gateway, event_ids: list[str]) -> dict[str, dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT event_id::text, body FROM event_journal WHERE event_id = ANY(%s::uuid[])",
                                 (event_ids,))
        return {eid: dict(body) for eid, body in await cur.fetchall()}


def _sorted(items: list[dict[str, Any]]) -> bool:
    keys = [(i["occurred_at"], uuid.UUID(i["event_id"])) for i in items]
    return keys == sorted(keys)


async def test_a_run_timeline_lists_every_event_in_order_with_costs_that_add_up_to_the_finance_view(
        gateway: Gateway, admin: AdminHttp, traffic: Traffic) -> None:
    t = traffic
    expected = {*t.calls, t.refused, t.spent}
    view = await _settled(admin, f"/admin/v1/runs/{t.run}/timeline", t.org.ws, expected)
    items = view["items"]
    assert (view["object"], view["run_id"], view["workspace_id"], view["truncated"]) == (
        "run.timeline", t.run, t.org.ws, False)
    assert _sorted(items)
    assert {i["run_id"] for i in items} == {t.run} and {i["session_id"] for i in items} == {t.session}
    assert t.other not in {i["request_id"] for i in items}

    by_request: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_request.setdefault(item["request_id"], []).append(item)
        assert {"type", "occurred_at", "request_id", "cost_usd", "trace_id"} <= item.keys()
    first = next(i for i in by_request[t.calls[0]] if i["type"] == "llm.call")
    assert (first["status"], first["provider"], first["model"], first["agent_id"]) == (
        200, t.org.provider, "echo", t.org.agent)
    assert first["cost_usd"] == "0.005" and first["latency_ms"] > 0 and "body_key" in first
    assert first["usage"]["output_tokens"] == 5
    hit = next(i for i in by_request[t.hit] if i["type"] == "cache.hit")
    assert (hit["cost_usd"], hit["saved_usd"], hit["cache"]) == ("0", "0.005", "exact")
    refused_types = {i["type"] for i in by_request[t.refused]}
    assert "policy.decision" in refused_types
    decision = next(i for i in by_request[t.refused] if i["type"] == "policy.decision")
    assert (decision["decision"], decision["code"], decision["cost_usd"]) == ("deny", "policy_denied", "0")
    assert "models_deny" in decision["rule"]
    spend = next(i for i in by_request[t.spent] if i["type"] == "tool.spend")
    assert (spend["cost_usd"], spend["vendor"], spend["tool"]) == ("0.25", "serpapi", "web_search")

    # Each item's cost is its journalled event's amount.
    journal = await _journal(gateway, [i["event_id"] for i in items])
    for item in items:
        body = journal[item["event_id"]]
        assert body["type"] == item["type"] and body.get("request_id") == item["request_id"]
        amount = {"llm.call": body.get("cost_nanos"), "tool.spend": body.get("amount_nanos")}.get(item["type"], 0)
        assert item["cost_nanos"] == amount, item
        assert item["trace_id"] == body.get("trace_id")

    # The totals are the finance view of the run, field for field.
    summary = await admin.ok("GET", f"/admin/v1/runs/{t.run}?workspace_id={t.org.ws}")
    assert {k: view["totals"][k] for k in TOTAL_KEYS} == {k: summary[k] for k in TOTAL_KEYS}
    assert view["totals"]["tool_cost_usd"] == "0.25"


async def test_a_session_spans_its_runs_and_its_totals_are_theirs(admin: AdminHttp, traffic: Traffic) -> None:
    t = traffic
    expected = {*t.calls, t.refused, t.spent, t.other}
    view = await _settled(admin, f"/admin/v1/sessions/{t.session}", t.org.ws, expected)
    assert (view["object"], view["session_id"]) == ("session.timeline", t.session)
    assert _sorted(view["items"]) and {i["run_id"] for i in view["items"]} == {t.run, t.other_run}
    runs = [await admin.ok("GET", f"/admin/v1/runs/{r}?workspace_id={t.org.ws}") for r in (t.run, t.other_run)]
    for key in ("cost_nanos", "llm_cost_nanos", "tool_cost_nanos", "requests", "revenue_nanos"):
        assert view["totals"][key] == sum(r[key] for r in runs), key


async def test_limit_truncates_oldest_first(admin: AdminHttp, traffic: Traffic) -> None:
    t = traffic
    await _settled(admin, f"/admin/v1/runs/{t.run}/timeline", t.org.ws, {*t.calls, t.refused, t.spent})
    whole = await admin.ok("GET", f"/admin/v1/runs/{t.run}/timeline?workspace_id={t.org.ws}")
    two = await admin.ok("GET", f"/admin/v1/runs/{t.run}/timeline?workspace_id={t.org.ws}&limit=2")
    assert (two["truncated"], two["limit"], two["items"]) == (True, 2, whole["items"][:2])
    assert two["totals"] == whole["totals"]  # totals cover the whole run
    across = await admin.ok("GET", f"/admin/v1/runs/{t.run}/timeline")  # no workspace: every workspace
    assert across["items"] == whole["items"]


async def test_unknown_ids_are_404_and_bad_input_400(admin: AdminHttp, traffic: Traffic) -> None:
    t = traffic
    for path, code in ((f"/admin/v1/runs/nope-{uid()}/timeline", "run_not_found"),
                       (f"/admin/v1/sessions/nope-{uid()}", "session_not_found"),
                       (f"/admin/v1/runs/{t.run}/timeline?workspace_id=demo", "run_not_found"),
                       (f"/admin/v1/sessions/{t.session}?workspace_id=demo", "session_not_found")):
        status, body, _ = await admin.call("GET", path)
        assert status == 404, (path, body)
        assert (body["error"]["type"], body["error"]["code"]) == ("not_found_error", code)
    for path, param in ((f"/admin/v1/runs/{'x' * 300}/timeline", "run_id"),
                        ("/admin/v1/sessions/a%01b", "session_id"),
                        (f"/admin/v1/runs/{t.run}/timeline?limit=0", "limit"),
                        (f"/admin/v1/runs/{t.run}/timeline?limit=10001", "limit"),
                        (f"/admin/v1/sessions/{t.session}?workspace=x", "workspace"),
                        (f"/admin/v1/runs/{t.run}/timeline?workspace_id=a%00b", "workspace_id")):
        status, body, _ = await admin.call("GET", path)
        assert status == 400, (path, body)
        assert (body["error"]["type"], body["error"]["param"]) == ("invalid_request_error", param)


async def test_the_cli_prints_the_timeline_and_its_totals(gateway: Gateway, admin: AdminHttp,
                                                          traffic: Traffic) -> None:
    t = traffic
    view = await _settled(admin, f"/admin/v1/runs/{t.run}/timeline", t.org.ws, {*t.calls, t.refused, t.spent})
    done = await asyncio.to_thread(run_cli, gateway, "runs", "timeline", t.run, "-w", t.org.ws)
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["time", "type", "request", "id"]
    assert len([ln for ln in lines if t.refused in ln]) == len([i for i in view["items"]
                                                                 if i["request_id"] == t.refused])
    row = next(ln for ln in lines if t.calls[0] in ln and "llm.call" in ln)
    assert f"{t.org.provider}/echo" in row and "0.005" in row and " ms" in row
    assert any("deny: policy_denied" in ln for ln in lines)
    assert any("serpapi/web_search" in ln and "0.25" in ln for ln in lines)
    summary = await admin.ok("GET", f"/admin/v1/runs/{t.run}?workspace_id={t.org.ws}")
    assert lines[-1].startswith(f"total cost {show_usd(summary['cost_usd'])} ")

    as_json = json.loads((await asyncio.to_thread(run_cli, gateway, "runs", "timeline", t.run, "-w", t.org.ws,
                                                  "--json")).stdout)
    assert as_json == view
    session = await asyncio.to_thread(run_cli, gateway, "sessions", "show", t.session, "-w", t.org.ws, "--limit", "1")
    assert "only the first 1 events" in session.stderr and "total cost" in session.stdout
    missing = await asyncio.to_thread(run_cli, gateway, "runs", "timeline", f"nope-{uid()}", check=False)
    assert missing.returncode != 0 and "404" in missing.stderr
