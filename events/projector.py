"""The projectors: durable JetStream pull consumers folding events into Postgres.

Several named projections read the same stream, each through its own durable consumer and with
its own checkpoint row, so a new read model can be added and backfilled from sequence 1 without
touching the others (`PROJECTIONS`):
* `ledger`: the event journal, double-entry transfers (`events.ledger`), run usage, escalations;
* `finance`: `finance_fact` (one row per money-relevant event, the source of the finance
  queries) and `run_outcome`.

Each fetched batch is one Postgres transaction:
  1. lock this projection's checkpoint row (serializes concurrent instances of it);
  2. dead-letter the messages that cannot be decoded or stored (`journal_rejection`: a NUL in a
     string, an integer beyond its column, an oversized key), with their reason;
  3. fold the others, idempotently by event id: the ledger journals the events `event_journal`
     does not hold yet and posts transfers for those only; the finance projection does the same
     with `finance_fact`;
  4. advance the checkpoint to the batch's highest stream sequence;
  5. commit, then ack every message of the batch.
If the database still refuses the batch because of its data, the batch is redone event by event
(one SAVEPOINT each) and the events it refuses are dead-lettered, so one poison message never
holds back the others. Only an unreachable or busy database makes a batch nak and retry.
A crash before commit rolls back; a crash after commit but before ack causes a redelivery that
step 3 turns into a no-op. Dedup is by event id rather than by sequence, so it also covers an
event published twice outside the stream's dedup window (a spool replay) and several
projector instances sharing the consumer.

Statements are set-based (COPY and `unnest` arrays: one statement per table per batch), so a
batch costs a handful of round trips whatever its size.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events.finance import FACT_COLUMNS, finance_rows, outcome_rows
from events.ledger import Transfer, journal_rejection, transfers_for
from events.pull import BatchPuller
from schemas.events import Event, LlmCall, PolicyDecision, event_decoder, event_type

log = structlog.get_logger(__name__)

# SQLSTATE classes caused by the data itself: 22 data exception (NUL, out of range), 23 integrity
# constraint, 54 program limit (index row too large). P0001 is our immutability trigger.
_JOURNAL_COLUMNS = ("event_id", "stream_seq", "type", "workspace_id", "occurred_at", "snapshot_revision", "body")


async def _insert_new(cur: psycopg.AsyncCursor[Any], table: str, columns: Sequence[str],
                      rows: Iterable[Sequence[Any]]) -> set[uuid.UUID]:
    """Insert the `rows` whose `event_id` (their first column) `table` does not hold yet, once
    each, with COPY; the ids inserted.

    Check-then-insert is safe here: a batch holds its projection's checkpoint row lock, and the
    table is written by that projection only. COPY, not `unnest` array parameters: Postgres
    re-reads a large array parameter for every element it unnests, which made a 512-event
    journal insert cost ~100 µs per event against ~15 with COPY."""
    rows = list(rows)
    await cur.execute(f"SELECT event_id FROM {table} WHERE event_id = ANY(%s)",  # noqa: S608  (constant names)
                      ([r[0] for r in rows],))
    seen = {row[0] for row in await cur.fetchall()}
    new: set[uuid.UUID] = set()
    async with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            if row[0] not in seen and row[0] not in new:
                new.add(row[0])
                await copy.write_row(row)
    return new


# A message a projection folds: (stream sequence, the decoded event, its raw JSON).
Folded = tuple[int, Event, bytes]

_POISON_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})


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


async def _post_transfers(cur: psycopg.AsyncCursor[Any], by_id: dict[uuid.UUID, Event],
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
    await cur.execute(
        "UPDATE ledger_account a SET debits_posted = a.debits_posted + d.debits, "
        "credits_posted = a.credits_posted + d.credits "
        "FROM unnest(%s::text[], %s::numeric[], %s::numeric[]) AS d (id, debits, credits) WHERE a.id = d.id",
        (ids, [accounts[i][0] for i in ids], [accounts[i][1] for i in ids]),
    )
    async with cur.copy(f"COPY ledger_transfer ({', '.join(_TRANSFER_COLUMNS)}) FROM STDIN") as copy:
        for eid, t in transfers:
            e = by_id[eid]
            await copy.write_row((t.id, eid, t.leg, t.debit, t.credit, t.amount, t.currency, t.code, e.workspace_id,
                                  e.run_id, e.occurred_at, e.agent_id, e.workflow_id, e.session_id,
                                  e.snapshot_revision))


_TRANSFER_COLUMNS = ("id", "event_id", "leg", "debit_account_id", "credit_account_id", "amount", "currency", "code",
                     "workspace_id", "run_id", "created_at", "agent_id", "workflow_id", "session_id",
                     "snapshot_revision")


async def _record_escalations(cur: psycopg.AsyncCursor[Any], decisions: list[PolicyDecision]) -> None:
    """One pending `escalation` row per escalation id (the first event wins; a replay is a no-op)."""
    rows = [
        (d.escalation_id, d.event_id, d.workspace_id, d.key_id, d.agent_id, d.run_id, d.request_id, d.rule, d.scope,
         d.scope_id, d.model, d.endpoint, d.message, d.occurred_at)
        for d in decisions if d.outcome == "escalate" and d.escalation_id
    ]
    if rows:
        await cur.executemany(
            "INSERT INTO escalation (id, event_id, workspace_id, key_id, agent_id, run_id, request_id, rule, scope, "
            "scope_id, model, endpoint, message, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            rows,
        )


async def _update_runs(cur: psycopg.AsyncCursor[Any], calls: list[LlmCall]) -> None:
    deltas = sorted(_run_deltas(calls).items())  # one order for every batch: no deadlocks between them
    if not deltas:
        return
    await cur.execute(
        """
        INSERT INTO run_usage AS r (workspace_id, run_id, requests, errors, input_tokens, output_tokens,
                                    cost_nanos, agents, first_at, last_at)
        SELECT ws, run, requests, errors, input_tokens, output_tokens, cost_nanos,
               ARRAY(SELECT jsonb_array_elements_text(agents)), first_at, last_at
        FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::numeric[],
                    %s::jsonb[], %s::timestamptz[], %s::timestamptz[])
             AS d (ws, run, requests, errors, input_tokens, output_tokens, cost_nanos, agents, first_at, last_at)
        ON CONFLICT (workspace_id, run_id) DO UPDATE SET
            requests = r.requests + EXCLUDED.requests,
            errors = r.errors + EXCLUDED.errors,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            cost_nanos = r.cost_nanos + EXCLUDED.cost_nanos,
            agents = CASE WHEN EXCLUDED.agents <@ r.agents THEN r.agents
                          ELSE ARRAY(SELECT DISTINCT a FROM unnest(r.agents || EXCLUDED.agents) AS a ORDER BY a) END,
            first_at = LEAST(r.first_at, EXCLUDED.first_at),
            last_at = GREATEST(r.last_at, EXCLUDED.last_at)
        """,
        (
            [ws for (ws, _), _ in deltas], [run for (_, run), _ in deltas], [d.requests for _, d in deltas],
            [d.errors for _, d in deltas], [d.input_tokens for _, d in deltas], [d.output_tokens for _, d in deltas],
            [d.cost_nanos for _, d in deltas], [json.dumps(sorted(d.agents)) for _, d in deltas],
            [d.first_at for _, d in deltas], [d.last_at for _, d in deltas],
        ),
    )


@dataclass(frozen=True, slots=True)
class _Dead:
    seq: int
    subject: str
    data: bytes
    reason: str
    event_id: uuid.UUID | None = None


async def _lock_checkpoint(cur: psycopg.AsyncCursor[Any], stream: str, name: str) -> None:
    await cur.execute(
        "INSERT INTO projector_checkpoint (projector, stream, last_seq) VALUES (%s, %s, 0) "
        "ON CONFLICT (projector) DO NOTHING",
        (name, stream),
    )
    await cur.execute("SELECT last_seq FROM projector_checkpoint WHERE projector = %s FOR UPDATE", (name,))


async def _advance_checkpoint(cur: psycopg.AsyncCursor[Any], last_seq: int, name: str) -> None:
    await cur.execute(
        "UPDATE projector_checkpoint SET last_seq = GREATEST(last_seq, %s), updated_at = now() "
        "WHERE projector = %s",
        (last_seq, name),
    )


async def _dead_letter(cur: psycopg.AsyncCursor[Any], stream: str, dead: list[_Dead]) -> None:
    await cur.executemany(
        "INSERT INTO dead_letter (stream, stream_seq, subject, body, error, event_id) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        [(stream, d.seq, d.subject, d.data, d.reason.replace("\x00", ""), d.event_id) for d in dead],
    )


async def _fold_ledger(cur: psycopg.AsyncCursor[Any], decoded: list[Folded]) -> tuple[int, int]:
    """Journal `decoded` and post what is new; returns (journalled, transfers)."""
    # The body is the message as published (it decoded, and `journal_rejection` passed it).
    new_ids = await _insert_new(cur, "event_journal", _JOURNAL_COLUMNS, (
        (e.event_id, seq, event_type(e), e.workspace_id, e.occurred_at, e.snapshot_revision, raw.decode())
        for seq, e, raw in decoded))
    # A batch can hold the same event twice (a replay); fold each id once.
    by_id = {e.event_id: e for _, e, _ in decoded if e.event_id in new_ids}
    transfers = [(eid, t) for eid, e in by_id.items() for t in transfers_for(e)]
    if transfers:
        await _post_transfers(cur, by_id, transfers)
    unique = list(by_id.values())
    await _update_runs(cur, [e for e in unique if isinstance(e, LlmCall)])
    await _record_escalations(cur, [e for e in unique if isinstance(e, PolicyDecision)])
    return len(unique), len(transfers)


_FACT_NAMES = tuple(name for name, _ in FACT_COLUMNS)


async def _fold_finance(cur: psycopg.AsyncCursor[Any], decoded: list[Folded]) -> tuple[int, int]:
    """`finance_fact` rows for the money-relevant events (new ones only) and run outcomes;
    returns (facts inserted, 0)."""
    events = list({e.event_id: e for _, e, _ in decoded}.values())
    rows = finance_rows(events)
    inserted = 0
    if rows:
        inserted = len(await _insert_new(cur, "finance_fact", _FACT_NAMES, rows))
    outcomes = outcome_rows(events)
    if outcomes:
        await cur.execute(
            "INSERT INTO run_outcome AS o (workspace_id, run_id, outcome, metadata, event_id, completed_at) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::jsonb[], %s::uuid[], %s::timestamptz[]) "
            "ON CONFLICT (workspace_id, run_id) DO UPDATE SET outcome = EXCLUDED.outcome, "
            "metadata = EXCLUDED.metadata, event_id = EXCLUDED.event_id, completed_at = EXCLUDED.completed_at "
            "WHERE (EXCLUDED.completed_at, EXCLUDED.event_id) > (o.completed_at, o.event_id)",
            [list(col) for col in zip(*outcomes, strict=True)],
        )
    return inserted, 0


@dataclass(frozen=True, slots=True)
class Projection:
    """A named read model: its durable consumer and checkpoint are called `name`; `fold` applies
    decoded events idempotently inside the batch's transaction and returns (folded, transfers)."""

    name: str
    fold: Callable[[psycopg.AsyncCursor[Any], list[Folded]], Awaitable[tuple[int, int]]]


LEDGER = Projection("ledger", _fold_ledger)
FINANCE = Projection("finance", _fold_finance)
PROJECTIONS = (LEDGER, FINANCE)


def is_poison_error(exc: BaseException) -> bool:
    """A database refusal caused by the data itself (bad value, constraint, size limit), which
    no retry can fix, as opposed to the database being unreachable, overloaded or locked."""
    if isinstance(exc, UnicodeError | OverflowError):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate or ""
    return state[:2] in _POISON_SQLSTATE_CLASSES or state == "P0001"


async def apply_batch(conn: psycopg.AsyncConnection[Any], stream: str, msgs: list[tuple[int, str, bytes]],
                      projection: Projection = LEDGER) -> BatchResult:
    """Fold `(stream_seq, subject, data)` messages into `projection`. Idempotent.

    Messages that cannot be decoded or stored (`journal_rejection`) are dead-lettered with their
    reason; the rest commit in one transaction with the checkpoint. If that transaction still
    fails on the data (`is_poison_error`), the batch is folded again event by event, one
    SAVEPOINT each, dead-lettering the events the database refuses. Any other error (the
    database down, a deadlock) propagates with nothing committed, for the caller to retry.
    """
    result = BatchResult(received=len(msgs), last_seq=max((m[0] for m in msgs), default=0))
    good: list[Folded] = []
    dead: list[_Dead] = []
    subjects: dict[int, tuple[str, bytes]] = {}
    for seq, subject, data in msgs:
        try:
            event = event_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            dead.append(_Dead(seq, subject, data, f"undecodable: {exc}"[:500]))
            continue
        reason = journal_rejection(event, data)
        if reason is not None:
            dead.append(_Dead(seq, subject, data, reason, event.event_id))
        else:
            good.append((seq, event, data))
            subjects[seq] = (subject, data)
    try:
        async with conn.transaction(), conn.cursor() as cur:
            await _lock_checkpoint(cur, stream, projection.name)
            if dead:
                await _dead_letter(cur, stream, dead)
            if good:
                result.journalled, result.transfers = await projection.fold(cur, good)
            await _advance_checkpoint(cur, result.last_seq, projection.name)
        result.dead = len(dead)
        return result
    except Exception as exc:
        if not is_poison_error(exc):
            raise
        log.warning("projector_batch_poison_retry_per_event", projection=projection.name, error=type(exc).__name__,
                    detail=str(exc)[:200])
    result.journalled = result.transfers = 0
    async with conn.transaction(), conn.cursor() as cur:
        await _lock_checkpoint(cur, stream, projection.name)
        for seq, event, data in good:
            try:
                async with conn.transaction():
                    journalled, transfers = await projection.fold(cur, [(seq, event, data)])
            except Exception as exc:
                if not is_poison_error(exc):
                    raise
                subject, data = subjects[seq]
                reason = f"refused_by_database: {getattr(exc, 'sqlstate', None) or type(exc).__name__}: {exc}"
                dead.append(_Dead(seq, subject, data, reason[:500], event.event_id))
                continue
            result.journalled += journalled
            result.transfers += transfers
        if dead:
            await _dead_letter(cur, stream, dead)
        await _advance_checkpoint(cur, result.last_seq, projection.name)
    result.dead = len(dead)
    return result


class Projector:
    """Runs `apply_batch` for one projection over its durable pull consumer until cancelled."""

    def __init__(self, js: JetStreamContext, database_url: str, *, stream: str, subject_prefix: str,
                 batch: int = 512, ack_wait_s: float = 30.0, projection: Projection = LEDGER) -> None:
        self._js = js
        self.projection = projection
        self._database_url = database_url
        self._stream = stream
        self._subject = f"{subject_prefix}.>"
        self._batch = batch
        self._ack_wait_s = ack_wait_s
        self.applied = 0
        self.dead = 0
        self.batches_failed = 0  # batches nak'ed because the database was unreachable or busy
        # For the lag in seconds (events.projector_metrics): when the oldest message fetched but not
        # yet acked was stored (Unix s; None: none in hand), and when the newest acked one was.
        self.in_hand_since: float | None = None
        self.folded_until: float | None = None
        # Health (events.projector_metrics): the durable consumer is bound (this instance fetches
        # from it), and when this instance last committed a batch (Unix s; None: not yet).
        self.bound = False
        self.last_commit_at: float | None = None

    async def run(self) -> None:
        puller = BatchPuller(self._js._nc, self._js, self._stream, ConsumerConfig(
            durable_name=self.projection.name,
            filter_subject=self._subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._ack_wait_s,
            max_ack_pending=self._batch * 4,
        ))
        await puller.start()
        self.bound = True
        try:
            await self._fold_forever(puller)
        finally:
            self.bound = False
            await puller.close()

    async def _fold_forever(self, puller: BatchPuller) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        while True:
            try:
                msgs: list[Msg] = await puller.fetch(self._batch, timeout=1.0)
            except TimeoutError:
                continue
            await puller.prefetch(self._batch)
            if self.in_hand_since is None:
                self.in_hand_since = msgs[0].metadata.timestamp.timestamp()
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(self._database_url)
                rows = [(m.metadata.sequence.stream, m.subject, m.data) for m in msgs]
                result = await apply_batch(conn, self._stream, rows, self.projection)
            except (psycopg.Error, OSError) as exc:
                # Not the data (apply_batch dead-letters that): the database is unreachable or busy.
                log.warning("projector_batch_failed", projection=self.projection.name, error=type(exc).__name__,
                            detail=str(exc)[:200])
                await _settle(msgs, ack=False)
                self.batches_failed += 1
                if conn is not None:
                    await conn.close()
                conn = None
                await asyncio.sleep(1.0)
                continue
            self.last_commit_at = time.time()
            await _settle(msgs, ack=True)
            self.in_hand_since, self.folded_until = None, msgs[-1].metadata.timestamp.timestamp()
            self.applied += result.journalled
            self.dead += result.dead
            if result.dead:
                log.error("projector_dead_lettered", projection=self.projection.name, dead=result.dead,
                          total_dead=self.dead, last_seq=result.last_seq)
            log.debug("projector_batch", projection=self.projection.name, received=result.received,
                      journalled=result.journalled, transfers=result.transfers, last_seq=result.last_seq)


async def _settle(msgs: list[Msg], *, ack: bool) -> None:
    """Ack (committed) or nak (retry later) each message. A failure here is harmless: an unacked
    message is redelivered after ack_wait, and the journal dedups it."""
    try:
        for m in msgs:
            await (m.ack() if ack else m.nak(delay=1.0))
    except Exception as exc:
        log.warning("projector_ack_failed", ack=ack, error=type(exc).__name__)
