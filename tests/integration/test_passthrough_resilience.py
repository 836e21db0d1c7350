"""Resilience on the passthrough (issue 10): a provider's `retries` option re-sends a retryable
answer (the last one is relayed as the provider sent it), and every attempt is in the event with
the provider's own status."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio

from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.upstream import FakeUpstream

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest_asyncio.fixture(scope="module")
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


async def _provider(gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream, **options: str) -> str:
    name = f"pt{os.urandom(3).hex()}"
    gateway.admin.call("POST", "/admin/v1/providers", {
        "workspace_id": "demo", "name": name, "type": "openai", "base_url": fake.base_url,
        "api_key": "sk-pt-upstream-0123456789", "options": options})

    async def known() -> bool | None:
        status, _, _ = await _post(gateway, http, name)
        return True if status == 200 else None
    await eventually(known)
    return name


async def _post(gateway: Gateway, http: aiohttp.ClientSession, name: str) -> tuple[int, dict[str, str], str]:
    url = f"{gateway.base_url.removesuffix('/v1')}/{name}/v1/chat/completions"
    async with http.post(url, json=BODY, headers={"Authorization": f"Bearer {gateway.demo_key}"}) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def test_a_retryable_answer_is_retried_when_the_provider_allows_and_every_attempt_is_recorded(
        gateway: Gateway, http: aiohttp.ClientSession, fake: FakeUpstream) -> None:
    plain = await _provider(gateway, http, fake)
    retried = await _provider(gateway, http, fake, retries="1")
    fake.fail_next(503)
    status, headers, text = await _post(gateway, http, plain)
    assert status == 503 and "error" in text  # relayed as the provider sent it, no retry by default
    event = await eventually(lambda: journal_event(gateway.database_url, headers["Alephant-Request-Id"]))
    assert [(a["status"], a["retryable"]) for a in event["attempts"]] == [(503, True)]
    fake.fail_next(503)
    before = fake.chat_attempts
    status, headers, _ = await _post(gateway, http, retried)
    assert status == 200 and fake.chat_attempts == before + 2
    event = await eventually(lambda: journal_event(gateway.database_url, headers["Alephant-Request-Id"]))
    assert [a["status"] for a in event["attempts"]] == [503, 200]
    fake.fail_next(404)
    status, headers, _ = await _post(gateway, http, retried)
    assert status == 404  # terminal: relayed at once, not retried
    event = await eventually(lambda: journal_event(gateway.database_url, headers["Alephant-Request-Id"]))
    assert [a["status"] for a in event["attempts"]] == [404]
