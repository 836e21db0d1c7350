"""Limits on what a client can hold, and disconnects before the headers, on a DEDICATED stack with
small limits (`ALEPHANT_MAX_STREAMS_PER_KEY=2`, a 1 s body timeout, a 2 s idle timeout, 40 connections), so the
shared stack keeps its defaults. A slow OpenAI fake holds streams open.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from deploy.stack import Stack
from tests.conftest import dedicated_stack, eventually, journal_event
from tests.fakes.upstream import FakeUpstream

LIMITS = {"ALEPHANT_MAX_STREAMS_PER_KEY": "2", "ALEPHANT_BODY_READ_TIMEOUT_S": "1", "ALEPHANT_MAX_CONNECTIONS": "40",
          "ALEPHANT_KEEPALIVE_TIMEOUT_S": "2"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with dedicated_stack(Path(tmp_path_factory.mktemp("limits")), LIMITS) as s:
        yield s


@pytest_asyncio.fixture(scope="module")
async def slow_upstream(stack: Stack) -> AsyncIterator[FakeUpstream]:
    """The OpenAI fake as provider `slow` in the demo workspace: 40 words, 100 ms apart."""
    async with FakeUpstream(chunk_delay_ms=100, words=40) as fake:
        admin = stack.admin()
        admin.call("POST", "/admin/v1/providers", {"workspace_id": "demo", "name": "slow", "type": "openai",
                                                   "base_url": fake.base_url, "api_key": "sk-slow-0123456789"})
        admin.call("POST", "/admin/v1/prices", {"provider": "slow", "model": "gpt-4o-mini",
                                                "input_per_mtok_nanos": 150_000_000,
                                                "output_per_mtok_nanos": 600_000_000})
        yield fake


def key_headers(stack: Stack, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {stack.demo['ALEPHANT_API_KEY']}"}
    if request_id:
        headers["Alephant-Request-Id"] = request_id
    return headers


async def wait_for_slow(stack: Stack, http: aiohttp.ClientSession) -> None:
    async def known() -> bool | None:
        async with http.post(f"{stack.origin}/v1/chat/completions", headers=key_headers(stack),
                             json={"model": "slow/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 1}) as resp:
            return True if resp.status == 200 else None

    await eventually(known)


def worker_log(stack: Stack) -> str:
    return Path(stack.procs["dataplane-0"].log).read_text(errors="replace")


async def test_per_key_stream_cap_is_a_429_in_both_error_shapes(stack: Stack, slow_upstream: FakeUpstream,
                                                                 http: aiohttp.ClientSession) -> None:
    await wait_for_slow(stack, http)
    chat = {"model": "slow/gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    held = [await http.post(f"{stack.origin}/v1/chat/completions", json=chat, headers=key_headers(stack))
            for _ in range(2)]
    try:
        assert [r.status for r in held] == [200, 200]
        async with http.post(f"{stack.origin}/v1/chat/completions", json=chat, headers=key_headers(stack)) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
            error = (await resp.json())["error"]
            assert error["code"] == "concurrency_limit_exceeded" and "API key" in error["message"]
        messages = {"model": "slow/gpt-4o-mini", "max_tokens": 50, "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{stack.origin}/v1/messages", json=messages, headers=key_headers(stack)) as resp:
            assert resp.status == 429
            body = await resp.json()
            assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
        origin_stream = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{stack.origin}/slow/v1/chat/completions", json=origin_stream,
                             headers=key_headers(stack)) as resp:
            assert resp.status == 429  # passthrough streams take the same slots
        # Non-streamed calls are not capped by stream slots.
        async with http.post(f"{stack.origin}/v1/chat/completions", headers=key_headers(stack),
                             json={**chat, "stream": False, "max_tokens": 1}) as resp:
            assert resp.status == 200
    finally:
        for resp in held:
            resp.close()
    # Slots come back when the streams end (here: the clients left).
    async def admitted() -> bool | None:
        async with http.post(f"{stack.origin}/v1/chat/completions", headers=key_headers(stack),
                             json={**chat, "max_tokens": 1}) as resp:
            await resp.read()
            return True if resp.status == 200 else None

    await eventually(admitted, timeout=10)


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_before_headers_is_a_499_event_without_traceback(
        stack: Stack, slow_upstream: FakeUpstream, stream: bool) -> None:
    request_id = f"req-early-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"model": "slow/gpt-4o-mini", "stream": stream,
                       "messages": [{"role": "user", "content": "tell me about ledgers"}]}).encode()
    slow_upstream.latency_ms = 1500  # the upstream answers after the client is gone
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        headers = "".join(f"{k}: {v}\r\n" for k, v in key_headers(stack, request_id).items())
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     f"{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()  # before any response header
        database_url = stack.child_env()["ALEPHANT_DATABASE_URL"]
        event = await eventually(lambda: journal_event(database_url, request_id), timeout=20)
    finally:
        slow_upstream.latency_ms = 0
    print(f"\n[limits] disconnect before headers (stream={stream}): status={event['status']} "
          f"partial={event['partial']} usage={event['usage']} estimated={event['usage_estimated']}")
    assert (event["status"], event["error_code"], event["partial"]) == (499, "client_disconnected", True)
    assert event["usage"]["input_tokens"] > 0
    assert event["usage_estimated"] is stream  # a non-streamed answer carried the upstream's own usage
    log = worker_log(stack)
    assert "Traceback" not in log and "unhandled_error" not in log


async def test_stalled_body_is_a_408_and_idle_connections_close(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    headers = "".join(f"{k}: {v}\r\n" for k, v in key_headers(stack).items())
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{headers}"
                 "Content-Length: 200\r\n\r\n".encode() + b'{"model": "mock/ec')
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
    # An idle connection (no request at all) is closed by the 2 s keep-alive timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_the_worker_caps_its_connections_and_answers_the_excess_in_json(stack: Stack,
                                                                              http: aiohttp.ClientSession) -> None:
    """The real worker process (`alephant dataplane`, `ALEPHANT_MAX_CONNECTIONS=40`): 100 idle
    connections are opened; at most 40 are held, every other one gets an immediate 503 in the API's
    error shape and is closed; once they are gone a normal request is served again."""
    opened = [await asyncio.open_connection("127.0.0.1", stack.port) for _ in range(100)]
    # All reads at once, for 1.5 s (under the 2 s idle timeout): a refused connection is answered
    # and closed at once (its read completes); an admitted one stays open and silent.
    reads = [asyncio.ensure_future(reader.read()) for reader, _writer in opened]
    done, pending = await asyncio.wait(reads, timeout=1.5)
    refused = 0
    for task in done:
        data = task.result()
        assert data.startswith(b"HTTP/1.1 503"), data[:80]
        body = json.loads(data.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "connection_limit_exceeded"
        refused += 1
    held = len(pending)
    for task in pending:
        task.cancel()
    print(f"connection cap 40: held {held}, refused {refused} of {len(opened)}")
    assert held <= 40 and refused >= 60
    for _reader, writer in opened:
        writer.close()

    async def served() -> bool | None:
        async with http.post(f"{stack.origin}/v1/chat/completions", headers=key_headers(stack),
                             json={"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            return True if resp.status == 200 else None

    await eventually(served)


async def test_mock_is_off_outside_the_demo_workspace_unless_enabled(stack: Stack,
                                                                     http: aiohttp.ClientSession) -> None:
    admin = stack.admin()
    admin.call("POST", "/admin/v1/workspaces", {"id": "acme", "name": "Acme"}, ok=(201, 409))
    admin.call("POST", "/admin/v1/providers", {"workspace_id": "acme", "name": "mock", "type": "mock"})
    key = admin.call("POST", "/admin/v1/virtual-keys", {"workspace_id": "acme", "name": "acme"})["key"]
    chat = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}

    async def status(path: str, body: dict[str, Any]) -> tuple[int, Any] | None:
        async with http.post(f"{stack.origin}{path}", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
            data = await resp.json()
            return None if resp.status in (401, 404) else (resp.status, data)  # not propagated yet

    refused = await eventually(lambda: status("/v1/chat/completions", chat))
    assert refused[0] == 403 and refused[1]["error"]["code"] == "mock_disabled"
    anthropic = await status("/v1/messages", {**chat, "max_tokens": 5})
    assert anthropic is not None and anthropic[0] == 403 and anthropic[1]["error"]["type"] == "permission_error"
    admin.call("POST", "/admin/v1/providers", {"workspace_id": "acme", "name": "mock", "type": "mock",
                                               "options": {"enabled": "true"}})

    async def served() -> bool | None:
        answer = await status("/v1/chat/completions", chat)
        return True if answer is not None and answer[0] == 200 else None

    await eventually(served)
