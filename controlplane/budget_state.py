"""The control plane's view of budgets in Redis: read a budget's current window, and reconcile
its spend with the ledger.

Redis is not the source of truth: replication is asynchronous and a failover (or a restart: the
embedded Redis keeps nothing on disk) can lose acknowledged increments. The journal in Postgres
is. `reconcile` raises each budget's `spent` to what the journal shows for the window and never
lowers it (Redis may be ahead: settlements land before their events are journalled). Run it at
start-up and every `ALEPHANT_RECONCILE_INTERVAL_S`.

Key layout and windows come from `schemas.budget_keys` (the control plane imports nothing from
the data plane).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable

import msgspec
import structlog
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.budget_keys import LEASE_PREFIX, budget_keys, key_expire_at_ms, period_window
from schemas.entities import Budget

log = structlog.get_logger(__name__)

# The event field that names each scope (a workspace budget covers every call of the workspace).
_SCOPE_FIELD: dict[str, str | None] = {
    "workspace": None, "department": "department_id", "member": "member_id", "agent": "agent_id",
    "key": "key_id", "workflow": "workflow_id",
}

# Raise `spent` to the ledger's figure, never lower it. KEYS: spent. ARGV: ledger nanos (a
# non-negative integer string), expire_at_ms (0 = never). Compared as decimal strings (length,
# then digits), so exact at any size. Returns 1 when raised.
_RAISE_SPENT = r"""
local cur = redis.call('GET', KEYS[1]) or '0'
local led = ARGV[1]
if #led > #cur or (#led == #cur and led > cur) then
  redis.call('SET', KEYS[1], led)
  if tonumber(ARGV[2]) > 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[2]) end
  return 1
end
return 0
"""


class BudgetState(msgspec.Struct, frozen=True, kw_only=True):
    """A budget's current window as Redis has it, in integer nano-USD. `held_nanos` counts the
    open holds of calls in flight (expired ones excluded); `leased_nanos` the unused slices
    workers reserved for an outage (reclaimable, so not subtracted from `remaining_nanos`)."""

    spent_nanos: int
    held_nanos: int
    remaining_nanos: int
    period_key: str
    period_start: dt.datetime
    period_end: dt.datetime | None
    leased_nanos: int = 0


async def budget_state(redis: Redis, budget: Budget, now: dt.datetime) -> BudgetState:
    """Read `budget`'s window containing `now` (one pipeline, no writes, nothing swept)."""
    period_key, start, end = period_window(budget, now)
    keys = budget_keys(budget.workspace_id, budget.id, period_key)
    now_ms = int(now.timestamp() * 1000)
    pipe = redis.pipeline(transaction=True)  # one consistent snapshot of the three keys
    pipe.get(keys.spent)
    pipe.hgetall(keys.holds)
    pipe.zrangebyscore(keys.hexp, f"({now_ms}", "+inf")
    spent_raw, holds_raw, live_raw = await pipe.execute()
    live = {_text(k) for k in live_raw}
    held = leased = 0
    for hold_id, value in holds_raw.items():
        name = _text(hold_id)
        if name not in live:
            continue
        if name.startswith(LEASE_PREFIX):
            leased += int(value)
        else:
            held += int(value)
    spent = int(spent_raw or 0)
    return BudgetState(spent_nanos=spent, held_nanos=held, remaining_nanos=budget.limit_nanos - spent - held,
                       period_key=period_key, period_start=start, period_end=end, leased_nanos=leased)


async def ledger_spend(pool: AsyncConnectionPool, budget: Budget, start: dt.datetime, end: dt.datetime | None) -> int:
    """Sum of `cost_nanos` of the journalled `llm.call` events in `budget`'s scope with
    `start <= occurred_at < end` (no end: everything from `start`)."""
    sql = ("SELECT COALESCE(SUM((body->>'cost_nanos')::numeric), 0) FROM event_journal "
           "WHERE workspace_id = %s AND type = 'llm.call' AND occurred_at >= %s")
    params: list[object] = [budget.workspace_id, start]
    if end is not None:
        sql += " AND occurred_at < %s"
        params.append(end)
    field = _SCOPE_FIELD[budget.scope]
    if field is not None:
        sql += " AND body->>%s = %s"
        params += [field, budget.scope_id]
    async with pool.connection() as conn:
        cur = await conn.execute(sql.encode(), params)
        row = await cur.fetchone()
    return int(row[0]) if row is not None else 0


async def reconcile(redis: Redis, pool: AsyncConnectionPool, budgets: Iterable[Budget], now: dt.datetime) -> int:
    """For each budget, `spent := max(spent, ledger spend of its current window)`, atomically in
    Redis (never lowered). Returns how many budgets were raised. Raises on a Redis or Postgres
    error (the caller logs it and tries again next interval; nothing is half-applied per budget).

    After a loss, a settlement a worker still has queued (it could not reach Redis) lands on top
    of the restored figure and is counted twice until the window ends: an over-count, the
    refusing side, never an overspend."""
    raise_spent = redis.register_script(_RAISE_SPENT)
    raised = 0
    for budget in budgets:
        period_key, start, end = period_window(budget, now)
        ledger = await ledger_spend(pool, budget, start, end)
        keys = budget_keys(budget.workspace_id, budget.id, period_key)
        raised += int(await raise_spent(keys=[keys.spent], args=[str(max(0, ledger)), key_expire_at_ms(end)]))
    return raised


async def live_budgets(pool: AsyncConnectionPool) -> list[Budget]:
    """Every budget not deleted, from the control plane's state."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT body FROM config_entity WHERE kind = 'budget' AND deleted_at IS NULL")
        rows = await cur.fetchall()
    return [msgspec.convert(row[0], Budget) for row in rows]


async def run_reconciler(redis: Redis, pool: AsyncConnectionPool, interval_s: float) -> None:
    """`reconcile` every budget at start and then every `interval_s`, until cancelled. A failed
    round (Redis or Postgres unreachable) is logged and retried at the next interval."""
    while True:
        try:
            raised = await reconcile(redis, pool, await live_budgets(pool), dt.datetime.now(dt.UTC))
        except Exception as exc:  # any store fault: the next round retries; never kill the loop
            log.warning("budget_reconcile_failed", error=type(exc).__name__)
        else:
            if raised:
                log.info("budget_reconcile_raised", budgets=raised)
        await asyncio.sleep(interval_s)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
