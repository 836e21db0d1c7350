"""Fixtures for unit tests that drive an adapter against an in-process fake upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from schemas.events import LlmCall


class Recorder:
    """Stands in for the worker's event publisher: keeps what the request path emits."""

    def __init__(self) -> None:
        self.events: list[LlmCall] = []

    def emit(self, event: LlmCall) -> None:
        self.events.append(event)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for one test, closed afterwards (filterwarnings=error catches leaks)."""
    async with aiohttp.ClientSession() as s:
        yield s
