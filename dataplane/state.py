"""Per-worker resources, built in the app's cleanup context and read through one typed key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from dataplane.bodies import BodyArchive
from dataplane.cache import ExactCache
from dataplane.fleet import FleetView
from dataplane.health import HealthBoard
from dataplane.metrics import DataPlaneMetrics
from dataplane.ports import EventSink, Governor, IdempotencyStore, NoGovernor, NoIdempotencyStore
from dataplane.refusals import RefusalCounter
from dataplane.snapshot import SnapshotStore
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings

if TYPE_CHECKING:
    from dataplane.cache_semantic import SemanticIndex


@dataclass
class WorkerState:
    settings: Settings
    keyring: KeyRing
    store: SnapshotStore
    events: EventSink
    session: aiohttp.ClientSession
    governor: Governor = field(default_factory=NoGovernor)
    # Idempotency-Key records of the money-moving routes (POST /v1/alephant/spend).
    idempotency: IdempotencyStore = field(default_factory=NoIdempotencyStore)
    fleet: FleetView = field(default_factory=FleetView)  # the live workers this one hears
    refusals: RefusalCounter = field(default_factory=RefusalCounter)
    health: HealthBoard = field(default_factory=HealthBoard)  # upstream targets, as this worker sees them
    metrics: DataPlaneMetrics = field(default_factory=DataPlaneMetrics)  # /metrics; observed in pipeline.finish
    cache: ExactCache | None = None  # the response cache (None: not wired, e.g. unit-test apps)
    semantic: SemanticIndex | None = None  # the semantic cache's index (Qdrant), opened on first use
    bodies: BodyArchive = field(default_factory=lambda: BodyArchive(Settings()))  # request bodies to S3, when kept
    policy_allows: int = 0  # plain policy allows (counted, not emitted)
    access_log: bool = False  # one access line per request (dataplane.access_log; set at start)
    # The smallest remaining budget (nano-USD) last admitted against, per budget id: what a
    # request without max_tokens is given (see stages.governance.admit).
    budget_remaining: dict[str, int] = field(default_factory=dict)
    # stages.governance.on_path's memo: (workspace, scope path) -> what governs it, valid while
    # the snapshot's governance index is `on_path_index` (the same object).
    on_path_memo: dict[Any, Any] = field(default_factory=dict)
    on_path_index: object = None
    _provider_keys: dict[str, Secret] = field(default_factory=dict)

    def provider_key(self, ciphertext: str | None) -> Secret | None:
        """Decrypted provider key, memoized per ciphertext (a rotated key is a new ciphertext)."""
        if ciphertext is None:
            return None
        key = self._provider_keys.get(ciphertext)
        if key is None:
            if len(self._provider_keys) > 10_000:
                self._provider_keys.clear()
            key = self._provider_keys[ciphertext] = self.keyring.decrypt(ciphertext)
        return key


WORKER: web.AppKey[WorkerState] = web.AppKey("worker", WorkerState)
