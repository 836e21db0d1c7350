"""dataplane/limits.py: stream slots, the body read timeout and the connection cap.

The connection and body tests serve a small app on a real loopback socket (no backing services):
raw sockets are the only honest way to hold idle connections or stall a body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from dataplane.limits import CappedTCPSite, StreamSlots, admit, body_within, wants_stream
from schemas.errors import RateLimited
from schemas.http import error_middleware, read_limited

# -- pure decisions --------------------------------------------------------------------------------


@given(st.integers(0, 50), st.integers(0, 50), st.integers(-1, 50), st.integers(-1, 50))
def test_admit_refuses_exactly_at_a_cap(total: int, held: int, max_streams: int, per_key: int) -> None:
    refused = admit(total, held, max_streams=max_streams, max_streams_per_key=per_key)
    worker_full = max_streams > 0 and total >= max_streams
    key_full = per_key > 0 and held >= per_key
    assert refused == ("worker" if worker_full else "key" if key_full else None)


def test_slots_are_released_however_the_block_ends() -> None:
    slots = StreamSlots(max_streams=3, max_streams_per_key=2)
    with slots.hold("k1"), slots.hold("k1"):
        with pytest.raises(RateLimited) as refused, slots.hold("k1"):
            pass
        assert refused.value.status == 429
        assert refused.value.code == "concurrency_limit_exceeded"
        assert refused.value.headers == {"Retry-After": "1"}
        with slots.hold("k2"), pytest.raises(RateLimited, match="this worker"), slots.hold("k3"):
            pass
    assert (slots.total, slots.by_key) == (0, {})
    with pytest.raises(ValueError), slots.hold("k1"):
        raise ValueError("the call failed")
    assert (slots.total, slots.by_key) == (0, {})


def test_zero_caps_are_off() -> None:
    slots = StreamSlots(max_streams=0, max_streams_per_key=0)
    with slots.hold("k"), slots.hold("k"), slots.hold("k"):
        assert slots.total == 3


@pytest.mark.parametrize(("body", "rest", "kind", "expected"), [
    (b'{"model":"m","stream":true}', "v1/chat/completions", "openai", True),
    (b'{"model":"m","stream":false}', "v1/chat/completions", "openai", False),
    (b'{"model":"m"}', "v1/chat/completions", "openai", False),
    (b'{"stream": "yes"}', "v1/messages", "anthropic", False),
    (b"", "v1beta/models/gemini-2.5-flash:streamGenerateContent", "gemini", True),
    (b"{}", "model/anthropic.claude/converse-stream", "bedrock", True),
    (b'{"model":"llama3"}', "api/chat", "ollama", True),
    (b'{"model":"llama3","stream":false}', "api/chat", "ollama", False),
    (b'{"model":"llama3"}', "api/tags", "ollama", False),
    (b'{"stream": tru', "v1/chat/completions", "openai", False),
])
def test_wants_stream(body: bytes, rest: str, kind: str, expected: bool) -> None:
    assert wants_stream(body, rest, kind) is expected


# -- a served app ----------------------------------------------------------------------------------

CAP = 20
BODY_TIMEOUT_S = 0.5


async def echo_length(request: web.Request) -> web.Response:
    body = await body_within(request, read_limited(request, 1 << 20), BODY_TIMEOUT_S)
    return web.json_response({"length": len(body)})


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[int, CappedTCPSite]]:
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/echo", echo_length)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=30)
    await runner.setup()
    site = CappedTCPSite(runner, "127.0.0.1", 0, max_connections=CAP)
    await site.start()
    try:
        yield site.port, site
    finally:
        await runner.cleanup()


async def http_call(port: int, payload: bytes = b'{"a": 1}') -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_a_stalled_body_is_answered_408_in_the_error_shape(served: tuple[int, CappedTCPSite]) -> None:
    port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                 b'{"model": "mo')  # ... and nothing more
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # well before any default timeout
    assert head.startswith(b"HTTP/1.1 408")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
    error = json.loads(await reader.readexactly(length))["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    writer.close()
    assert await http_call(port) == (200, {"length": 8})  # a whole body is never timed


async def test_connection_cap_refuses_the_excess_and_keeps_serving(served: tuple[int, CappedTCPSite]) -> None:
    port, site = served
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
    await asyncio.sleep(0.1)  # let the server register them
    excess = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
    answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in excess))
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    print(f"\n[limits] cap {CAP}: {len(idle)} idle held, {len(refused)} of {len(excess)} more refused with 503")
    assert len(refused) == 50 and site.cap is not None and site.cap.refused == 50
    error = json.loads(refused[0].partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "connection_limit_exceeded"
    for _, writer in excess:
        writer.close()
    _, writer = idle.pop()
    writer.close()
    await asyncio.sleep(0.1)
    assert await http_call(port) == (200, {"length": 8})  # a slot freed: served as usual
    for _, writer in idle:
        writer.close()
