"""The finance routes of the admin API and `alephant finance` (issue 9), end to end on the stack.

A small workload with known totals is published to the stack's event stream and folded by the
stack's own projector; the tests then read it through `GET /admin/v1/runs/{id}` and
`/admin/v1/finance/*` (JSON and CSV), check the 400s for bad parameters, and run the CLI.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from events.jetstream import connect
from events.publisher import EventPublisher
from schemas.events import (
    CacheHit,
    Event,
    LlmCall,
    PaymentInbound,
    PaymentOutbound,
    RunCompleted,
    ToolSpend,
    Usage,
)
from schemas.ids import uuid7
from tests.conftest import Gateway, eventually, run_cli

T = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Seeded:
    ws: str
    unpriced_provider: str
    long_run: str


def workload(ws: str, unpriced_provider: str, long_run: str) -> list[Event]:
    """Run r1 (agent a1): two calls ($0.0015, and $0.0025 with estimated usage), a $0.001 tool
    spend, a $0.003 payment out, $0.01 revenue, a $0.0004 cache saving and its outcome: total cost
    $0.008, margin $0.002. Run r2 (a2): a $0.0042 tool spend only. Run r3 (a1), the next day: an
    unpriced call (300 tokens) and a failed one. A run with a 230-character id (a2): $0.0000007."""
    def env(run: str, agent: str, at: dt.datetime) -> dict[str, Any]:
        return {"event_id": uuid7(), "occurred_at": at, "workspace_id": ws, "run_id": run, "agent_id": agent,
                "workflow_id": "wf-1"}

    return [
        LlmCall(**env("r1", "a1", T), provider="mock", model="echo", usage=Usage(input_tokens=1000, output_tokens=200),
                cost_nanos=1_500_000, department_id="d1", member_id="m1", properties={"customer": "acme"}),
        LlmCall(**env("r1", "a1", T + HOUR), provider="mock", model="echo",
                usage=Usage(input_tokens=500, output_tokens=100), cost_nanos=2_500_000, usage_estimated=True),
        ToolSpend(**env("r1", "a1", T + 2 * HOUR), spend_id="sp-1", amount_nanos=1_000_000, vendor="serpapi"),
        PaymentOutbound(**env("r1", "a1", T + 3 * HOUR), payment_id="po-1", amount_nanos=3_000_000, rail="x402"),
        PaymentInbound(**env("r1", "a1", T + 4 * HOUR), payment_id="pi-1", amount_nanos=10_000_000, rail="x402",
                       endpoint_id="ep-1"),
        CacheHit(**env("r1", "a1", T + 5 * HOUR), provider="mock", model="echo", saved_nanos=400_000),
        RunCompleted(**env("r1", "a1", T + 6 * HOUR), outcome="succeeded", metadata={"ticket": "T-1"}),
        ToolSpend(**env("r2", "a2", T + DAY), spend_id="sp-2", amount_nanos=4_200_000, vendor="browserbase"),
        LlmCall(**env("r3", "a1", T + DAY + HOUR), provider=unpriced_provider, model="mystery",
                usage=Usage(input_tokens=200, output_tokens=100), priced=False, price_source="unpriced"),
        LlmCall(**env("r3", "a1", T + DAY + 2 * HOUR), provider="mock", model="echo", status=500,
                usage=Usage(input_tokens=10)),
        LlmCall(**env(long_run, "a2", T + 2 * DAY), provider="mock", model="echo", cost_nanos=700),
    ]


class Admin:
    def __init__(self, gateway: Gateway, http: aiohttp.ClientSession) -> None:
        self.base = gateway.stack.admin_url
        self.http = http
        self.auth = {"Authorization": f"Bearer {gateway.stack.demo['ALEPHANT_ADMIN_TOKEN']}"}

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        async with self.http.get(self.base + path, params=params, headers=self.auth) as resp:
            return resp.status, await resp.json()

    async def ok(self, path: str, **params: Any) -> Any:
        status, body = await self.get(path, **params)
        assert status == 200, (path, params, body)
        return body

    async def text(self, path: str, **params: Any) -> tuple[int, str, str]:
        async with self.http.get(self.base + path, params=params, headers=self.auth) as resp:
            return resp.status, resp.headers["Content-Type"], await resp.text()


@pytest_asyncio.fixture
async def admin(gateway: Gateway, http: aiohttp.ClientSession) -> AsyncIterator[Admin]:
    yield Admin(gateway, http)


@pytest_asyncio.fixture(scope="module")
async def seeded(gateway: Gateway) -> Seeded:
    """The workload, published to the stack's stream and folded by its projector."""
    tag = secrets.token_hex(4)
    seeded = Seeded(f"fa{tag}", f"new{tag}", "x" * 225 + tag[:5])
    gateway.admin.call("POST", "/admin/v1/workspaces", {"id": seeded.ws, "name": "Finance API test"})
    nc = await connect(gateway.nats_url, "alephant-tests")
    try:
        publisher = EventPublisher(nc.jetstream(), stream=gateway.stream, subject_prefix=gateway.subject_prefix)
        for event in workload(seeded.ws, seeded.unpriced_provider, seeded.long_run):
            await publisher.publish(event)
    finally:
        await nc.close()

    async with aiohttp.ClientSession() as http:
        admin = Admin(gateway, http)

        async def folded() -> bool | None:
            _, body = await admin.get("/admin/v1/finance/summary", group_by="workspace", workspace_id=seeded.ws)
            total = body["data"][0] if body.get("data") else {}
            _, run = await admin.get("/admin/v1/runs/r1", workspace_id=seeded.ws)
            return True if total.get("requests") == 5 and total.get("cost_nanos") == 12_200_700 and run.get(
                "outcome") else None

        await eventually(folded, timeout=60)
    return seeded


async def test_run_detail(admin: Admin, seeded: Seeded) -> None:
    run = await admin.ok("/admin/v1/runs/r1", workspace_id=seeded.ws)
    assert run["run_id"] == "r1"
    assert (run["requests"], run["errors"], run["input_tokens"], run["output_tokens"]) == (2, 0, 1500, 300)
    assert {k: run[f"{k}_usd"] for k in ("llm_cost", "tool_cost", "payments_out", "cost", "revenue", "margin",
                                         "cache_savings", "estimated_cost")} == {
        "llm_cost": "0.004", "tool_cost": "0.001", "payments_out": "0.003", "cost": "0.008", "revenue": "0.01",
        "margin": "0.002", "cache_savings": "0.0004", "estimated_cost": "0.0025"}
    assert run["cost_nanos"] == 8_000_000 and run["margin_nanos"] == 2_000_000
    assert run["agents"] == ["a1"]
    assert run["outcome"] == {"outcome": "succeeded", "metadata": {"ticket": "T-1"},
                              "completed_at": (T + 6 * HOUR).isoformat()}
    assert run["first_at"] == T.isoformat() and run["last_at"] == (T + 5 * HOUR).isoformat()
    # A tool spend alone makes a run; a 230-character run id is found as given.
    tool_only = await admin.ok("/admin/v1/runs/r2", workspace_id=seeded.ws)
    assert (tool_only["requests"], tool_only["cost_usd"], tool_only["outcome"]) == (0, "0.0042", None)
    long = await admin.ok(f"/admin/v1/runs/{seeded.long_run}")
    assert (long["run_id"], long["cost_nanos"], long["agents"]) == (seeded.long_run, 700, ["a2"])
    status, body = await admin.get(f"/admin/v1/runs/none-{seeded.ws}")
    assert status == 404 and body["error"]["code"] == "run_not_found"


async def test_summary_json_and_csv(admin: Admin, seeded: Seeded) -> None:
    body = await admin.ok("/admin/v1/finance/summary", group_by="agent", interval="day", workspace_id=seeded.ws)
    assert (body["group_by"], body["interval"], body["has_more"]) == ("agent", "day", False)
    got = [(r["group"], r["period_start"][:10], r["cost_usd"], r["revenue_usd"], r["margin_usd"], r["requests"],
            r["errors"], r["unpriced_tokens"]) for r in body["data"]]
    assert got == [("a1", "2026-01-15", "0.008", "0.01", "0.002", 2, 0, 0),
                   ("a2", "2026-01-16", "0.0042", "0", "-0.0042", 0, 0, 0),
                   ("a1", "2026-01-16", "0", "0", "0", 2, 1, 300),
                   ("a2", "2026-01-17", "0.0000007", "0", "-0.0000007", 1, 0, 0)]
    first = body["data"][0]
    assert (first["workspace_id"], first["agent_id"], first["cache_savings_usd"], first["cache_savings_nanos"],
            first["estimated_cost_usd"], first["llm_cost_usd"], first["payments_out_usd"]) == (
        seeded.ws, "a1", "0.0004", 400_000, "0.0025", "0.004", "0.003")
    assert list(first) == body["columns"]

    status, content_type, text = await admin.text("/admin/v1/finance/summary", group_by="agent", interval="day",
                                                  workspace_id=seeded.ws, format="csv")
    assert status == 200 and content_type.startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0].split(",") == body["columns"]
    assert rows == [{k: "" if v is None else str(v) for k, v in r.items()} for r in body["data"]]

    window = await admin.ok("/admin/v1/finance/summary", group_by="workspace", workspace_id=seeded.ws,
                            **{"from": "2026-01-16", "to": "2026-01-17T00:00:00Z"})
    assert [(r["group"], r["requests"], r["errors"], r["tool_cost_usd"], r["unpriced_tokens"])
            for r in window["data"]] == [(seeded.ws, 2, 1, "0.0042", 300)]
    assert (window["from"], window["to"]) == ("2026-01-16T00:00:00+00:00", "2026-01-17T00:00:00+00:00")
    by_property = await admin.ok("/admin/v1/finance/summary", group_by="property:customer", workspace_id=seeded.ws)
    assert {r["group"]: r["llm_cost_usd"] for r in by_property["data"]} == {"acme": "0.0015", None: "0.0025007"}
    # Tool spends and payments have no model: their group is null ($0.0082, the costliest).
    by_model = await admin.ok("/admin/v1/finance/summary", group_by="model", workspace_id=seeded.ws, limit="2")
    assert [(r["group"], r["cost_usd"]) for r in by_model["data"]] == [(None, "0.0082"), ("mock/echo", "0.0040007")]
    assert by_model["has_more"] is True


async def test_top_spikes_unpriced(admin: Admin, seeded: Seeded) -> None:
    top = await admin.ok("/admin/v1/finance/top", by="run", workspace_id=seeded.ws)
    # Ids past 200 bytes are stored (so grouped) as their first 100 characters, "~" and a hash.
    stored = top["data"][2]["run_id"]
    assert stored.startswith(seeded.long_run[:100] + "~") and len(stored) == 117
    assert [(r["rank"], r["run_id"], r["cost_usd"]) for r in top["data"]] == [
        (1, "r1", "0.008"), (2, "r2", "0.0042"), (3, stored, "0.0000007"), (4, "r3", "0")]
    worst = await admin.ok("/admin/v1/finance/top", by="run", metric="margin", order="asc", limit="2",
                           workspace_id=seeded.ws)
    assert [(r["run_id"], r["margin_usd"]) for r in worst["data"]] == [("r2", "-0.0042"), (stored, "-0.0000007")]
    agents = await admin.ok("/admin/v1/finance/top", by="agent", metric="revenue", workspace_id=seeded.ws)
    assert [(r["agent_id"], r["revenue_usd"]) for r in agents["data"]] == [("a1", "0.01"), ("a2", "0")]

    spikes = await admin.ok("/admin/v1/finance/spikes", workspace_id=seeded.ws)
    assert spikes["data"] == [] and spikes["min_runs"] == 5  # no agent has 5 other runs
    spikes = await admin.ok("/admin/v1/finance/spikes", workspace_id=seeded.ws, min_runs="1")
    assert [(r["agent_id"], r["run_id"], r["cost_usd"], r["baseline_usd"], r["ratio"], r["baseline_runs"])
            for r in spikes["data"]] == [("a2", "r2", "0.0042", "0.0000007", "6000.00", 1)]

    unpriced = await admin.ok("/admin/v1/finance/unpriced", workspace_id=seeded.ws)
    assert [(r["provider"], r["model"], r["unpriced_tokens"], r["unpriced_calls"]) for r in unpriced["data"]] == [
        (seeded.unpriced_provider, "mystery", 300, 1)]


async def test_budgets(gateway: Gateway, admin: Admin, seeded: Seeded) -> None:
    gateway.admin.call("POST", "/admin/v1/budgets", {"workspace_id": seeded.ws, "scope": "workspace",
                                                     "scope_id": seeded.ws, "period": "month", "limit_usd": "2.50",
                                                     "id": f"budget-{seeded.ws}"})
    body = await admin.ok("/admin/v1/finance/budgets", workspace_id=seeded.ws)
    assert [(r["id"], r["limit_usd"], r["spent_usd"], r["remaining_usd"], r["used_pct"], r["budget_store"])
            for r in body["data"]] == [(f"budget-{seeded.ws}", "2.5", "0", "2.5", "0.0", "ok")]


BAD = [
    ("summary", {"group_by": "color"}, "group_by"),
    ("summary", {"group_by": "property:"}, "group_by"),
    ("summary", {"interval": "week"}, "interval"),
    ("summary", {"from": "yesterday"}, "from"),
    ("summary", {"to": "2026-13-01"}, "to"),
    ("summary", {"from": "2026-02-01", "to": "2026-01-01"}, "from"),
    ("summary", {"limit": "0"}, "limit"),
    ("summary", {"limit": "many"}, "limit"),
    ("summary", {"group-by": "agent"}, "group-by"),
    ("summary", {"format": "xml"}, "format"),
    ("top", {"by": "model"}, "by"),
    ("top", {"metric": "tokens"}, "metric"),
    ("top", {"limit": "100000"}, "limit"),
    ("top", {"order": "sideways"}, "order"),
    ("spikes", {"factor": "0.5"}, "factor"),
    ("spikes", {"factor": "NaN"}, "factor"),
    ("spikes", {"min_runs": "-1"}, "min_runs"),
    ("unpriced", {"group_by": "agent"}, "group_by"),
    ("budgets", {"from": "2026-01-01"}, "from"),
]


@pytest.mark.parametrize(("route", "params", "param"), BAD)
async def test_bad_parameters_are_400s(admin: Admin, route: str, params: dict[str, str], param: str) -> None:
    status, body = await admin.get(f"/admin/v1/finance/{route}", **params)
    assert status == 400, body
    error = body["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert param in error["message"]


async def test_a_plus_read_as_a_space_is_explained(admin: Admin) -> None:
    status, body = await admin.get("/admin/v1/finance/summary", **{"from": "2026-01-16T00:00:00 02:00"})
    assert status == 400 and "%2B" in body["error"]["message"]
    # Sent encoded, the offset is honoured.
    body = await admin.ok("/admin/v1/finance/summary", **{"from": "2026-01-16T00:00:00+02:00"})
    assert body["from"] == "2026-01-15T22:00:00+00:00"


async def test_routes_are_in_the_openapi_document(admin: Admin) -> None:
    doc = await admin.ok("/admin/v1/openapi.json")
    assert {f"/admin/v1/finance/{r}" for r in ("summary", "top", "spikes", "unpriced", "budgets")} <= set(doc["paths"])


# -- the CLI ---------------------------------------------------------------------------------------


async def test_cli_finance(gateway: Gateway, admin: Admin, seeded: Seeded) -> None:
    run = lambda *argv: asyncio.to_thread(lambda: run_cli(gateway, *argv).stdout)  # noqa: E731
    ws = ("-w", seeded.ws)
    table = await run("finance", "summary", "--group-by", "agent", "--interval", "day", *ws)
    lines = table.splitlines()
    for header in ("agent", "period", "model cost", "tool cost", "payments", "total cost", "revenue", "margin",
                   "cache savings"):
        assert header in lines[0]
    assert lines[1].split() == ["a1", "2026-01-15", "2", "0.004", "0.001", "0.003", "0.008", "0.01", "0.002",
                                "0.0004", "0"]
    assert lines[2].split()[:2] == ["a2", "2026-01-16"] and "-0.0042" in lines[2].split()

    api = await admin.ok("/admin/v1/finance/summary", group_by="agent", interval="day", workspace_id=seeded.ws)
    assert json.loads(await run("finance", "summary", "--group-by", "agent", "--interval", "day", *ws,
                                "--format", "json")) == api
    _, _, api_csv = await admin.text("/admin/v1/finance/summary", group_by="agent", interval="day",
                                     workspace_id=seeded.ws, format="csv")
    cli_csv = await run("finance", "summary", "--group-by", "agent", "--interval", "day", *ws, "--format", "csv")
    assert list(csv.reader(io.StringIO(cli_csv))) == list(csv.reader(io.StringIO(api_csv)))
    window = await run("finance", "summary", "--group-by", "workspace", "--from", "2026-01-16T00:00:00+00:00",
                       "--to", "2026-01-17", *ws, "--format", "json")
    assert [r["requests"] for r in json.loads(window)["data"]] == [2]

    top = (await run("finance", "top", "--by", "run", "--metric", "cost", "--limit", "2", *ws)).splitlines()
    assert top[1].split()[:2] == ["1", "r1"] and top[2].split()[:2] == ["2", "r2"] and len(top) == 3
    spikes = (await run("finance", "spikes", "--min-runs", "1", *ws)).splitlines()
    assert spikes[1].split() == ["a2", "r2", "0.0042", "0.0000007", "6000.00", "1"]
    unpriced = (await run("finance", "unpriced", *ws)).splitlines()
    assert unpriced[1].split()[:5] == [seeded.unpriced_provider, "mystery", "300", "1", "1"]
    assert "(no rows)" in await run("finance", "spikes", *ws)
    help_text = await run("finance", "summary", "--help")
    assert "--group-by" in help_text and "property:<name>" in help_text and "example:" in help_text
