"""`POST /v1/responses` through the real lifecycle (`serve`) on a minimal app: the mock provider
(translated path), an OpenAI provider with the native Responses passthrough wired the way the
lead will wire it, and a stream that fails mid-way."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dataplane.ingress.responses import ResponsesIngress
from dataplane.lifecycle import ModelCall
from dataplane.pipeline import run
from dataplane.providers import openai_responses, registry
from dataplane.providers.base import CallStats, ChatResponse, UpstreamCall
from dataplane.providers.mock import MockProvider
from dataplane.providers.openai import OpenAIProvider
from dataplane.snapshot import SnapshotStore
from dataplane.state import WORKER, WorkerState
from schemas.entities import ConfigEntity, Provider, VirtualKey
from schemas.errors import RateLimited
from schemas.events import Usage
from schemas.http import error_middleware
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot
from tests.fakes.responses_upstream import FakeResponses
from tests.unit.conftest import Recorder
from tests.unit.ingress.test_responses import Answer, chat_chunks

CLIENT_KEY = "sk-alph-responses-client"


class NativeOpenAI(OpenAIProvider):
    """OpenAIProvider plus the few lines the lead adds for the native Responses path."""

    native_apis = openai_responses.NATIVE_APIS

    def _responses(self, api: str, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        openai_responses.check_api(api)
        url, headers = self._request(call)
        return url.removesuffix("/chat/completions") + "/responses", headers

    async def complete_native(self, api: str, call: UpstreamCall) -> ChatResponse:
        return await openai_responses.complete(call, *self._responses(api, call))

    def stream_native(self, api: str, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        return openai_responses.stream(call, *self._responses(api, call), stats)


class FailingMidStream(MockProvider):
    async def stream(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        for chunk in chat_chunks(Answer(text="half an answer", cuts={"text": [4]}))[:3]:
            yield chunk
        stats.usage = Usage(input_tokens=5, output_tokens=2)
        raise RateLimited("Provider 'mock' returned 429: slow down", headers={"Retry-After": "3"})


@pytest.fixture
async def fake() -> AsyncIterator[FakeResponses]:
    async with FakeResponses() as upstream:
        yield upstream


@pytest.fixture
async def gateway(fake: FakeResponses, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[tuple[str, aiohttp.ClientSession, Recorder]]:
    monkeypatch.setitem(registry.ADAPTERS, "openai", NativeOpenAI())
    keyring = KeyRing(Secret("test-master-secret-0123456789"))
    entities: dict[str, ConfigEntity] = {
        "p1": Provider(id="p1", workspace_id="ws", name="mock", type="mock", options={"enabled": "true"}),
        "p2": Provider(id="p2", workspace_id="ws", name="openai", type="openai", base_url=fake.base_url,
                       api_key_enc=keyring.encrypt("sk-upstream-9999")),
        "k1": VirtualKey(id="k1", workspace_id="ws", key_hash=keyring.hash_key(CLIENT_KEY)),
    }
    store = SnapshotStore()
    store.swap(Snapshot.build(entities, 1))
    store.ready.set()
    recorder = Recorder()
    async with aiohttp.ClientSession() as session:
        app = web.Application(middlewares=[error_middleware])
        app[WORKER] = WorkerState(settings=Settings(), keyring=keyring, store=store,
                                  events=recorder, session=session)

        ingress = ResponsesIngress()  # stateless: one instance serves every request

        async def responses(request: web.Request) -> web.StreamResponse:
            return await run(request, ModelCall(ingress))  # the route the lead adds

        app.router.add_post("/v1/responses", responses)
        async with TestServer(app, host="127.0.0.1") as server:
            yield str(server.make_url("/v1/responses")), session, recorder


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for block in raw.decode().split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append(msgspec.json.decode("\n".join(data)))
    return events


AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


async def test_translated_non_streamed(gateway: tuple[str, aiohttp.ClientSession, Recorder]) -> None:
    url, session, recorder = gateway
    async with session.post(url, json={"model": "mock/echo", "input": "hello gateway"}, headers=AUTH) as resp:
        assert resp.status == 200
        body = await resp.json()
        assert resp.headers["Alephant-Cost-Usd"]
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == "hello gateway"
    assert body["usage"]["total_tokens"] == body["usage"]["input_tokens"] + body["usage"]["output_tokens"] > 0
    event = recorder.events[-1]
    assert (event.ingress, event.status, event.provider) == ("openai.responses", 200, "mock")
    assert event.usage.output_tokens == body["usage"]["output_tokens"]


async def test_translated_stream(gateway: tuple[str, aiohttp.ClientSession, Recorder]) -> None:
    url, session, recorder = gateway
    body = {"model": "mock/echo", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a b c"}]}],
            "stream": True, "tools": [{"type": "web_search"}]}
    async with session.post(url, json=body, headers=AUTH) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = await resp.read()
    events = sse_events(raw)
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "a b c"
    assert events[-1]["response"]["usage"]["output_tokens"] > 0
    assert raw.endswith(b"\n\n") and b": alephant-cost-usd " in raw and b"[DONE]" not in raw
    assert recorder.events[-1].stream and recorder.events[-1].usage.output_tokens > 0


async def test_native_passthrough(gateway: tuple[str, aiohttp.ClientSession, Recorder], fake: FakeResponses) -> None:
    url, session, recorder = gateway
    raw = {"model": "openai/gpt-fake", "input": "hi", "store": False, "tools": [{"type": "web_search"}],
           "include": ["reasoning.encrypted_content"]}
    async with session.post(url, json=raw, headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.json() == fake.response("completed", fake.answer)
    assert fake.requests[-1][2] == {**raw, "model": "gpt-fake"}  # hosted tools and all reach OpenAI
    assert recorder.events[-1].usage.cache_read_tokens == 100

    async with session.post(url, json={**raw, "stream": True}, headers=AUTH) as resp:
        streamed = await resp.read()
    assert streamed.startswith(b"".join(fake.sent))
    assert streamed.removeprefix(b"".join(fake.sent)).startswith(b": alephant-cost-usd ")
    assert recorder.events[-1].usage.reasoning_tokens == 12


async def test_errors_before_the_first_byte_are_json(gateway: tuple[str, aiohttp.ClientSession, Recorder]) -> None:
    url, session, _ = gateway
    async with session.post(url, json={"model": "mock/echo", "input": "x", "previous_response_id": "r"},
                            headers=AUTH) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "previous_response_id"
    async with session.post(url, json={"model": "nope/x", "input": "x", "stream": True}, headers=AUTH) as resp:
        assert resp.status == 404 and resp.content_type == "application/json"


async def test_mid_stream_failure_ends_with_response_failed(gateway: tuple[str, aiohttp.ClientSession, Recorder],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    url, session, recorder = gateway
    monkeypatch.setitem(registry.ADAPTERS, "mock", FailingMidStream())
    async with session.post(url, json={"model": "mock/echo", "input": "x", "stream": True}, headers=AUTH) as resp:
        events = sse_events(await resp.read())
    failed = events[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["id"] == events[0]["response"]["id"]
    assert failed["sequence_number"] == len(events) - 1
    assert failed["response"]["error"]["code"] == "rate_limit_exceeded"
    assert "try again in 3s" in failed["response"]["error"]["message"]
    event = recorder.events[-1]
    assert (event.status, event.partial, event.usage.input_tokens) == (429, True, 5)
