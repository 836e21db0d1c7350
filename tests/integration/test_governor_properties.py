"""Hypothesis properties of budget admission against a real Redis (the project's launcher):
whatever the sequence of holds and settlements, admitted holds never exceed the remaining budget,
spent + held never exceeds the limit, and what is settled is exactly what is spent."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from controlplane.budget_state import budget_state
from dataplane.governor import RedisGovernor
from dataplane.ports import AdmitRequest
from deploy.services import Service
from schemas.entities import Budget

CENT = 10_000_000


# One step: a call holding `hold` cents that settles at `actual` cents (at most its hold: a
# provider that honours max_tokens), or stays open (`actual` None) until the end.
STEP = st.tuples(st.integers(1, 40), st.one_of(st.none(), st.integers(0, 40)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit_cents=st.integers(1, 200), steps=st.lists(STEP, min_size=1, max_size=40), workers=st.integers(1, 3))
async def test_admitted_holds_never_exceed_the_remaining_budget(redis_service: Service, limit_cents: int,
                                                                steps: list[tuple[int, int | None]],
                                                                workers: int) -> None:
    ws = f"ws_{uuid.uuid4().hex[:8]}"
    budget = Budget(id=f"b_{uuid.uuid4().hex[:6]}", workspace_id=ws, scope="workspace", scope_id=ws, period="total",
                    limit_nanos=limit_cents * CENT)
    clients = [Redis.from_url(redis_service.url, socket_timeout=2.0) for _ in range(workers)]
    govs = [RedisGovernor(c, lambda: workers, worker_id=f"w{i}") for i, c in enumerate(clients)]
    try:
        admitted_open = 0  # cents held by admitted calls not yet settled
        settled = 0
        for i, (hold, actual) in enumerate(steps):
            gov = govs[i % workers]
            now = int(time.time() * 1000)
            state = await budget_state(clients[0], budget, dt.datetime.now(dt.UTC))
            remaining = budget.limit_nanos - state.spent_nanos - admitted_open * CENT
            admission = await gov.admit(AdmitRequest(workspace_id=ws, request_id=f"r{i}-{uuid.uuid4().hex[:6]}",
                                                     limits=(), budgets=(budget,), tokens=0, hold_nanos=hold * CENT,
                                                     now_ms=now))
            assert admission.mode == "redis"
            # Admitted only if it fits what is left; refused only if it does not.
            assert admission.ok == (hold * CENT <= remaining), (hold, remaining)
            if not admission.ok:
                assert admission.code == "budget_exceeded"
                continue
            if actual is None:
                admitted_open += hold
                continue
            spent_now = min(actual, hold)
            gov.settle(admission, spent_now * CENT, 0)
            settled += spent_now
            assert await gov.flush()
        state = await budget_state(clients[0], budget, dt.datetime.now(dt.UTC))
        assert state.spent_nanos == settled * CENT
        assert state.held_nanos == admitted_open * CENT
        assert state.spent_nanos + state.held_nanos <= budget.limit_nanos
    finally:
        for gov, client in zip(govs, clients, strict=True):
            await gov.close()
            await client.aclose()
        await asyncio.sleep(0)
