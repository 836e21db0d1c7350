"""The projector dies at each point of a batch, then comes back: the books are the same as if it
had never died, with no duplicates (RELIABILITY rows 1-3).

* Before commit: the database connection is killed (`pg_terminate_backend`) after every
  statement of the fold ran but before COMMIT; the batch must leave nothing behind, not even a
  checkpoint, and folding it again on a new connection books each event once.
* After commit, before ack: the same batch is delivered again (the ack was lost); folding it
  again changes nothing.
Both for every projection, on a real Postgres (a database of its own on the stack's server). A
real SIGKILL of the running projector process under load is tests/integration/test_projector.py.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from events.projector import PROJECTIONS, Folded, Projection, apply_batch
from schemas.events import LlmCall, PaymentInbound, ToolSpend, Usage, event_encoder
from schemas.ids import uuid7
from tests.conftest import Gateway
from tests.integration.conftest import scratch_database

STREAM = "CRASH_POINTS"


@pytest.fixture(scope="module")
def database(gateway: Gateway) -> Iterator[str]:
    with scratch_database(gateway.database_url, "crash_points") as url:
        yield url


def _batch(ws: str, first_seq: int) -> list[tuple[int, str, bytes]]:
    t0 = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    events: list[Any] = []
    for i in range(40):
        env = {"event_id": uuid7(), "occurred_at": t0 + dt.timedelta(seconds=i), "workspace_id": ws,
               "agent_id": f"a{i % 3}", "run_id": f"r{i % 4}"}
        if i % 5 == 0:
            events.append(ToolSpend(**env, spend_id=f"s{i}", amount_nanos=1000 + i, vendor="v"))
        elif i % 7 == 0:
            events.append(PaymentInbound(**env, payment_id=f"p{i}", amount_nanos=5000 + i, rail="x402",
                                         endpoint_id="e"))
        else:
            events.append(LlmCall(**env, provider="openai", model="gpt", cost_nanos=100 + i,
                                  usage=Usage(input_tokens=10, output_tokens=5)))
    return [(first_seq + i, f"events.{ws}.x", event_encoder.encode(e)) for i, e in enumerate(events)]


async def _books(url: str, ws: str) -> dict[str, Any]:
    """Everything both projections wrote for `ws`, and the checkpoints."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        out: dict[str, Any] = {}
        for name, sql in {
            "journal": "SELECT event_id, count(*) FROM event_journal WHERE workspace_id = %s GROUP BY event_id",
            "transfers": "SELECT event_id, leg, amount, debit_account_id, credit_account_id FROM ledger_transfer "
                         "WHERE workspace_id = %s ORDER BY event_id, leg",
            "accounts": "SELECT id, debits_posted, credits_posted FROM ledger_account WHERE id LIKE '%%:' || %s || "
                        "':%%' ORDER BY id",
            "runs": "SELECT run_id, requests, cost_nanos FROM run_usage WHERE workspace_id = %s ORDER BY run_id",
            "facts": "SELECT event_id, kind, llm_cost_nanos, tool_cost_nanos, revenue_nanos FROM finance_fact "
                     "WHERE workspace_id = %s ORDER BY event_id",
        }.items():
            cur = await conn.execute(sql, (ws,))
            out[name] = await cur.fetchall()
        cur = await conn.execute("SELECT projector, last_seq FROM projector_checkpoint WHERE stream = %s "
                                 "ORDER BY projector", (STREAM,))
        out["checkpoints"] = await cur.fetchall()
    return out


def _dying(projection: Projection) -> Projection:
    """`projection`, whose fold kills its own database session once all its statements ran."""
    async def fold(cur: psycopg.AsyncCursor[Any], decoded: list[Folded]) -> tuple[int, int]:
        result = await projection.fold(cur, decoded)
        await cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return result
    return Projection(projection.name, fold)


@pytest.mark.parametrize("projection", PROJECTIONS, ids=lambda p: p.name)
async def test_killed_before_commit_leaves_nothing_and_the_redelivery_books_once(database: str,
                                                                                 projection: Projection) -> None:
    ws = f"ws_{uuid.uuid4().hex[:8]}"
    batch = _batch(ws, 1_000_000 + 100 * PROJECTIONS.index(projection))
    before = await _books(database, ws)
    async with await psycopg.AsyncConnection.connect(database) as conn:
        with pytest.raises(psycopg.OperationalError):  # the session died: not a data error
            await apply_batch(conn, STREAM, batch, _dying(projection))
    assert await _books(database, ws) == before  # rolled back whole: no rows, no checkpoint move

    async with await psycopg.AsyncConnection.connect(database) as conn:  # the projector restarted
        result = await apply_batch(conn, STREAM, batch, projection)
    assert result.journalled == len(batch) and result.dead == 0
    after = await _books(database, ws)
    if projection.name == "ledger":
        assert sorted(n for _, n in after["journal"]) == [1] * len(batch)
        assert len(after["transfers"]) == len(batch)  # one per money event, each once
        assert sum(d for _, d, _ in after["accounts"]) == sum(c for _, _, c in after["accounts"]) > 0
    else:
        assert len(after["facts"]) == len(batch)


@pytest.mark.parametrize("projection", PROJECTIONS, ids=lambda p: p.name)
async def test_killed_after_commit_before_ack_the_redelivery_changes_nothing(database: str,
                                                                             projection: Projection) -> None:
    ws = f"ws_{uuid.uuid4().hex[:8]}"
    batch = _batch(ws, 2_000_000 + 100 * PROJECTIONS.index(projection))
    async with await psycopg.AsyncConnection.connect(database) as conn:
        await apply_batch(conn, STREAM, batch, projection)
    committed = await _books(database, ws)
    async with await psycopg.AsyncConnection.connect(database) as conn:  # restarted; the batch comes again
        again = await apply_batch(conn, STREAM, batch, projection)
        await apply_batch(conn, STREAM, batch[10:], projection)  # and once more, cut differently
    assert again.journalled == 0 and again.transfers == 0
    assert await _books(database, ws) == committed
