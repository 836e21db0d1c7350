"""`/{provider}/*` native passthrough through the real stack: official SDKs pointed at
`<gateway>/<provider name>`, the provider key (never the virtual key) upstream, native bodies and
streams back, and every call priced into the run's ledger."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import msgspec
import openai
import psycopg
import pytest_asyncio

from schemas.money import decimal_to_nanos
from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.anthropic_upstream import FakeAnswer, FakeAnthropic
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.upstream import FakeUpstream

PRICE_IN, PRICE_OUT = 1_000_000_000, 4_000_000_000  # nano-USD per million tokens, for every provider here
TAG = uuid.uuid4().hex[:6]


def cost(input_tokens: int, output_tokens: int) -> int:
    """Independent arithmetic: integer nano-USD, rounded half up."""
    return (input_tokens * PRICE_IN + output_tokens * PRICE_OUT + 500_000) // 1_000_000


def origin(gateway: Gateway) -> str:
    return gateway.base_url.removesuffix("/v1")


async def journal_cost(gateway: Gateway, request_id: str) -> int | None:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute(
            "SELECT (body->>'cost_nanos')::bigint FROM event_journal WHERE type = 'llm.call' "
            "AND body->>'request_id' = %s", (request_id,))
        row = await cur.fetchone()
    return None if row is None else int(row[0])


def register(gateway: Gateway, name: str, kind: str, base_url: str, api_key: str, models: tuple[str, ...]) -> None:
    gateway.admin.call("POST", "/admin/v1/providers", {
        "workspace_id": "demo", "name": name, "type": kind, "base_url": base_url, "api_key": api_key})
    for model in models:
        gateway.admin.call("POST", "/admin/v1/prices", {
            "provider": name, "model": model, "input_per_mtok_nanos": PRICE_IN, "output_per_mtok_nanos": PRICE_OUT})


async def wait_for_provider(gateway: Gateway, http: aiohttp.ClientSession, name: str) -> None:
    """Until the workers' snapshot has the provider: any answer that names it (even the upstream's 404).
    `GET v1/models` is on every type's passthrough allowlist, so the probe itself is forwarded."""
    async def known() -> bool | None:
        async with http.get(f"{origin(gateway)}/{name}/v1/models",
                            headers={"Authorization": f"Bearer {gateway.demo_key}"}) as resp:
            return True if resp.headers.get("Alephant-Provider") == name else None

    await eventually(known)


@pytest_asyncio.fixture(scope="module")
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(answer=FakeAnswer(input_tokens=25, output_tokens=12)) as fake:
        yield fake


@pytest_asyncio.fixture(scope="module")
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    async with FakeGemini(words=6) as fake:
        yield fake


@pytest_asyncio.fixture(scope="module")
async def providers(gateway: Gateway, fake_upstream: FakeUpstream, fake_anthropic: FakeAnthropic,
                    fake_gemini: FakeGemini) -> dict[str, str]:
    names = {"openai": f"pt-oai-{TAG}", "anthropic": f"pt-ant-{TAG}", "gemini": f"pt-gem-{TAG}"}
    register(gateway, names["openai"], "openai", fake_upstream.base_url, "sk-pt-openai-upstream-1111",
             ("gpt-4o-mini",))
    register(gateway, names["anthropic"], "anthropic", fake_anthropic.base_url, "sk-pt-anthropic-upstream-2222",
             ("claude-opus-4-6",))
    register(gateway, names["gemini"], "gemini", fake_gemini.base_url, "pt-gemini-upstream-3333",
             ("gemini-2.5-flash",))
    async with aiohttp.ClientSession() as http:
        for name in names.values():
            await wait_for_provider(gateway, http, name)
    return names


async def _openai_calls(gateway: Gateway, name: str, key: str, headers: dict[str, str],
                        fake: FakeUpstream) -> list[int]:
    costs: list[int] = []
    async with openai.AsyncOpenAI(base_url=f"{origin(gateway)}/{name}/v1", api_key=key, max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello through the passthrough"}],
            extra_headers=headers)
        completion = raw.parse()
        assert completion.object == "chat.completion" and completion.usage is not None
        assert completion.id.startswith("chatcmpl-fake")  # the upstream's own body
        assert raw.headers["alephant-provider"] == name and raw.headers["x-request-id"].startswith("req_")
        forwarded = fake.requests[-1]
        assert forwarded.path == "/v1/chat/completions" and forwarded.api_key_hint == "1111"
        assert not any(h.startswith("alephant-") for h in forwarded.headers)
        header_cost = decimal_to_nanos(Decimal(raw.headers["alephant-cost-usd"]))
        assert header_cost == cost(completion.usage.prompt_tokens, completion.usage.completion_tokens) > 0
        costs.append(header_cost)

        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "stream it"}], stream=True,
            stream_options={"include_usage": True}, extra_headers=headers)
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text and usage is not None
        assert fake.requests[-1].api_key_hint == "1111"
        request_id = stream.response.headers["alephant-request-id"]
    stream_cost = await eventually(lambda: journal_cost(gateway, request_id))
    assert stream_cost == cost(usage.prompt_tokens, usage.completion_tokens)
    costs.append(stream_cost)
    return costs


async def _anthropic_calls(gateway: Gateway, name: str, key: str, headers: dict[str, str],
                           fake: FakeAnthropic) -> list[int]:
    costs: list[int] = []
    async with anthropic.AsyncAnthropic(base_url=f"{origin(gateway)}/{name}", api_key=key, max_retries=0) as sdk:
        raw = await sdk.messages.with_raw_response.create(
            model="claude-opus-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi claude"}],
            extra_headers={**headers, "anthropic-beta": "fine-grained-tool-streaming-2025-05-14"})
        message = await raw.parse()
        assert message.content[0].type == "text" and message.usage.input_tokens == 25
        forwarded = fake.requests[-1]
        assert forwarded.api_key_hint == "2222" and forwarded.path == "/v1/messages"
        assert forwarded.headers["anthropic-beta"] == "fine-grained-tool-streaming-2025-05-14"
        assert forwarded.headers["anthropic-version"] == sdk.default_headers["anthropic-version"]  # the client's, kept
        costs.append(decimal_to_nanos(Decimal(raw.headers["alephant-cost-usd"])))
        assert costs[-1] == cost(25, 12)

        async with sdk.messages.stream(model="claude-opus-4-6", max_tokens=64,
                                       messages=[{"role": "user", "content": "stream, claude"}],
                                       extra_headers=headers) as stream:
            text = await stream.get_final_text()
            final = await stream.get_final_message()
            request_id = stream.response.headers["alephant-request-id"]
        assert text == "Hello from the fake Anthropic upstream." and final.usage.output_tokens == 12
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert (event["ingress"], event["stream"], event["model"]) == ("passthrough", True, "claude-opus-4-6")
    assert event["usage"]["input_tokens"] == 25 and event["usage"]["output_tokens"] == 12
    costs.append(int(event["cost_nanos"]))
    assert costs[-1] == cost(25, 12)
    return costs


async def _gemini_calls(gateway: Gateway, name: str, key: str, headers: dict[str, str],
                        fake: FakeGemini, http: aiohttp.ClientSession) -> list[int]:
    costs: list[int] = []
    url = f"{origin(gateway)}/{name}/v1beta/models/gemini-2.5-flash"
    body = {"contents": [{"role": "user", "parts": [{"text": "sixteen chars!!!"}]}]}
    auth = {"x-goog-api-key": key, **headers}
    async with http.post(f"{url}:generateContent", json=body, headers=auth) as resp:
        assert resp.status == 200
        answer = await resp.json()
        header_cost = decimal_to_nanos(Decimal(resp.headers["Alephant-Cost-Usd"]))
    meta = answer["usageMetadata"]
    assert header_cost == cost(meta["promptTokenCount"], meta["candidatesTokenCount"]) > 0
    assert fake.requests[-1].api_key_hint == "3333"
    costs.append(header_cost)

    async with http.post(f"{url}:streamGenerateContent?alt=sse", json=body, headers=auth) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = await resp.read()
        request_id = resp.headers["Alephant-Request-Id"]
    chunks = [msgspec.json.decode(line[6:]) for line in raw.splitlines() if line.startswith(b"data: ")]
    final = chunks[-1]["usageMetadata"]
    assert fake.requests[-1].path.endswith(":streamGenerateContent?alt=sse")
    stream_cost = await eventually(lambda: journal_cost(gateway, request_id))
    assert stream_cost == cost(final["promptTokenCount"], final["candidatesTokenCount"])
    costs.append(stream_cost)
    return costs


async def test_native_sdks_through_passthrough_land_in_the_run_ledger(
        gateway: Gateway, providers: dict[str, str], fake_upstream: FakeUpstream, fake_anthropic: FakeAnthropic,
        fake_gemini: FakeGemini, http: aiohttp.ClientSession) -> None:
    key = gateway.create_key(name=f"pt-{TAG}", agent_id="demo-agent")["key"]
    run_id = f"run-pt-{uuid.uuid4().hex[:10]}"
    headers = {"Alephant-Agent-Id": "demo-agent", "Alephant-Run-Id": run_id}
    costs = await _openai_calls(gateway, providers["openai"], key, headers, fake_upstream)
    costs += await _anthropic_calls(gateway, providers["anthropic"], key, headers, fake_anthropic)
    costs += await _gemini_calls(gateway, providers["gemini"], key, headers, fake_gemini, http)

    async def summary() -> dict[str, Any] | None:
        status, body = gateway.admin.request("GET", f"/admin/v1/runs/{run_id}")
        return body if status == 200 and body["requests"] >= len(costs) else None

    run = await eventually(summary)
    assert run["requests"] == 6 and run["errors"] == 0
    assert run["cost_nanos"] == sum(costs) > 0
    assert Decimal(run["cost_usd"]) == Decimal(sum(costs)) / 10**9


async def test_unknown_provider_and_missing_key(gateway: Gateway, providers: dict[str, str],
                                                http: aiohttp.ClientSession) -> None:
    auth = {"Authorization": f"Bearer {gateway.demo_key}"}
    async with http.post(f"{origin(gateway)}/no-such-provider-{TAG}/v1/chat/completions", json={}, headers=auth) as r:
        assert r.status == 404
        error = (await r.json())["error"]
        assert (error["type"], error["code"]) == ("not_found_error", "provider_not_found")
    async with http.post(f"{origin(gateway)}/{providers['openai']}/v1/chat/completions", json={}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    async with http.post(f"{origin(gateway)}/{providers['anthropic']}/v1/messages", json={},
                         headers={"x-api-key": "sk-not-a-real-key"}) as r:
        assert r.status == 401 and (await r.json())["type"] == "error"  # Anthropic's shape
    async with http.get(f"{gateway.base_url}/models", headers=auth) as r:
        assert r.status == 200  # /v1 is never shadowed


async def test_upstream_429_is_relayed_with_its_retry_after(
        gateway: Gateway, providers: dict[str, str], fake_upstream: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake_upstream.fail_next(429, retry_after="7")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(f"{origin(gateway)}/{providers['openai']}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {gateway.demo_key}"}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
        error = (await resp.json())["error"]
        request_id = resp.headers["Alephant-Request-Id"]
    # The provider's own body, unchanged (the gateway's mapped error would say "Provider '...' returned 429").
    assert error == {"message": "Rate limit reached for requests. Please try again in 1s.", "type": "requests",
                     "param": None, "code": "rate_limit_exceeded"}
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert (event["status"], event["ingress"], event["cost_nanos"]) == (429, "passthrough", 0)
