"""Self-test of the fake upstream through the official ``openai`` SDK and raw aiohttp."""

from __future__ import annotations

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
