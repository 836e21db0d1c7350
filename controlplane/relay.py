"""Outbox relay: publishes committed config changes to JetStream and the KV snapshot bucket.

Commands write state and an outbox row in one Postgres transaction. This relay then, in outbox
order, publishes the `config.*` event (`Nats-Msg-Id` = event id, so a retry is deduplicated)
and applies the KV put/delete, and marks the row published. A crash between those steps
replays the row: both effects are idempotent. A row with an empty `kv_key` is an event alone,
with no KV effect: how the control plane publishes events that are not config changes (e.g.
`llm.repriced`) transactionally. `resync()` makes the bucket equal Postgres state at start-up,
so a lost KV write is repaired by a restart.

A command waits for its row at most a bounded time (`flush_within`); when NATS is slow or down,
the row stays pending and `run()` retries it on every heartbeat until it is published.
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


class OutboxRelay:
    def __init__(self, pool: AsyncConnectionPool[Any], js: JetStreamContext, kv: KeyValue, stream: str) -> None:
        self._pool = pool
        self._js = js
        self._kv = kv
        self._stream = stream
        self._lock = asyncio.Lock()
        self.last_revision = 0

    async def flush(self) -> int:
        """Publish every pending outbox row in order; return the last KV revision written."""
        async with self._lock, self._pool.connection() as conn:
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
                    self.last_revision = (await self._kv.status()).stream_info.state.last_seq
                else:
                    self.last_revision = await self._kv.put(kv_key, bytes(kv_value))
                await conn.execute("UPDATE config_outbox SET published_at = now() WHERE event_id = %s", (event_id,))
                await conn.commit()
            return self.last_revision

    async def flush_within(self, timeout_s: float) -> int | None:
        """`flush()`, waiting at most `timeout_s`. Returns the last KV revision written, or None
        when the rows could not be published in time (NATS down or slow).

        Never raises for a publish failure: callers have already committed, and the heartbeat loop
        retries the rows. A flush still running at the timeout continues in the background (it is
        shielded), so its work is not thrown away half-way.
        """
        flushing = asyncio.ensure_future(self.flush())
        try:
            return await asyncio.wait_for(asyncio.shield(flushing), timeout_s)
        except TimeoutError:
            flushing.add_done_callback(_consume)
            log.warning("relay_flush_pending", waited_s=timeout_s)
        except Exception as exc:
            log.warning("relay_flush_failed", error=type(exc).__name__)
        return None

    async def resync(self) -> int:
        """Make the bucket equal the live rows of `config_entity`. Returns keys changed."""
        async with self._lock, self._pool.connection() as conn:
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
        """Heartbeat and retry unpublished rows until cancelled (covers a NATS outage)."""
        while True:
            try:
                await self._kv.put(HEARTBEAT_KEY, entity_encoder.encode(Heartbeat(ts_ms=int(time.time() * 1000))))
                await self.flush()
            except Exception as exc:
                log.warning("relay_iteration_failed", error=type(exc).__name__)
            await asyncio.sleep(heartbeat_s)


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
