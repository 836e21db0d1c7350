"""The walking skeleton, end to end through real NATS, Postgres and gateway processes:
admin API -> KV snapshot -> worker -> provider -> llm.call on JetStream -> projector -> ledger -> finance query.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import psycopg

from schemas.money import decimal_to_nanos
from tests.conftest import Gateway, eventually
from tests.fakes.upstream import FakeUpstream

MOCK_IN, MOCK_OUT = 150_000_000, 600_000_000  # the mock's built-in nano-USD per million tokens


def expected_cost(prompt_tokens: int, completion_tokens: int, per_in: int = MOCK_IN, per_out: int = MOCK_OUT) -> int:
    """Independent arithmetic for the test: integer nano-USD, rounded half up."""
    return (prompt_tokens * per_in + completion_tokens * per_out + 500_000) // 1_000_000


def client(gw: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


async def journal_cost(gw: Gateway, request_id: str) -> int | None:
    async with await psycopg.AsyncConnection.connect(gw.database_url) as conn:
        cur = await conn.execute(
            "SELECT (body->>'cost_nanos')::bigint FROM event_journal WHERE type = 'llm.call' "
            "AND body->>'request_id' = %s", (request_id,))
        row = await cur.fetchone()
    return None if row is None else int(row[0])


async def run_summary(gw: Gateway, run_id: str, requests: int) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        status, body = gw.admin.request("GET", f"/admin/v1/runs/{run_id}")
        return body if status == 200 and body["requests"] >= requests else None

    summary: dict[str, Any] = await eventually(check)
    return summary


async def _two_calls(sdk: openai.AsyncOpenAI, gateway: Gateway, messages: Any, headers: dict[str, str],
                     costs: list[int]) -> None:
    """One plain and one streamed call; appends each call's cost as the client could see it."""
    raw = await sdk.chat.completions.with_raw_response.create(
        model="mock/echo", messages=messages, extra_headers=headers)  # type: ignore[arg-type]
    completion = raw.parse()
    assert completion.choices[0].message.content == "count the cost of this call please"
    assert raw.headers["alephant-provider"] == "mock"
    assert raw.headers["alephant-request-id"].startswith("req_")
    header_cost = decimal_to_nanos(Decimal(raw.headers["alephant-cost-usd"]))
    assert completion.usage is not None
    assert header_cost == expected_cost(completion.usage.prompt_tokens, completion.usage.completion_tokens) > 0
    costs.append(header_cost)

    stream = await sdk.chat.completions.create(
        model="mock/echo", messages=messages, stream=True, stream_options={"include_usage": True},
        extra_headers=headers)  # type: ignore[arg-type]
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == "count the cost of this call please"
    assert usage is not None
    request_id = stream.response.headers["alephant-request-id"]
    stream_cost = await eventually(lambda: journal_cost(gateway, request_id))
    assert stream_cost == expected_cost(usage.prompt_tokens, usage.completion_tokens)
    costs.append(stream_cost)


async def test_sdk_calls_are_priced_and_land_in_a_balanced_ledger(gateway: Gateway) -> None:
    key = gateway.create_key(name="sdk-test", agent_id="demo-agent")["key"]
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    headers = {"Alephant-Agent-Id": "demo-agent", "Alephant-Run-Id": run_id, "Alephant-Session-Id": "s-1"}
    messages = [{"role": "user", "content": "count the cost of this call please"}]
    sdk = client(gateway, key)
    costs: list[int] = []
    async with sdk:
        await _two_calls(sdk, gateway, messages, headers, costs)

    summary = await run_summary(gateway, run_id, requests=2)
    assert summary["requests"] == 2
    assert summary["cost_nanos"] == sum(costs)
    assert Decimal(summary["cost_usd"]) == Decimal(sum(costs)) / 10**9
    assert summary["agents"] == ["demo-agent"]

    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT coalesce(sum(amount), 0), count(*), count(DISTINCT event_id) "
                                 "FROM ledger_transfer WHERE run_id = %s", (run_id,))
        total, rows, distinct = await cur.fetchone()  # type: ignore[misc]
        assert (int(total), rows, distinct) == (sum(costs), 2, 2)
        cur = await conn.execute("SELECT debit_account_id, credit_account_id FROM ledger_transfer WHERE run_id = %s",
                                 (run_id,))
        assert set(await cur.fetchall()) == {("agent:demo:demo-agent:llm_cost", "provider:demo:mock:payable")}
        cur = await conn.execute("SELECT currency, sum(debits_posted), sum(credits_posted) FROM ledger_account "
                                 "GROUP BY currency")
        for currency, debits, credits in await cur.fetchall():
            assert debits == credits, currency


async def test_openai_provider_relays_and_prices_with_operator_override(
        gateway: Gateway, fake_provider: str, fake_upstream: FakeUpstream) -> None:
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    async with client(gateway, gateway.demo_key) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model=f"{fake_provider}/gpt-4o-mini", messages=[{"role": "user", "content": "hi there"}], max_tokens=5,
            extra_headers={"Alephant-Run-Id": run_id})
    completion = raw.parse()
    assert completion.usage is not None and completion.choices[0].finish_reason == "length"
    forwarded = fake_upstream.requests[-1]
    assert forwarded.body["model"] == "gpt-4o-mini"  # the provider prefix is stripped upstream
    assert forwarded.api_key_hint == "6789"  # the decrypted provider key, not the client's virtual key
    cost = decimal_to_nanos(Decimal(raw.headers["alephant-cost-usd"]))
    assert cost == expected_cost(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    summary = await run_summary(gateway, run_id, requests=1)
    assert summary["cost_nanos"] == cost


async def test_revoked_key_is_rejected_fleet_wide_without_restart(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    created = gateway.create_key(name="to-revoke")
    auth = {"Authorization": f"Bearer {created['key']}"}
    async with http.get(f"{gateway.base_url}/models", headers=auth) as resp:
        assert resp.status == 200
        assert "mock/echo" in {m["id"] for m in (await resp.json())["data"]}

    gateway.admin.call("POST", f"/admin/v1/virtual-keys/{created['id']}/revoke")
    revoked_at = time.monotonic()

    async def rejected() -> dict[str, Any] | None:
        async with http.get(f"{gateway.base_url}/models", headers=auth) as resp:
            return await resp.json() if resp.status == 401 else None

    body = await eventually(rejected, timeout=5.0, interval=0.02)
    assert time.monotonic() - revoked_at < 2.0
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "authentication_error"
    # The demo key is unaffected.
    async with http.get(f"{gateway.base_url}/models",
                        headers={"Authorization": f"Bearer {gateway.demo_key}"}) as resp:
        assert resp.status == 200


async def test_admin_api_requires_its_token_and_serves_openapi(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    base = gateway.stack.admin_url
    async with http.get(f"{base}/admin/v1/workspaces") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_admin_token"
    async with http.get(f"{base}/admin/v1/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    assert "/admin/v1/virtual-keys/{id}/revoke" in doc["paths"]
    listed = gateway.admin.call("GET", "/admin/v1/virtual-keys?workspace_id=demo")["data"]
    assert listed and all("key" not in k and "key_hash" not in k for k in listed)


async def test_admin_model_views_match_what_keys_see(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.base_url}/models",
                        headers={"Authorization": f"Bearer {gateway.demo_key}"}) as resp:
        seen = [m["id"] for m in (await resp.json())["data"]]
    admin = gateway.admin.call("GET", "/admin/v1/models?workspace_id=demo")
    assert [m["id"] for m in admin["data"]] == seen and "mock/echo" in seen
    catalog = {entry["type"]: entry["models"] for entry in gateway.admin.call("GET", "/admin/v1/catalog")["data"]}
    assert {"openai", "anthropic", "gemini", "bedrock", "mock"} <= set(catalog)
    assert any(m["id"] == "gpt-4o-mini" and m["context_window"] for m in catalog["openai"])
