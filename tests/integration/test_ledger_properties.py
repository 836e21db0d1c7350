"""Property: whatever sequence of money events arrives, in whatever batches, duplicated,
redelivered or mixed with poison, both projections agree with an independent recomputation.

Hypothesis generates events of every money kind (priced and unpriced model calls, re-pricings,
tool spend, outbound and inbound payments, cache hits, run outcomes) over a few agents and runs,
with duplicates (the same message twice), redeliveries (a batch folded again) and poison
messages, and folds them through `events.projector.apply_batch` for each projection in
`PROJECTIONS` (each with its own random batch cuts) into a real Postgres. Then:
* per currency, debits equal credits over the whole ledger;
* per run, the ledger's transfers by kind, and the finance facts' columns, equal totals computed
  here directly from the generated events: this file's own arithmetic, not `events.ledger` or
  `events.finance`;
* every good event is journalled once, every poison message is dead-lettered.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import itertools
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.projector import PROJECTIONS, apply_batch
from schemas.events import (
    CacheHit,
    Event,
    LlmCall,
    LlmRepriced,
    PaymentInbound,
    PaymentOutbound,
    RunCompleted,
    ToolSpend,
    Usage,
    event_encoder,
)
from schemas.ids import uuid7
from tests.conftest import Gateway
from tests.integration.conftest import scratch_database

STREAM = "LEDGER_PROPS"
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
AGENTS = ["a1", "a2", None]
RUNS = ["r1", "r2", "r3", None]


@dataclass
class Expected:
    """Per run: USD totals by kind, and unpriced tokens."""

    llm: int = 0
    tool: int = 0
    out: int = 0
    revenue: int = 0
    savings: int = 0
    unpriced_tokens: int = 0
    requests: int = 0


@dataclass
class Workload:
    workspace: str
    messages: list[bytes] = field(default_factory=list)
    good: set[uuid.UUID] = field(default_factory=set)
    poison: int = 0
    expected: dict[str | None, Expected] = field(default_factory=lambda: collections.defaultdict(Expected))


def _envelope(ws: str, agent: str | None, run: str | None, i: int) -> dict[str, Any]:
    return {"event_id": uuid7(), "occurred_at": T0 + dt.timedelta(minutes=i), "workspace_id": ws, "agent_id": agent,
            "run_id": run}


# One generated step: (kind, agent index, run index, amount, tokens, duplicate?)
step = st.tuples(
    st.sampled_from(["llm", "unpriced", "repriced", "tool", "out", "in", "cache", "outcome", "poison"]),
    st.integers(0, len(AGENTS) - 1), st.integers(0, len(RUNS) - 1),
    st.integers(1, 10**12), st.integers(1, 10**6), st.booleans(),
)


def build(steps: list[tuple[str, int, int, int, int, bool]]) -> Workload:
    w = Workload(workspace=f"ws_{secrets.token_hex(4)}")
    for i, (kind, a, r, amount, tokens, dup) in enumerate(steps):
        agent, run = AGENTS[a], RUNS[r]
        env = _envelope(w.workspace, agent, run, i)
        exp = w.expected[run]
        event: Event
        if kind == "poison":
            bad = LlmCall(**env, provider="p", model="m\x00x", cost_nanos=amount)
            w.messages.append(event_encoder.encode(bad))
            w.poison += 1
            continue
        if kind == "llm":
            event = LlmCall(**env, provider="openai", model="gpt", cost_nanos=amount,
                            usage=Usage(input_tokens=tokens, output_tokens=tokens // 2))
            exp.llm += amount
            exp.requests += 1
        elif kind == "unpriced":
            event = LlmCall(**env, provider="house", model="m1", priced=False,
                            usage=Usage(input_tokens=tokens, output_tokens=tokens // 3))
            exp.unpriced_tokens += tokens + tokens // 3
            exp.requests += 1
        elif kind == "repriced":
            event = LlmRepriced(**env, original_event_id=uuid7(), provider="house", model="m1", tokens=tokens,
                                cost_nanos=amount, price_id="price-1")
            exp.llm += amount
            exp.unpriced_tokens -= tokens
        elif kind == "tool":
            event = ToolSpend(**env, spend_id=f"s{i}", amount_nanos=amount, vendor="serpapi", tool="search")
            exp.tool += amount
        elif kind == "out":
            event = PaymentOutbound(**env, payment_id=f"po{i}", amount_nanos=amount, rail="x402")
            exp.out += amount
        elif kind == "in":
            event = PaymentInbound(**env, payment_id=f"pi{i}", amount_nanos=amount, rail="mpp", endpoint_id="ep")
            exp.revenue += amount
        elif kind == "cache":
            event = CacheHit(**env, provider="openai", model="gpt", saved_nanos=amount)
            exp.savings += amount
        else:
            event = RunCompleted(**env, outcome="succeeded" if amount % 2 else "failed")
        data = event_encoder.encode(event)
        w.messages.append(data)
        w.good.add(event.event_id)
        if dup:
            w.messages.append(data)  # a duplicate publish (outside the stream's dedup window)
    return w


@pytest.fixture(scope="module")
def fresh_db(gateway: Gateway) -> Iterator[str]:
    """A database of its own on the stack's Postgres server, migrated."""
    with scratch_database(gateway.database_url, "ledger_props") as url:
        yield url


_seq = itertools.count(1)


async def _fold_and_check(url: str, w: Workload, cuts: list[list[int]], redeliver: list[int]) -> None:
    rows = [(next(_seq), f"events.{w.workspace}.x", data) for data in w.messages]
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for projection, raw_cuts in zip(PROJECTIONS, itertools.cycle(cuts), strict=False):
            bounds = sorted({0, len(rows), *(c % (len(rows) + 1) for c in raw_cuts)})
            batches = [rows[lo:hi] for lo, hi in itertools.pairwise(bounds)]
            for i, batch in enumerate(batches):
                await apply_batch(conn, STREAM, batch, projection)
                if i in redeliver:  # the ack was lost: the same batch comes again
                    await apply_batch(conn, STREAM, batch, projection)

        cur = await conn.execute("SELECT currency, sum(debits_posted) = sum(credits_posted) FROM ledger_account "
                                 "GROUP BY currency")
        assert all(balanced for _, balanced in await cur.fetchall())

        cur = await conn.execute("SELECT event_id, count(*) FROM event_journal WHERE workspace_id = %s "
                                 "GROUP BY event_id", (w.workspace,))
        assert dict(await cur.fetchall()) == dict.fromkeys(w.good, 1)
        if w.poison:
            cur = await conn.execute("SELECT count(DISTINCT stream_seq) FROM dead_letter WHERE stream = %s "
                                     "AND subject = %s", (STREAM, f"events.{w.workspace}.x"))
            assert (await cur.fetchone() or [0])[0] == w.poison

        # The ledger, by run and transfer code (USD) and the TOKENS suspense postings.
        cur = await conn.execute(
            "SELECT run_id, code, currency, sum(amount) FROM ledger_transfer WHERE workspace_id = %s "
            "GROUP BY run_id, code, currency", (w.workspace,))
        ledger: dict[tuple[str | None, str], int] = {(run, code): int(total) for run, code, _, total in
                                                     await cur.fetchall()}
        cur = await conn.execute(
            "SELECT run_id, sum(llm_cost_nanos), sum(tool_cost_nanos), sum(payments_out_nanos), sum(revenue_nanos), "
            "sum(cache_savings_nanos), sum(unpriced_tokens), sum(requests) FROM finance_fact WHERE workspace_id = %s "
            "GROUP BY run_id", (w.workspace,))
        facts = {row[0]: tuple(int(v) for v in row[1:]) for row in await cur.fetchall()}

    for run, exp in w.expected.items():
        if not any((exp.llm, exp.tool, exp.out, exp.revenue, exp.savings, exp.unpriced_tokens, exp.requests)):
            continue
        llm_ledger = ledger.get((run, "llm_cost"), 0) + ledger.get((run, "llm_cost_repriced"), 0)
        assert llm_ledger == exp.llm, run
        assert ledger.get((run, "tool_spend"), 0) == exp.tool, run
        assert ledger.get((run, "payment_outbound"), 0) == exp.out, run
        assert ledger.get((run, "payment_inbound"), 0) == exp.revenue, run
        suspense = ledger.get((run, "llm_unpriced"), 0) - ledger.get((run, "llm_unpriced_reversal"), 0)
        assert suspense == exp.unpriced_tokens, run
        assert facts.get(run, (0,) * 7) == (exp.llm, exp.tool, exp.out, exp.revenue, exp.savings,
                                            exp.unpriced_tokens, exp.requests), run


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(step, min_size=1, max_size=40), st.lists(st.lists(st.integers(0, 100), max_size=4), min_size=1,
                                                           max_size=2),
       st.lists(st.integers(0, 5), max_size=3))
def test_both_projections_equal_an_independent_recomputation(fresh_db: str, steps: list[Any], cuts: list[list[int]],
                                                              redeliver: list[int]) -> None:
    asyncio.run(_fold_and_check(fresh_db, build(steps), cuts, redeliver))
