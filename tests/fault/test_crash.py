"""A data-plane worker SIGKILLed under paced load loses no answered call (issue 7, item 2).

Every answered call's event is in the worker's disk spool before the response is written, so
the restarted worker (which claims the dead one's spool slot) publishes whatever the dead one
had not had acked. Each trial: ~150 req/s of `mock/echo` from an aiohttp client, SIGKILL the
worker mid-load, start it again, then require every request id answered 200 to be journalled.
Figures per trial are printed (`-rA`).
Runs on a dedicated stack so the session `gateway` is unaffected.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from deploy.stack import Stack
from tests.conftest import dedicated_stack, eventually

RATE_PER_S = 150
LOAD_S = 1.2
KILL_AT_S = 0.6


@pytest.fixture(scope="module")
def crash_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with dedicated_stack(Path(tmp_path_factory.mktemp("crash"))) as stack:
        yield stack


async def journalled_request_ids(database_url: str, run_id: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT body->>'request_id' FROM event_journal WHERE body->>'run_id' = %s",
                                 (run_id,))
        return {row[0] for row in await cur.fetchall()}


async def _paced_load(http: aiohttp.ClientSession, stack: Stack, run_id: str, on_kill: asyncio.Event) -> set[str]:
    """Fire RATE_PER_S requests a second for LOAD_S seconds (open loop); return the request ids
    answered 200. Sets `on_kill` at KILL_AT_S."""
    headers = {"Authorization": f"Bearer {stack.demo['ALEPHANT_API_KEY']}", "Alephant-Run-Id": run_id,
               "Alephant-Agent-Id": "demo-agent"}
    url = f"{stack.origin}/v1/chat/completions"
    answered: set[str] = set()

    async def one(i: int) -> None:
        body = {"model": "mock/echo", "messages": [{"role": "user", "content": f"crash trial call {i}"}]}
        try:
            async with http.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                await resp.read()
                if resp.status == 200:
                    answered.add(resp.headers["Alephant-Request-Id"])
        except (aiohttp.ClientError, TimeoutError):
            pass  # the worker died under this request: not answered, so nothing is owed

    start, tasks = time.monotonic(), []
    for i in range(int(RATE_PER_S * LOAD_S)):
        await asyncio.sleep(max(0.0, start + i / RATE_PER_S - time.monotonic()))
        if not on_kill.is_set() and time.monotonic() - start >= KILL_AT_S:
            on_kill.set()
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return answered


async def _trial(stack: Stack, n: int) -> tuple[int, int]:
    run_id = f"crash-{n}-{uuid.uuid4().hex[:8]}"
    kill = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        load = asyncio.create_task(_paced_load(http, stack, run_id, kill))
        await kill.wait()
        await asyncio.to_thread(stack.kill, "dataplane-0")
        answered = await load
    await asyncio.to_thread(stack.start_worker, 0)
    database_url = stack.child_env()["ALEPHANT_DATABASE_URL"]

    async def all_journalled() -> set[str] | None:
        found = await journalled_request_ids(database_url, run_id)
        return found if answered <= found else None

    try:
        journalled = await eventually(all_journalled, timeout=30)
    except pytest.fail.Exception:
        journalled = await journalled_request_ids(database_url, run_id)
    lost = len(answered - journalled)
    print(f"crash trial {n}: answered {len(answered)}, journalled {len(journalled & answered)}, lost {lost}")
    assert answered, "the worker answered nothing before the kill: the trial proves nothing"
    return len(answered), lost


async def test_sigkill_under_load_loses_no_answered_call_in_ten_trials(crash_stack: Stack) -> None:
    """Ten trials (about 25 s). With the spool disabled this loses ~5 answered calls per trial
    (the events still queued in memory at the kill), so the test can fail."""
    results = [await _trial(crash_stack, n) for n in range(10)]
    print(f"crash: 10 trials, answered {sum(a for a, _ in results)}, lost {sum(lost for _, lost in results)}")
    assert [lost for _, lost in results] == [0] * 10
