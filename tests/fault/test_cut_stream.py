"""The cut-stream experiment: a call whose usage never arrives is still billed, by estimate.

Against the running stack and the OpenAI fake (shared fixtures, demo workspace, priced model):

* a client reads about half of a translated stream and disconnects: the upstream never got to
  its usage chunk, so the event is a 499 partial call with `usage_estimated`, non-zero input and
  output tokens and a non-zero cost (the figures are printed);
* the same through `/{provider}/*` passthrough, with the upstream cutting the stream itself;
* a passthrough stream that completes but never reports usage (the client did not ask for it).
"""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import pytest

from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.upstream import FakeUpstream

WORDS = 200
PROMPT = "Please write a long answer about the history of double-entry bookkeeping in Venice. " * 4


def headers(gateway: Gateway, request_id: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gateway.demo_key}", "Alephant-Request-Id": request_id, **extra}


def report(label: str, event: dict[str, Any], relayed_words: int) -> None:
    usage = event["usage"]
    print(f"\n[cut-stream] {label}: status={event['status']} partial={event['partial']} "
          f"usage_estimated={event['usage_estimated']} input_tokens={usage['input_tokens']} "
          f"output_tokens={usage['output_tokens']} (words relayed: {relayed_words}) cost_nanos={event['cost_nanos']}")


async def read_events(resp: aiohttp.ClientResponse, wanted: int) -> int:
    """Read SSE content events until `wanted` were seen (or the stream ends); returns how many."""
    seen = 0
    async for line in resp.content:
        if line.startswith(b"data:") and b'"content"' in line:
            seen += 1
            if seen >= wanted:
                break
    return seen


async def test_client_reads_half_a_stream_and_disconnects(gateway: Gateway, fake_upstream: FakeUpstream,
                                                          fake_provider: str) -> None:
    request_id = f"req-cut-{uuid.uuid4().hex[:8]}"
    body = {"model": f"{fake_provider}/gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": PROMPT}]}
    saved = fake_upstream.words, fake_upstream.chunk_delay_ms
    fake_upstream.words, fake_upstream.chunk_delay_ms = WORDS, 10
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(f"{gateway.base_url}/chat/completions", json=body,
                                   headers=headers(gateway, request_id))
            assert resp.status == 200
            relayed = await read_events(resp, WORDS // 2)
            resp.close()  # the client goes away mid-answer
    finally:
        fake_upstream.words, fake_upstream.chunk_delay_ms = saved
    event = await eventually(lambda: journal_event(gateway.database_url, request_id), timeout=20)
    report("client disconnect mid-stream", event, relayed)
    assert (event["status"], event["error_code"], event["partial"]) == (499, "client_disconnected", True)
    assert event["usage_estimated"] is True
    usage = event["usage"]
    # o200k_base: the prompt is about 70 tokens; the fake's words are one token each.
    assert 40 <= usage["input_tokens"] <= 200
    assert relayed // 2 <= usage["output_tokens"] <= 3 * WORDS
    assert event["cost_nanos"] > 0


async def test_passthrough_stream_cut_by_the_upstream_is_estimated(gateway: Gateway, fake_provider: str,
                                                                   http: aiohttp.ClientSession) -> None:
    request_id = f"req-cut-{uuid.uuid4().hex[:8]}"
    body = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPT}]}
    origin = gateway.base_url.removesuffix("/v1")
    async with http.post(f"{origin}/{fake_provider}/v1/chat/completions", json=body,
                         headers=headers(gateway, request_id, **{"x-fake-words": str(WORDS),
                                                                 "x-fake-truncate-after": "60"})) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_events(resp, WORDS)
    event = await eventually(lambda: journal_event(gateway.database_url, request_id), timeout=20)
    report("upstream cut (passthrough)", event, 60)
    assert (event["partial"], event["error_code"], event["usage_estimated"]) == (True, "upstream_interrupted", True)
    assert event["usage"]["input_tokens"] > 0
    assert 30 <= event["usage"]["output_tokens"] <= 3 * 60
    assert event["cost_nanos"] > 0


async def test_passthrough_stream_without_usage_is_estimated(gateway: Gateway, fake_provider: str,
                                                             http: aiohttp.ClientSession) -> None:
    request_id = f"req-nousage-{uuid.uuid4().hex[:8]}"
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    origin = gateway.base_url.removesuffix("/v1")
    async with http.post(f"{origin}/{fake_provider}/v1/chat/completions", json=body,
                         headers=headers(gateway, request_id, **{"x-fake-words": "40"})) as resp:
        assert resp.status == 200
        relayed = await read_events(resp, 10_000)
    event = await eventually(lambda: journal_event(gateway.database_url, request_id), timeout=20)
    report("no usage reported (passthrough)", event, relayed)
    assert (event["status"], event["partial"], event["usage_estimated"]) == (200, False, True)
    assert 20 <= event["usage"]["output_tokens"] <= 120
    assert event["cost_nanos"] > 0
