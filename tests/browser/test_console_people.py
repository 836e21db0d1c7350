"""The agents, members and departments page: gauges equal to the finance API's budgets, limits
and policies in words, and key management (create, rotate, revoke) through the admin commands,
audited as the signed-in actor.

The module builds a workspace of its own (the stack is shared): department -> member -> agent, a
built-in `mock` provider priced at $0.001 per output token, so a call asking for `max_tokens` n
on a long prompt costs exactly n mills.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import psycopg
import pytest
from playwright.async_api import Dialog, Page

from tests.browser.conftest import Console, shot
from tests.conftest import Gateway, eventually

pytestmark = pytest.mark.browser

OUTPUT_PER_MTOK = 10**12  # nano-USD per million output tokens: $0.001 a token
PROMPT = " ".join(["word"] * 64)


def uid() -> str:
    return uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Org:
    ws: str
    provider: str
    department: str
    member: str
    agent: str
    agent_budget: str

    @property
    def model(self) -> str:
        return f"{self.provider}/echo"

    @property
    def page(self) -> str:
        return f"/console/agents?ws={self.ws}"


@pytest.fixture(scope="module")
def org(gateway: Gateway) -> Org:
    tag = uid()
    ws, provider = f"people-{tag}", f"pm{tag}"
    admin = gateway.admin
    admin.call("POST", "/admin/v1/workspaces", {"id": ws, "name": f"People {tag}"})
    admin.call("POST", "/admin/v1/providers", {"workspace_id": ws, "name": provider, "type": "mock",
                                               "options": {"enabled": "true"}})
    admin.call("POST", "/admin/v1/prices", {"provider": provider, "model": "echo", "input_per_mtok_nanos": 0,
                                            "output_per_mtok_nanos": OUTPUT_PER_MTOK})
    dept = admin.call("POST", "/admin/v1/departments", {"workspace_id": ws, "name": "Research"})["id"]
    member = admin.call("POST", "/admin/v1/members", {"workspace_id": ws, "name": "Ada", "department_id": dept,
                                                      "email": "ada@example.com"})["id"]
    agent = admin.call("POST", "/admin/v1/agents", {"workspace_id": ws, "id": f"agent-{tag}", "name": "Researcher",
                                                    "department_id": dept, "member_id": member})["id"]
    budget = admin.call("POST", "/admin/v1/budgets", {"workspace_id": ws, "scope": "agent", "scope_id": agent,
                                                      "period": "month", "limit_usd": "2"})["id"]
    admin.call("POST", "/admin/v1/budgets", {"workspace_id": ws, "scope": "department", "scope_id": dept,
                                             "period": "day", "limit_usd": "10"})
    admin.call("POST", "/admin/v1/budgets", {"workspace_id": ws, "scope": "workspace", "scope_id": ws,
                                             "period": "total", "limit_usd": "100"})
    admin.call("POST", "/admin/v1/limits", {"workspace_id": ws, "scope": "agent", "scope_id": agent, "rpm": 600,
                                            "concurrency": 8})
    # On a workflow the test calls never name: its time window must not refuse them.
    admin.call("POST", "/admin/v1/policies", {"workspace_id": ws, "scope": "workflow", "scope_id": "nightly-report",
                                              "models_deny": ["openai/*"], "max_cost_usd": "5",
                                              "windows": [{"days": [0, 1, 2, 3, 4], "start": "08:00",
                                                           "end": "20:00", "timezone": "Europe/Paris"}]})
    return Org(ws, provider, dept, member, agent, budget)


async def chat_status(http: aiohttp.ClientSession, gateway: Gateway, key: str, model: str,
                      max_tokens: int = 4) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
    async with http.post(gateway.stack.origin + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def answers(http: aiohttp.ClientSession, gateway: Gateway, key: str, model: str, status: int) -> None:
    """Wait until a call with `key` answers `status` (config reaches the workers asynchronously)."""
    async def check() -> bool | None:
        return True if await chat_status(http, gateway, key, model) == status else None

    await eventually(check, timeout=20, interval=0.1)


async def config_event(gateway: Gateway, entity_id: str, op: str) -> dict[str, Any]:
    """The journalled `config.changed` event of `op` on `entity_id`."""
    async def check() -> dict[str, Any] | None:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute(
                "SELECT body FROM event_journal WHERE type = 'config.changed' AND body->>'entity_id' = %s "
                "AND body->>'op' = %s", (entity_id, op))
            row = await cur.fetchone()
        return None if row is None else dict(row[0])

    return await eventually(check, timeout=20)


async def admin_get(gateway: Gateway, path: str) -> Any:
    return await asyncio.to_thread(gateway.admin.call, "GET", path)


async def new_key(gateway: Gateway, org: Org, name: str) -> dict[str, Any]:
    return await asyncio.to_thread(gateway.create_key, org.ws, name=name, agent_id=org.agent)


def accept_dialogs(page: Page, seen: list[str]) -> None:
    async def accept(dialog: Dialog) -> None:
        seen.append(dialog.message)
        await dialog.accept()

    page.once("dialog", accept)


async def test_revoking_a_key_in_the_console_makes_the_next_request_with_it_fail_with_401(
        console: Console, gateway: Gateway, http: aiohttp.ClientSession, org: Org) -> None:
    name = f"revoke-me-{uid()}"
    created = await new_key(gateway, org, name)
    await answers(http, gateway, created["key"], org.model, 200)

    page = await console.open(org.page)
    row = page.locator(f'tr[data-key="{created["id"]}"]')
    assert await row.get_attribute("data-status") == "active"
    dialogs: list[str] = []
    accept_dialogs(page, dialogs)
    async with page.expect_navigation():
        await page.get_by_role("button", name=f"Revoke key {name} ({created['prefix']})", exact=True).click()
    assert dialogs and dialogs[0].startswith(f"Revoke key {name} ")
    assert await page.get_by_role("status").inner_text() == f"Revoked key {created['id']}."
    assert await row.get_attribute("data-status") == "revoked"

    await answers(http, gateway, created["key"], org.model, 401)
    event = await config_event(gateway, created["id"], "revoked")
    assert event["actor"] == "console:alice"


async def test_dismissing_the_confirmation_revokes_nothing(
        console: Console, gateway: Gateway, org: Org) -> None:
    name = f"keep-me-{uid()}"
    created = await new_key(gateway, org, name)
    page = await console.open(org.page)

    async def dismiss(dialog: Dialog) -> None:
        await dialog.dismiss()

    page.once("dialog", dismiss)
    await page.get_by_role("button", name=f"Revoke key {name} ({created['prefix']})", exact=True).click()
    await console.open(org.page)
    assert await page.locator(f'tr[data-key="{created["id"]}"]').get_attribute("data-status") == "active"


async def test_creating_a_key_shows_its_plaintext_once_and_it_works(
        console: Console, gateway: Gateway, http: aiohttp.ClientSession, org: Org) -> None:
    page = await console.open(org.page)
    name = f"made-in-console-{uid()}"
    await page.get_by_label("Key name").fill(name)
    await page.get_by_label("Agent (optional)").select_option(org.agent)
    async with page.expect_navigation():
        await page.get_by_role("button", name="Create key", exact=True).click()
    assert await page.title() == "New virtual key · Alephant console"
    plaintext = await page.get_by_label("New key").input_value()
    assert plaintext.startswith("sk-alph-")
    assert "will not be shown again" in await page.get_by_role("alert").inner_text()
    key_id = await page.locator("#created-key code").first.inner_text()
    await shot(page, "agents-key-created")

    await answers(http, gateway, plaintext, org.model, 200)
    listed = await admin_get(gateway, f"/admin/v1/virtual-keys/{key_id}")
    assert (listed["name"], listed["agent_id"], listed["workspace_id"]) == (name, org.agent, org.ws)
    assert (await config_event(gateway, key_id, "created"))["actor"] == "console:alice"

    # Never again: not on the list, not in any stored session (the flash lives in Postgres).
    await console.open(org.page)
    assert plaintext not in await page.content()
    assert await page.locator(f'tr[data-key="{key_id}"]').get_attribute("data-status") == "active"
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM console_session WHERE flash LIKE %s", (f"%{plaintext}%",))
        assert (await cur.fetchone()) == (0,)


async def test_rotating_a_key_without_overlap_shows_the_new_key_and_stops_the_old(
        console: Console, gateway: Gateway, http: aiohttp.ClientSession, org: Org) -> None:
    name = f"rotate-me-{uid()}"
    old = await new_key(gateway, org, name)
    await answers(http, gateway, old["key"], org.model, 200)
    page = await console.open(org.page)
    label = f"{name} ({old['prefix']})"
    await page.get_by_label(f"How long the old key {label} keeps working").select_option("0")
    dialogs: list[str] = []
    accept_dialogs(page, dialogs)
    async with page.expect_navigation():
        await page.get_by_role("button", name=f"Rotate key {label}", exact=True).click()
    assert dialogs and dialogs[0].startswith(f"Rotate key {label}?")
    assert await page.title() == "Rotated virtual key · Alephant console"
    fresh = await page.get_by_label("New key").input_value()
    assert fresh.startswith("sk-alph-") and fresh != old["key"]

    await answers(http, gateway, fresh, org.model, 200)
    await answers(http, gateway, old["key"], org.model, 401)
    assert (await config_event(gateway, old["id"], "rotated"))["actor"] == "console:alice"
    await console.open(org.page)
    assert await page.locator(f'tr[data-key="{old["id"]}"]').get_attribute("data-status") == "expired"


def _usd(text: str | None) -> str:
    assert text is not None, "the budget store did not answer"
    return f"${text}"


async def test_gauges_show_the_finance_apis_budget_numbers(
        console: Console, gateway: Gateway, http: aiohttp.ClientSession, org: Org) -> None:
    key = (await new_key(gateway, org, f"spender-{uid()}"))["key"]
    await answers(http, gateway, key, org.model, 200)  # 4 output tokens: 4 mills
    for max_tokens in (5, 7):
        assert await chat_status(http, gateway, key, org.model, max_tokens) == 200
    # The three calls (4 + 5 + 7 mills) settled: spent, nothing held, and projected into finance.
    # Earlier tests of this module may have spent with the agent too, so wait for a quiet state.
    month = dt.datetime.now(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0).isoformat()

    async def settled() -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        budgets = (await admin_get(gateway, f"/admin/v1/finance/budgets?workspace_id={org.ws}"))["data"]
        mine = next(b for b in budgets if b["id"] == org.agent_budget)
        if mine["spent_usd"] is None or Decimal(mine["spent_usd"]) < Decimal("0.016") or mine["held_usd"] != "0":
            return None
        summary = await admin_get(gateway, f"/admin/v1/finance/summary?workspace_id={org.ws}&group_by=agent"
                                           f"&from={month.replace('+', '%2B')}")
        row = next((r for r in summary["data"] if r["agent_id"] == org.agent), None)
        if row is None or row["cost_usd"] != mine["spent_usd"]:
            return None
        return budgets, row

    budgets, agent_spend = await eventually(settled, timeout=30, interval=0.2)

    page = await console.open(org.page)
    assert len(budgets) == 3
    for b in budgets:
        gauge = page.locator(f'#budget-table [data-budget="{b["id"]}"]')
        assert await gauge.locator('[data-field="spent_usd"]').inner_text() == _usd(b["spent_usd"])
        assert await gauge.locator('[data-field="limit_usd"]').inner_text() == _usd(b["limit_usd"])
        assert await gauge.locator('[data-field="used_pct"]').inner_text() == b["used_pct"]
        meter = gauge.get_by_role("meter")
        assert await meter.get_attribute("value") == b["used_pct"]
        assert await meter.get_attribute("aria-label") == f"Budget {b['id']} ({b['period']}): {b['used_pct']}% used"
    # The same gauges beside the agent and the department they limit, and the agent's spend.
    agent_row = page.locator(f'#agents tr[data-agent="{org.agent}"]')
    agent_gauge = agent_row.locator(f'[data-budget="{org.agent_budget}"] [data-field="spent_usd"]')
    assert await agent_gauge.inner_text() == _usd(agent_spend["cost_usd"])
    assert await agent_row.locator('[data-field="cost_usd"]').inner_text() == _usd(agent_spend["cost_usd"])
    assert await page.locator(f'#departments tr[data-department="{org.department}"] meter').count() == 1
    # Limits and policies in words, naming what they apply to.
    limits = await page.locator("#limits tbody").inner_text()
    assert f"Agent Researcher ({org.agent})" in limits and "600 requests a minute; 8 concurrent requests" in limits
    policies = await page.locator("#policies tbody").inner_text()
    assert "Workflow nightly-report" in policies
    for phrase in ("Models denied: openai/*", "Allowed Mon to Fri, 08:00 to 20:00 Europe/Paris",
                   "Calls estimated above $5 refused"):
        assert phrase in policies
    await shot(page, "agents")


async def test_changing_a_budget_limit_runs_the_budget_patch_as_the_actor(
        console: Console, gateway: Gateway, org: Org) -> None:
    department_budget = next(b for b in (await admin_get(gateway, f"/admin/v1/budgets?workspace_id={org.ws}"))["data"]
                             if b["scope"] == "department")
    page = await console.open(org.page)
    row = page.locator(f'#budget-table tr[data-budget-row="{department_budget["id"]}"]')
    await row.get_by_label(f"New limit in US dollars for budget {department_budget['id']}").fill("7.25")
    async with page.expect_navigation():
        await row.get_by_role("button", name=f"Set the limit of budget {department_budget['id']}").click()
    assert "now limits spend to $7.25" in await page.get_by_role("status").inner_text()
    assert await row.locator('[data-field="limit_usd"]').inner_text() == "$7.25"
    assert (await admin_get(gateway, f"/admin/v1/budgets/{department_budget['id']}"))["limit_usd"] == "7.25"
    event = await config_event(gateway, department_budget["id"], "updated")
    assert (event["actor"], event["data"]["limit_usd"]) == ("console:alice", "7.25")

    # A refused change says why and changes nothing.
    csrf = await page.locator("form.signout input[name=csrf]").input_value()
    response = await page.request.post(console.url(f"/console/budgets/{department_budget['id']}/limit"),
                                       form={"csrf": csrf, "ws": org.ws, "limit_usd": "-3"})
    assert response.status == 200 and response.url.startswith(console.url(org.page))
    assert "Refused: 'limit_usd' must be a decimal string" in html.unescape(await response.text())
    assert (await admin_get(gateway, f"/admin/v1/budgets/{department_budget['id']}"))["limit_usd"] == "7.25"
