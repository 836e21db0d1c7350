"""Shared fixtures (integration and contract suites): the real stack that `make run` starts, plus a fake upstream.

Backing services are embedded by default. When `ALEPHANT_NATS_URL` / `ALEPHANT_DATABASE_URL` /
`ALEPHANT_REDIS_URL` point at shared servers, the session isolates itself: a fresh database, and
a stream, bucket and subject prefix of its own, all removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg
import pytest
import pytest_asyncio

from deploy.cluster import ClusterStack
from deploy.stack import AdminClient, Stack
from events.jetstream import connect
from tests.fakes.upstream import FakeUpstream

T = TypeVar("T")

# Variables a developer's shell may carry that would change what the stack registers.
_SCRUBBED = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
             "ALEPHANT_SECRET_KEY", "ALEPHANT_ADMIN_TOKEN", "ALEPHANT_PORT", "ALEPHANT_ADMIN_PORT")


@dataclass
class Gateway:
    """Handles on the running stack for tests."""

    stack: Stack
    base_url: str
    admin: AdminClient
    database_url: str
    # With the admin user's credentials (embedded NATS); `stack.nats_url(role)` gives another role's.
    nats_url: str
    stream: str
    subject_prefix: str
    demo_key: str

    def create_key(self, workspace: str = "demo", **extra: Any) -> dict[str, Any]:
        created: dict[str, Any] = self.admin.call(
            "POST", "/admin/v1/virtual-keys", {"workspace_id": workspace, **extra})
        return created


class AdminHttp:
    """Async admin API calls with the stack's admin token: `call` returns (status, body, headers),
    `ok` the body of an expected success."""

    def __init__(self, gateway: Gateway, http: aiohttp.ClientSession) -> None:
        self.base = gateway.stack.admin_url
        self.http = http
        self.auth = {"Authorization": f"Bearer {gateway.stack.demo['ALEPHANT_ADMIN_TOKEN']}"}

    async def call(self, method: str, path: str, body: Any = None,
                   key: str | None = None) -> tuple[int, Any, dict[str, str]]:
        headers = dict(self.auth)
        if key is not None:
            headers["Idempotency-Key"] = key
        async with self.http.request(method, self.base + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    async def ok(self, method: str, path: str, body: Any = None, status: int | None = None) -> Any:
        got, data, _ = await self.call(method, path, body)
        expected = status or (201 if method == "POST" else 200)
        assert got == expected, (method, path, got, data)
        return data


def run_cli(gateway: Gateway, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`alephant <args>` as an operator runs it: the admin URL and token from the environment, no
    other ALEPHANT_* setting inherited. With `check`, a non-zero exit fails the test with stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALEPHANT_")}
    env.update({"ALEPHANT_ADMIN_URL": gateway.stack.admin_url,
                "ALEPHANT_ADMIN_TOKEN": gateway.stack.demo["ALEPHANT_ADMIN_TOKEN"]})
    done = subprocess.run([sys.executable, "-m", "deploy.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    if check:
        assert done.returncode == 0, f"alephant {' '.join(args)}: {done.stderr}"
    return done


def cli_json(gateway: Gateway, *args: str) -> Any:
    """`run_cli`'s JSON answer."""
    return json.loads(run_cli(gateway, *args).stdout)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.contextmanager
def dedicated_stack(state_dir: Path, extra_env: Mapping[str, str] | None = None,
                    log: Callable[[str], None] | None = None, workers: int = 1) -> Iterator[Stack]:
    """A whole stack of its own, always on embedded services (never a shared server: these tests
    kill, pause and reconfigure their stack), for fault and limit suites, with `workers` data-plane
    workers (`stack.procs["dataplane-<i>"]`). Paused processes are resumed before the stop (a
    stopped process cannot handle the stop signal)."""
    with _own_stack(Stack, state_dir, extra_env, log, workers) as stack:
        yield stack


@contextlib.contextmanager
def cluster_stack(state_dir: Path, extra_env: Mapping[str, str] | None = None,
                  log: Callable[[str], None] | None = None, workers: int = 4) -> Iterator[ClusterStack]:
    """The multi-node stack (deploy/cluster.py) of its own, on embedded services, for the cluster
    and fault suites: `stack.services["nats-1".."nats-3"]`, `stack.procs["controlplane-0|1"]`,
    `["dataplane-<i>"]`, `["projector-0|1"]` (pause, resume, kill; `stack.start_worker(i)`,
    `start_controlplane_at(i)` and `start_projector_at(i)` start one again on its port;
    `stack.relay_leader()` names the leading control plane). Paused processes are resumed before
    the stop."""
    with _own_stack(ClusterStack, state_dir, extra_env, log, workers) as stack:
        yield stack


S = TypeVar("S", bound=Stack)


@contextlib.contextmanager
def _own_stack(kind: type[S], state_dir: Path, extra_env: Mapping[str, str] | None,
               log: Callable[[str], None] | None, workers: int) -> Iterator[S]:
    """`kind` started on embedded services with the test settings, stopped (paused parts resumed
    first: a stopped process cannot handle the stop signal) when done."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith("ALEPHANT_")}
    stack = kind(state_dir=state_dir, port=0, admin_port=0, workers=workers, env=env,
                 extra_env={"ALEPHANT_HEARTBEAT_INTERVAL_S": "0.5", "ALEPHANT_PROJECTOR_ACK_WAIT_S": "2",
                            **(extra_env or {})},
                 log=log or (lambda _msg: None))
    stack.start()
    try:
        yield stack
    finally:
        for svc in (*stack.services.values(), *stack.procs.values()):
            svc.resume()
        stack.stop()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    tag = secrets.token_hex(4)
    created_db: tuple[str, str] | None = None
    if env.get("ALEPHANT_DATABASE_URL"):
        server_url, db = env["ALEPHANT_DATABASE_URL"], f"alephant_test_{tag}"
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        created_db = (server_url, db)
        env["ALEPHANT_DATABASE_URL"] = _with_database(server_url, db)
    names = {"ALEPHANT_STREAM": f"T{tag.upper()}_EVENTS", "ALEPHANT_KV_BUCKET": f"t{tag}_config",
             "ALEPHANT_SUBJECT_PREFIX": f"t{tag}", "ALEPHANT_HEARTBEAT_INTERVAL_S": "0.5",
             "ALEPHANT_PROJECTOR_ACK_WAIT_S": "2"}
    stack = Stack(state_dir=Path(tmp_path_factory.mktemp("stack")), port=0, admin_port=0, env=env,
                  extra_env=names, log=lambda _msg: None)
    stack.start()
    try:
        yield Gateway(
            stack=stack, base_url=stack.demo["ALEPHANT_BASE_URL"], admin=stack.admin(),
            database_url=stack.child_env()["ALEPHANT_DATABASE_URL"], nats_url=stack.nats_url("admin"),
            stream=names["ALEPHANT_STREAM"], subject_prefix=names["ALEPHANT_SUBJECT_PREFIX"],
            demo_key=stack.demo["ALEPHANT_API_KEY"],
        )
    finally:
        stack.stop()
        if env.get("ALEPHANT_NATS_URL"):
            asyncio.run(_drop_nats_resources(env["ALEPHANT_NATS_URL"], names))
        if created_db is not None:
            with psycopg.connect(created_db[0], autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{created_db[1]}" WITH (FORCE)')


async def _drop_nats_resources(url: str, names: dict[str, str]) -> None:
    nc = await connect(url, "alephant-tests-cleanup")
    try:
        js = nc.jetstream()
        for stream in (names["ALEPHANT_STREAM"], f"KV_{names['ALEPHANT_KV_BUCKET']}"):
            with contextlib.suppress(Exception):  # best-effort cleanup of a shared server
                await js.delete_stream(stream)
    finally:
        await nc.close()


@pytest_asyncio.fixture(scope="session")
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_provider(gateway: Gateway, fake_upstream: FakeUpstream) -> str:
    """Register the fake as provider `fake` (OpenAI type) in the demo workspace, with a known price."""
    gateway.admin.call("POST", "/admin/v1/providers", {
        "workspace_id": "demo", "name": "fake", "type": "openai", "base_url": fake_upstream.base_url,
        "api_key": "sk-fake-upstream-canary-0123456789"})
    gateway.admin.call("POST", "/admin/v1/prices", {
        "provider": "fake", "model": "gpt-4o-mini", "input_per_mtok_nanos": 150_000_000,
        "output_per_mtok_nanos": 600_000_000})
    return "fake"


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 15.0, interval: float = 0.05) -> T:
    """Poll an async check until it returns a non-None value; fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def journal_event(database_url: str, request_id: str) -> dict[str, Any] | None:
    """The journalled `llm.call` body of the request `request_id`, or None (not (yet) journalled)."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT body FROM event_journal WHERE type = 'llm.call' AND body->>'request_id' = %s",
                                 (request_id,))
        row = await cur.fetchone()
    return None if row is None else dict(row[0])


async def wait_until_true(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    async def as_optional() -> bool | None:
        return True if await check() else None

    await eventually(as_optional, timeout)
