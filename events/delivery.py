"""Downstream log delivery: the event stream, filtered per destination, to webhooks, OTLP
collectors and S3 prefixes (`schemas.entities.LogDestination`), from the projector process.

Design: one durable JetStream pull consumer per destination (`deliver_<destination id>`), not one
consumer fanning out. JetStream then keeps each destination's position, its unacked events and
their redelivery schedule, so:
* a slow or dead destination holds back only itself (its consumer's `max_ack_pending` bounds how
  many of its events are in retry at once; the others read on);
* retries need no table of our own: a failed event is nak'ed with the backoff delay
  (`schemas.log_delivery.retry_delay_s`) and JetStream redelivers it; its delivery count is the
  attempt number;
* a restart resumes where each destination was, and a new destination starts at its creation
  time (`DeliverPolicy.BY_START_TIME`), so no event between its creation and the task noticing
  it is skipped.
The price is a consumer per destination on the server (cheap: destinations are few) and a
projector bus permission over the stream's consumers (`events.jetstream.role_permissions`).

Requests are never slowed: the data plane only publishes to the stream; delivery runs in the
projector process (`alephant projector`, or `--only delivery`), off every request path.

Guarantees. At least once: an event is acked only after the destination took it (2xx; S3 stored
the object) or it was dead-lettered. A crash, a timeout past `ack_wait` or a failed ack redelivers
it, so receivers dedup by `Alephant-Event-Id` (S3 and OTLP: the `event_id`). No ordering across
retries. An event is dead-lettered after `max_attempts` failed attempts, or at once when the
receiver refuses it for good (4xx other than 408/429) or it is not a decodable event: a row in
`log_dead_letter` (the event as stored, the reason, the attempts), counted in
`log_delivery_state.dead_lettered` and logged (`delivery_dead_lettered`). `GET
/admin/v1/log-destinations/{id}` shows `delivered`, `failed`, `dead_lettered` and `last_error`.

Destinations are read from Postgres (`config_entity`, the control plane's record) every
`refresh_s`: a change restarts that destination's worker with the new settings (its in-flight
events are nak'ed for immediate redelivery); a disabled one stops (its events wait in the stream
until it is enabled or the stream's retention drops them); a deleted one stops and its consumer
is deleted. Secrets are decrypted in memory only, never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import psycopg
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from psycopg_pool import AsyncConnectionPool

from events.archive import s3_region
from events.db import open_pool
from events.delivery_senders import (
    Attempt,
    Item,
    OtlpSender,
    S3Sender,
    Sender,
    WebhookSender,
    guarded_session,
    s3_client,
)
from events.pull import BatchPuller
from schemas.entities import ConfigEntity, LogDestination
from schemas.keys import KeyMaterialError, KeyRing
from schemas.log_delivery import envelope_decoder, parse_s3_url, retry_delay_s, settle, subject_parts, wants
from schemas.settings import Secret, Settings
from schemas.ssrf import parse_allow_list

log = structlog.get_logger(__name__)

CONSUMER_PREFIX = "deliver_"


def consumer_name(dest_id: str) -> str:
    """The durable consumer of a destination (ids are letters, digits, '_' and '-': a valid name)."""
    return CONSUMER_PREFIX + dest_id


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """The knobs (`ALEPHANT_DELIVERY_*`, see `schemas.settings`)."""

    stream: str
    subject_prefix: str
    max_attempts: int = 10
    backoff_s: float = 2.0
    backoff_max_s: float = 300.0
    timeout_s: float = 10.0
    batch: int = 64
    concurrency: int = 8
    linger_s: float = 1.0
    refresh_s: float = 2.0
    ssrf_allow: tuple[str, ...] = ()
    s3_url: str = ""
    s3_region: str = "us-east-1"

    @property
    def ack_wait_s(self) -> float:
        # A fetched batch is held while it lingers and while its attempts run (in waves of
        # `concurrency`), plus a margin; past that JetStream redelivers it.
        waves = -(-self.batch // max(1, self.concurrency))
        return self.linger_s + waves * self.timeout_s + 30.0

    @classmethod
    def from_settings(cls, settings: Settings, s3_region: str) -> DeliveryConfig:
        return cls(stream=settings.stream, subject_prefix=settings.subject_prefix,
                   max_attempts=max(1, settings.delivery_max_attempts), backoff_s=settings.delivery_backoff_s,
                   backoff_max_s=settings.delivery_backoff_max_s, timeout_s=settings.delivery_timeout_s,
                   batch=max(1, settings.delivery_batch), concurrency=max(1, settings.delivery_concurrency),
                   linger_s=settings.delivery_linger_s, refresh_s=settings.delivery_refresh_s,
                   ssrf_allow=parse_allow_list(settings.ssrf_allow), s3_url=settings.s3_url, s3_region=s3_region)


# -- the delivery book (Postgres) ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Dead:
    item_seq: int
    event_id: str
    event_type: str
    attempts: int
    reason: str
    body: bytes


class DeliveryBook:
    """Per destination: counters and the last error (`log_delivery_state`), and dead letters
    (`log_dead_letter`, once per destination and event)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def dead_letter(self, dest_id: str, dead: Sequence[Dead]) -> int:
        """Store the dead letters and count the new ones; raises when Postgres is unreachable
        (the caller then retries them instead of acking)."""
        async with self._pool.connection() as conn, conn.transaction():
            inserted = 0
            for d in dead:
                cur = await conn.execute(
                    "INSERT INTO log_dead_letter (destination_id, event_id, stream_seq, event_type, attempts, "
                    "reason, event) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                    (dest_id, d.event_id, d.item_seq, d.event_type, d.attempts, d.reason[:500], d.body))
                inserted += 1 if await cur.fetchone() is not None else 0
            last = dead[-1].reason[:500] if dead else None
            await conn.execute(
                "INSERT INTO log_delivery_state (destination_id, dead_lettered, last_error, last_error_at) "
                "VALUES (%s, %s, %s, now()) ON CONFLICT (destination_id) DO UPDATE SET "
                "dead_lettered = log_delivery_state.dead_lettered + EXCLUDED.dead_lettered, "
                "last_error = EXCLUDED.last_error, last_error_at = now(), updated_at = now()",
                (dest_id, inserted, last))
        return inserted

    async def record(self, dest_id: str, delivered: int, failed: int, last_error: str | None) -> None:
        """Add to the counters (best effort: a lost update only skews the counts)."""
        if not delivered and not failed:
            return
        try:
            async with self._pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO log_delivery_state (destination_id, delivered, failed, last_error, last_error_at, "
                    "last_delivered_at) VALUES (%s, %s, %s, %s, CASE WHEN %s THEN now() END, "
                    "CASE WHEN %s THEN now() END) ON CONFLICT (destination_id) DO UPDATE SET "
                    "delivered = log_delivery_state.delivered + EXCLUDED.delivered, "
                    "failed = log_delivery_state.failed + EXCLUDED.failed, "
                    "last_error = COALESCE(EXCLUDED.last_error, log_delivery_state.last_error), "
                    "last_error_at = COALESCE(EXCLUDED.last_error_at, log_delivery_state.last_error_at), "
                    "last_delivered_at = COALESCE(EXCLUDED.last_delivered_at, log_delivery_state.last_delivered_at), "
                    "updated_at = now()",
                    (dest_id, delivered, failed, last_error, last_error is not None, delivered > 0))
        except (psycopg.Error, OSError) as exc:
            log.warning("delivery_state_not_recorded", destination=dest_id, error=type(exc).__name__)


# -- one destination -------------------------------------------------------------------------------------

SenderFactory = Callable[[LogDestination], Awaitable[tuple[Sender, Callable[[], Awaitable[None]]]]]


class DestinationWorker:
    """Delivers one destination's events through its durable consumer until cancelled."""

    def __init__(self, js: JetStreamContext, dest: LogDestination, sender: Sender, book: DeliveryBook,
                 config: DeliveryConfig, *, jitter: Callable[[], float] = random.random) -> None:
        self._js, self.dest, self._sender, self._book, self._config = js, dest, sender, book, config
        self._jitter = jitter
        self._inflight: list[Msg] = []
        self.delivered = self.failed = self.dead = 0

    def consumer_config(self) -> ConsumerConfig:
        c = self._config
        start = dt.datetime.fromtimestamp(self.dest.created_at_ms / 1000, dt.UTC) if self.dest.created_at_ms else None
        return ConsumerConfig(
            durable_name=consumer_name(self.dest.id), filter_subject=f"{c.subject_prefix}.>",
            ack_policy=AckPolicy.EXPLICIT, ack_wait=c.ack_wait_s, max_ack_pending=c.batch * 8,
            deliver_policy=DeliverPolicy.BY_START_TIME if start else DeliverPolicy.NEW,
            opt_start_time=start)

    async def run(self) -> None:
        puller = BatchPuller(self._js._nc, self._js, self._config.stream, self.consumer_config())
        await puller.start()
        try:
            while True:
                msgs = await self._gather(puller)
                if msgs:
                    self._inflight = msgs
                    await self.process(msgs)
                    self._inflight = []
        finally:
            # Stopped (a change, a delete, shutdown): what was fetched goes back at once.
            with contextlib.suppress(Exception):
                for m in self._inflight:
                    await m.nak()
            await puller.close()

    async def _gather(self, puller: BatchPuller) -> list[Msg]:
        """Up to `batch` messages; OTLP and S3 wait up to `linger_s` to fill an export/object."""
        c = self._config
        try:
            msgs = await puller.fetch(c.batch, timeout=1.0)
        except TimeoutError:
            return []
        if self.dest.type == "webhook":
            return msgs
        deadline = asyncio.get_running_loop().time() + c.linger_s
        while len(msgs) < c.batch:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                msgs += await puller.fetch(c.batch - len(msgs), timeout=max(0.05, min(left, 1.0)))
            except TimeoutError:
                continue
        return msgs

    async def process(self, msgs: Sequence[Msg]) -> None:
        """Deliver one batch and settle every message: ack the delivered, the dead-lettered and
        the ones this destination does not want; nak the others with their backoff delay."""
        c = self._config
        acks: list[Msg] = []
        items: list[Item] = []
        dead: list[tuple[Msg, Dead]] = []
        for m in msgs:
            meta = m.metadata
            parts = subject_parts(m.subject, c.subject_prefix)
            if parts is None or not wants(self.dest, *parts):
                acks.append(m)
                continue
            try:
                env = envelope_decoder.decode(m.data)
            except msgspec.DecodeError:
                dead.append((m, Dead(meta.sequence.stream, f"seq-{meta.sequence.stream}", parts[1],
                                     meta.num_delivered, "undecodable_event: not a JSON event", m.data)))
                continue
            items.append(Item(m, meta.sequence.stream, m.data, env, meta.num_delivered, meta.timestamp))
        results: list[Attempt] = await self._sender.send(items) if items else []
        retries: list[tuple[Msg, float]] = []
        delivered = failed = 0
        last_error: str | None = None
        for item, result in zip(items, results, strict=True):
            decision = settle(result.outcome, item.attempt, c.max_attempts)
            if result.outcome != "delivered":
                failed += 1
                last_error = result.error
            if decision == "ack":
                delivered += 1
                acks.append(item.msg)
            elif decision == "dead":
                why = "refused by the destination" if result.outcome == "permanent" else \
                    f"gave up after {item.attempt} attempts"
                dead.append((item.msg, Dead(item.seq, item.env.event_id, item.env.type, item.attempt,
                                            f"{why}: {result.error}", item.body)))
            else:
                retries.append((item.msg, retry_delay_s(item.attempt, c.backoff_s, c.backoff_max_s, self._jitter())))
        if dead:
            try:
                new = await self._book.dead_letter(self.dest.id, [d for _, d in dead])
            except (psycopg.Error, OSError) as exc:
                # Not recorded: not given up on either; they come back after the first backoff.
                log.warning("delivery_dead_letter_failed", destination=self.dest.id, error=type(exc).__name__)
                retries += [(m, c.backoff_s) for m, _ in dead]
            else:
                acks += [m for m, _ in dead]
                self.dead += new
                log.error("delivery_dead_lettered", destination=self.dest.id, kind=self.dest.type, count=len(dead),
                          total_dead=self.dead, reason=dead[-1][1].reason)
        await self._book.record(self.dest.id, delivered, failed, last_error)
        self.delivered += delivered
        self.failed += failed
        if failed:
            log.warning("delivery_failed", destination=self.dest.id, kind=self.dest.type, failed=failed,
                        retrying=len(retries), error=last_error)
        await _settle(acks, retries)


async def _settle(acks: Sequence[Msg], retries: Sequence[tuple[Msg, float]]) -> None:
    """Ack, or nak with a delay. A failure here is harmless: the message is redelivered after
    `ack_wait`, which at least once allows."""
    try:
        for m in acks:
            await m.ack()
        for m, delay in retries:
            await m.nak(delay=delay)
    except Exception as exc:
        log.warning("delivery_ack_failed", error=type(exc).__name__)


# -- every destination ---------------------------------------------------------------------------------

class DeliveryManager:
    """Keeps one `DestinationWorker` task per live, enabled destination (re-read every
    `refresh_s`), restarting a worker whose settings changed or that died, and deleting the
    consumers of deleted destinations. Runs until cancelled."""

    def __init__(self, js: JetStreamContext, pool: AsyncConnectionPool[Any], keyring: KeyRing | None,
                 config: DeliveryConfig) -> None:
        self._js, self._pool, self._keyring, self._config = js, pool, keyring, config
        self._book = DeliveryBook(pool)
        self._workers: dict[str, tuple[LogDestination, asyncio.Task[None]]] = {}
        self._cleaned: set[str] = set()
        self._http: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        self._http = guarded_session(self._config.ssrf_allow, self._config.timeout_s)
        try:
            while True:
                try:
                    live, deleted = await self._load()
                except (psycopg.Error, OSError) as exc:
                    log.warning("delivery_destinations_unavailable", error=type(exc).__name__)
                else:
                    await self._reconcile(live, deleted)
                await asyncio.sleep(self._config.refresh_s)
        finally:
            for dest_id in list(self._workers):
                await self._stop(dest_id)
            await self._http.close()

    async def _load(self) -> tuple[dict[str, LogDestination], set[str]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT id, body, deleted_at IS NOT NULL FROM config_entity "
                                     "WHERE kind = 'logdest'")
            rows = await cur.fetchall()
        live: dict[str, LogDestination] = {}
        deleted: set[str] = set()
        for ent_id, body, is_deleted in rows:
            if is_deleted:
                deleted.add(ent_id)
                continue
            entity: ConfigEntity = msgspec.convert(dict(body) | {"kind": "logdest"}, ConfigEntity)
            if isinstance(entity, LogDestination):
                live[ent_id] = entity
        return live, deleted

    async def _reconcile(self, live: dict[str, LogDestination], deleted: set[str]) -> None:
        for dest_id, (dest, task) in list(self._workers.items()):
            wanted = live.get(dest_id)
            if wanted is None or not wanted.enabled or wanted != dest or task.done():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    log.error("delivery_worker_died", destination=dest_id, error=type(exc).__name__,
                              detail=str(exc)[:200])
                await self._stop(dest_id)
        for dest_id, dest in live.items():
            if dest.enabled and dest_id not in self._workers:
                await self._start(dest)
        for dest_id in deleted - self._cleaned - set(live):
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(self._config.stream, consumer_name(dest_id))
                log.info("delivery_consumer_deleted", destination=dest_id)
            self._cleaned.add(dest_id)

    async def _start(self, dest: LogDestination) -> None:
        try:
            sender, close = await self._sender(dest)
        except Exception as exc:  # a ciphertext from another secret key, an unusable URL
            log.error("delivery_destination_unusable", destination=dest.id, error=type(exc).__name__)
            return
        worker = DestinationWorker(self._js, dest, sender, self._book, self._config)

        async def run() -> None:
            try:
                await worker.run()
            finally:
                await close()

        self._workers[dest.id] = (dest, asyncio.create_task(run(), name=f"deliver-{dest.id}"))
        log.info("delivery_started", destination=dest.id, kind=dest.type, workspace=dest.workspace_id or "*",
                 event_types=list(dest.event_types) or "*")

    async def _stop(self, dest_id: str) -> None:
        _, task = self._workers.pop(dest_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _sender(self, dest: LogDestination) -> tuple[Sender, Callable[[], Awaitable[None]]]:
        secret: Secret | None = None
        if dest.secret_enc is not None:
            if self._keyring is None:
                raise KeyMaterialError("ALEPHANT_SECRET_KEY is not set: a destination's secret cannot be decrypted")
            secret = self._keyring.decrypt(dest.secret_enc)
        c = self._config
        assert self._http is not None

        async def nothing() -> None:
            return None

        if dest.type == "webhook":
            return WebhookSender(self._http, dest.url, secret, timeout_s=c.timeout_s,
                                 concurrency=c.concurrency), nothing
        if dest.type == "otlp":
            return OtlpSender(self._http, dest.url, secret, timeout_s=c.timeout_s), nothing
        target = parse_s3_url(dest.url)
        if target is None:
            raise ValueError("not an s3:// URL")
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(s3_client(c.s3_url, c.s3_region, secret, c.timeout_s))
        return S3Sender(client, target, dest.id), stack.aclose


async def run_delivery(js: JetStreamContext, settings: Settings) -> None:
    """The projector process's delivery task; runs until cancelled. Without ALEPHANT_SECRET_KEY,
    destinations that have a secret are not delivered (logged), the others are."""
    try:
        keyring: KeyRing | None = KeyRing(settings.secret_key)
    except KeyMaterialError:
        keyring = None
        log.warning("delivery_without_secret_key")
    pool = open_pool(settings.database_url, max_size=4)
    await pool.open(wait=True, timeout=30)
    try:
        await DeliveryManager(js, pool, keyring, DeliveryConfig.from_settings(settings, s3_region(settings))).run()
    finally:
        await pool.close()
