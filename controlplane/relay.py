"""Outbox relay: publishes committed config changes to JetStream and the KV snapshot bucket.

Commands write state and an outbox row in one Postgres transaction. This relay then, in outbox
order, publishes the `config.*` event (`Nats-Msg-Id` = event id, so a retry is deduplicated)
and applies the KV put/delete, and marks the row published. A crash between those steps
replays the row: both effects are idempotent. A row with an empty `kv_key` is an event alone,
with no KV effect: how the control plane publishes events that are not config changes (e.g.
`llm.repriced`) transactionally. `resync()` makes the bucket equal Postgres state when an
instance takes the lead, so a lost KV write is repaired by a restart or a failover.

Leadership. Several control planes may run; exactly one relays at a time: the one whose
dedicated Postgres session holds the advisory lock `RELAY_LOCK` (`pg_try_advisory_lock`, a
session lock). The others retry every `retry_s`; Postgres releases a dead session's lock as soon
as it notices the connection is gone (at once when the process dies), so another instance leads
within about `retry_s`. A leader that stops running statements (a stopped or hung process, whose
session Postgres still sees as alive) is ended by a follower after `stall_s`. The leader reads
and marks outbox rows over that same session, so an instance whose session is gone stops at the
next statement: after losing the lock it can still complete at most the one row in hand
(idempotent, and the next leader's `resync()` restores the bucket from Postgres). The heartbeat
is written by the leader only: its age tells workers that config is being relayed, which a
follower cannot vouch for.

A command waits for its rows at most a bounded time (`flush_within`): on the leader it flushes
them itself; on a follower it signals the leader (NOTIFY `NOTIFY_CHANNEL`, which the leader
LISTENs on) and polls the rows' `published_at`, so `propagated` is true only once they were
published. When NATS is slow or down, or no instance leads, the rows stay pending and the
leader's `run()` retries them on every heartbeat until they are published.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg
import structlog
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from psycopg_pool import AsyncConnectionPool

from events.publisher import MSG_ID
from schemas.entities import HEARTBEAT_KEY, ConfigEntity, Heartbeat, entity_encoder
from schemas.events import Event, event_encoder, subject_for

log = structlog.get_logger(__name__)

# pg_try_advisory_lock(int4, int4): ("alep", 1) = the outbox relay. One per database: control
# planes sharing a database share the relay.
RELAY_LOCK = (0x616C6570, 1)
# The outbox's wake-up channel: a follower's commands NOTIFY it, the leader LISTENs.
NOTIFY_CHANNEL = "alephant_outbox"


class NotLeading(RuntimeError):
    """This instance does not hold the relay lock (any more), so it may not publish."""


class OutboxRelay:
    """The relay of one control plane; leads or follows (see the module docstring).

    `database_url` opens the leader's two dedicated sessions (the lock holder, which also reads
    and marks the rows, and the LISTEN session); `retry_s` is how often a follower tries to take
    the lock; `poll_s` how often a follower's command looks at its rows; `stall_s` how long the
    lock holder's session may stay idle before a follower ends it (`_end_stalled_leader`).
    """

    def __init__(self, pool: AsyncConnectionPool[Any], js: JetStreamContext, kv: KeyValue, stream: str,
                 database_url: str, *, retry_s: float = 1.0, poll_s: float = 0.02, stall_s: float = 10.0) -> None:
        self._pool = pool
        self._js = js
        self._kv = kv
        self._stream = stream
        self._database_url = database_url
        self._retry_s = retry_s
        self._poll_s = poll_s
        self._stall_s = stall_s
        self._lock = asyncio.Lock()
        # The lock session (kept open by a follower too), and the same object while it holds the lock.
        self._session: psycopg.AsyncConnection[Any] | None = None
        self._leader: psycopg.AsyncConnection[Any] | None = None
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._resynced = False
        self.last_revision = 0
        # False once an attempt to reach Postgres for the lock failed, until one succeeds (/readyz).
        self.postgres_ok = True

    @property
    def leading(self) -> bool:
        """True while this instance holds the relay lock (as far as it knows: see the docstring)."""
        return self._leader is not None and not self._leader.closed

    async def try_lead(self) -> bool:
        """Take the relay lock if it is free; on taking it, flush what is pending and resync the
        bucket. True if this instance leads. Raises on a Postgres failure (the caller retries).

        A follower keeps its lock session open between tries, so trying costs one statement."""
        if self.leading:
            return True
        session = self._session
        if session is None or session.closed:
            session = self._session = await psycopg.AsyncConnection.connect(
                self._database_url, autocommit=True, application_name="alephant-relay")
        cur = await session.execute("SELECT pg_try_advisory_lock(%s, %s)", RELAY_LOCK)
        row = await cur.fetchone()
        if row is None or not row[0]:
            await self._end_stalled_leader(session)
            return False
        try:
            listener = await psycopg.AsyncConnection.connect(self._database_url, autocommit=True,
                                                             application_name="alephant-relay-listen")
            await listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except BaseException:
            await self._step_down()  # closing the session releases the lock just taken
            raise
        self._leader, self._listener, self._resynced = session, listener, False
        log.info("relay_leading")
        try:
            await self.flush()
            await self._resync_once()
        except psycopg.Error:
            raise
        except Exception as exc:  # NATS unreachable: still the leader; run() retries both
            log.warning("relay_takeover_incomplete", error=type(exc).__name__)
        return True

    async def _end_stalled_leader(self, session: psycopg.AsyncConnection[Any]) -> None:
        """Terminate the lock holder's session if it has run no statement for `stall_s` (its
        process is stopped or hung: a live leader runs one at least every heartbeat), so the lock
        is released and the next try takes it. The stalled process finds its session gone and
        steps down when it runs again."""
        cur = await session.execute(
            "SELECT a.pid, extract(epoch FROM now() - a.state_change) FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND a.state = 'idle'", RELAY_LOCK)
        row = await cur.fetchone()
        if row is not None and row[1] is not None and float(row[1]) > self._stall_s:
            log.warning("relay_leader_stalled", pid=row[0], idle_s=round(float(row[1]), 1))
            await session.execute("SELECT pg_terminate_backend(%s)", (row[0],))

    async def _step_down(self) -> None:
        """Close this instance's Postgres sessions (releasing the lock if Postgres still has it)."""
        was_leading = self._leader is not None
        for conn in (self._session, self._listener):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._session = self._leader = self._listener = None
        if was_leading:
            log.warning("relay_leadership_lost")

    async def _resync_once(self) -> None:
        if not self._resynced:
            changed = await self.resync()
            self._resynced = True
            log.info("kv_resynced", changed=changed)

    async def flush(self) -> int:
        """Publish every pending outbox row in order; return the last KV revision written.
        Leader only (`NotLeading` otherwise); the rows are read and marked over the lock session."""
        async with self._lock:
            conn = self._leader
            if conn is None or conn.closed:
                raise NotLeading("this control plane does not lead the outbox relay")
            cur = await conn.execute(
                "SELECT event_id, subject, event, kv_key, kv_value FROM config_outbox "
                "WHERE published_at IS NULL ORDER BY seq"
            )
            for event_id, subject, event, kv_key, kv_value in await cur.fetchall():
                await self._js.publish(subject, bytes(event), stream=self._stream, headers={MSG_ID: str(event_id)})
                if not kv_key:
                    pass  # an event alone (see the module docstring)
                elif kv_value is None:
                    with contextlib.suppress(KeyNotFoundError):
                        await self._kv.delete(kv_key)
                    # nats-py's delete() drops the PubAck; the bucket's last sequence is at least
                    # the delete marker's revision, which is what "applied >= R" waiters need.
                    self.last_revision = await self._bucket_last_seq()
                else:
                    self.last_revision = await self._kv.put(kv_key, bytes(kv_value))
                await conn.execute("UPDATE config_outbox SET published_at = now() WHERE event_id = %s", (event_id,))
            return self.last_revision

    async def _bucket_last_seq(self) -> int:
        return int((await self._kv.status()).stream_info.state.last_seq or 0)

    async def flush_within(self, timeout_s: float) -> int | None:
        """Have the pending rows published, waiting at most `timeout_s`. Returns a KV revision at
        or after the rows' own (what "applied >= R" waiters need), or None when they were not
        published in time (NATS down or slow, or no control plane leads right now).

        The leader flushes; a follower waits for the leader (see the module docstring). Never
        raises for a publish failure: callers have already committed, and the leader's heartbeat
        loop retries the rows. A leader's flush still running at the timeout continues in the
        background (it is shielded), so its work is not thrown away half-way.
        """
        if not self.leading:
            return await self._wait_for_leader(timeout_s)
        flushing = asyncio.ensure_future(self.flush())
        try:
            return await asyncio.wait_for(asyncio.shield(flushing), timeout_s)
        except TimeoutError:
            flushing.add_done_callback(_consume)
            log.warning("relay_flush_pending", waited_s=timeout_s)
        except Exception as exc:
            log.warning("relay_flush_failed", error=type(exc).__name__)
        return None

    async def _wait_for_leader(self, timeout_s: float) -> int | None:
        try:
            return await asyncio.wait_for(self._published_by_leader(), timeout_s)
        except TimeoutError:
            log.warning("relay_flush_pending", waited_s=timeout_s, leader=False)
        except Exception as exc:
            log.warning("relay_flush_failed", error=type(exc).__name__, leader=False)
        return None

    async def _published_by_leader(self) -> int:
        """Wake the leader and wait until every row pending now is published; then the bucket's
        last sequence (read after the rows' puts, so at least their revisions)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT seq FROM config_outbox WHERE published_at IS NULL")
            pending = [row[0] for row in await cur.fetchall()]
            if pending:
                await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")  # delivered at this block's commit
        while pending:
            await asyncio.sleep(self._poll_s)
            async with self._pool.connection() as conn:
                cur = await conn.execute("SELECT seq FROM config_outbox WHERE seq = ANY(%s) AND published_at IS NULL",
                                         (pending,))
                pending = [row[0] for row in await cur.fetchall()]
        self.last_revision = max(self.last_revision, await self._bucket_last_seq())
        return self.last_revision

    async def resync(self) -> int:
        """Make the bucket equal the live rows of `config_entity`. Returns keys changed. Leader only."""
        async with self._lock, self._pool.connection() as conn:
            if not self.leading:
                raise NotLeading("this control plane does not lead the outbox relay")
            cur = await conn.execute("SELECT kv_key, body FROM config_entity WHERE deleted_at IS NULL")
            # Re-encode through the entity type so the bytes equal what flush() writes (jsonb's own
            # rendering differs), else every restart would rewrite every key.
            wanted = {k: entity_encoder.encode(msgspec.convert(v, ConfigEntity)) for k, v in await cur.fetchall()}
        changed = 0
        try:
            existing = set(await self._kv.keys())
        except Exception:
            existing = set()
        for key in existing - set(wanted) - {HEARTBEAT_KEY}:
            await self._kv.delete(key)
            changed += 1
        for key, value in wanted.items():
            try:
                current = await self._kv.get(key)
                if current.value == value:
                    continue
            except KeyNotFoundError:
                pass
            await self._kv.put(key, value)
            changed += 1
        return changed

    async def run(self, heartbeat_s: float) -> None:
        """Until cancelled: follow (try the lock every `retry_s`) or lead (heartbeat every
        `heartbeat_s`, flush on every NOTIFY and heartbeat; covers a NATS outage)."""
        next_beat = 0.0
        while True:
            try:
                if not self.leading and not await self.try_lead():
                    self.postgres_ok = True
                    await self._follow()
                    continue
                self.postgres_ok = True
                # Flush first: its first statement is on the lock session, so a leader whose session
                # was ended learns it here, before it writes anything.
                await self.flush()
                await self._resync_once()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + heartbeat_s
                    await self._kv.put(HEARTBEAT_KEY, entity_encoder.encode(Heartbeat(ts_ms=int(time.time() * 1000))))
                await self._wait_for_work(max(0.0, next_beat - time.monotonic()))
            except (psycopg.Error, OSError, NotLeading) as exc:  # the lock session (or Postgres) is gone
                log.warning("relay_postgres_failed", error=type(exc).__name__, leading=self.leading)
                self.postgres_ok = False
                await self._step_down()
                await asyncio.sleep(self._retry_s)
            except Exception as exc:  # NATS unreachable or slow: keep the lead, retry at the next beat
                log.warning("relay_iteration_failed", error=type(exc).__name__)
                await asyncio.sleep(heartbeat_s)
                with contextlib.suppress(Exception):  # a statement per beat: followers see a live leader
                    if self._leader is not None:
                        await self._leader.execute("SELECT 1")

    async def _wait_for_work(self, timeout_s: float) -> None:
        """Until a follower's NOTIFY arrives or `timeout_s` passes (raises if the session broke)."""
        listener = self._listener
        if listener is None or listener.closed:
            raise NotLeading("the relay's LISTEN session is closed")
        # Run to its end (stop_after): leaving the generator early would keep the connection locked.
        async for _ in listener.notifies(timeout=timeout_s, stop_after=1):
            pass

    async def _follow(self) -> None:
        """A follower's pause before its next try for the lock; keeps `last_revision` current."""
        with contextlib.suppress(Exception):  # NATS down: the revision shown is just older
            self.last_revision = max(self.last_revision, await self._bucket_last_seq())
        await asyncio.sleep(self._retry_s)

    async def close(self) -> None:
        """Give up the lead (if held) at shutdown, so another instance takes over at once."""
        await self._step_down()


def _consume(task: asyncio.Future[int]) -> None:
    """Retrieve a background flush's outcome so a failure is logged once, not as 'never retrieved'."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("relay_flush_failed", error=type(task.exception()).__name__)


async def enqueue_events(conn: psycopg.AsyncConnection[Any], events: Sequence[Event], subject_prefix: str) -> None:
    """Put events that are not config changes in the outbox, in the caller's transaction (no KV
    effect; a row already there is kept): the relay publishes them like config events."""
    if not events:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO config_outbox (event_id, subject, event, kv_key, kv_value) "
            "VALUES (%s, %s, %s, '', NULL) ON CONFLICT (event_id) DO NOTHING",
            [(e.event_id, subject_for(e, subject_prefix), event_encoder.encode(e)) for e in events])


class OutboxWriter:
    """Base of the admin commands that publish events which are not config changes (re-pricing,
    payment resolutions): they write them with `enqueue_events` in their own transaction, then
    wait a bounded time for the relay to publish them (`propagated`)."""

    def __init__(self, pool: AsyncConnectionPool[Any], relay: OutboxRelay, subject_prefix: str,
                 propagation_wait_s: float = 2.0) -> None:
        self._pool = pool
        self._relay = relay
        self._prefix = subject_prefix
        self._wait_s = propagation_wait_s

    async def propagated(self) -> bool:
        """Whether the relay published what was committed within the wait (it keeps trying if not)."""
        return await self._relay.flush_within(self._wait_s) is not None
