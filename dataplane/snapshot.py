"""The worker's config snapshot: an immutable view of the KV bucket, swapped by reference.

`SnapshotWatcher` replays the bucket (ordered consumer, last value per key) into a staging
dict, publishes the first `Snapshot` when the end-of-replay marker arrives, then applies each
later burst of updates copy-on-write (`Snapshot.with_changes`). A request pins one snapshot
(`store.pin`) and uses that object for every decision, and stamps its `revision` on the events it emits.

Staleness: the control plane writes a heartbeat entry every few seconds; a worker whose newest
heartbeat is older than `stale_after_s` (NATS or the control plane unreachable) is stale. Its
`stale_policy` decides: `serve` keeps answering from the snapshot (counted, and logged at most
once a minute), `refuse` answers model calls 503 `config_stale`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec
import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from schemas.entities import ConfigEntity, entity_decoder, entity_encoder
from schemas.errors import UpstreamError
from schemas.snapshot import Snapshot

log = structlog.get_logger(__name__)


def entities_digest(entities: Mapping[str, ConfigEntity]) -> str:
    """SHA-256 (hex) over every `(KV key, entity)` in key order, each entity in its JSON encoding:
    equal digests mean the same config. Pure; O(n). A bucket dump decoded with `entity_decoder`
    digests the same way, so a worker's snapshot can be compared with the server's bucket."""
    digest = hashlib.sha256()
    for key in sorted(entities):
        digest.update(key.encode())
        digest.update(b"\0")
        digest.update(entity_encoder.encode(entities[key]))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class SnapshotStore:
    """Holds the current snapshot. `ready` is set once the initial replay is complete.

    `stale_after_s` and `refuse_stale` are the worker's ALEPHANT_STALE_AFTER_S and
    ALEPHANT_STALE_POLICY (`refuse` -> True); `served_stale` counts requests served while stale.
    """

    current: Snapshot = field(default_factory=Snapshot.empty)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_applied_at: float = 0.0
    bucket_last_seq: int = 0
    stale_after_s: float = 15.0
    refuse_stale: bool = False
    served_stale: int = 0
    # Set at every swap; whoever reports the applied revision (dataplane.fleet) waits on it and clears it.
    swapped: asyncio.Event = field(default_factory=asyncio.Event)
    # The current snapshot's digest, once asked for: computed at most once per snapshot.
    _digest: tuple[Snapshot, str] | None = None

    def swap(self, snap: Snapshot) -> None:
        self.current = snap
        self.last_applied_at = time.monotonic()
        self.swapped.set()

    def heartbeat_age_s(self, now_s: float) -> float | None:
        beat = self.current.heartbeat_ms
        return None if beat is None else max(0.0, now_s - beat / 1000)

    def is_stale(self, now_s: float) -> bool:
        """Not ready, no heartbeat yet, or the newest one is older than `stale_after_s`."""
        beat = self.current.heartbeat_ms
        return not self.ready.is_set() or beat is None or now_s - beat / 1000 > self.stale_after_s

    def pin(self, now_s: float) -> Snapshot:
        """The snapshot one model call uses, after the staleness gate (callers check `ready` first).

        O(1), with no clock read of its own (`now_s` is the caller's `time.time()`). Raises 503
        `config_stale` when stale under the `refuse` policy; under `serve` a stale pin is counted
        in `served_stale`.
        """
        snap = self.current
        if self.is_stale(now_s):
            if self.refuse_stale:
                raise UpstreamError("The gateway has lost contact with its configuration source and is set to "
                                    "refuse calls until it is back (ALEPHANT_STALE_POLICY=refuse). Retry later.",
                                    status=503, code="config_stale")
            self.served_stale += 1
        return snap

    def status(self, now_ms: int) -> dict[str, object]:
        """Health facts: revision, lag against the bucket, heartbeat age, staleness and policy."""
        snap = self.current
        age = self.heartbeat_age_s(now_ms / 1000)
        return {
            "ready": self.ready.is_set(),
            "snapshot_revision": snap.revision,
            "bucket_last_seq": self.bucket_last_seq,
            "heartbeat_age_s": None if age is None else round(age, 3),
            "stale": self.is_stale(now_ms / 1000),
            "stale_policy": "refuse" if self.refuse_stale else "serve",
            "served_while_stale": self.served_stale,
            "entities": len(snap.entities),
        }

    def digest(self) -> dict[str, object]:
        """The current snapshot's revision, entity count and `entities_digest`. The digest is
        computed once per snapshot (O(entities)), so polling between swaps costs nothing."""
        snap = self.current
        if self._digest is None or self._digest[0] is not snap:
            self._digest = (snap, entities_digest(snap.entities))
        return {"snapshot_revision": snap.revision, "entities": len(snap.entities), "digest": self._digest[1]}

    async def report_staleness(self, every_s: float = 60.0, poll_s: float = 1.0) -> None:
        """Log `snapshot_stale` at most once per `every_s` while stale, and `snapshot_fresh` when
        it recovers. Runs until cancelled; one clock read per `poll_s`."""
        stale_since: float | None = None
        logged_at = 0.0
        while True:
            await asyncio.sleep(poll_s)
            if not self.ready.is_set():
                continue
            now = time.time()
            if self.is_stale(now):
                if stale_since is None:
                    stale_since = now
                if now - logged_at >= every_s:
                    logged_at = now
                    age = self.heartbeat_age_s(now)
                    log.warning("snapshot_stale", heartbeat_age_s=None if age is None else round(age, 1),
                                stale_after_s=self.stale_after_s, policy="refuse" if self.refuse_stale else "serve",
                                served_while_stale=self.served_stale, snapshot_revision=self.current.revision)
            elif stale_since is not None:
                log.info("snapshot_fresh", stale_for_s=round(now - stale_since, 1),
                         served_while_stale=self.served_stale)
                stale_since, logged_at = None, 0.0


def _apply(staging: dict[str, ConfigEntity], key: str, op: str | None, value: bytes | None) -> None:
    if op in (KV_DEL, KV_PURGE) or not value:
        staging.pop(key, None)
        return
    try:
        staging[key] = entity_decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # An entry we cannot read must not take the worker down; it is skipped and logged.
        log.error("snapshot_entry_invalid", key=key, error=str(exc)[:200])


class SnapshotWatcher:
    """Replays then follows the config bucket into a SnapshotStore until cancelled."""

    def __init__(self, kv: KeyValue, store: SnapshotStore) -> None:
        self._kv = kv
        self._store = store

    async def run(self) -> None:
        watcher = await self._kv.watchall()
        staging: dict[str, ConfigEntity] = {}
        revision = 0
        while True:  # replay phase: until the end-of-initial-values marker (None)
            entry = await watcher.updates(timeout=None)  # type: ignore[no-untyped-call]
            if entry is None:
                break
            _apply(staging, entry.key, entry.operation, entry.value)
            revision = max(revision, entry.revision or 0)
        self._store.swap(Snapshot.build(staging, revision))
        self._store.ready.set()
        log.info("snapshot_ready", revision=revision, entities=len(staging))
        while True:  # follow phase
            entry = await watcher.updates(timeout=None)  # type: ignore[no-untyped-call]
            if entry is None:
                continue
            changed: set[str] = set()
            while entry is not None:
                if (entry.revision or 0) > revision:  # re-delivery after an ordered-consumer reset
                    _apply(staging, entry.key, entry.operation, entry.value)
                    revision = entry.revision or revision
                    changed.add(entry.key)
                # Coalesce a burst of updates into one rebuild (nats-py exposes no non-blocking get).
                queue = watcher._updates
                entry = queue.get_nowait() if not queue.empty() else None
            if changed:
                # Copy-on-write from the current snapshot: only the indexes of the changed kinds
                # are copied (a heartbeat copies only the entity map, at C speed).
                self._store.swap(self._store.current.with_changes({k: staging.get(k) for k in changed}, revision))

    async def poll_bucket_seq(self, interval_s: float = 2.0) -> None:
        """Track the bucket's last sequence so /healthz can report revision lag."""
        while True:
            try:
                status = await self._kv.status()
                self._store.bucket_last_seq = status.stream_info.state.last_seq
            except Exception as exc:
                log.debug("bucket_status_failed", error=type(exc).__name__)
            await asyncio.sleep(interval_s)

