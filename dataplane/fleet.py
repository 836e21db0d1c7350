"""This worker's place in the fleet: it beats its applied config revision, and counts its peers.

`run_fleet` publishes a `WorkerBeat` (schemas/fleet.py) every `BEAT_INTERVAL_S` and at once after
the snapshot store applies a new revision, and feeds the beats it hears (its own included) to a
`FleetView`. The control plane reads the same beats for `GET /admin/v1/fleet`.

Fire and forget on core NATS: a publish that fails (NATS down) is logged at debug and replaced by
the next beat; the view then keeps its last count, since a worker that cannot hear its peers has
no better estimate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from dataplane.snapshot import SnapshotStore
from schemas.fleet import (
    BEAT_INTERVAL_S,
    PEER_LIVE_S,
    FleetRoster,
    TargetState,
    WorkerBeat,
    beat_decoder,
    beat_encoder,
    fleet_subject,
)
from schemas.ids import new_id

log = structlog.get_logger(__name__)


class FleetView:
    """How many workers are live (a beat within `PEER_LIVE_S`), this one included.

    `size()` is O(1) and reads no clock: the count is recomputed when a beat arrives and on each
    of this worker's own beats (`refresh`). It is at least 1 (a worker alone, or not yet heard
    from anyone, is a fleet of one)."""

    def __init__(self, live_within_s: float = PEER_LIVE_S) -> None:
        self._roster = FleetRoster()
        self._within_s = live_within_s
        self._size = 1

    def size(self) -> int:
        return self._size

    def observe(self, beat: WorkerBeat, now_ms: int) -> None:
        self._roster.observe(beat, now_ms)
        self.refresh(now_ms)

    def refresh(self, now_ms: int) -> None:
        self._size = max(1, len(self._roster.live(now_ms, self._within_s)))


def _now_ms() -> int:
    return int(time.time() * 1000)


class Beacon:
    """Builds this worker's beats: identity fixed at start, revision and staleness read per beat."""

    def __init__(self, store: SnapshotStore, clock_ms: Callable[[], int] = _now_ms,
                 targets: Callable[[], tuple[TargetState, ...]] | None = None) -> None:
        self.store = store
        self.targets = targets
        self.clock_ms = clock_ms
        self.worker_id = new_id("wrk")
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.started_at_ms = clock_ms()

    def beat(self) -> WorkerBeat:
        now_ms = self.clock_ms()
        age = self.store.heartbeat_age_s(now_ms / 1000)
        return WorkerBeat(worker_id=self.worker_id, pid=self.pid, host=self.host,
                          applied_revision=self.store.current.revision, stale=self.store.is_stale(now_ms / 1000),
                          heartbeat_age_s=None if age is None else round(age, 3),
                          started_at_ms=self.started_at_ms, ts_ms=now_ms,
                          targets=self.targets() if self.targets is not None else ())


async def run_fleet(nc: NATS, subject_prefix: str, store: SnapshotStore, view: FleetView,
                    interval_s: float = BEAT_INTERVAL_S,
                    targets: Callable[[], tuple[TargetState, ...]] | None = None) -> None:
    """Beat and listen until cancelled. Beats start once the store's initial replay is done (a
    worker that has applied nothing has no revision to report)."""
    subject = fleet_subject(subject_prefix)
    beacon = Beacon(store, targets=targets)

    async def heard(msg: Msg) -> None:
        try:
            view.observe(beat_decoder.decode(msg.data), _now_ms())
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            log.warning("fleet_beat_invalid", error=str(exc)[:200])

    sub = await nc.subscribe(subject, cb=heard)
    try:
        await store.ready.wait()
        while True:
            store.swapped.clear()
            try:
                await nc.publish(subject, beat_encoder.encode(beacon.beat()))
            except Exception as exc:  # NATS down or reconnecting: the next beat replaces this one
                log.debug("fleet_beat_failed", error=type(exc).__name__)
            view.refresh(_now_ms())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(store.swapped.wait(), interval_s)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
