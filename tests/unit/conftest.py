"""Fixtures for unit tests that drive an adapter against an in-process fake upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for one test, closed afterwards (filterwarnings=error catches leaks)."""
    async with aiohttp.ClientSession() as s:
        yield s
