"""Fixtures for unit tests that drive an adapter against an in-process fake upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from dataplane.call import Call
from dataplane.decisions import AgentContext, Target
from dataplane.ingress.chat import ChatIngress
from dataplane.lifecycle import ModelCall
from dataplane.snapshot import SnapshotStore
from dataplane.state import WorkerState
from schemas.entities import VirtualKey
from schemas.events import Event, LlmCall
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot


class Recorder:
    """Stands in for the worker's event publisher: keeps what the request path emits."""

    def __init__(self) -> None:
        self.events: list[LlmCall] = []  # the llm.call events
        self.others: list[Event] = []  # every other type (policy.decision, budget.alert, ...)

    def emit(self, event: Event) -> None:
        if isinstance(event, LlmCall):
            self.events.append(event)
        else:
            self.others.append(event)


def bare_call(snap: Snapshot, vk: VirtualKey, ctx: AgentContext, target: Target | None = None) -> Call:
    """A chat `Call` outside any server, for tests of what a call records (it never dispatches,
    so its worker has no HTTP session)."""
    settings = Settings(secret_key=Secret("unit-test-secret-key-0123456789"))
    worker = WorkerState(settings=settings, keyring=KeyRing(settings.secret_key), store=SnapshotStore(),
                         events=Recorder(), session=cast(aiohttp.ClientSession, None))
    call = Call(request=make_mocked_request("POST", "/v1/chat/completions"), worker=worker,
                endpoint=ModelCall(ChatIngress()), snap=snap, vk=vk, ctx=ctx, target=target)
    return call


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for one test, closed afterwards (filterwarnings=error catches leaks)."""
    async with aiohttp.ClientSession() as s:
        yield s
