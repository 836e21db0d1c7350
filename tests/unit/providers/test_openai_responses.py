"""dataplane/providers/openai_responses.py: the native Responses passthrough for OpenAI upstreams,
against the fake Responses endpoint (relay unchanged, usage, errors, truncation)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from dataplane.providers import openai_responses
from dataplane.providers.base import CallStats, UpstreamCall
from dataplane.providers.sse import iter_sse
from schemas.entities import Provider
from schemas.errors import GatewayError, InternalError, RateLimited, UpstreamError
from schemas.events import Usage
from schemas.responses import ResponseUsage
from schemas.settings import Secret
from tests.fakes.responses_upstream import USAGE, FakeResponses

KEY = "sk-native-secret-4321"
EXPECTED_USAGE = Usage(input_tokens=120, output_tokens=30, cache_read_tokens=100, cache_write_tokens=5,
                       reasoning_tokens=12)


@pytest.fixture
async def fake() -> AsyncIterator[FakeResponses]:
    async with FakeResponses() as upstream:
        yield upstream



def call_for(session: aiohttp.ClientSession, body: dict[str, Any]) -> UpstreamCall:
    provider = Provider(id="prov_oa", workspace_id="ws_1", name="openai", type="openai")
    return UpstreamCall(provider=provider, model="gpt-fake", body=body, api_key=Secret(KEY), session=session,
                        timeout_s=5.0)


def endpoint(fake: FakeResponses) -> tuple[str, dict[str, str]]:
    return f"{fake.base_url}/responses", {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}


async def collect(gen: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in gen]


def test_usage_from_responses_keeps_openai_semantics() -> None:
    assert openai_responses.usage_from_responses(msgspec.convert(USAGE, ResponseUsage)) == EXPECTED_USAGE
    assert openai_responses.usage_from_responses(ResponseUsage()) == Usage()


def test_check_api_refuses_other_apis() -> None:
    openai_responses.check_api("openai.responses")
    with pytest.raises(InternalError):
        openai_responses.check_api("anthropic.messages")
    assert "openai.responses" in openai_responses.NATIVE_APIS


async def test_complete_relays_body_byte_for_byte(fake: FakeResponses, session: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-fake", "input": "hi", "store": False, "tools": [{"type": "web_search"}]}
    url, headers = endpoint(fake)
    result = await openai_responses.complete(call_for(session, body), url, headers)
    assert msgspec.json.decode(result.body) == fake.response("completed", fake.answer)
    assert result.usage == EXPECTED_USAGE
    path, sent_headers, sent = fake.requests[-1]
    assert path == "/v1/responses"
    assert sent == body  # the native body goes upstream as the client wrote it
    assert sent_headers["authorization"] == "<redacted>"
    await openai_responses.complete(call_for(session, {"model": "gpt-fake", "input": "hi"}), url, headers)
    assert fake.requests[-1][2] == {"model": "gpt-fake", "input": "hi", "store": False}  # never stored by default
    await openai_responses.complete(call_for(session, {"model": "m", "input": "x", "store": True}), url, headers)
    assert fake.requests[-1][2]["store"] is True


async def test_stream_relays_events_unchanged_and_reads_usage(fake: FakeResponses,
                                                             session: aiohttp.ClientSession) -> None:
    stats = CallStats()
    url, headers = endpoint(fake)
    out = await collect(openai_responses.stream(call_for(session, {"model": "gpt-fake", "input": "hi"}), url,
                                                headers, stats))
    assert out == fake.sent
    assert fake.requests[-1][2] == {"model": "gpt-fake", "input": "hi", "store": False, "stream": True}
    assert stats.usage == EXPECTED_USAGE


async def test_stream_drops_comments_and_reframes_multiline_data(fake: FakeResponses,
                                                                session: aiohttp.ClientSession) -> None:
    fake.keepalive = fake.multiline = True
    url, headers = endpoint(fake)
    out = await collect(openai_responses.stream(call_for(session, {"model": "m", "input": "x"}), url, headers,
                                                CallStats()))
    assert out == fake.sent
    assert not any(chunk.startswith(b":") for chunk in out)

    async def lines() -> AsyncIterator[bytes]:
        for chunk in out:
            for line in chunk.splitlines(keepends=True):
                yield line

    events = [event async for event in iter_sse(lines())]
    assert [e.event for e in events][:2] == ["response.created", "response.in_progress"]
    assert msgspec.json.decode(events[1].data)["sequence_number"] == 1


async def test_stream_without_terminal_event_is_an_error(fake: FakeResponses,
                                                        session: aiohttp.ClientSession) -> None:
    fake.truncate = True
    url, headers = endpoint(fake)
    stats = CallStats()
    received: list[bytes] = []
    with pytest.raises(UpstreamError, match=r"before response\.completed"):
        async for chunk in openai_responses.stream(call_for(session, {"model": "m", "input": "x"}), url, headers,
                                                   stats):
            received.append(chunk)
    assert received == fake.sent
    assert stats.usage is None


async def test_stream_ending_with_upstream_error_event_is_relayed(fake: FakeResponses,
                                                                 session: aiohttp.ClientSession) -> None:
    fake.error_event = True
    url, headers = endpoint(fake)
    out = await collect(openai_responses.stream(call_for(session, {"model": "m", "input": "x"}), url, headers,
                                                CallStats()))
    assert out[-1].startswith(b"event: error\n")


@pytest.mark.parametrize("streamed", [False, True])
async def test_upstream_errors_are_mapped_before_the_first_byte(fake: FakeResponses, session: aiohttp.ClientSession,
                                                                streamed: bool) -> None:
    fake.fail_status, fake.retry_after = 429, "7"
    url, headers = endpoint(fake)
    call = call_for(session, {"model": "m", "input": "x"})
    with pytest.raises(RateLimited) as info:
        if streamed:
            await anext(openai_responses.stream(call, url, headers, CallStats()))
        else:
            await openai_responses.complete(call, url, headers)
    assert info.value.headers == {"Retry-After": "7"}
    assert KEY not in info.value.message


async def test_unreachable_upstream_is_an_upstream_error(session: aiohttp.ClientSession) -> None:
    call = call_for(session, {"model": "m", "input": "x"})
    with pytest.raises(GatewayError) as info:
        await openai_responses.complete(call, "http://127.0.0.1:9/v1/responses", {})
    assert info.value.status == 502
