"""The ledger projector: a durable JetStream pull consumer folding events into Postgres.

Each fetched batch is one Postgres transaction:
  1. lock this projector's checkpoint row (serializes concurrent projector instances);
  2. insert every event into `event_journal ... ON CONFLICT (event_id) DO NOTHING RETURNING`;
  3. for the newly journalled events only, post ledger transfers and update read models;
  4. advance the checkpoint to the batch's highest stream sequence;
  5. commit, then ack.
A crash before commit rolls back; a crash after commit but before ack causes a redelivery that
step 2 turns into a no-op. Dedup is by event id rather than by sequence, so it also covers an
event published twice outside the stream's dedup window (a spool replay) and several
projector instances sharing the consumer.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events.ledger import Transfer, transfers_for
from schemas.events import Event, LlmCall, event_decoder, event_encoder, event_type

log = structlog.get_logger(__name__)

PROJECTOR_NAME = "ledger"


@dataclass
class BatchResult:
    received: int = 0
    journalled: int = 0
    transfers: int = 0
    dead: int = 0
    last_seq: int = 0


@dataclass
class _RunDelta:
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0
    agents: set[str] = field(default_factory=set)
    first_at: Any = None
    last_at: Any = None


def _run_deltas(events: list[LlmCall]) -> dict[tuple[str, str], _RunDelta]:
    deltas: dict[tuple[str, str], _RunDelta] = collections.defaultdict(_RunDelta)
    for ev in events:
        if ev.run_id is None:
            continue
        d = deltas[(ev.workspace_id, ev.run_id)]
        d.requests += 1
        d.errors += 0 if ev.status < 400 else 1
        d.input_tokens += ev.usage.input_tokens
        d.output_tokens += ev.usage.output_tokens
        d.cost_nanos += ev.cost_nanos
        if ev.agent_id:
            d.agents.add(ev.agent_id)
        d.first_at = ev.occurred_at if d.first_at is None else min(d.first_at, ev.occurred_at)
        d.last_at = ev.occurred_at if d.last_at is None else max(d.last_at, ev.occurred_at)
    return deltas


async def _post_transfers(cur: psycopg.AsyncCursor[Any], ws_run: dict[uuid.UUID, tuple[str, str | None, Any]],
                          transfers: list[tuple[uuid.UUID, Transfer]]) -> None:
    accounts: dict[str, list[int]] = {}
    currency: dict[str, str] = {}
    for _, t in transfers:
        accounts.setdefault(t.debit, [0, 0])[0] += t.amount
        accounts.setdefault(t.credit, [0, 0])[1] += t.amount
        currency[t.debit] = currency[t.credit] = t.currency
    ids = sorted(accounts)  # lock accounts in one global order so batches never deadlock
    await cur.execute(
        "INSERT INTO ledger_account (id, currency) SELECT * FROM unnest(%s::text[], %s::text[]) "
        "ON CONFLICT (id) DO NOTHING",
        (ids, [currency[i] for i in ids]),
    )
    await cur.execute("SELECT id FROM ledger_account WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,))
    await cur.executemany(
        "UPDATE ledger_account SET debits_posted = debits_posted + %s, credits_posted = credits_posted + %s "
        "WHERE id = %s",
        [(accounts[i][0], accounts[i][1], i) for i in ids],
    )
    await cur.executemany(
        "INSERT INTO ledger_transfer (id, event_id, leg, debit_account_id, credit_account_id, amount, currency, "
        "code, workspace_id, run_id, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (t.id, eid, t.leg, t.debit, t.credit, t.amount, t.currency, t.code, *ws_run[eid])
            for eid, t in transfers
        ],
    )


async def _update_runs(cur: psycopg.AsyncCursor[Any], calls: list[LlmCall]) -> None:
    rows = [
        (ws, run, d.requests, d.errors, d.input_tokens, d.output_tokens, d.cost_nanos, sorted(d.agents),
         d.first_at, d.last_at)
        for (ws, run), d in _run_deltas(calls).items()
    ]
    if not rows:
        return
    await cur.executemany(
        """
        INSERT INTO run_usage AS r (workspace_id, run_id, requests, errors, input_tokens, output_tokens,
                                    cost_nanos, agents, first_at, last_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (workspace_id, run_id) DO UPDATE SET
            requests = r.requests + EXCLUDED.requests,
            errors = r.errors + EXCLUDED.errors,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            cost_nanos = r.cost_nanos + EXCLUDED.cost_nanos,
            agents = ARRAY(SELECT DISTINCT a FROM unnest(r.agents || EXCLUDED.agents) AS a ORDER BY a),
            first_at = LEAST(r.first_at, EXCLUDED.first_at),
            last_at = GREATEST(r.last_at, EXCLUDED.last_at)
        """,
        rows,
    )


async def apply_batch(conn: psycopg.AsyncConnection[Any], stream: str,
                      msgs: list[tuple[int, str, bytes]]) -> BatchResult:
    """Fold `(stream_seq, subject, data)` messages into Postgres in one transaction. Idempotent."""
    result = BatchResult(received=len(msgs))
    decoded: list[tuple[int, Event]] = []
    dead: list[tuple[int, str, bytes, str]] = []
    for seq, subject, data in msgs:
        try:
            decoded.append((seq, event_decoder.decode(data)))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            dead.append((seq, subject, data, str(exc)[:500]))
    result.last_seq = max((m[0] for m in msgs), default=0)
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO projector_checkpoint (projector, stream, last_seq) VALUES (%s, %s, 0) "
            "ON CONFLICT (projector) DO NOTHING",
            (PROJECTOR_NAME, stream),
        )
        await cur.execute("SELECT last_seq FROM projector_checkpoint WHERE projector = %s FOR UPDATE",
                          (PROJECTOR_NAME,))
        if dead:
            await cur.executemany(
                "INSERT INTO dead_letter (stream, stream_seq, subject, body, error) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                [(stream, *d) for d in dead],
            )
            result.dead = len(dead)
        new_ids: set[Any] = set()
        if decoded:
            await cur.execute(
                """
                INSERT INTO event_journal
                    (event_id, stream_seq, type, workspace_id, occurred_at, snapshot_revision, body)
                SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::text[], %s::text[], %s::timestamptz[],
                                     %s::bigint[], %s::jsonb[])
                ON CONFLICT (event_id) DO NOTHING
                RETURNING event_id
                """,
                (
                    [e.event_id for _, e in decoded],
                    [s for s, _ in decoded],
                    [event_type(e) for _, e in decoded],
                    [e.workspace_id for _, e in decoded],
                    [e.occurred_at for _, e in decoded],
                    [e.snapshot_revision for _, e in decoded],
                    [event_encoder.encode(e).decode() for _, e in decoded],
                ),
            )
            new_ids = {row[0] for row in await cur.fetchall()}
        fresh = [e for _, e in decoded if e.event_id in new_ids]
        # A batch can hold the same event twice (a replay); fold each id once.
        unique = list({e.event_id: e for e in fresh}.values())
        result.journalled = len(unique)
        transfers = [(e.event_id, t) for e in unique for t in transfers_for(e)]
        if transfers:
            ws_run = {e.event_id: (e.workspace_id, e.run_id, e.occurred_at) for e in unique}
            await _post_transfers(cur, ws_run, transfers)
            result.transfers = len(transfers)
        await _update_runs(cur, [e for e in unique if isinstance(e, LlmCall)])
        await cur.execute(
            "UPDATE projector_checkpoint SET last_seq = GREATEST(last_seq, %s), updated_at = now() "
            "WHERE projector = %s",
            (result.last_seq, PROJECTOR_NAME),
        )
    return result


class Projector:
    """Runs `apply_batch` over a durable pull consumer until cancelled."""

    def __init__(self, js: JetStreamContext, database_url: str, *, stream: str, subject_prefix: str,
                 batch: int = 512, ack_wait_s: float = 30.0) -> None:
        self._js = js
        self._database_url = database_url
        self._stream = stream
        self._subject = f"{subject_prefix}.>"
        self._batch = batch
        self._ack_wait_s = ack_wait_s
        self.applied = 0

    async def run(self) -> None:
        psub = await self._js.pull_subscribe(
            self._subject,
            durable=PROJECTOR_NAME,
            stream=self._stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self._ack_wait_s,
                max_ack_pending=self._batch * 4,
            ),
        )
        conn: psycopg.AsyncConnection[Any] | None = None
        while True:
            try:
                msgs: list[Msg] = await psub.fetch(self._batch, timeout=1.0)
            except TimeoutError:
                continue
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(self._database_url)
                rows = [(m.metadata.sequence.stream, m.subject, m.data) for m in msgs]
                result = await apply_batch(conn, self._stream, rows)
            except (psycopg.Error, OSError) as exc:
                log.warning("projector_batch_failed", error=type(exc).__name__, detail=str(exc)[:200])
                for m in msgs:
                    await m.nak(delay=1.0)
                if conn is not None:
                    await conn.close()
                conn = None
                await asyncio.sleep(1.0)
                continue
            for m in msgs:
                await m.ack()
            self.applied += result.journalled
            log.debug("projector_batch", received=result.received, journalled=result.journalled,
                      transfers=result.transfers, last_seq=result.last_seq)
