"""The fleet view: every data-plane worker says, once a second, which config revision it applied.

Workers publish a `WorkerBeat` on `fleet_subject(prefix)` (core NATS, fire and forget: a lost beat
is replaced a second later). Workers subscribe too, to count their peers (`FleetView.size`); the
control plane subscribes to answer `GET /admin/v1/fleet`, which `alephant ... --wait` polls until
every live worker has applied the revision a change returned.

The subject is deliberately outside `<prefix>.>`: the event stream captures that whole tree, and a
beat is not an event (it would be stored for good and refused by the projector).

`FleetRoster` is the pure part both sides share: the latest beat per worker, aged by the
receiver's clock (never the sender's, so clock skew between hosts cannot hide or keep a worker).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

BEAT_INTERVAL_S = 1.0  # a worker's beat period (and it beats at once after applying a revision)
PEER_LIVE_S = 5.0  # a worker counts as a peer while its newest beat is at most this old
LISTED_LIVE_S = 30.0  # GET /admin/v1/fleet lists workers heard from within this window
MAX_WORKERS = 10_000  # roster bound; beyond it the oldest entries are pruned first


def fleet_subject(subject_prefix: str) -> str:
    """`<prefix>-fleet.heartbeat` (see the module docstring for why it is not under `<prefix>.`)."""
    return f"{subject_prefix}-fleet.heartbeat"


MAX_REPORTED_TARGETS = 500  # target states one beat carries (the most recently used), for its size


class TargetState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One upstream target's health on one worker (`dataplane.health`): a target is (provider,
    credential, model). Times are Unix ms by the worker's clock (None: not ejected / cooling)."""

    workspace_id: str
    provider: str
    provider_id: str
    model: str
    provider_key_id: str | None = None
    in_flight: int = 0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until_ms: int | None = None
    cooldown_until_ms: int | None = None
    ewma_ttfb_ms: float | None = None
    ewma_total_ms: float | None = None
    successes: int = 0
    failures: int = 0
    last_error: str = ""


class WorkerBeat(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's heartbeat. Times are the worker's own clock, in Unix milliseconds; new fields
    get defaults so old and new workers interoperate."""

    worker_id: str  # unique per process start
    pid: int
    host: str
    applied_revision: int  # the config (KV) revision of the snapshot the worker serves from
    stale: bool  # the worker's own staleness verdict (SnapshotStore.is_stale)
    heartbeat_age_s: float | None  # age of the control plane's config heartbeat it last saw
    started_at_ms: int
    ts_ms: int
    # The upstream targets this worker used lately and their health (GET /admin/v1/routers/{id}/health).
    targets: tuple[TargetState, ...] = ()


beat_encoder = msgspec.json.Encoder()
beat_decoder = msgspec.json.Decoder(WorkerBeat)


@dataclass(frozen=True, slots=True)
class Seen:
    """A beat and when the receiver got it (receiver's clock, Unix ms)."""

    beat: WorkerBeat
    received_ms: int

    def age_s(self, now_ms: int) -> float:
        return max(0, now_ms - self.received_ms) / 1000


class FleetRoster:
    """The newest beat per worker. Pure: the caller passes the time. Not thread-safe (one loop)."""

    def __init__(self) -> None:
        self._seen: dict[str, Seen] = {}

    def observe(self, beat: WorkerBeat, now_ms: int) -> None:
        """Record `beat` as received at `now_ms` (a beat never replaces a newer one of its worker)."""
        prior = self._seen.get(beat.worker_id)
        if prior is not None and prior.beat.ts_ms > beat.ts_ms:
            return
        self._seen[beat.worker_id] = Seen(beat, now_ms)
        if len(self._seen) > MAX_WORKERS:
            for worker_id, _ in sorted(self._seen.items(), key=lambda kv: kv[1].received_ms)[:len(self._seen) // 10]:
                del self._seen[worker_id]

    def live(self, now_ms: int, within_s: float) -> list[Seen]:
        """Workers heard from within `within_s`, by worker id; older entries are forgotten."""
        horizon = now_ms - within_s * 1000
        self._seen = {w: s for w, s in self._seen.items() if s.received_ms >= horizon}
        return [self._seen[w] for w in sorted(self._seen)]


def fleet_report(roster: FleetRoster, revision: int, now_ms: int, within_s: float = LISTED_LIVE_S) -> dict[str, object]:
    """The `GET /admin/v1/fleet` body: the control plane's latest relayed `revision` and each live
    worker (`last_heartbeat_ms` and `age_s` by the control plane's clock)."""
    return {
        "revision": revision,
        "workers": [
            {"worker_id": s.beat.worker_id, "host": s.beat.host, "pid": s.beat.pid,
             "applied_revision": s.beat.applied_revision, "stale": s.beat.stale,
             "last_heartbeat_ms": s.received_ms, "age_s": round(s.age_s(now_ms), 3)}
            for s in roster.live(now_ms, within_s)
        ],
    }
