"""The exact response cache end to end (issue 11): the real stack and Redis, the fake OpenAI
upstream as provider `cfake`, the official SDKs as clients. Caching is turned on per request with
`Alephant-Cache-Ttl` (no settings needed) unless a test says otherwise; counts at the fake are
upstream calls."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import pytest_asyncio

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
               headers: dict[str, str] | None = None, path: str = "/chat/completions") -> tuple[int, dict[str, str], Any]:
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
    assert headers["Alephant-Cost-Usd"] == "0"
    event = await eventually(lambda: _cache_hit(gateway, headers["Alephant-Request-Id"]))
    assert (event["provider"], event["model"], event["cache"]) == ("cfake", MODEL, "exact")
    assert event["saved_nanos"] > 0 and event["usage"]["output_tokens"] == first["usage"]["completion_tokens"]


async def _cache_hit(gateway: Gateway, request_id: str) -> dict[str, Any] | None:
    import psycopg
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT body FROM event_journal WHERE type = 'cache.hit' AND "
                                 "body->>'request_id' = %s", (request_id,))
        row = await cur.fetchone()
    return None if row is None else dict(row[0])
