"""Every call is recorded: the `llm.call` event in the journal, with provider-reported usage and a
cost priced from the bundled catalog (or `priced: false` with cost 0 when the model has no price)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import psycopg
import pytest
from genai_prices import Usage as CatalogUsage
from genai_prices import calc_price

from schemas.money import decimal_to_nanos
from tests.conftest import eventually
from tests.contract.conftest import CATALOG_ID, KINDS, PRICED, Contract
from tests.fakes.responses_upstream import USAGE as NATIVE_RESPONSES_USAGE


async def journal_row(contract: Contract, request_id: str) -> dict[str, Any]:
    async def fetch() -> dict[str, Any] | None:
        async with await psycopg.AsyncConnection.connect(contract.gateway.database_url) as conn:
            cur = await conn.execute("SELECT body FROM event_journal WHERE type = 'llm.call' "
                                     "AND body->>'request_id' = %s", (request_id,))
            row = await cur.fetchone()
        return None if row is None else dict(row[0])

    found: dict[str, Any] = await eventually(fetch, timeout=15.0, interval=0.1)
    return found


def catalog_cost_nanos(kind: str, model: str, usage: dict[str, int]) -> int:
    """The price computed here, independently, from the journal's usage and the bundled catalog."""
    price = calc_price(CatalogUsage(input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"],
                                    cache_read_tokens=usage["cache_read_tokens"] or None,
                                    cache_write_tokens=usage["cache_write_tokens"] or None),
                       model, provider_id=CATALOG_ID[kind])
    return decimal_to_nanos(price.total_price)


def check_cost(kind: str, model: str, row: dict[str, Any]) -> None:
    assert row["priced"] is PRICED[kind]
    if PRICED[kind]:
        assert row["cost_nanos"] == catalog_cost_nanos(kind, model, row["usage"]) > 0
    else:
        assert row["cost_nanos"] == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_chat_call_is_journalled_with_usage_and_cost(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.openai() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=up.ref, messages=[{"role": "user", "content": "How much does this cost?"}])
    completion = raw.parse()
    assert completion.usage is not None
    row = await journal_row(contract, raw.headers["alephant-request-id"])
    assert row["provider"] == up.name and row["model"] == up.model
    assert row["ingress"] == "chat.completions" and row["status"] == 200 and row["stream"] is False
    assert row["workspace_id"] == "demo"
    assert row["usage"]["input_tokens"] == completion.usage.prompt_tokens > 0
    assert row["usage"]["output_tokens"] == completion.usage.completion_tokens > 0
    check_cost(kind, up.model, row)
    assert decimal_to_nanos(Decimal(raw.headers["alephant-cost-usd"])) == row["cost_nanos"]


async def test_native_responses_stream_usage_is_journalled(contract: Contract) -> None:
    up = contract["openai"]
    async with contract.openai() as client:
        stream = await client.responses.create(model=up.ref, input="hello", stream=True)
        events = [event async for event in stream]
        request_id = stream.response.headers["alephant-request-id"]
    assert events[-1].type == "response.completed"
    row = await journal_row(contract, request_id)
    assert row["ingress"] == "openai.responses" and row["stream"] is True and row["partial"] is False
    u = NATIVE_RESPONSES_USAGE
    assert row["usage"] == {
        "input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"],
        "cache_read_tokens": u["input_tokens_details"]["cached_tokens"],
        "cache_write_tokens": u["input_tokens_details"]["cache_write_tokens"],
        "reasoning_tokens": u["output_tokens_details"]["reasoning_tokens"],
    }
    check_cost("openai", up.model, row)


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_messages_stream_usage_is_journalled(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.anthropic() as client, \
            client.messages.stream(model=up.ref, max_tokens=128,
                                   messages=[{"role": "user", "content": "hello"}]) as stream:
        final = await stream.get_final_message()
        request_id = stream.response.headers["alephant-request-id"]
    row = await journal_row(contract, request_id)
    assert row["ingress"] == "anthropic.messages" and row["stream"] is True
    assert row["provider"] == up.name
    assert row["usage"]["input_tokens"] == final.usage.input_tokens > 0
    assert row["usage"]["output_tokens"] == final.usage.output_tokens > 0
    check_cost(kind, up.model, row)


async def test_failed_call_is_journalled_at_zero_cost(contract: Contract) -> None:
    up = contract["openai"]
    up.fake.fail_next(400)
    async with contract.openai() as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=up.ref, messages=[{"role": "user", "content": "boom"}])
    row = await journal_row(contract, info.value.response.headers["alephant-request-id"])
    assert row["provider"] == up.name and row["ingress"] == "chat.completions"
    assert row["status"] == 400 and row["error_code"] == "upstream_invalid_request"
    assert row["cost_nanos"] == 0 and row["usage"]["input_tokens"] == 0
