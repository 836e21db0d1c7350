"""controlplane/budget_state.py against real Postgres and Redis: after Redis loses its state
(FLUSHALL, as after a failover or a restart), `reconcile` restores each budget's spend from the
journal, per scope and calendar window, and never lowers a figure Redis has ahead of the ledger."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from controlplane.budget_state import budget_state, reconcile
from dataplane.governor import RedisGovernor
from dataplane.ports import AdmitRequest
from deploy.services import Service, start_postgres, start_redis
from events.db import migrate, open_pool
from schemas.entities import Budget

UTC = dt.UTC
# Noon UTC today: windows are real ones (keys of a window long past would expire at once).
NOW = dt.datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
MONTH_START = NOW.replace(day=1, hour=0)
CENT = 10_000_000
WS = "ws_recon"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    state = Path(tmp_path_factory.mktemp("reconcile"))
    pg = start_postgres(state)
    try:
        redis = start_redis(state)
        try:
            yield pg, redis
        finally:
            redis.stop()
    finally:
        pg.stop()


@pytest_asyncio.fixture(scope="module")
async def pool(services: tuple[Service, Service]) -> AsyncIterator[AsyncConnectionPool]:
    await migrate(services[0].url)
    pool = open_pool(services[0].url, max_size=2)
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()


@pytest_asyncio.fixture
async def redis(services: tuple[Service, Service]) -> AsyncIterator[Redis]:
    client = Redis.from_url(services[1].url)
    try:
        yield client
    finally:
        await client.aclose()


async def journal(url: str, *rows: tuple[str, dt.datetime, dict[str, Any], str]) -> None:
    """Insert `llm.call`-shaped rows: (workspace_id, occurred_at, body, type)."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for seq, (workspace, at, body, kind) in enumerate(rows):
            await conn.execute(
                "INSERT INTO event_journal (event_id, stream_seq, type, workspace_id, occurred_at, body) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (uuid.uuid4(), seq, kind, workspace, at, json.dumps({"workspace_id": workspace, **body})))


def call(at: dt.datetime, cost: int, workspace: str = WS, kind: str = "llm.call",
         **scope: str) -> tuple[str, dt.datetime, dict[str, Any], str]:
    return workspace, at, {"cost_nanos": cost, **scope}, kind


def budget(bid: str, scope: Any, scope_id: str, period: Any, tz: str = "UTC") -> Budget:
    return Budget(id=bid, workspace_id=WS, scope=scope, scope_id=scope_id, period=period, limit_nanos=100 * CENT,
                  timezone=tz)


AGENT = budget("bud_agent", "agent", "agent_1", "month")
WORKSPACE = budget("bud_ws", "workspace", WS, "month")
DEPT_DAY = budget("bud_dept", "department", "d1", "day", "America/New_York")
KEY_TOTAL = budget("bud_key", "key", "k1", "total")
BUDGETS = (AGENT, WORKSPACE, DEPT_DAY, KEY_TOTAL)


async def test_reconcile_restores_spend_from_the_ledger_and_never_lowers_it(
        services: tuple[Service, Service], pool: AsyncConnectionPool, redis: Redis) -> None:
    await journal(
        services[0].url,
        # Midnight UTC of the 1st is the evening before in New York: outside the department's day.
        call(MONTH_START, 30 * CENT, agent_id="agent_1", department_id="d1", key_id="k1"),
        call(NOW.replace(hour=10), 20 * CENT, agent_id="agent_1", department_id="d1", key_id="k1"),
        # 03:00 UTC is still yesterday in New York: outside the department's day too.
        call(NOW.replace(hour=3), 5 * CENT, agent_id="agent_2", department_id="d1", key_id="k2"),
        call(MONTH_START - dt.timedelta(hours=1), 100 * CENT, agent_id="agent_1", key_id="k1"),  # last month
        call(NOW.replace(hour=9), 7, workspace="ws_other", agent_id="agent_1"),
        call(NOW.replace(hour=9), 9, kind="budget.alert", agent_id="agent_1"),
    )
    # A worker settles spend in Redis, then Redis loses everything.
    gov = RedisGovernor(redis, lambda: 1, worker_id="w0")
    try:
        now_ms = int(NOW.timestamp() * 1000)
        admission = await gov.admit(AdmitRequest(workspace_id=WS, request_id="r1", limits=(), budgets=(AGENT,),
                                                 tokens=10, hold_nanos=50 * CENT, now_ms=now_ms))
        assert admission.ok
        gov.settle(admission, 50 * CENT, 10)
        assert await gov.flush()
        assert (await budget_state(redis, AGENT, NOW)).spent_nanos == 50 * CENT
        await redis.flushall()
        assert (await budget_state(redis, AGENT, NOW)).spent_nanos == 0

        assert await reconcile(redis, pool, BUDGETS, NOW) == 4
        spent = {b.id: (await budget_state(redis, b, NOW)).spent_nanos for b in BUDGETS}
        assert spent == {"bud_agent": 50 * CENT, "bud_ws": 55 * CENT, "bud_dept": 20 * CENT, "bud_key": 150 * CENT}
        state = await budget_state(redis, DEPT_DAY, NOW)
        assert state.period_key == NOW.date().isoformat() and state.remaining_nanos == 80 * CENT
        # Enforcement sees the restored spend: $0.60 more does not fit the agent's $1.00.
        refused = await gov.admit(AdmitRequest(workspace_id=WS, request_id="r2", limits=(), budgets=(AGENT,),
                                               tokens=10, hold_nanos=60 * CENT, now_ms=now_ms))
        assert not refused.ok and "spent $0.50" in refused.message

        # Redis ahead of the ledger (settled, not yet journalled) is kept: nothing is lowered.
        admission = await gov.admit(AdmitRequest(workspace_id=WS, request_id="r3", limits=(), budgets=(AGENT,),
                                                 tokens=10, hold_nanos=10 * CENT, now_ms=now_ms))
        gov.settle(admission, 10 * CENT, 10)
        assert await gov.flush()
        assert await reconcile(redis, pool, BUDGETS, NOW) == 0
        assert (await budget_state(redis, AGENT, NOW)).spent_nanos == 60 * CENT
    finally:
        await gov.close()
