"""A stream that stalls mid-way is cut off at the provider's `idle_timeout_s`, and what was relayed is billed.

Against the running stack (shared `gateway` fixture) and an OpenAI fake of its own that sends five
content chunks and then nothing for 5 s, the connection open. The provider (type openai, priced)
has option `idle_timeout_s` = "1": the gateway's read of the upstream times out after about a
second of silence. The client sees an error event in its own API's stream format and no clean end
(Chat: `data: {"error": ...}`, no `[DONE]`; Messages: `event: error`, no `message_stop`), well
before the upstream would have gone on; the llm.call is partial, its output tokens estimated
from the relayed chunks, priced, with the upstream failure as its status and error code.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.upstream import FakeUpstream

PROVIDER = "idle-fake"
MODEL = f"{PROVIDER}/gpt-4o-mini"
WORDS = 40
STALL_AFTER = 5  # content chunks before the silence
STALL_S = 5.0
IDLE_TIMEOUT_S = 1.0
PROMPT = "Tell me, at some length, how a ledger balances. " * 4


@pytest_asyncio.fixture(scope="module")
async def stalling_upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(words=WORDS) as fake:
        yield fake


@pytest_asyncio.fixture(scope="module")
async def idle_provider(gateway: Gateway, stalling_upstream: FakeUpstream) -> str:
    """The fake as provider `idle-fake` (OpenAI type, `idle_timeout_s` 1) in the demo workspace,
    priced; returned once a non-streamed call through it is answered and priced (the worker has
    the provider and the price)."""
    gateway.admin.call("POST", "/admin/v1/providers", {
        "workspace_id": "demo", "name": PROVIDER, "type": "openai", "base_url": stalling_upstream.base_url,
        "api_key": "sk-idle-upstream-0123456789", "options": {"idle_timeout_s": str(IDLE_TIMEOUT_S)}})
    gateway.admin.call("POST", "/admin/v1/prices", {
        "provider": PROVIDER, "model": "gpt-4o-mini", "input_per_mtok_nanos": 150_000_000,
        "output_per_mtok_nanos": 600_000_000})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

    async def priced() -> bool | None:
        async with aiohttp.ClientSession() as http, http.post(
                f"{gateway.base_url}/chat/completions", json=body,
                headers={"Authorization": f"Bearer {gateway.demo_key}"}) as resp:
            await resp.read()
            cost = resp.headers.get("Alephant-Cost-Usd", "0")
            return True if resp.status == 200 and Decimal(cost) > 0 else None

    await eventually(priced, timeout=30)
    return PROVIDER


@pytest.fixture
def stalling(stalling_upstream: FakeUpstream) -> FakeUpstream:
    stalling_upstream.stall_after, stalling_upstream.stall_s = STALL_AFTER, STALL_S
    return stalling_upstream


async def _stream(gateway: Gateway, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[float, bytes]:
    """POST a streamed call; (seconds until the response body ended, the whole body)."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as http, http.post(
            f"{gateway.base_url}{path}", json=body, headers=headers,
            timeout=aiohttp.ClientTimeout(total=STALL_S * 3)) as resp:
        assert resp.status == 200, await resp.text()
        raw = await resp.read()
    return time.monotonic() - started, raw


def _data_events(raw: bytes) -> list[str]:
    return [line[len("data: "):] for line in raw.decode().splitlines() if line.startswith("data: ")]


def _assert_billed_partial(event: dict[str, Any], label: str) -> None:
    usage = event["usage"]
    print(f"\n[stream-idle] {label}: status={event['status']} error_code={event['error_code']} "
          f"partial={event['partial']} usage_estimated={event.get('usage_estimated')} "
          f"input_tokens={usage['input_tokens']} output_tokens={usage['output_tokens']} "
          f"cost_nanos={event['cost_nanos']}")
    assert event["partial"] is True
    assert event["usage_estimated"] is True  # the upstream's usage chunk never came
    assert usage["input_tokens"] > 0
    # Five one-word chunks were relayed (the role chunk carries no text).
    assert 1 <= usage["output_tokens"] <= 3 * STALL_AFTER
    assert event["cost_nanos"] > 0
    # The upstream's failure, not the client's (499) nor a clean 200.
    assert (event["status"], event["error_code"]) == (504, "upstream_idle_timeout")


async def test_chat_stream_that_stalls_is_cut_off_at_the_idle_timeout(
        gateway: Gateway, idle_provider: str, stalling: FakeUpstream) -> None:
    request_id = f"req-idle-chat-{uuid.uuid4().hex[:8]}"
    before = stalling.chat_attempts
    elapsed, raw = await _stream(
        gateway, "/chat/completions",
        {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": PROMPT}]},
        {"Authorization": f"Bearer {gateway.demo_key}", "Alephant-Request-Id": request_id})
    # Cut off about a second into the silence, long before the upstream would have gone on.
    assert IDLE_TIMEOUT_S * 0.8 <= elapsed < STALL_S * 0.6, elapsed
    events = _data_events(raw)
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert len(text.split()) == STALL_AFTER
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]  # what the openai SDK raises APIError on
    print(f"\n[stream-idle] chat.completions: cut off after {elapsed:.2f}s; the client's last event: {events[-1]}")
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error" and error["code"].startswith("upstream_")
    assert PROVIDER in error["message"]
    assert stalling.chat_attempts == before + 1  # a stream that has begun is never retried

    event = await eventually(lambda: journal_event(gateway.database_url, request_id), timeout=20)
    _assert_billed_partial(event, "chat.completions")
    assert event["error_code"] == error["code"]


async def test_messages_stream_that_stalls_ends_with_an_anthropic_error_event(
        gateway: Gateway, idle_provider: str, stalling: FakeUpstream) -> None:
    request_id = f"req-idle-msg-{uuid.uuid4().hex[:8]}"
    elapsed, raw = await _stream(
        gateway, "/messages",
        {"model": MODEL, "max_tokens": 512, "stream": True, "messages": [{"role": "user", "content": PROMPT}]},
        {"x-api-key": gateway.demo_key, "anthropic-version": "2023-06-01", "Alephant-Request-Id": request_id})
    assert IDLE_TIMEOUT_S * 0.8 <= elapsed < STALL_S * 0.6, elapsed
    text = raw.decode()
    blocks = [b for b in text.split("\n\n") if b.strip()]
    names = [line[len("event: "):] for b in blocks for line in b.splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start"
    assert names.count("content_block_delta") >= 1
    assert "message_stop" not in names
    assert names[-1] == "error", names
    last = json.loads(_data_events(blocks[-1].encode())[0])
    print(f"\n[stream-idle] anthropic.messages: cut off after {elapsed:.2f}s; the client's last event: {blocks[-1]!r}")
    assert last["type"] == "error"  # what the anthropic SDK raises on
    assert last["error"]["type"] in ("api_error", "timeout_error"), last
    assert PROVIDER in last["error"]["message"]

    event = await eventually(lambda: journal_event(gateway.database_url, request_id), timeout=20)
    _assert_billed_partial(event, "anthropic.messages")
