"""Re-pricing unpriced calls, end to end on the real stack (issue 9).

A call to a model no price knows is recorded with cost 0, `priced: false`, and its tokens parked in
the suspense account of its provider and model. A workspace-scoped price is then set (with a
negotiated discount and a per-request fee), and `POST /admin/v1/finance/reprice` (and `alephant
ledger reprice`) prices those calls: the suspense account nets to 0, the agent's `llm_cost` account
and the finance projection carry the cost, and re-pricing again books nothing more.

Expected costs are computed here from the token counts the client saw and the price set, not with
the code under test.
"""

from __future__ import annotations

import asyncio
import uuid
from fractions import Fraction
from typing import Any

import openai
import psycopg
import pytest
from genai_prices import Usage as GPUsage
from genai_prices import calc_price
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Gateway, cli_json, eventually, journal_event
from tests.fakes.upstream import FakeUpstream

MODEL = "acme-llm-7b"  # no catalog knows it
PER_IN, PER_OUT = 1_234_567_891, 9_876_543_219  # nano-USD per million tokens
DISCOUNT = Fraction(875, 1000)  # discount_pct "12.5"
FEE = 150_000  # per_request_usd "0.00015", per successful call


def expected_cost(prompt: int, completion: int) -> int:
    """Tokens at the price, less 12.5 %, rounded half up to a nano-USD, plus the per-request fee."""
    exact = Fraction(prompt * PER_IN + completion * PER_OUT, 1_000_000) * DISCOUNT
    return int(exact + Fraction(1, 2)) + FEE



async def rows(gateway: Gateway, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall()


async def account(gateway: Gateway, account_id: str) -> tuple[int, int]:
    """(debits, credits) posted to an account; (0, 0) while it does not exist."""
    found = await rows(gateway, "SELECT debits_posted, credits_posted FROM ledger_account WHERE id = %s", account_id)
    return (int(found[0][0]), int(found[0][1])) if found else (0, 0)


async def call(sdk: openai.AsyncOpenAI, provider: str, stream: bool) -> tuple[str, int, int]:
    """One call (streamed or not): its request id, prompt and completion tokens."""
    headers = {"Alephant-Property-Team": "Search", "Alephant-Run-Id": "run-reprice"}
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "price me later please"}]
    if not stream:
        raw = await sdk.chat.completions.with_raw_response.create(
            model=f"{provider}/{MODEL}", messages=messages, extra_headers=headers)
        completion = raw.parse()
        assert completion.usage is not None
        assert raw.headers["alephant-cost-usd"] == "0"
        return raw.headers["alephant-request-id"], completion.usage.prompt_tokens, completion.usage.completion_tokens
    chunks = await sdk.chat.completions.create(
        model=f"{provider}/{MODEL}", messages=messages, stream=True,
        stream_options={"include_usage": True}, extra_headers=headers)
    usage = None
    async for chunk in chunks:
        usage = chunk.usage or usage
    assert usage is not None
    return chunks.response.headers["alephant-request-id"], usage.prompt_tokens, usage.completion_tokens


async def test_unpriced_calls_are_repriced_once_when_a_price_is_added(
        gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    with pytest.raises(LookupError):  # the premise: genai-prices cannot price this model
        calc_price(GPUsage(input_tokens=1, output_tokens=1), MODEL, provider_id="openai")
    tag = uuid.uuid4().hex[:8]
    ws, provider, agent = f"rp-{tag}", "acmecloud", f"rp-agent-{tag}"
    admin = gateway.admin
    admin.call("POST", "/admin/v1/workspaces", {"name": f"Repricing {tag}", "id": ws})
    admin.call("POST", "/admin/v1/providers", {"workspace_id": ws, "name": provider, "type": "openai",
                                               "base_url": fake_upstream.base_url, "api_key": "sk-fake-upstream-rp"})
    admin.call("POST", "/admin/v1/agents", {"workspace_id": ws, "name": "Repriced agent", "id": agent})
    key = gateway.create_key(ws, agent_id=agent)["key"]
    suspense = f"suspense:{ws}:unpriced:{provider}/{MODEL}"
    cost_account = f"agent:{ws}:{agent}:llm_cost"

    # 1. Two calls no price knows: cost 0, unpriced, their tokens in suspense.
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as sdk:
        made = [await call(sdk, provider, stream=False), await call(sdk, provider, stream=True)]
    tokens = sum(p + c for _, p, c in made)
    for request_id, _, _ in made:
        event = await journalled(gateway, request_id)
        assert (event["cost_nanos"], event["priced"], event["price_source"]) == (0, False, "unpriced")
        assert event["price_id"] is None
        assert event["properties"] == {"team": "Search"}
    await eventually(lambda: _when(account(gateway, suspense), lambda a: a == (tokens, 0)))
    transfers = await rows(gateway, "SELECT code, currency, amount, credit_account_id FROM ledger_transfer "
                                    "WHERE debit_account_id = %s", suspense)
    assert sorted(transfers) == sorted(("llm_unpriced", "TOKENS", p + c, f"agent:{ws}:{agent}:unpriced_usage")
                                       for _, p, c in made)
    assert await account(gateway, cost_account) == (0, 0)

    # Nothing to re-price with yet.
    body = {"workspace_id": ws, "provider": provider, "model": MODEL}
    nothing = admin.call("POST", "/admin/v1/finance/reprice", body)
    assert (nothing["repriced"], nothing["still_unpriced"], nothing["cost_usd"], nothing["more"]) == (0, 2, "0", False)

    # 2. Price validation: nothing half-written.
    for bad, status, code in (
            ({"scope": "workspace", "discount_pct": "5"}, 400, "missing_scope_id"),
            ({"scope": "galaxy", "discount_pct": "5"}, 400, "invalid_scope"),
            ({"scope": "workspace", "workspace_id": f"nope-{tag}", "discount_pct": "5"}, 404, "workspace_not_found"),
            ({"scope": "provider_key", "provider_key_id": f"pkey_nope{tag}", "discount_pct": "5"}, 404,
             "provider_key_not_found"),
            ({"scope": "workspace", "workspace_id": ws, "discount_pct": "100"}, 400, "invalid_discount")):
        got, answer = admin.request("POST", "/admin/v1/prices", {"provider": provider, "model": MODEL} | bad)
        assert (got, answer["error"]["code"]) == (status, code), answer
    listed = admin.call("GET", "/admin/v1/prices")["data"]
    assert [p for p in listed if p["provider"] == provider] == []

    # 3. A workspace-scoped price with a negotiated discount and a per-request fee (the CLI waits
    #    until every worker applied it).
    price = cli_json(gateway, "prices", "set", provider, MODEL, "-w", ws, "--input", str(PER_IN),
                     "--output", str(PER_OUT), "--discount-pct", "12.5", "--per-request-usd", "0.00015", "--wait")
    assert (price["scope"], price["workspace_id"], price["discount_pct"], price["per_request_usd"]) == (
        "workspace", ws, "12.5", "0.00015")

    # A new call is priced by it, and says so.
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as sdk:
        request_id, prompt, completion = await call_priced(sdk, provider)
    event = await journalled(gateway, request_id)
    assert (event["priced"], event["price_source"], event["price_id"], event["price_scope"]) == (
        True, "override", price["id"], "workspace")
    assert event["cost_nanos"] == expected_cost(prompt, completion)

    # 4. Re-price the two unpriced calls.
    repriced = admin.call("POST", "/admin/v1/finance/reprice", body)
    want = sum(expected_cost(p, c) for _, p, c in made)
    assert (repriced["repriced"], repriced["still_unpriced"], repriced["cost_nanos"], repriced["more"]) == (
        2, 0, want, False)
    assert repriced["propagated"] is True
    await eventually(lambda: _when(account(gateway, suspense), lambda a: a == (tokens, tokens)))
    await eventually(lambda: _when(account(gateway, cost_account),
                                   lambda a: a == (want + expected_cost(prompt, completion), 0)))
    legs = await rows(gateway, "SELECT t.code, t.amount, j.body->>'original_event_id' FROM ledger_transfer t "
                               "JOIN event_journal j ON j.event_id = t.event_id "
                               "WHERE t.workspace_id = %s AND j.type = 'llm.repriced' ORDER BY t.code, t.amount",
                      ws)
    assert sorted((code, int(amount)) for code, amount, _ in legs) == sorted(
        [("llm_cost_repriced", expected_cost(p, c)) for _, p, c in made]
        + [("llm_unpriced_reversal", p + c) for _, p, c in made])
    originals = {event_id for _, _, event_id in legs}
    calls = {(await journal_event(gateway.database_url, rid) or {}).get("event_id") for rid, _, _ in made}
    assert originals == calls

    # The finance projection: unpriced tokens net to 0, the cost is there (dated at the calls).
    async def facts() -> tuple[int, int] | None:
        found = await rows(gateway, "SELECT coalesce(sum(unpriced_tokens), 0), coalesce(sum(llm_cost_nanos), 0), "
                                    "count(*) FROM finance_fact WHERE workspace_id = %s AND provider = %s "
                                    "AND model = %s", ws, provider, MODEL)
        unpriced, cost, count = found[0]
        return (int(unpriced), int(cost)) if count == 5 else None  # 3 calls, 2 re-pricings

    assert await eventually(facts) == (0, want + expected_cost(prompt, completion))

    # 5. Again (the API, then the CLI, then with a platform price too): nothing more is booked.
    again = admin.call("POST", "/admin/v1/finance/reprice", body)
    assert (again["repriced"], again["cost_usd"]) == (0, "0")
    platform = admin.call("POST", "/admin/v1/prices", {"provider": provider, "model": MODEL,
                                                       "input_per_mtok_nanos": 1, "output_per_mtok_nanos": 1})
    assert cli_json(gateway, "ledger", "reprice", "--provider", provider, "--model", "*")["repriced"] == 0
    admin.call("DELETE", f"/admin/v1/prices/{platform['id']}")
    await asyncio.sleep(1.0)  # anything wrongly published would be projected by now
    assert await account(gateway, suspense) == (tokens, tokens)
    assert await account(gateway, cost_account) == (want + expected_cost(prompt, completion), 0)
    count = await rows(gateway, "SELECT count(*) FROM event_journal WHERE type = 'llm.repriced' AND workspace_id = %s",
                       ws)
    assert count[0][0] == 2


async def call_priced(sdk: openai.AsyncOpenAI, provider: str) -> tuple[str, int, int]:
    raw = await sdk.chat.completions.with_raw_response.create(
        model=f"{provider}/{MODEL}", messages=[{"role": "user", "content": "now I have a price"}])
    completion = raw.parse()
    assert completion.usage is not None
    return raw.headers["alephant-request-id"], completion.usage.prompt_tokens, completion.usage.completion_tokens


async def journalled(gateway: Gateway, request_id: str) -> dict[str, Any]:
    return await eventually(lambda: journal_event(gateway.database_url, request_id))


async def _when(value: Any, ok: Any) -> Any:
    got = await value
    return got if ok(got) else None
