"""The policy page: decisions by rule, and deciding escalations in the console.

Each test builds its own workspace (`make_org`: a mock provider priced at $0.001 per output
token, an agent and its key) with a policy that escalates calls estimated above $0.005, so
`max_tokens=10` is held for an admin. Deciding it in the console must do what the admin API's
approve/reject do, with `decided_by` naming the console user.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from tests.browser.conftest import Console, shot
from tests.conftest import AdminHttp, Gateway, eventually
from tests.integration.test_governance_e2e import Answer, Org, applied, chat, make_org, policy_decision

pytestmark = pytest.mark.browser


async def escalated_call(gateway: Gateway, http: aiohttp.ClientSession, org: Org, run_id: str) -> tuple[Answer, str]:
    """A call the policy holds: its 403 answer and the escalation id, once the escalation is pending."""
    refused = await chat(http, gateway, org.key, org.model, max_tokens=10, headers={"Alephant-Run-Id": run_id})
    assert refused.status == 403 and refused.error["code"] == "escalation_required", refused.body
    found = re.search(r"\besc_[0-9a-f]+\b", refused.error["message"])
    assert found, refused.error["message"]
    esc_id = found.group(0)
    admin = AdminHttp(gateway, http)

    async def pending() -> dict[str, Any] | None:
        status, body, _ = await admin.call("GET", f"/admin/v1/escalations/{esc_id}")
        return body if status == 200 and body.get("status") == "pending" else None

    await eventually(pending, timeout=20)
    return refused, esc_id


async def escalating_org(gateway: Gateway) -> tuple[Org, str]:
    org = await asyncio.to_thread(make_org, gateway)
    policy = await asyncio.to_thread(org.create, "policies", scope="agent", scope_id=org.agent,
                                     escalate_over_usd="0.005")
    await org.synced()
    return org, f"policy:{policy['id']}.escalate_over_usd"


async def fleet_caught_up(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    """Every worker applied the control plane's latest relayed revision (the grant's, once an
    approval propagated)."""
    report = await AdminHttp(gateway, http).ok("GET", "/admin/v1/fleet")
    await applied(gateway, int(report["revision"]))


async def test_approving_an_escalation_in_the_console_lets_the_agents_retry_through(
        console: Console, gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org, rule = await escalating_org(gateway)
    run_id = f"run-console-{os.urandom(4).hex()}"
    refused, esc_id = await escalated_call(gateway, http, org, run_id)
    await policy_decision(gateway, refused.request_id)  # journalled

    page = await console.open(f"/console/policy?ws={org.ws}")
    assert await page.title() == "Policy & escalations · Alephant console"
    # The decision is counted under its rule, and listed with a link to its run.
    counted = page.locator(f'#decision-counts tr[data-rule="{rule}"][data-decision="escalate"]')
    assert await counted.locator('[data-field="decisions"]').inner_text() == "1"
    recent = page.locator(f'#recent-decisions tr[data-escalation="{esc_id}"]')
    assert await recent.get_by_role("link", name=run_id).get_attribute("href") == \
        f"/console/runs/{run_id}?ws={quote(org.ws)}"
    assert "escalation_required" in await recent.inner_text()
    queued = page.locator(f'#pending-escalations tr[data-escalation="{esc_id}"]')
    assert await queued.count() == 1
    await shot(page, "policy")

    # Without approval, naming the escalation changes nothing.
    early = await chat(http, gateway, org.key, org.model, max_tokens=10, headers={"Alephant-Escalation-Id": esc_id})
    assert early.status == 403 and early.error["code"] == "escalation_required"

    async with page.expect_navigation():
        await page.get_by_role("button", name=f"Approve escalation {esc_id}").click()
    assert esc_id in await page.get_by_role("status").inner_text()
    assert await queued.count() == 0
    decided = page.locator(f'#decided-escalations tr[data-escalation="{esc_id}"]')
    assert await decided.locator('[data-field="status"]').inner_text() == "approved"
    assert await decided.locator('[data-field="decided_by"]').inner_text() == "console:alice"

    row = await AdminHttp(gateway, http).ok("GET", f"/admin/v1/escalations/{esc_id}")
    assert (row["status"], row["decided_by"]) == ("approved", "console:alice")

    await fleet_caught_up(gateway, http)
    retry = await chat(http, gateway, org.key, org.model, max_tokens=10, headers={"Alephant-Escalation-Id": esc_id})
    assert retry.status == 200, retry.body
    again = await chat(http, gateway, org.key, org.model, max_tokens=10, headers={"Alephant-Escalation-Id": esc_id})
    assert again.status == 403 and again.error["code"] == "escalation_required"


async def test_rejecting_an_escalation_in_the_console_keeps_the_call_refused(
        console: Console, gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org, _ = await escalating_org(gateway)
    _, esc_id = await escalated_call(gateway, http, org, f"run-console-{os.urandom(4).hex()}")

    page = await console.open(f"/console/policy?ws={org.ws}")
    dialogs: list[str] = []

    async def confirm(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.accept()

    page.once("dialog", confirm)
    async with page.expect_navigation():
        await page.get_by_role("button", name=f"Reject escalation {esc_id}").click()
    assert dialogs and esc_id in dialogs[0]
    assert "rejected" in await page.get_by_role("status").inner_text()
    decided = page.locator(f'#decided-escalations tr[data-escalation="{esc_id}"]')
    assert await decided.locator('[data-field="status"]').inner_text() == "rejected"

    row = await AdminHttp(gateway, http).ok("GET", f"/admin/v1/escalations/{esc_id}")
    assert (row["status"], row["decided_by"]) == ("rejected", "console:alice")
    await fleet_caught_up(gateway, http)
    retry = await chat(http, gateway, org.key, org.model, max_tokens=10, headers={"Alephant-Escalation-Id": esc_id})
    assert retry.status == 403 and retry.error["code"] == "escalation_required"


async def test_deciding_twice_is_refused_with_the_commands_message(
        console: Console, gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org, _ = await escalating_org(gateway)
    _, esc_id = await escalated_call(gateway, http, org, f"run-console-{os.urandom(4).hex()}")
    page = await console.open(f"/console/policy?ws={org.ws}")
    await AdminHttp(gateway, http).ok("POST", f"/admin/v1/escalations/{esc_id}/reject", {}, status=200)
    # The page still offers the stale button; the command refuses, and the console says why.
    async with page.expect_navigation():
        await page.get_by_role("button", name=f"Approve escalation {esc_id}").click()
    assert "already rejected" in await page.get_by_role("status").inner_text()
    row = await AdminHttp(gateway, http).ok("GET", f"/admin/v1/escalations/{esc_id}")
    assert (row["status"], row["decided_by"]) == ("rejected", "admin")
