"""Self-test of the fake upstream through the official ``openai`` SDK and raw aiohttp."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes.openai_bodies import count_prompt_tokens
from tests.fakes.upstream import FakeUpstream

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the gateway, please."},
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(words=8) as upstream:
        yield upstream


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test-1234", max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


async def test_non_streaming_shape_and_usage(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o-mini"
    assert resp.system_fingerprint
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.refusal is None
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None and len(choice.message.content.split()) == 8
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 8
    assert resp.usage.prompt_tokens == count_prompt_tokens(MESSAGES) == 3 + 4 + 3 + 9
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    assert resp.usage.completion_tokens_details is not None
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0

    recorded = fake.requests[-1]
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.headers["authorization"] == "Bearer <redacted>"
    assert recorded.api_key_hint == "1234"
    assert recorded.body["messages"] == MESSAGES


async def test_streaming_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 8
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


async def test_streaming_without_usage_has_no_usage_chunk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_max_tokens_truncates(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_completion_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2

    fake.ignore_max_tokens = True
    resp = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 8


async def test_rate_limit_error(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.fail_next(429, retry_after="2")
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.code == "rate_limit_exceeded"
    # Only the next request fails.
    resp = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.choices[0].finish_reason == "stop"


async def test_server_error_via_header(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            extra_headers={"x-fake-fail-status": "503"},
        )
    assert info.value.status_code == 503


async def test_missing_key_is_401(fake: FakeUpstream) -> None:
    url = f"{fake.base_url}/chat/completions"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json={"model": "m", "messages": MESSAGES}) as resp,
    ):
        assert resp.status == 401
        body = await resp.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert "gpt-4o-mini" in models


async def test_truncated_stream_has_no_done(fake: FakeUpstream) -> None:
    fake.truncate_after = 3
    headers = {"Authorization": "Bearer x"}
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    url = f"{fake.base_url}/chat/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in resp.content.iter_any():
                received += data
    assert received.count(b"data: ") == 4  # role + 3 content chunks
    assert b"[DONE]" not in received


async def test_header_knobs_and_latency(fake: FakeUpstream) -> None:
    headers = {"Authorization": "Bearer x", "x-fake-words": "2", "x-fake-chunk-delay-ms": "1"}
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    url = f"{fake.base_url}/chat/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        text = await resp.text()
    assert text.endswith("data: [DONE]\n\n")
    assert text.count("data: ") == 1 + 2 + 1 + 1
    fake.record = False
    before = len(fake.requests)
    auth = {"Authorization": "Bearer x"}
    async with aiohttp.ClientSession() as http, http.get(f"{fake.base_url}/models", headers=auth) as resp:
        assert resp.status == 200
    assert len(fake.requests) == before


# --- fault knobs -------------------------------------------------------------------------------

CHAT_BODY = {"model": "gpt-4o-mini", "messages": MESSAGES}
AUTH = {"Authorization": "Bearer x"}


async def _post(fake: FakeUpstream, *, stream: bool = False, headers: dict[str, str] | None = None,
                ) -> tuple[int, dict[str, str], bytes]:
    body = {**CHAT_BODY, "stream": True} if stream else CHAT_BODY
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{fake.base_url}/chat/completions", json=body, headers={**AUTH, **(headers or {})}) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def test_fail_status_is_an_outage_until_cleared(fake: FakeUpstream) -> None:
    fake.fail_status, fake.fail_retry_after = 503, "3"
    for _ in range(3):
        status, headers, raw = await _post(fake)
        assert (status, headers.get("retry-after")) == (503, "3")
        assert b'"error"' in raw
    status, _, _ = await _post(fake, stream=True)
    assert status == 503  # streams too
    # A queued one-shot failure comes first; the outage goes on after it.
    fake.fail_next(429)
    assert [(await _post(fake))[0] for _ in range(2)] == [429, 503]
    fake.clear()
    assert fake.fail_status is None and fake.fail_retry_after is None
    status, _, raw = await _post(fake)
    assert status == 200 and b"chat.completion" in raw
    with pytest.raises(ValueError, match="fail_status"):
        fake.fail_status = 200


async def test_fail_ratio_fails_that_share_at_random() -> None:
    async with FakeUpstream(seed=7, record=False) as fake:
        fake.fail_ratio = 0.3
        statuses = [(await _post(fake))[0] for _ in range(200)]
        assert set(statuses) == {200, 503}
        assert 30 <= statuses.count(503) <= 90  # 60 expected; the seed makes it repeatable
        fake.fail_ratio, fake.fail_ratio_status = 1.0, 500
        assert {(await _post(fake))[0] for _ in range(5)} == {500}
        # The header overrides the attribute, both ways.
        assert (await _post(fake, headers={"x-fake-fail-ratio": "0"}))[0] == 200
        fake.fail_ratio = 0.0
        status, _, _ = await _post(fake, headers={"x-fake-fail-ratio": "1", "x-fake-fail-ratio-status": "429"})
        assert status == 429
        status, _, raw = await _post(fake, headers={"x-fake-fail-ratio": "1.5"})
        assert status == 400 and b"between 0 and 1" in raw
        with pytest.raises(ValueError, match="fail_ratio"):
            fake.fail_ratio = -0.1
        fake.fail_ratio = 0.5
        fake.clear()
        assert fake.fail_ratio == 0.0
        assert fake.chat_attempts == 0


async def _timed_stream(fake: FakeUpstream, headers: dict[str, str] | None = None) -> list[tuple[float, bytes]]:
    """Each SSE event of a streamed chat completion with its arrival time (seconds from sending)."""
    body = {**CHAT_BODY, "stream": True}
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{fake.base_url}/chat/completions", json=body, headers={**AUTH, **(headers or {})}) as resp,
    ):
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append((time.monotonic() - started, line))
    return arrivals


async def test_stall_after_pauses_a_stream_mid_way(fake: FakeUpstream) -> None:
    fake.stall_after, fake.stall_s = 2, 0.5
    events = await _timed_stream(fake)
    # role, 8 words, finish, [DONE]: all of it arrives, with the silence after the 2nd word.
    assert len(events) == 1 + 8 + 1 + 1 and events[-1][1].startswith(b"data: [DONE]")
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(events)]
    assert gaps[2] >= 0.45, gaps  # between the 2nd and the 3rd content chunk
    assert max(gaps[:2] + gaps[3:]) < 0.2, gaps

    fake.stall_after = None  # the per-request header form
    events = await _timed_stream(fake, {"x-fake-stall-after": "0", "x-fake-stall-s": "0.3"})
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(events)]
    assert gaps[0] >= 0.25 and max(gaps[1:]) < 0.2, gaps  # silence right after the role chunk


async def test_a_stalled_stream_ends_when_its_client_leaves(fake: FakeUpstream) -> None:
    fake.stall_after, fake.stall_s = 1, 30.0
    body = {**CHAT_BODY, "stream": True}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{fake.base_url}/chat/completions", json=body, headers=AUTH)
        seen = 0
        async for line in resp.content:
            seen += line.startswith(b"data: ")
            if seen == 2:  # role + the one content chunk before the silence
                break
        resp.close()
    # The handler notices the closed connection instead of sleeping 30 s: stopping is quick.
    started = time.monotonic()
    await asyncio.sleep(0.2)
    await fake.stop()
    assert time.monotonic() - started < 3


async def test_latency_delays_the_first_byte(fake: FakeUpstream) -> None:
    fake.latency_ms = 300
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{fake.base_url}/chat/completions", json={**CHAT_BODY, "stream": True}, headers=AUTH)
        headers_at = time.monotonic() - started  # the status line and headers: the first bytes
        await resp.read()
        resp.release()
    assert headers_at >= 0.29


async def test_chat_attempts_counts_every_arrival_without_recording() -> None:
    async with FakeUpstream(record=False) as fake:
        assert (await _post(fake))[0] == 200
        fake.fail_next(500)
        assert (await _post(fake))[0] == 500
        assert (await _post(fake, headers={"Authorization": ""}))[0] == 401
        async with aiohttp.ClientSession() as http, http.get(f"{fake.base_url}/models", headers=AUTH) as resp:
            assert resp.status == 200  # not a chat completion: not counted
        assert fake.chat_attempts == 3
        assert fake.requests == []
