"""Event publishing to JetStream with `Nats-Msg-Id = event_id`.

`emit()` is for the request path: it only encodes and enqueues. A background task publishes in
batches (concurrent publishes, each awaiting its PubAck) and re-queues what failed, so events
survive a NATS outage as long as the process lives. `publish()` is for callers that must know
the event is stored before they answer (the control plane).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.api import PubAck

from schemas.events import Event, event_encoder, subject_for

log = structlog.get_logger(__name__)

MSG_ID = "Nats-Msg-Id"


@dataclass(frozen=True, slots=True)
class Outgoing:
    msg_id: str
    subject: str
    payload: bytes


class EventPublisher:
    """Batched, at-least-once publisher. Duplicates are harmless: the stream dedups on the
    msg id inside its window, and projectors dedup on event_id forever."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        stream: str,
        subject_prefix: str,
        batch_max: int = 256,
        flush_interval_s: float = 0.05,
        max_queue: int = 200_000,
    ) -> None:
        self._js = js
        self._stream = stream
        self._prefix = subject_prefix
        self._batch_max = batch_max
        self._flush_interval = flush_interval_s
        self._max_queue = max_queue
        self._queue: collections.deque[Outgoing] = collections.deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.published = 0
        self.dropped = 0

    def encode(self, event: Event) -> Outgoing:
        return Outgoing(str(event.event_id), subject_for(event, self._prefix), event_encoder.encode(event))

    def emit(self, event: Event) -> None:
        """Queue an event for publishing; never blocks, never raises on NATS trouble."""
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self.dropped += 1
            log.error("event_queue_overflow", dropped=self.dropped)
        self._queue.append(self.encode(event))
        self._idle.clear()
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def publish(self, event: Event, timeout: float = 5.0) -> PubAck:
        """Publish one event now and return its PubAck (`duplicate=True` on a dedup hit)."""
        return await self.publish_raw(self.encode(event), timeout)

    async def publish_raw(self, out: Outgoing, timeout: float = 5.0) -> PubAck:
        return await self._js.publish(
            out.subject, out.payload, timeout=timeout, stream=self._stream, headers={MSG_ID: out.msg_id}
        )

    async def run(self) -> None:
        """Publish queued events until cancelled. Failed publishes go back to the queue's head."""
        backoff = 0.1
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                await asyncio.sleep(self._flush_interval)
            batch = [self._queue.popleft() for _ in range(min(self._batch_max, len(self._queue)))]
            results = await asyncio.gather(*(self.publish_raw(o) for o in batch), return_exceptions=True)
            failed = [o for o, r in zip(batch, results, strict=True) if isinstance(r, BaseException)]
            self.published += len(batch) - len(failed)
            if failed:
                self._queue.extendleft(reversed(failed))
                log.warning("event_publish_failed", failed=len(failed), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.1

    async def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty (True) or `timeout` passes (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
