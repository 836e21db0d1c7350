"""The local stack's supervisor (issue 7, item 4): an embedded NATS, Postgres or Redis that dies is
started again on the same port and data, with a notice, and the gateway carries on.

Each test SIGKILLs one service of a dedicated stack (the session `gateway` stays untouched), runs
one supervisor pass (`Stack.supervise_once`), and then requires a new call to be journalled:
the worker, the control plane and the projector reconnected by themselves.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from deploy.services import port_open
from deploy.stack import Stack
from events.jetstream import connect
from schemas.settings import load_settings
from tests.conftest import dedicated_stack, eventually


@pytest.fixture(scope="module")
def notices() -> list[str]:
    return []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, notices: list[str]) -> Iterator[Stack]:
    with dedicated_stack(Path(tmp_path_factory.mktemp("supervised")), log=notices.append) as st:
        yield st


def _kill(st: Stack, name: str) -> int | None:
    proc = st.services[name].proc
    assert proc is not None and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return proc.returncode


async def _journalled_call(st: Stack, run_id: str, timeout: float = 60.0) -> None:
    """Call the gateway until it answers 200, then wait until exactly the answered calls are journalled."""
    headers = {"Authorization": f"Bearer {st.demo['ALEPHANT_API_KEY']}", "Alephant-Run-Id": run_id}
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "still there?"}]}
    answered = 0
    async with aiohttp.ClientSession() as http:
        async def call() -> bool | None:
            nonlocal answered
            try:
                async with http.post(f"{st.demo['ALEPHANT_BASE_URL']}/chat/completions", json=body,
                                     headers=headers) as resp:
                    answered += resp.status == 200
                    return True if resp.status == 200 else None
            except aiohttp.ClientError:
                return None

        await eventually(call, timeout=timeout, interval=0.25)

    async def journalled() -> int | None:
        try:
            async with await psycopg.AsyncConnection.connect(st.child_env()["ALEPHANT_DATABASE_URL"]) as conn:
                cur = await conn.execute("SELECT count(*) FROM event_journal WHERE body->>'run_id' = %s", (run_id,))
                count = int((await cur.fetchone() or (0,))[0])
        except psycopg.OperationalError:
            return None
        return count if count >= answered else None

    assert await eventually(journalled, timeout=timeout, interval=0.25) == answered


async def _stream_last_seq(st: Stack) -> int:
    nc = await connect(st.nats_url("admin"), "alephant-tests")
    try:
        info = await nc.jetstream().stream_info(load_settings(st.child_env()).stream)
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def test_killed_nats_comes_back_on_its_port_with_its_store(stack: Stack, notices: list[str]) -> None:
    await _journalled_call(stack, f"run-sup-{uuid.uuid4().hex[:8]}")
    before = await _stream_last_seq(stack)
    url = stack.services["nats"].url
    code = _kill(stack, "nats")
    assert stack.supervise_once() == ["nats"]
    assert stack.services["nats"].url == url and port_open(int(url.rsplit(":", 1)[1]))
    assert any(n.startswith(f"!! nats exited with {code}; restarting") for n in notices), notices
    assert await _stream_last_seq(stack) >= before  # JetStream store kept: nothing before the kill is gone
    await _journalled_call(stack, f"run-sup-{uuid.uuid4().hex[:8]}")
    print(f"nats SIGKILLed (exit {code}), restarted on {url}; stream last_seq before {before}")


async def test_killed_postgres_comes_back_and_the_ledger_advances(stack: Stack, notices: list[str]) -> None:
    url = stack.services["postgres"].url
    code = _kill(stack, "postgres")
    assert stack.supervise_once() == ["postgres"]
    assert stack.services["postgres"].url == url
    assert any(n.startswith(f"!! postgres exited with {code}; restarting") for n in notices), notices
    await _journalled_call(stack, f"run-sup-{uuid.uuid4().hex[:8]}")


async def test_killed_redis_comes_back_on_its_port(stack: Stack, notices: list[str]) -> None:
    url = stack.services["redis"].url
    code = _kill(stack, "redis")
    assert stack.supervise_once() == ["redis"]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert stack.services["redis"].url == url and port_open(port)
    assert any(n.startswith(f"!! redis exited with {code}; restarting") for n in notices), notices
    await _journalled_call(stack, f"run-sup-{uuid.uuid4().hex[:8]}")


async def test_killed_worker_is_restarted(stack: Stack, notices: list[str]) -> None:
    stack.kill("dataplane-0")
    assert stack.supervise_once() == ["dataplane-0"]
    assert any(n.startswith("!! dataplane-0 exited with") for n in notices), notices
    await _journalled_call(stack, f"run-sup-{uuid.uuid4().hex[:8]}")
    assert stack.supervise_once() == []  # nothing else died along the way
