"""Poison isolation in the ledger projector, against the stack's real Postgres and NATS.

Hypothesis feeds `apply_batch` random mixes of good, duplicate and poison messages (NUL strings
anywhere, integers past bigint, oversized keys, undecodable bytes, and a pair whose run total
overflows only once both are folded, which only the per-event SAVEPOINT retry can isolate). After
every example: per currency debits equal credits, each good event is journalled exactly once
with its transfer, each poison message is dead-lettered with a reason, and the checkpoint is the
highest sequence seen. A second test puts poison into a real JetStream stream in front of a
running projector and checks that the consumer keeps going.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.jetstream import connect
from events.projector import apply_batch
from schemas.events import ConfigChanged, Event, LlmCall, Usage, event_encoder
from schemas.ids import uuid7
from tests.conftest import Gateway, wait_until_true
from tests.integration.conftest import scratch_database

STREAM = "POISON_TEST"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass
class Msg:
    data: bytes
    good_id: uuid.UUID | None = None  # journalled exactly once if set
    cost: int = 0
    poison: bool = False


def _call(cost: int = 0, **kw: Any) -> LlmCall:
    base: dict[str, Any] = {"event_id": uuid7(), "occurred_at": T0, "workspace_id": "ws_p", "agent_id": "a1",
                            "run_id": f"run-{uuid.uuid4().hex[:8]}", "provider": "mock", "model": "echo",
                            "usage": Usage(input_tokens=10, output_tokens=5), "cost_nanos": cost}
    return LlmCall(**(base | kw))


def _good(cost: int) -> list[Msg]:
    e = _call(cost)
    return [Msg(event_encoder.encode(e), e.event_id, cost)]


def _dup(cost: int) -> list[Msg]:
    e = _call(cost)
    data = event_encoder.encode(e)
    return [Msg(data, e.event_id, cost), Msg(data, e.event_id, 0)]  # the copy posts nothing more


def _poison_event(e: Event) -> list[Msg]:
    return [Msg(event_encoder.encode(e), poison=True)]


POISONS: dict[str, Any] = {
    "nul_model": lambda: _poison_event(_call(5, model="mock/echo\x00x")),
    "nul_run_id": lambda: _poison_event(_call(5, run_id="r\x00")),
    "nul_nested_key": lambda: _poison_event(ConfigChanged(
        event_id=uuid7(), occurred_at=T0, workspace_id="ws_p", entity="agent", entity_id="a",
        op="put", data={"deep": [{"k\x00": 1}]})),
    "tokens_1e19": lambda: _poison_event(_call(5, usage=Usage(input_tokens=10**19))),
    "tokens_2_70": lambda: _poison_event(_call(5, usage=Usage(output_tokens=2**70))),
    "revision_2_63": lambda: _poison_event(_call(5, snapshot_revision=2**63)),
    "cost_2_130": lambda: _poison_event(_call(2**130)),
    "oversized_run_id": lambda: _poison_event(_call(5, run_id="r" * 5000)),
    "oversized_agent_id": lambda: _poison_event(_call(5, agent_id="a" * 3000)),
    "undecodable": lambda: [Msg(b'{"type": "llm.call", "event_id": ', poison=True)],
}


def _run_overflow_pair(cost: int) -> list[Msg]:
    """Each event alone is storable; their run total passes bigint only when both are folded."""
    run = f"run-ovf-{uuid.uuid4().hex[:8]}"
    first = _call(cost, run_id=run, usage=Usage(input_tokens=2**62 + 1))
    second = _call(cost, run_id=run, usage=Usage(input_tokens=2**62 + 1))
    return [Msg(event_encoder.encode(first), first.event_id, cost), Msg(event_encoder.encode(second), poison=True)]


item = st.one_of(
    st.integers(0, 10**12).map(_good),
    st.integers(1, 10**9).map(_dup),
    st.sampled_from(sorted(POISONS)).map(lambda name: POISONS[name]()),
    st.integers(1, 10**6).map(_run_overflow_pair),
)


@pytest.fixture(scope="module")
def fresh_db(gateway: Gateway) -> Iterator[str]:
    """A database of its own on the stack's Postgres server, migrated."""
    with scratch_database(gateway.database_url, "poison") as url:
        yield url


_seq = itertools.count(1)


async def _feed_and_check(url: str, msgs: list[Msg], splits: list[int]) -> None:
    seqs = [next(_seq) for _ in msgs]
    rows = [(s, "events.ws_p.llm.call", m.data) for s, m in zip(seqs, msgs, strict=True)]
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cuts = sorted({0, len(rows), *(c % (len(rows) + 1) for c in splits)})
        for lo, hi in itertools.pairwise(cuts):
            await apply_batch(conn, STREAM, rows[lo:hi])
        good = {m.good_id for m in msgs if m.good_id}
        cur = await conn.execute("SELECT event_id, count(*) FROM event_journal WHERE event_id = ANY(%s) "
                                 "GROUP BY event_id", (list(good),))
        assert dict(await cur.fetchall()) == dict.fromkeys(good, 1)
        cur = await conn.execute("SELECT coalesce(sum(amount), 0) FROM ledger_transfer WHERE event_id = ANY(%s)",
                                 (list(good),))
        assert (await cur.fetchone() or [0])[0] == sum(m.cost for m in msgs)
        poison_seqs = [s for s, m in zip(seqs, msgs, strict=True) if m.poison]
        cur = await conn.execute("SELECT stream_seq, error FROM dead_letter WHERE stream = %s AND stream_seq = ANY(%s)",
                                 (STREAM, poison_seqs))
        dead = dict(await cur.fetchall())
        assert sorted(dead) == sorted(poison_seqs)
        assert all(reason for reason in dead.values())
        cur = await conn.execute("SELECT currency, sum(debits_posted), sum(credits_posted) FROM ledger_account "
                                 "GROUP BY currency")
        for _currency, debits, credits in await cur.fetchall():
            assert debits == credits
        cur = await conn.execute("SELECT last_seq FROM projector_checkpoint WHERE projector = 'ledger'")
        assert (await cur.fetchone() or [0])[0] == max(seqs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(item, min_size=1, max_size=12).map(lambda groups: [m for g in groups for m in g]),
       st.lists(st.integers(0, 100), max_size=3))
def test_random_mixes_of_good_duplicate_and_poison_events(fresh_db: str, msgs: list[Msg], splits: list[int]) -> None:
    asyncio.run(_feed_and_check(fresh_db, msgs, splits))


async def test_poison_in_the_stream_does_not_stall_the_running_projector(gateway: Gateway) -> None:
    run_id = f"run-poison-{uuid.uuid4().hex[:8]}"
    events = [_call(1000 + i, workspace_id="demo", run_id=run_id) for i in range(30)]
    poisons = [_call(7, workspace_id="demo", run_id=run_id, model="echo\x00x"),
               _call(7, workspace_id="demo", run_id=run_id, usage=Usage(input_tokens=10**19)),
               _call(7, workspace_id="demo", run_id=run_id, snapshot_revision=2**80)]
    order: list[Event] = [*events[:10], poisons[0], *events[10:20], poisons[1], *events[20:], poisons[2]]
    nc = await connect(gateway.nats_url, "alephant-tests-poison")
    try:
        js = nc.jetstream()
        acks = [await js.publish(f"{gateway.subject_prefix}.demo.llm.call", event_encoder.encode(e),
                                 stream=gateway.stream, headers={"Nats-Msg-Id": str(e.event_id)}) for e in order]
    finally:
        await nc.close()
    last = max(a.seq for a in acks)

    async def caught_up() -> bool:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute("SELECT coalesce(max(last_seq), 0) FROM projector_checkpoint")
            return int((await cur.fetchone() or [0])[0]) >= last

    await wait_until_true(caught_up, timeout=30)
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT count(*), coalesce(sum(amount), 0) FROM ledger_transfer WHERE run_id = %s",
                                 (run_id,))
        assert await cur.fetchone() == (30, sum(e.cost_nanos for e in events))
        cur = await conn.execute("SELECT event_id, error FROM dead_letter WHERE event_id = ANY(%s)",
                                 ([p.event_id for p in poisons],))
        dead = dict(await cur.fetchall())
    assert set(dead) == {p.event_id for p in poisons}
    print(f"\nprojector: 30 good journalled, 3 poison dead-lettered: {sorted(dead.values())}")
