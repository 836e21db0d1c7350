"""The exact response cache end to end (issue 11): the real stack and Redis, the fake OpenAI
upstream as provider `cfake`, the official SDKs as clients. Caching is turned on per request with
`Alephant-Cache-Ttl` (no settings needed) unless a test says otherwise; counts at the fake are
upstream calls."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import anthropic
import openai
import psycopg
import pytest
import pytest_asyncio

from dataplane.cache import NEAR_TTL_S
from tests.conftest import Gateway, cli_json, eventually, journal_event
from tests.fakes.upstream import FakeUpstream

MODEL = "gpt-4o-mini"
REF = f"cfake/{MODEL}"
PRICE = {"input_per_mtok_nanos": 150_000_000, "output_per_mtok_nanos": 600_000_000}


@pytest_asyncio.fixture(scope="module")
async def fake(gateway: Gateway) -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(words=12) as upstream:
        gateway.admin.call("POST", "/admin/v1/providers", {
            "workspace_id": "demo", "name": "cfake", "type": "openai", "base_url": upstream.base_url,
            "api_key": "sk-cfake-upstream-0123456789"})
        gateway.admin.call("POST", "/admin/v1/prices", {"provider": "cfake", "model": MODEL, **PRICE})
        yield upstream


def calls_at(fake: FakeUpstream) -> int:
    return fake.chat_attempts


def question() -> list[dict[str, str]]:
    """A question no other test asks (every test starts from an empty cache)."""
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is cached here? {os.urandom(6).hex()}"}]


async def post(gateway: Gateway, http: aiohttp.ClientSession, body: dict[str, Any],
               headers: dict[str, str] | None = None,
               path: str = "/chat/completions") -> tuple[int, dict[str, str], Any]:
    async with http.post(gateway.base_url + path, json=body,
                         headers={"Authorization": f"Bearer {gateway.demo_key}", **(headers or {})}) as resp:
        text = await resp.text()
        data: Any = text if body.get("stream") else await resp.json(content_type=None)
        return resp.status, dict(resp.headers), data


TTL = {"Alephant-Cache-Ttl": "60"}


async def test_the_same_question_twice_is_answered_from_the_cache_the_second_time(
        gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream) -> None:
    body = {"model": REF, "messages": question(), "max_tokens": 64}
    before = calls_at(fake)
    status, headers, first = await post(gateway, http, body, TTL)
    assert status == 200 and headers["Alephant-Cache"] == "miss"
    assert first["usage"]["completion_tokens"] > 0

    async def again() -> tuple[dict[str, str], Any] | None:  # the store is off the request path
        _, h, data = await post(gateway, http, body, TTL)
        return (h, data) if h["Alephant-Cache"] == "hit" else None
    headers, second = await eventually(again, timeout=5)
    upstream = calls_at(fake)
    assert upstream - before >= 1
    _, third_headers, _ = await post(gateway, http, body, TTL)
    assert third_headers["Alephant-Cache"] == "hit" and calls_at(fake) == upstream  # no upstream call
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    assert second["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert headers["Alephant-Cost-Usd"] == "0" and headers["Alephant-Provider"] == "cfake"
    event = await eventually(lambda: _cache_hit(gateway, headers["Alephant-Request-Id"]))
    assert (event["provider"], event["model"], event["cache"]) == ("cfake", MODEL, "exact")
    assert event["saved_nanos"] > 0 and event["usage"]["output_tokens"] == first["usage"]["completion_tokens"]


async def _cache_hit(gateway: Gateway, request_id: str) -> dict[str, Any] | None:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT body FROM event_journal WHERE type = 'cache.hit' AND "
                                 "body->>'request_id' = %s", (request_id,))
        row = await cur.fetchone()
    return None if row is None else dict(row[0])


def sdk_openai(gateway: Gateway, headers: dict[str, str] | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=gateway.demo_key, max_retries=0,
                              default_headers=headers or TTL)


def sdk_anthropic(gateway: Gateway, headers: dict[str, str] | None = None) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gateway.base_url.removesuffix("/v1"), api_key=gateway.demo_key,
                                    max_retries=0, default_headers=headers or TTL)


async def _cached(gateway: Gateway, http: aiohttp.ClientSession, messages: list[dict[str, str]],
                  max_tokens: int) -> str:
    """Ask through Chat until the answer is stored; its text."""
    body = {"model": REF, "messages": messages, "max_tokens": max_tokens}
    _, _, first = await post(gateway, http, body, TTL)

    async def stored() -> bool | None:
        _, h, _ = await post(gateway, http, body, TTL)
        return True if h["Alephant-Cache"] == "hit" else None
    await eventually(stored, timeout=5)
    text: str = first["choices"][0]["message"]["content"]
    return text


async def test_an_answer_cached_from_chat_is_replayed_in_every_api_and_stream_mode(
        gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream) -> None:
    messages = question()
    text = await _cached(gateway, http, messages, 64)
    upstream = calls_at(fake)
    async with sdk_openai(gateway) as client:
        raw = await client.chat.completions.with_raw_response.create(model=REF, messages=cast(Any, messages),
                                                                     max_tokens=64)
        assert raw.headers["alephant-cache"] == "hit" and raw.parse().choices[0].message.content == text
        stream = await client.chat.completions.create(model=REF, messages=cast(Any, messages), max_tokens=64,
                                                      stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        async for chunk in stream:
            parts += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(parts) == text and usage is not None and usage.total_tokens == 0
        # Responses: the same question as `instructions` + `input`
        resp = await client.responses.create(model=REF, instructions=messages[0]["content"],
                                             input=messages[1]["content"], max_output_tokens=64)
        assert resp.output_text == text
    async with sdk_anthropic(gateway) as claude:
        message = await claude.messages.create(model=REF, system=messages[0]["content"], max_tokens=64,
                                               messages=[{"role": "user", "content": messages[1]["content"]}])
        assert message.content[0].type == "text" and message.content[0].text == text
        assert message.usage.input_tokens == 0 and message.usage.output_tokens == 0
        async with claude.messages.stream(model=REF, system=messages[0]["content"], max_tokens=64,
                                          messages=[{"role": "user", "content": messages[1]["content"]}]) as s:
            streamed = await s.get_final_message()
        assert streamed.content[0].type == "text" and streamed.content[0].text == text
        assert streamed.stop_reason == "end_turn"
    assert calls_at(fake) == upstream, "every replay came from the cache"


async def test_a_streamed_answer_is_stored_and_replayed_unstreamed(
        gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream) -> None:
    body: dict[str, Any] = {"model": REF, "messages": question(), "max_tokens": 64, "stream": True}
    status, headers, text = await post(gateway, http, body, TTL)
    assert status == 200 and headers["Alephant-Cache"] == "miss" and text.rstrip().endswith("[DONE]")
    body["stream"] = False

    async def hit() -> Any:
        _, h, data = await post(gateway, http, body, TTL)
        return data if h["Alephant-Cache"] == "hit" else None
    data = await eventually(hit, timeout=5)
    words = [line for line in text.splitlines() if '"content"' in line]
    assert data["choices"][0]["message"]["content"] and words
    assert data["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(("change", "hits"), [
    ({"user": "someone-else"}, True),
    ({"metadata": {"a": "b"}}, True),
    ({"stream_options": {"include_usage": True}, "stream": True}, True),
    ({"temperature": 0.3}, False),
    ({"max_tokens": 32}, False),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, False),
    ({"messages": [{"role": "user", "content": "something else entirely"}]}, False),
])
async def test_fields_that_change_the_answer_miss_and_the_others_hit(
        gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream, change: dict[str, Any],
        hits: bool) -> None:
    messages = question()
    await _cached(gateway, http, messages, 64)
    status, headers, _ = await post(gateway, http, {"model": REF, "messages": messages, "max_tokens": 64, **change},
                                    TTL)
    assert status == 200 and headers["Alephant-Cache"] == ("hit" if hits else "miss")


async def test_ttl_expiry_and_the_skip_refresh_and_no_cache_controls(
        gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream) -> None:
    body = {"model": REF, "messages": question(), "max_tokens": 64}
    short = {"Alephant-Cache-Ttl": "1"}
    await post(gateway, http, body, short)

    async def hit() -> bool | None:
        _, h, _ = await post(gateway, http, body, short)
        return True if h["Alephant-Cache"] == "hit" else None
    await eventually(hit, timeout=5)
    await asyncio.sleep(1.3)
    _, headers, _ = await post(gateway, http, body, short)
    assert headers["Alephant-Cache"] == "miss", "expired after its TTL"
    await eventually(hit, timeout=5)
    for control in ({"Alephant-Cache": "skip", **short}, {"Cache-Control": "no-cache", **short}):
        before = calls_at(fake)
        _, headers, _ = await post(gateway, http, body, control)
        assert headers["Alephant-Cache"] == "skip" and calls_at(fake) == before + 1
    before = calls_at(fake)
    _, headers, _ = await post(gateway, http, body, {"Alephant-Cache": "refresh", **short})
    assert headers["Alephant-Cache"] == "miss" and calls_at(fake) == before + 1  # not read, but written
    _, headers, _ = await post(gateway, http, body, short)
    assert headers["Alephant-Cache"] == "hit"
    # Without a TTL or a setting, nothing is cached.
    _, headers, _ = await post(gateway, http, {"model": REF, "messages": question(), "max_tokens": 64})
    assert headers["Alephant-Cache"] == "miss"
    # A namespace is a separate cache.
    _, headers, _ = await post(gateway, http, body, {**short, "Alephant-Cache-Namespace": "other"})
    assert headers["Alephant-Cache"] == "miss"


async def test_redis_paused_the_cache_fails_open_with_bounded_latency(
        gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream) -> None:
    redis = gateway.stack.services.get("redis")
    if redis is None:
        pytest.skip("Redis is an external service here; this test pauses the embedded one")
    body = {"model": REF, "messages": question(), "max_tokens": 64}
    await _cached(gateway, http, body["messages"], 64)  # type: ignore[arg-type]
    await asyncio.sleep(NEAR_TTL_S + 0.2)  # past the worker's in-memory copy: the next reads go to Redis
    redis.pause()
    try:
        took = []
        for question_body in [body] + [{**body, "messages": question()} for _ in range(5)]:
            started = time.monotonic()
            status, headers, _ = await post(gateway, http, question_body, TTL)
            took.append(time.monotonic() - started)
            assert status == 200 and headers["Alephant-Cache"] == "miss"  # even the cached one: Redis is away
        assert max(took) < 1.0, took  # one cache deadline at most, then the breaker skips the cache
    finally:
        redis.resume()

    async def back() -> bool | None:
        _, h, _ = await post(gateway, http, body, TTL)
        return True if h["Alephant-Cache"] == "hit" else None
    await eventually(back, timeout=10)


async def test_savings_in_the_finance_views_equal_the_would_be_costs(
        gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream) -> None:
    agent = f"cache-agent-{os.urandom(3).hex()}"
    headers = {**TTL, "Alephant-Agent-Id": agent, "Alephant-Run-Id": f"run-{agent}"}
    body = {"model": REF, "messages": question(), "max_tokens": 64}
    status, first_headers, _ = await post(gateway, http, body, headers)
    assert status == 200
    first = await eventually(lambda: journal_event(gateway.database_url, first_headers["Alephant-Request-Id"]))
    hits: list[str] = []
    while len(hits) < 3:
        _, h, _ = await post(gateway, http, body, headers)
        if h["Alephant-Cache"] == "hit":
            hits.append(h["Alephant-Request-Id"])
        else:
            await asyncio.sleep(0.05)
    events = []
    for rid in hits:
        async def hit_event(rid: str = rid) -> dict[str, Any] | None:
            return await _cache_hit(gateway, rid)
        events.append(await eventually(hit_event))
    assert all(e["saved_nanos"] == first["cost_nanos"] for e in events)  # the same price as the original call

    async def summary() -> dict[str, Any] | None:
        rows = cli_json(gateway, "finance", "summary", "--group-by", "agent", "--workspace", "demo",
                        "--format", "json")["data"]
        row = next((r for r in rows if r["agent_id"] == agent), None)
        return row if row is not None and int(row["cache_savings_nanos"]) == 3 * first["cost_nanos"] else None
    row = await eventually(summary, timeout=15)
    assert int(row["cache_savings_nanos"]) == sum(e["saved_nanos"] for e in events)


async def test_a_budgeted_key_hits_without_max_tokens_and_limits_still_apply_to_hits(
        gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream) -> None:
    key = gateway.create_key()
    gateway.admin.call("POST", "/admin/v1/budgets", {"workspace_id": "demo", "scope": "key", "scope_id": key["id"],
                                                     "period": "month", "limit_usd": "5"})
    gateway.admin.call("POST", "/admin/v1/limits", {"workspace_id": "demo", "scope": "key", "scope_id": key["id"],
                                                    "rpm": 4})
    body = {"model": REF, "messages": question()}  # no max_tokens: the budget injects one at admission

    async def ask() -> tuple[int, str]:
        async with http.post(gateway.base_url + "/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key['key']}", **TTL}) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Alephant-Cache", "")

    async def budgeted() -> tuple[int, str] | None:  # the budget and limit reach the worker
        answer = await ask()
        return answer if answer[0] == 200 else None
    assert await eventually(budgeted) == (200, "miss")
    await asyncio.sleep(0.3)  # the answer's store, off the request path
    statuses = [await ask() for _ in range(4)]
    assert statuses[:3] == [(200, "hit")] * 3, statuses  # the injected max_tokens is not part of the key
    assert statuses[3][0] == 429, statuses  # the fifth call in the minute: hits count against the rpm too
