"""Budgets and limits under concurrency and faults, across TWO data-plane workers (issue 8;
RELIABILITY rows 10-13).

One dedicated stack (embedded NATS, Postgres, Redis; 2 workers sharing the port, the kernel
spreading connections) with a short hold TTL and reconcile interval. Each test builds its own
workspace with the helpers of the end-to-end suite: a `mock` provider (or the OpenAI fake) priced
at $0 input and $0.001 per output token, so a call asking for 10 tokens of a 64-token prompt
costs exactly $0.01 and holds exactly that. Clients open a new connection per request
(`force_close`), so both workers serve; the budget's worker leases (`lease:<worker_id>` holds in
Redis) show that each did.

In order (the later ones disturb the stack):
* zero overspend: 1000 concurrent $0.01 calls against $1.00 -> exactly 100 served; and the bound
  when the provider ignores `max_tokens`;
* rate limit: the fleet admits the configured rate (GCRA, burst = the limit), not twice it;
* Redis paused: no 5xx, rate limits fall back to limit/2 per worker, budgets spend only leases;
* a worker killed with open holds: they lapse within the hold TTL and the budget is whole again
  (a new worker is started after);
* Redis restarted empty: the reconciler restores spend from the journal, and the workers decide
  by Redis again at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from deploy.stack import Stack
from schemas.budget_keys import budget_keys
from schemas.settings import load_settings
from tests.conftest import Gateway, dedicated_stack, eventually, wait_until_true
from tests.fakes.upstream import FakeUpstream
from tests.integration.test_governance_e2e import (
    CENT,
    MILL,
    Answer,
    Org,
    budget_view,
    chat,
    make_org,
    settled_budget,
    usd,
)

HOLD_TTL_S = 8.0
RECONCILE_INTERVAL_S = 1.0
REFRESH_S = 5.0  # RedisGovernor's default lease refresh and sweep interval
DOLLAR = 1_000_000_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"ALEPHANT_HOLD_TTL_S": str(HOLD_TTL_S), "ALEPHANT_RECONCILE_INTERVAL_S": str(RECONCILE_INTERVAL_S)}
    with dedicated_stack(Path(tmp_path_factory.mktemp("governance")), env, workers=2) as s:
        yield s


@pytest.fixture(scope="module")
def gw(stack: Stack) -> Gateway:
    """The dedicated stack seen through the session suite's handle (so its helpers apply)."""
    env = stack.child_env()
    names = load_settings(env)
    return Gateway(stack=stack, base_url=stack.demo["ALEPHANT_BASE_URL"], admin=stack.admin(),
                   database_url=env["ALEPHANT_DATABASE_URL"], nats_url=stack.nats_url("admin"),
                   stream=names.stream, subject_prefix=names.subject_prefix, demo_key=stack.demo["ALEPHANT_API_KEY"])


@pytest_asyncio.fixture
async def spread() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a new connection per request, without a cap, so the kernel spreads
    requests over both workers."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        yield http


@pytest_asyncio.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack.services["redis"].url, socket_timeout=5, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def both_workers_applied(gw: Gateway, org: Org) -> None:
    """Both live workers (heard in the last few seconds: a killed one stays listed for a while)
    have applied the org's config."""
    revision = max(org.revisions)

    async def both() -> bool:
        report = await asyncio.to_thread(gw.admin.call, "GET", "/admin/v1/fleet")
        live = [w for w in report["workers"] if w["age_s"] <= 3]
        return len(live) == 2 and all(w["applied_revision"] >= revision for w in live)

    await wait_until_true(both)


async def leases(redis: Redis, gw: Gateway, org: Org, budget_id: str) -> dict[str, int]:
    """The worker leases held on the budget's current window: lease id -> nano-USD."""
    view = await budget_view(gw, budget_id)
    keys = budget_keys(org.ws, budget_id, view["period_key"])
    members = {str(m) for m in await redis.smembers(keys.leases)}
    holds = {str(k): int(v) for k, v in (await redis.hgetall(keys.holds)).items()}
    return {m: holds[m] for m in members if m in holds}


async def ledger(gw: Gateway, org: Org, expected_calls: int) -> list[dict[str, Any]]:
    """The journalled `llm.call`s of the org's agent, once there are `expected_calls` of them."""
    async def rows() -> list[dict[str, Any]] | None:
        async with await psycopg.AsyncConnection.connect(gw.database_url) as conn:
            cur = await conn.execute("SELECT body FROM event_journal WHERE type = 'llm.call' AND workspace_id = %s "
                                     "AND body->>'agent_id' = %s", (org.ws, org.agent))
            found = [dict(r[0]) for r in await cur.fetchall()]
        return found if len(found) >= expected_calls else None

    return await eventually(rows, timeout=30)


async def burst(http: aiohttp.ClientSession, gw: Gateway, key: str, model: str, n: int,
                max_tokens: int = 10) -> list[Answer | BaseException]:
    return await asyncio.gather(*(chat(http, gw, key, model, max_tokens=max_tokens) for _ in range(n)),
                                return_exceptions=True)


async def paced(http: aiohttp.ClientSession, gw: Gateway, key: str, model: str, per_tick: int, *,
                max_tokens: int, ticks: int = 15, tick_s: float = 0.2) -> list[Answer]:
    """`per_tick` requests every `tick_s` for `ticks` ticks (open loop); every answer."""
    tasks: list[asyncio.Task[Answer]] = []
    start = time.monotonic()
    for i in range(ticks):
        await asyncio.sleep(max(0.0, start + i * tick_s - time.monotonic()))
        tasks += [asyncio.create_task(chat(http, gw, key, model, max_tokens=max_tokens)) for _ in range(per_tick)]
    return answers(list(await asyncio.gather(*tasks, return_exceptions=True)))


def answers(results: list[Answer | BaseException]) -> list[Answer]:
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} requests failed without an answer: {failed[:3]}"
    return [r for r in results if isinstance(r, Answer)]


# -- zero overspend -------------------------------------------------------------------------------


async def test_1000_concurrent_cent_calls_against_a_dollar_serve_exactly_100(
        gw: Gateway, spread: aiohttp.ClientSession, redis: Redis) -> None:
    org = make_org(gw)
    budget = org.create("budgets", scope="agent", scope_id=org.agent, period="total", limit_usd="1.00")
    await both_workers_applied(gw, org)

    results = answers(await burst(spread, gw, org.key, org.model, 1000))
    statuses = Counter(a.status for a in results)
    assert statuses == {200: 100, 429: 900}, statuses
    assert all(a.body["usage"]["completion_tokens"] == 10 for a in results if a.status == 200)
    codes = Counter((a.error["type"], a.error["code"]) for a in results if a.status == 429)
    assert codes == {("insufficient_quota", "budget_exceeded"): 900}
    assert all(budget["id"] in a.error["message"] for a in results if a.status == 429)

    view = await settled_budget(gw, budget["id"], Decimal("1"))
    assert usd(view["remaining_usd"]) == 0
    rows = await ledger(gw, org, 1000)
    assert len(rows) == 1000
    assert sum(r["cost_nanos"] for r in rows) == DOLLAR
    assert Counter(r["status"] for r in rows) == {200: 100, 429: 900}
    assert {r["decision"] for r in rows if r["status"] == 429} == {"budget_exceeded"}


async def test_a_provider_ignoring_max_tokens_overspends_at_most_its_excess(
        gw: Gateway, spread: aiohttp.ClientSession) -> None:
    """Holds assume max_tokens (10 tokens, $0.01) but the provider answers 15 ($0.015). Every
    admission checked spent + held + hold <= limit, and each call's actual cost is at least its
    hold, so the holds of all admitted calls sum to at most the limit: overspend <= the sum over
    admitted calls of (actual - hold)."""
    async with FakeUpstream(words=15) as fake:
        fake.ignore_max_tokens = True
        fake.record = False
        org = make_org(gw, fake)
        budget = org.create("budgets", scope="agent", scope_id=org.agent, period="total", limit_usd="1.00")
        await both_workers_applied(gw, org)
        results = answers(await burst(spread, gw, org.key, f"{org.fake}/gpt-4o-mini", 1000))
    statuses = Counter(a.status for a in results)
    assert set(statuses) == {200, 429} and 0 < statuses[200] <= 100, statuses
    assert {a.error["code"] for a in results if a.status == 429} == {"budget_exceeded"}

    rows = await ledger(gw, org, 1000)
    served = [r for r in rows if r["status"] == 200]
    assert len(served) == statuses[200]
    assert all(r["hold_nanos"] == CENT and r["cost_nanos"] == 15 * MILL for r in served)
    spent = sum(r["cost_nanos"] for r in rows)
    excess = sum(r["cost_nanos"] - r["hold_nanos"] for r in served)
    assert spent - DOLLAR <= excess
    assert sum(r["hold_nanos"] for r in served) <= DOLLAR
    view = await settled_budget(gw, budget["id"], Decimal(spent) / DOLLAR)
    assert usd(view["held_usd"]) == 0


# -- rate limits across workers ---------------------------------------------------------------------

RPM = 120
LOAD_RPS = 40
LOAD_S = 6.0


async def test_two_workers_admit_the_configured_rate_not_twice_it(
        gw: Gateway, spread: aiohttp.ClientSession, redis: Redis) -> None:
    """GCRA with burst = the limit: from rest, over D seconds a limit of R per minute admits
    R + R * D / 60. Open-loop load at twice that; the fleet must stay within 10% of it (two
    independent workers would admit about twice)."""
    org = make_org(gw)
    limit = org.create("limits", scope="key", scope_id=org.key_id, rpm=RPM)
    # A generous budget on the path: each worker that serves it takes a lease, which shows both served.
    budget = org.create("budgets", scope="key", scope_id=org.key_id, period="total", limit_usd="100.00")
    await both_workers_applied(gw, org)

    tasks: list[asyncio.Task[Answer]] = []
    start = time.monotonic()
    for i in range(int(LOAD_RPS * LOAD_S)):
        await asyncio.sleep(max(0.0, start + i / LOAD_RPS - time.monotonic()))
        tasks.append(asyncio.create_task(chat(spread, gw, org.key, org.model, max_tokens=1)))
    duration = time.monotonic() - start
    results = answers(list(await asyncio.gather(*tasks, return_exceptions=True)))

    admitted = sum(a.status == 200 for a in results)
    expected = RPM + RPM * duration / 60
    refused = [a for a in results if a.status != 200]
    assert {(a.status, a.error["code"]) for a in refused} == {(429, "rate_limit_exceeded")}
    assert all(int(a.headers["Retry-After"]) >= 1 and limit["id"] in a.error["message"] for a in refused)
    assert abs(admitted - expected) <= 0.1 * expected, (admitted, expected)
    assert len(await leases(redis, gw, org, budget["id"])) == 2  # both workers served


# -- Redis faults -----------------------------------------------------------------------------------


async def test_redis_paused_no_5xx_local_rate_limits_and_budgets_only_on_leases(
        gw: Gateway, stack: Stack, spread: aiohttp.ClientSession, redis: Redis) -> None:
    org = make_org(gw)
    budget = org.create("budgets", scope="agent", scope_id=org.agent, period="total", limit_usd="1.00")
    rated_key, rated_id = org.new_key()
    org.create("limits", scope="key", scope_id=rated_id, rpm=20)
    plain_key, _ = org.new_key()
    await both_workers_applied(gw, org)

    # Both workers serve the budget (each then holds a lease of it), then everything settles and
    # the leases are topped up again (the periodic refresh).
    served = 0
    while len(await leases(redis, gw, org, budget["id"])) < 2:
        served += sum(a.status == 200 for a in answers(await burst(spread, gw, org.key, org.model, 4)))
        assert served <= 40, "the second worker never took a lease"
    await settled_budget(gw, budget["id"], Decimal(served * CENT) / DOLLAR)

    async def leased() -> bool:
        granted = await leases(redis, gw, org, budget["id"])
        return len(granted) == 2 and all(v >= CENT for v in granted.values())

    await wait_until_true(leased, timeout=REFRESH_S + 5)

    # Paced load for 5 s: a worker trusts its lease only once Redis has failed for a while (the
    # first reply it waits for times out after ALEPHANT_REDIS_TIMEOUT_S, 1 s, and the breaker opens
    # after down_after_s, 1 s, more); calls before that are refused (budgets) or limited locally
    # (rates). On a busy machine that is well into the load, so the load lasts long enough.
    stack.services["redis"].pause()
    try:
        loads = await asyncio.gather(*(paced(spread, gw, key, org.model, per_tick, max_tokens=tokens, ticks=25)
                                       for key, per_tick, tokens in ((org.key, 2, 10), (rated_key, 3, 1),
                                                                     (plain_key, 1, 1))))
        status_view = await budget_view(gw, budget["id"])
    finally:
        stack.services["redis"].resume()
    budgeted, rated, plain = loads

    everything = budgeted + rated + plain
    assert all(a.status < 500 for a in everything), Counter(a.status for a in everything)
    assert {a.status for a in plain} == {200}
    # Budgets: only the leases the workers held when Redis stopped are spent. A lease is at most 5%
    # of the limit (refreshed every few seconds, so its exact size at the pause is not observable).
    outage_spend = sum(a.status == 200 for a in budgeted) * CENT
    outcomes = Counter((a.status, a.body.get("error", {}).get("message", "")[:160]) for a in budgeted)
    assert 0 < outage_spend <= 2 * DOLLAR * 5 // 100, (outage_spend, outcomes)
    assert {a.error["code"] for a in budgeted if a.status != 200} <= {"budget_exceeded"}
    # Rate limits fail open onto each worker's share (20 / 2 per minute, burst included): about 20.
    ok_rated = [a for a in rated if a.status == 200]
    assert 10 <= len(ok_rated) <= 30, len(ok_rated)
    assert {a.headers["x-ratelimit-limit-requests"] for a in ok_rated} == {"10"}
    assert {a.error["code"] for a in rated if a.status != 200} == {"rate_limit_exceeded"}
    assert status_view["spent_usd"] is None and status_view.get("budget_store") == "unavailable"

    # Back on Redis: the outage's admissions are recorded and settled; the total stays within $1.
    total = served * CENT + outage_spend
    view = await settled_budget(gw, budget["id"], Decimal(total) / DOLLAR)
    assert usd(view["spent_usd"]) <= 1
    rows = await ledger(gw, org, served + len(budgeted))
    assert sum(r["cost_nanos"] for r in rows) == total

    # Each worker's breaker closes at its next probe (every 0.5 s): until then budgeted calls are
    # still refused as "store unreachable". Leave the stack with both back on Redis (each request
    # opens a new connection, so 20 /healthz answers cover both workers but for 2**-19).
    async def both_back() -> bool:
        stores = []
        for _ in range(20):
            async with spread.get(gw.base_url.removesuffix("/v1") + "/healthz") as resp:
                stores.append((await resp.json())["budget_store"])
        return set(stores) == {"ok"}

    await wait_until_true(both_back, timeout=10)


# -- holds of a dead worker ------------------------------------------------------------------------


async def test_a_killed_workers_holds_lapse_within_the_hold_ttl(gw: Gateway, stack: Stack,
                                                                spread: aiohttp.ClientSession) -> None:
    """20 calls of $0.01 hold a $0.20 budget whole while a slow upstream keeps them in flight;
    SIGKILL one worker. The survivor's calls settle; the dead one's holds lapse within the hold TTL
    (plus a sweep), after which the budget admits again what they had reserved."""
    async with FakeUpstream(words=10, latency_ms=3000, record=False) as slow:
        org = make_org(gw, slow)
        budget = org.create("budgets", scope="agent", scope_id=org.agent, period="total", limit_usd="0.20")
        await both_workers_applied(gw, org)
        model = f"{org.fake}/gpt-4o-mini"
        in_flight = asyncio.gather(*(chat(spread, gw, org.key, model, max_tokens=10) for _ in range(20)),
                                   return_exceptions=True)

        async def all_held() -> bool:
            if in_flight.done():  # every call ended before all 20 were held at once: say how
                outcomes = Counter((a.status, a.body.get("error", {}).get("message", "")) if isinstance(a, Answer)
                                   else (0, repr(a)) for a in in_flight.result())
                pytest.fail(f"the 20 calls were never all in flight: {outcomes}")
            view = await budget_view(gw, budget["id"])
            return view.get("held_usd") is not None and usd(view["held_usd"]) == Decimal("0.20")

        await wait_until_true(all_held, timeout=10)
        killed_at = time.monotonic()
        await asyncio.to_thread(stack.kill, "dataplane-1")
        try:
            results = await in_flight
        finally:
            await asyncio.to_thread(stack.start_worker, 1)  # a new worker for the tests after this one
        answered = [r for r in results if isinstance(r, Answer)]
        lost = len(results) - len(answered)
        assert {a.status for a in answered} <= {200}, Counter(a.status for a in answered)
        assert lost >= 1 and answered, "both workers must have held calls for the kill to mean anything"

        async def released() -> bool:
            view = await budget_view(gw, budget["id"])
            return usd(view["held_usd"]) == 0

        await wait_until_true(released, timeout=HOLD_TTL_S + REFRESH_S)
        assert time.monotonic() - killed_at <= HOLD_TTL_S + REFRESH_S
        view = await budget_view(gw, budget["id"])
        assert usd(view["spent_usd"]) * DOLLAR == len(answered) * CENT
        assert usd(view["remaining_usd"]) * DOLLAR == lost * CENT
        # The budget is whole again: a call the leaked holds would have blocked is served.
        again = await chat(spread, gw, org.key, model, max_tokens=10)
        assert again.status == 200, again.body


# -- Redis restarted empty (keep last: the stale connections it leaves may affect later tests) ----


async def test_redis_restarted_empty_the_reconciler_restores_spend_from_the_journal(
        gw: Gateway, stack: Stack, spread: aiohttp.ClientSession) -> None:
    """Redis loses everything (the embedded one keeps nothing on disk). Within one reconcile
    interval the control plane restores each budget's spend from the journal, so a spent budget
    refuses again, by Redis's own arithmetic; a budget with room keeps serving, with no call
    refused because of the restart itself."""
    spent_org, open_org = make_org(gw), make_org(gw)
    budget = spent_org.create("budgets", scope="agent", scope_id=spent_org.agent, period="month", limit_usd="0.10")
    roomy = open_org.create("budgets", scope="agent", scope_id=open_org.agent, period="month", limit_usd="1.00")
    await both_workers_applied(gw, spent_org)
    await both_workers_applied(gw, open_org)
    for _ in range(10):
        ans = await chat(spread, gw, spent_org.key, spent_org.model, max_tokens=10)
        assert ans.status == 200, ans.body
    ans = await chat(spread, gw, spent_org.key, spent_org.model, max_tokens=10)
    assert ans.status == 429 and "would be exceeded" in ans.error["message"], ans.body
    assert all(a.status == 200 for a in answers(await burst(spread, gw, open_org.key, open_org.model, 4)))
    await settled_budget(gw, budget["id"], Decimal("0.10"))
    await settled_budget(gw, roomy["id"], Decimal("0.04"))
    rows = await ledger(gw, spent_org, 11)
    assert sum(r["cost_nanos"] for r in rows) == 10 * CENT

    redis_svc = stack.services["redis"]
    await asyncio.to_thread(redis_svc.stop)
    await asyncio.to_thread(redis_svc.restart)

    async def restored() -> bool:
        view = await budget_view(gw, budget["id"])
        return view.get("spent_usd") is not None and usd(view["spent_usd"]) == Decimal("0.10")

    # One reconcile interval, plus the control plane reconnecting to the new Redis.
    await wait_until_true(restored, timeout=RECONCILE_INTERVAL_S + 3)
    assert usd((await budget_view(gw, roomy["id"]))["spent_usd"]) == Decimal("0.04")

    refused = answers(await burst(spread, gw, spent_org.key, spent_org.model, 20))
    assert {(a.status, a.error["code"]) for a in refused} == {(429, "budget_exceeded")}
    reasons = Counter(a.error["message"].partition(": ")[2] for a in refused)
    assert all("would be exceeded" in a.error["message"] for a in refused), reasons
    served = answers(await burst(spread, gw, open_org.key, open_org.model, 20))
    assert Counter(a.status for a in served) == {200: 20}, Counter(
        (a.status, a.error["message"]) for a in served if a.status != 200)
