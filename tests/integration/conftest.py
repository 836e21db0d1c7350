"""Fixtures shared by integration suites: a Redis of their own (not the stack's), a scratch
database on the stack's Postgres server, and `admin` (async admin API calls on the stack)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg
import pytest
import pytest_asyncio

from deploy.services import Service, start_redis
from events.db import migrate
from tests.conftest import AdminHttp, Gateway


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new database `<prefix>_<random>` on the Postgres server of `server_url`, migrated; its
    URL. Dropped afterwards. For suites that fold synthetic stream sequences, which would confuse
    the stack's own projectors' checkpoints and `ledger reconcile`."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    try:
        asyncio.run(migrate(url))
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A redis-server from the project's launcher for one test module; resumed before the stop
    (a test may leave it paused)."""
    svc = start_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield svc
    finally:
        svc.resume()
        svc.stop()


@pytest_asyncio.fixture
async def admin(gateway: Gateway, http: aiohttp.ClientSession) -> AsyncIterator[AdminHttp]:
    """Admin API calls with the stack's admin token (suites with their own `admin` override it)."""
    yield AdminHttp(gateway, http)
