"""The overview's numbers are the finance API's, for a generated workload (deploy/demo_history.py:
a few agents' runs over five days, published to the stream and folded by the stack's projector)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from typing import Any

import aiohttp
import pytest

from controlplane.console.render import usd  # "$" and the exact decimal string
from deploy import demo_history
from schemas.events import LlmCall
from tests.browser.conftest import Console, shot
from tests.conftest import AdminHttp, Gateway, eventually

pytestmark = pytest.mark.browser


async def finance(admin: AdminHttp, name: str, **params: str) -> Any:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return await admin.ok("GET", f"/admin/v1/finance/{name}?{query}")


async def cells(console: Console, table: str) -> list[list[str]]:
    rows = console.page.locator(f"table#{table} tbody tr")
    return [[c.strip() for c in await rows.nth(i).locator("td").all_inner_texts()] for i in range(await rows.count())]


@pytest.fixture
def workspace() -> str:
    return f"ov{os.urandom(4).hex()}"


async def test_the_overview_shows_the_finance_apis_numbers(console: Console, gateway: Gateway,
                                                           http: aiohttp.ClientSession, workspace: str) -> None:
    admin = AdminHttp(gateway, http)
    await admin.ok("POST", "/admin/v1/workspaces", {"id": workspace, "name": "Overview test"})
    now = dt.datetime.now(dt.UTC)
    events = demo_history.history(workspace, now, days=5, seed=workspace)
    calls = sum(1 for e in events if isinstance(e, LlmCall))
    await demo_history.publish(gateway.nats_url, gateway.stream, gateway.subject_prefix, events)

    async def folded() -> bool | None:
        body = await finance(admin, "summary", group_by="workspace", workspace_id=workspace)
        return True if body["data"] and body["data"][0]["requests"] == calls else None
    await eventually(folded, timeout=60)

    page = await console.open(f"/console?ws={workspace}&g=day&by=agent")
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    for stat, start in (("today", today), ("month", today.replace(day=1))):
        api = await finance(admin, "summary", group_by="workspace", workspace_id=workspace,
                            **{"from": start.isoformat().replace("+00:00", "Z")})
        expected = usd(api["data"][0]["cost_usd"]) if api["data"] else "$0"
        shown = await page.locator(f"[data-stat={stat}] [data-field=cost_usd]").inner_text()
        assert shown == expected, stat

    since = (now - dt.timedelta(days=31)).replace(hour=0, minute=0, second=0, microsecond=0)
    window = {"workspace_id": workspace, "from": since.isoformat().replace("+00:00", "Z")}
    top = await finance(admin, "top", by="agent", limit="10", **window)
    assert await cells(console, "top-agents") == [
        [r["agent_id"], str(r["requests"]), usd(r["cost_usd"]), usd(r["margin_usd"])] for r in top["data"]]
    top_runs = await finance(admin, "top", by="run", limit="10", **window)
    assert [r[0] for r in await cells(console, "top-runs")] == [r["run_id"] for r in top_runs["data"]]

    daily = await finance(admin, "summary", group_by="agent", interval="day", limit="20000", **window)
    await page.get_by_text("The numbers as a table").click()
    table = await cells(console, "cost-table")
    assert [[r[1], r[2], r[3]] for r in table] == [
        [d["agent_id"], str(d["requests"]), usd(d["cost_usd"])] for d in daily["data"]]
    # The chart draws the same totals (integer nano-USD per series).
    drawn = await page.evaluate(
        "() => Chart.getChart('cost-chart').data.datasets.map(d => d.data.reduce((a, b) => a + b, 0))")
    assert sum(drawn) == sum(d["cost_nanos"] for d in daily["data"])
    await shot(page, "overview-workload")

    # The costliest run is one click away, and its page names its calls.
    await page.locator("table#top-runs tbody tr").first.get_by_role("link").click()
    await page.wait_for_url(f"**/console/runs/{top_runs['data'][0]['run_id']}*")
    await asyncio.sleep(0)
