"""The providers page: a workspace of its own with a provider on a fake OpenAI upstream (one
answer in four fails with a 500), a price override and a fallback router over it. The page lists
the provider (never its key) with the finance summary's requests, errors and error rate, the
router's target with the health the admin API reports, the live workers and the price.
"""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from tests.browser.conftest import Console, shot
from tests.conftest import AdminHttp, Gateway, eventually
from tests.fakes.upstream import FakeUpstream
from tests.integration.test_governance_e2e import applied

pytestmark = pytest.mark.browser

MODEL = "gpt-4o-mini"
CALLS, FAILURES = 6, 2


async def routed_chat(http: aiohttp.ClientSession, gateway: Gateway, key: str, router_id: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    async with http.post(f"{gateway.stack.origin}/router/{router_id}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


def expected_state(summary: dict[str, Any], workers: list[Any]) -> str:
    if summary["workers_ejected"]:
        return "ejected"
    if summary["workers_cooling"]:
        return "cooling down"
    return "healthy" if workers else "idle"


async def test_the_providers_page_shows_error_rates_router_health_workers_and_prices(
        console: Console, gateway: Gateway, http: aiohttp.ClientSession) -> None:
    admin = AdminHttp(gateway, http)
    tag = os.urandom(4).hex()
    ws, provider, secret = f"con-{tag}", f"cp{tag}", f"sk-console-secret-{tag}-0123456789"
    async with FakeUpstream() as fake:
        await admin.ok("POST", "/admin/v1/workspaces", {"id": ws, "name": f"Console providers {tag}"})
        await admin.ok("POST", "/admin/v1/providers", {"workspace_id": ws, "name": provider, "type": "openai",
                                                       "base_url": fake.base_url, "api_key": secret})
        await admin.ok("POST", "/admin/v1/prices", {"provider": provider, "model": MODEL,
                                                    "input_per_mtok_nanos": 150_000_000,
                                                    "output_per_mtok_nanos": 600_000_000})
        await admin.ok("POST", "/admin/v1/prices", {"provider": f"other{tag}", "model": MODEL,
                                                    "input_per_mtok_nanos": 1, "output_per_mtok_nanos": 1})
        key = (await admin.ok("POST", "/admin/v1/virtual-keys", {"workspace_id": ws, "name": "k"}))["key"]
        router = await admin.ok("POST", "/admin/v1/routers", {
            "workspace_id": ws, "name": f"r{tag}", "strategy": "fallback", "targets": [{"model": f"{provider}/*"}],
            "retry": {"retries": 0}})
        await applied(gateway, int(router["revision"]))

        statuses = []
        for i in range(CALLS):
            if i % 3 == 2:
                fake.fail_next(500)
            statuses.append(await routed_chat(http, gateway, key, router["id"]))
        assert statuses.count(200) == CALLS - FAILURES, statuses

    since = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    query = urlencode({"workspace_id": ws, "group_by": "provider", "from": since})

    async def summarised() -> dict[str, Any] | None:
        rows = (await admin.ok("GET", f"/admin/v1/finance/summary?{query}"))["data"]
        row = next((r for r in rows if r["provider"] == provider), None)
        return row if row is not None and row["requests"] == CALLS else None

    usage = await eventually(summarised, timeout=20)
    assert usage["errors"] == FAILURES

    async def reported() -> dict[str, Any] | None:
        health = await admin.ok("GET", f"/admin/v1/routers/{router['id']}/health")
        target = health["targets"][0]
        done = target["summary"]["successes"] + target["summary"]["failures"] == CALLS
        return target if done else None

    target = await eventually(reported, timeout=20)

    page = await console.open(f"/console/providers?ws={ws}")
    assert await page.title() == "Providers & routers · Alephant console"
    row = page.locator(f'#providers tr[data-provider="{provider}"]')
    assert await row.locator('[data-field="requests"]').inner_text() == str(usage["requests"])
    assert await row.locator('[data-field="errors"]').inner_text() == str(usage["errors"])
    rate = (Decimal(usage["errors"]) * 100 / Decimal(usage["requests"])).quantize(Decimal("0.1"))
    assert await row.locator('[data-field="error_rate"]').inner_text() == f"{rate}%" == "33.3%"
    assert "set" in await row.inner_text()
    content = await page.content()
    assert secret not in content

    target_row = page.locator(f'[data-router="{router["id"]}"] tr[data-target="{provider}/*"]')
    assert await target_row.locator('[data-field="successes"]').inner_text() == str(target["summary"]["successes"])
    assert await target_row.locator('[data-field="failures"]').inner_text() == str(target["summary"]["failures"])
    assert target["summary"]["successes"] == CALLS - FAILURES
    assert await target_row.locator('[data-field="state"]').inner_text() == \
        expected_state(target["summary"], target["workers"])

    fleet = await admin.ok("GET", "/admin/v1/fleet")
    assert fleet["workers"]
    for worker in fleet["workers"]:
        assert await page.locator(f'#workers tr[data-worker="{worker["worker_id"]}"]').count() == 1

    price = page.locator(f'#prices tr[data-provider="{provider}"][data-model="{MODEL}"]')
    assert await price.locator('[data-field="input_usd"]').inner_text() == "$0.15"
    assert await price.locator('[data-field="output_usd"]').inner_text() == "$0.6"
    # A platform price of a provider this workspace does not use is not listed.
    assert await page.locator(f'#prices tr[data-provider="other{tag}"]').count() == 0
    await shot(page, "providers")


async def test_both_pages_render_for_the_default_workspace(console: Console) -> None:
    for path, title in (("/console/providers", "Providers & routers"), ("/console/policy", "Policy & escalations")):
        page = await console.open(path)
        assert await page.title() == f"{title} · Alephant console"
        assert await page.get_by_label("Workspace").input_value() == "demo"
