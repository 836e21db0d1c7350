"""Issue 8's "done when", from the CLI: an admin creates a department, a member, an agent with a
key, a $1 budget and a policy; the agent's calls are refused the moment the budget would be
exceeded (never after), the refusal names the budget, `budgets get` shows spent, held and
remaining, and the refusals are on record."""

from __future__ import annotations

import asyncio
import secrets
from decimal import Decimal
from typing import Any

import aiohttp

from tests.conftest import Gateway, cli_json, eventually, journal_event

# 10 output tokens at $1000/MTok: every call costs exactly $0.01 more than its input (free here).
PRICE_OUT_PER_MTOK_NANOS = 10**12
MAX_TOKENS = 10



async def test_done_when_from_the_cli(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    ws = f"cli{secrets.token_hex(4)}"
    run = lambda *argv: asyncio.to_thread(cli_json, gateway, *argv)  # noqa: E731
    await run("workspaces", "create", "CLI governance", "--id", ws)
    await run("providers", "set", "mock", "--type", "mock", "-w", ws, "--option", "enabled=true")
    await run("prices", "set", "mock", "echo", "--input", "0", "--output", str(PRICE_OUT_PER_MTOK_NANOS))
    dept = (await run("departments", "create", "Research", "-w", ws))["id"]
    member = (await run("members", "create", "Ada", "-w", ws, "--department", dept))["id"]
    agent = (await run("agents", "create", "analyst", "-w", ws, "--department", dept, "--member", member))["id"]
    key = (await run("keys", "create", "-w", ws, "--agent", agent))["key"]
    budget = (await run("budgets", "create", "-w", ws, "--scope", "agent", "--scope-id", agent, "--period", "month",
                        "--limit-usd", "1.00", "--alert-at", "50"))["id"]
    await run("policies", "create", "-w", ws, "--scope", "department", "--scope-id", dept,
              "--models-allow", "mock/*", "--wait")

    body = {"model": "mock/echo", "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "tell me everything " * 20}]}
    statuses: list[int] = []
    refusal: dict[str, Any] = {}
    refused_ids: list[str] = []
    for i in range(104):
        rid = f"req-cli-{secrets.token_hex(6)}-{i}"
        async with http.post(f"{gateway.base_url}/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}", "Alephant-Request-Id": rid}) as resp:
            statuses.append(resp.status)
            if resp.status != 200:
                refusal = await resp.json()
                refused_ids.append(rid)
    # Sequential calls of exactly $0.01 against $1.00: the 101st is the first refused, and all after it.
    assert statuses == [200] * 100 + [429] * 4, statuses
    assert refusal["error"]["type"] == "insufficient_quota" and refusal["error"]["code"] == "budget_exceeded"
    assert budget in refusal["error"]["message"]

    async def settled() -> dict[str, Any] | None:
        state: dict[str, Any] = await asyncio.to_thread(cli_json, gateway, "budgets", "get", budget)
        return state if state["held_usd"] == "0" else None

    state = await eventually(settled)
    assert Decimal(state["spent_usd"]) == Decimal("1.00") and Decimal(state["remaining_usd"]) == 0
    for rid in refused_ids:
        event = await eventually(lambda r=rid: journal_event(gateway.database_url, r))  # type: ignore[misc]
        assert (event["status"], event["decision"], event["cost_nanos"]) == (429, "budget_exceeded", 0)
        assert (event["department_id"], event["member_id"], event["agent_id"]) == (dept, member, agent)
