"""`POST /v1/alephant/spend` and `POST /v1/alephant/runs/{run_id}/complete` on the session stack:
a spend booked once in the journal and the ledger and settled on its budget, replays, mismatches,
a request while the first is in flight (the in-flight record seeded in the stack's Redis through
`RedisIdempotencyStore`, the store the gateway uses), validation, budgets, policies and limits,
and run outcomes.

Each test builds its own workspace (`make_org`: a key bound to an agent under a department and a
member)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import aiohttp
import psycopg

from dataplane.idempotency import RedisIdempotencyStore
from dataplane.ingress.alephant import spend_event_id
from tests.conftest import Gateway, eventually
from tests.integration.test_governance_e2e import Answer, Org, chat, journal_rows, make_org, settled_budget, uid

SPEND = "/v1/alephant/spend"


async def post(http: aiohttp.ClientSession, gateway: Gateway, key: str, path: str, body: Any, *,
               idempotency_key: str | None = None, headers: Mapping[str, str] | None = None) -> Answer:
    request_id = f"req-spend-{uuid.uuid4().hex}"
    sent = {"Authorization": f"Bearer {key}", "Alephant-Request-Id": request_id, **(headers or {})}
    if idempotency_key is not None:
        sent["Idempotency-Key"] = idempotency_key
    async with http.post(gateway.stack.origin + path, json=body, headers=sent) as resp:
        decoded = await resp.json(content_type=None)
        return Answer(resp.status, decoded, resp.headers, request_id)


async def spend(http: aiohttp.ClientSession, org: Org, body: Any, key: str | None = None,
                headers: Mapping[str, str] | None = None) -> Answer:
    return await post(http, org.gateway, org.key, SPEND, body, idempotency_key=key or f"idem-{uid()}",
                      headers=headers)


async def journalled(gateway: Gateway, event_type: str, request_id: str) -> dict[str, Any]:
    async def one() -> dict[str, Any] | None:
        rows = await journal_rows(gateway.database_url, event_type, request_id)
        return rows[0] if rows else None

    return await eventually(one, timeout=20)


async def query(gateway: Gateway, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute(sql, args)
        return await cur.fetchall()


async def transfers_of(gateway: Gateway, event_id: uuid.UUID) -> list[tuple[Any, ...]]:
    return await query(gateway, "SELECT debit_account_id, credit_account_id, amount, code, run_id, agent_id "
                                "FROM ledger_transfer WHERE event_id = %s", event_id)


def redis_store(gateway: Gateway) -> RedisIdempotencyStore:
    return RedisIdempotencyStore(gateway.stack.child_env()["ALEPHANT_REDIS_URL"])


async def test_a_spend_is_booked_once_and_a_retry_gets_the_same_answer(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    budget = org.create("budgets", scope="agent", scope_id=org.agent, period="total", limit_usd="1.00")
    await org.synced()
    run = f"run-{uid()}"
    headers = {"Alephant-Run-Id": run, "Alephant-Session-Id": "sess-1", "Alephant-Workflow-Id": "research",
               "Alephant-Property-Team": "growth"}
    body = {"amount_usd": "0.25", "vendor": "serpapi", "tool": "web_search", "description": "3 queries"}

    first = await spend(http, org, body, key="spend-key-1", headers=headers)
    assert first.status == 201, first.body
    event_id = spend_event_id(org.ws, org.key_id, "spend-key-1")
    assert first.body == {
        "id": f"spend_{event_id.hex}", "object": "alephant.spend", "amount_usd": "0.25", "currency": "USD",
        "vendor": "serpapi", "tool": "web_search", "run_id": run, "agent_id": org.agent, "workspace_id": org.ws,
        "created_at": first.body["created_at"]}
    assert isinstance(first.body["created_at"], int) and "Idempotent-Replayed" not in first.headers

    event = await journalled(gateway, "tool.spend", first.request_id)
    assert event["event_id"] == str(event_id) and event["spend_id"] == first.body["id"]
    assert (event["amount_nanos"], event["currency"], event["vendor"], event["tool"], event["description"]) == (
        250_000_000, "USD", "serpapi", "web_search", "3 queries")
    assert (event["agent_id"], event["run_id"], event["session_id"], event["workflow_id"]) == (
        org.agent, run, "sess-1", "research")
    assert (event["key_id"], event["department_id"], event["member_id"]) == (org.key_id, org.department, org.member)
    assert event["properties"] == {"team": "growth"}

    async def booked() -> list[tuple[Any, ...]] | None:
        return await transfers_of(gateway, event_id) or None

    assert await eventually(booked, timeout=20) == [
        (f"agent:{org.ws}:{org.agent}:tool_cost", f"vendor:{org.ws}:serpapi:payable", 250_000_000, "tool_spend", run,
         org.agent)]
    await settled_budget(gateway, budget["id"], Decimal("0.25"))

    # The retry (keys in another order, the amount written another way, the run in the body instead
    # of the header: the same spend) is answered as the first request was, and books nothing.
    retry = await spend(http, org, {"tool": "web_search", "description": "3 queries", "vendor": "serpapi",
                                    "amount_usd": "0.250", "run_id": run}, key="spend-key-1",
                        headers={k: v for k, v in headers.items() if k != "Alephant-Run-Id"})
    assert retry.status == 201 and retry.body == first.body
    assert retry.headers["Idempotent-Replayed"] == "true"

    # A new spend after it: the budget shows 0.25 + 0.10, not a second 0.25.
    other = await spend(http, org, {"amount_usd": "0.10", "vendor": "serpapi"}, headers=headers)
    assert other.status == 201 and other.body["tool"] is None
    await journalled(gateway, "tool.spend", other.request_id)
    await settled_budget(gateway, budget["id"], Decimal("0.35"))
    rows = await query(gateway, "SELECT count(*), sum(amount) FROM ledger_transfer WHERE debit_account_id = %s",
                       f"agent:{org.ws}:{org.agent}:tool_cost")
    assert rows == [(2, 350_000_000)]
    assert await query(gateway, "SELECT count(*) FROM event_journal WHERE type = 'tool.spend' AND workspace_id = %s",
                       org.ws) == [(2,)]
    # The replay was not recorded as a call either.
    assert await journal_rows(gateway.database_url, "llm.call", retry.request_id) == []


async def test_the_same_key_for_another_spend_is_a_422(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    body = {"amount_usd": "0.25", "vendor": "serpapi"}
    assert (await spend(http, org, body, key="k-1")).status == 201
    for changed, headers in (({**body, "amount_usd": "0.30"}, {}), ({**body, "vendor": "exa"}, {}),
                             (body, {"Alephant-Run-Id": "another-run"})):
        ans = await spend(http, org, changed, key="k-1", headers=headers)
        assert ans.status == 422, (changed, headers, ans.body)
        assert (ans.error["type"], ans.error["code"], ans.error["param"]) == (
            "invalid_request_error", "idempotency_key_mismatch", "Idempotency-Key")


async def test_a_request_while_the_first_is_in_flight_is_a_409_and_the_key_is_usable_once_released(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    store = redis_store(gateway)
    try:
        # The first request, as far as any worker can tell, is still running.
        first = await store.claim(org.ws, org.key_id, "busy-key", "the first request's fingerprint")
        assert first.outcome == "claimed"
        ans = await spend(http, org, {"amount_usd": "0.25", "vendor": "serpapi"}, key="busy-key")
        assert ans.status == 409, ans.body
        assert (ans.error["type"], ans.error["code"], ans.error["param"]) == (
            "invalid_request_error", "idempotency_key_in_use", "Idempotency-Key")
        refusal = await journalled(gateway, "llm.call", ans.request_id)
        assert (refusal["status"], refusal["error_code"], refusal["ingress"], refusal["endpoint"]) == (
            409, "idempotency_key_in_use", "alephant.spend", SPEND)
        assert refusal["cost_nanos"] == 0

        # The first request failed and let go of the key: the retry runs and books.
        store.release(org.ws, org.key_id, "busy-key", first.token)
        await store.flush()
        ans = await spend(http, org, {"amount_usd": "0.25", "vendor": "serpapi"}, key="busy-key")
        assert ans.status == 201, ans.body
        # The gateway completed the record: the first "owner" can no longer.
        assert not await store.complete(org.ws, org.key_id, "busy-key", first.token, 201, b"{}")
        replay = await store.claim(org.ws, org.key_id, "busy-key", "anything")
        assert replay.outcome == "mismatch"
    finally:
        await store.close()
    await journalled(gateway, "tool.spend", ans.request_id)


async def test_invalid_spends_are_400s_naming_the_field_and_book_nothing(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    base: dict[str, Any] = {"amount_usd": "0.25", "vendor": "serpapi"}
    cases: list[tuple[dict[str, Any], str | None, str | None]] = [
        ({"vendor": "serpapi"}, "amount_usd", "invalid_amount"),
        ({**base, "amount_usd": "-0.25"}, "amount_usd", "invalid_amount"),
        ({**base, "amount_usd": "0"}, "amount_usd", "invalid_amount"),
        ({**base, "amount_usd": "0.000"}, "amount_usd", "invalid_amount"),
        ({**base, "amount_usd": "abc"}, "amount_usd", "invalid_amount"),
        ({**base, "amount_usd": 0.25}, "amount_usd", "invalid_amount"),
        ({**base, "amount_usd": 1}, "amount_usd", "invalid_amount"),
        ({**base, "amount_usd": "1e3"}, "amount_usd", "invalid_amount"),
        ({**base, "amount_usd": "0.0000000001"}, "amount_usd", "invalid_amount"),
        ({**base, "amount_usd": "1000000.01"}, "amount_usd", "invalid_amount"),
        ({"amount_usd": "0.25"}, "vendor", None),
        ({**base, "vendor": "  "}, "vendor", None),
        ({**base, "vendor": "v" * 129}, "vendor", "invalid_value"),
        ({**base, "tool": "bad\nname"}, "tool", "invalid_value"),
        ({**base, "currency": "EUR"}, "currency", "unsupported_currency"),
        ({**base, "amount": "0.25"}, None, None),  # an unknown field (a typo of amount_usd): named in the message
    ]
    for body, param, code in cases:
        ans = await spend(http, org, body)
        assert ans.status == 400, (body, ans.body)
        assert (ans.error["type"], ans.error["param"], ans.error["code"]) == ("invalid_request_error", param, code), (
            body, ans.error)
        if not isinstance(body.get("amount_usd", ""), str):
            assert "never a float" in ans.error["message"]
        if param is None:
            assert "unknown field `amount`" in ans.error["message"]

    missing = await post(http, gateway, org.key, SPEND, base)  # no Idempotency-Key
    assert missing.status == 400
    assert (missing.error["code"], missing.error["param"]) == ("missing_idempotency_key", "Idempotency-Key")
    bad_key = await spend(http, org, base, key="has space")
    assert (bad_key.status, bad_key.error["code"]) == (400, "invalid_idempotency_key")
    both = await spend(http, org, {**base, "run_id": "run-a"}, headers={"Alephant-Run-Id": "run-b"})
    assert (both.status, both.error["code"], both.error["param"]) == (400, "run_id_mismatch", "run_id")

    # Nothing above booked: the one valid spend is the workspace's only tool.spend.
    ok = await spend(http, org, {**base, "run_id": "run-a"}, headers={"Alephant-Run-Id": "run-a"})
    assert ok.status == 201 and ok.body["run_id"] == "run-a"
    await journalled(gateway, "tool.spend", ok.request_id)
    assert await query(gateway, "SELECT count(*) FROM event_journal WHERE type = 'tool.spend' AND workspace_id = %s",
                       org.ws) == [(1,)]


async def test_a_spend_over_the_budget_is_refused_naming_it_and_releases_its_key(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    budget = org.create("budgets", scope="agent", scope_id=org.agent, period="month", limit_usd="0.50")
    await org.synced()
    assert (await spend(http, org, {"amount_usd": "0.30", "vendor": "exa"})).status == 201
    await settled_budget(gateway, budget["id"], Decimal("0.30"))

    over = await spend(http, org, {"amount_usd": "0.30", "vendor": "exa"}, key="over-key")
    assert over.status == 429, over.body
    assert (over.error["type"], over.error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert budget["id"] in over.error["message"]
    refusal = await journalled(gateway, "llm.call", over.request_id)
    assert (refusal["status"], refusal["decision"], refusal["hold_nanos"], refusal["cost_nanos"]) == (
        429, "budget_exceeded", 300_000_000, 0)
    assert (refusal["ingress"], refusal["agent_id"]) == ("alephant.spend", org.agent)

    # The refused spend let go of its key (off the request path, so allow a moment): a retry is
    # decided again, not 409 and not replayed.
    async def decided_again() -> Answer | None:
        ans = await spend(http, org, {"amount_usd": "0.30", "vendor": "exa"}, key="over-key")
        return None if ans.status == 409 else ans

    retry = await eventually(decided_again, timeout=10)
    assert (retry.status, retry.error["code"]) == (429, "budget_exceeded")

    # Exactly what is left still fits: admitted iff spent + amount <= limit.
    fits = await spend(http, org, {"amount_usd": "0.20", "vendor": "exa"})
    assert fits.status == 201, fits.body
    await settled_budget(gateway, budget["id"], Decimal("0.50"))


async def test_policies_and_limits_apply_to_spends(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    org.create("policies", scope="agent", scope_id=org.agent, endpoints_allow=["/v1/alephant/*"],
               max_cost_usd="0.10")
    org.create("limits", scope="key", scope_id=org.key_id, rpm=2)
    await org.synced()

    first = await spend(http, org, {"amount_usd": "0.10", "vendor": "exa"})
    assert first.status == 201 and first.headers["x-ratelimit-limit-requests"] == "2"
    # The amount is the policy's cost estimate.
    costly = await spend(http, org, {"amount_usd": "0.11", "vendor": "exa"})
    assert (costly.status, costly.error["code"]) == (403, "policy_denied")
    assert "max_cost_usd" in costly.error["param"]
    # The endpoint allow list admits the spend API and nothing else.
    called = await chat(http, gateway, org.key, org.model, max_tokens=5)
    assert (called.status, called.error["code"]) == (403, "policy_denied")
    assert "endpoints_allow" in called.error["param"]
    # Two requests a minute; the policy's refusals never reached admission, so only the first spend counted.
    assert (await spend(http, org, {"amount_usd": "0.01", "vendor": "exa"})).status == 201
    limited = await spend(http, org, {"amount_usd": "0.01", "vendor": "exa"})
    assert (limited.status, limited.error["code"]) == (429, "rate_limit_exceeded")
    assert "Retry-After" in limited.headers


async def test_a_run_outcome_is_journalled(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    run = f"run-{uid()}"
    path = f"/v1/alephant/runs/{run}/complete"
    ans = await post(http, gateway, org.key, path, {"outcome": "succeeded", "metadata": {"ticket": "T-1"}},
                     headers={"Alephant-Workflow-Id": "support"})
    assert ans.status == 200, ans.body
    assert ans.body == {"run_id": run, "outcome": "succeeded", "object": "alephant.run.outcome"}
    event = await journalled(gateway, "run.completed", ans.request_id)
    assert (event["run_id"], event["outcome"], event["metadata"]) == (run, "succeeded", {"ticket": "T-1"})
    assert (event["agent_id"], event["key_id"], event["workflow_id"]) == (org.agent, org.key_id, "support")

    failed = await post(http, gateway, org.key, path, {"outcome": "failed"}, headers={"Alephant-Run-Id": run})
    assert failed.status == 200 and failed.body["outcome"] == "failed"
    assert (await journalled(gateway, "run.completed", failed.request_id))["metadata"] == {}

    for body, param in (({"outcome": "done"}, "outcome"), ({}, "outcome"), ({"outcome": 1}, "outcome"),
                        ({"outcome": "failed", "metadata": {"n": 1}}, "metadata[...]"),
                        ({"outcome": "failed", "metadata": {"n": "line\nbreak"}}, "metadata.n"),
                        ({"outcome": "failed", "extra": True}, None)):
        bad = await post(http, gateway, org.key, path, body)
        assert bad.status == 400, (body, bad.body)
        assert (bad.error["type"], bad.error["param"]) == ("invalid_request_error", param), (body, bad.error)
    other = await post(http, gateway, org.key, path, {"outcome": "failed"}, headers={"Alephant-Run-Id": "run-x"})
    assert (other.status, other.error["code"]) == (400, "run_id_mismatch")
    unauthenticated = await post(http, gateway, "sk-not-a-key", path, {"outcome": "failed"})
    assert (unauthenticated.status, unauthenticated.error["code"]) == (401, "invalid_api_key")

    async with http.get(gateway.stack.origin + SPEND, headers={"Authorization": f"Bearer {org.key}"}) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
