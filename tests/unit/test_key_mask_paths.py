"""The provider key never leaves through the model-call lifecycle: an Anthropic upstream that echoes
the key in its answer, relayed natively (Messages to Anthropic, streamed and not) and translated
(Chat Completions to Anthropic, streamed and not)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dataplane.ingress.chat import ChatIngress
from dataplane.ingress.messages import MessagesIngress
from dataplane.lifecycle import ModelCall
from dataplane.outbound import make_session
from dataplane.pipeline import run
from dataplane.snapshot import SnapshotStore
from dataplane.state import WORKER, WorkerState
from schemas.entities import Provider, VirtualKey
from schemas.http import error_middleware
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot
from tests.fakes.anthropic_upstream import FakeAnswer, FakeAnthropic
from tests.unit.conftest import Recorder

KEY = "sk-ant-operator-echoed-0123456789"
CLIENT = {"x-api-key": "sk-alph-client", "anthropic-version": "2023-06-01", "Authorization": "Bearer sk-alph-client"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(answer=FakeAnswer(blocks=({"type": "text", "text": f"your key: {KEY} ok"},))) as f:
        yield f


@pytest.fixture
async def url(fake: FakeAnthropic) -> AsyncIterator[str]:
    keyring = KeyRing(Secret("test-master-secret-0123456789"))
    entities = {
        "p1": Provider(id="p1", workspace_id="ws", name="claude", type="anthropic", base_url=fake.base_url,
                       api_key_enc=keyring.encrypt(KEY)),
        "k1": VirtualKey(id="k1", workspace_id="ws", key_hash=keyring.hash_key("sk-alph-client")),
    }
    store = SnapshotStore()
    store.swap(Snapshot.build(entities, 1))
    store.ready.set()
    settings = Settings(ssrf_allow="127.0.0.1")
    async with make_session(settings) as session:
        app = web.Application(middlewares=[error_middleware])
        app[WORKER] = WorkerState(settings=settings, keyring=keyring, store=store, events=Recorder(),
                                  session=session)
        messages, chat = MessagesIngress(), ChatIngress()

        async def messages_route(request: web.Request) -> web.StreamResponse:
            return await run(request, ModelCall(messages))

        async def chat_route(request: web.Request) -> web.StreamResponse:
            return await run(request, ModelCall(chat))

        app.router.add_post("/v1/messages", messages_route)
        app.router.add_post("/v1/chat/completions", chat_route)
        async with TestServer(app, host="127.0.0.1") as server:
            yield str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_echoed_key_is_masked_on_every_lifecycle_path(url: str, fake: FakeAnthropic, path: str,
                                                               stream: bool) -> None:
    body = {"model": "claude/claude-x", "max_tokens": 50, "stream": stream,
            "messages": [{"role": "user", "content": "what is your key?"}]}
    async with aiohttp.ClientSession() as http, http.post(url + path, json=body, headers=CLIENT) as resp:
        raw = await resp.read()
    assert resp.status == 200, raw
    assert KEY.encode() not in raw and b"***" in raw

