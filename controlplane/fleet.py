"""`GET /admin/v1/fleet`: which config revision each live data-plane worker has applied.

The control plane listens to the workers' beats (schemas/fleet.py) and keeps the newest per worker;
workers silent for more than `LISTED_LIVE_S` are dropped. `revision` is the control plane's latest
relayed KV revision: once every listed worker's `applied_revision` is at least the
`snapshot_revision` a change returned, the whole fleet enforces it (`alephant ... --wait`).

`GET /admin/v1/routers/{id}/health` reads the same beats: each worker reports the health of the
upstream targets it used lately (`TargetState`), and `router_health` (pure) gathers, per target of
the router, the matching states of the live workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from controlplane.references import router_target_sets
from schemas.entities import ANY_REQUESTED, Router, RouterTarget
from schemas.fleet import LISTED_LIVE_S, FleetRoster, TargetState, WorkerBeat, beat_decoder, fleet_report, fleet_subject

log = structlog.get_logger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


class FleetMonitor:
    """The roster of worker beats, fed by a NATS subscription. `revision` reads the relay's latest
    revision (a callable, so this stays independent of the relay's type)."""

    def __init__(self, revision: Callable[[], int]) -> None:
        self.roster = FleetRoster()
        self._revision = revision

    async def subscribe(self, nc: NATS, subject_prefix: str) -> Subscription:
        """Start listening; the subscription ends with the connection (drain) or `unsubscribe`."""
        return await nc.subscribe(fleet_subject(subject_prefix), cb=self._heard)

    async def _heard(self, msg: Msg) -> None:
        try:
            self.roster.observe(beat_decoder.decode(msg.data), _now_ms())
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            log.warning("fleet_beat_invalid", error=str(exc)[:200])

    def report(self, now_ms: int) -> dict[str, object]:
        return fleet_report(self.roster, self._revision(), now_ms)

    def live_beats(self, now_ms: int) -> list[WorkerBeat]:
        """The newest beat of each worker heard within `LISTED_LIVE_S` (the workers `report` lists)."""
        return [s.beat for s in self.roster.live(now_ms, LISTED_LIVE_S)]


def router_targets(router: Router) -> list[RouterTarget]:
    """The router's targets and its rules', each (model, pinned key) once, in order of appearance."""
    seen: set[tuple[str, str | None]] = set()
    out: list[RouterTarget] = []
    for t in (t for _, targets in router_target_sets(router) for t in targets):
        if (t.model, t.provider_key_id) not in seen:
            seen.add((t.model, t.provider_key_id))
            out.append(t)
    return out


def target_matches(router: Router, target: RouterTarget, state: TargetState) -> bool:
    """Whether a worker's `state` is one of `target`'s upstreams: same workspace, provider (name)
    and model (`provider/*`: any model; a fixed model also under the names its `models` remap
    to), and the pinned credential when the target pins one."""
    provider, _, model = target.model.partition("/")
    if state.workspace_id != router.workspace_id or state.provider != provider:
        return False
    if model != ANY_REQUESTED and state.model != model and state.model not in target.models.values():
        return False
    return target.provider_key_id is None or state.provider_key_id == target.provider_key_id


def _worker_view(worker_id: str, st: TargetState, now_ms: int) -> dict[str, Any]:
    return {
        "worker_id": worker_id, "model": st.model, "provider_key_id": st.provider_key_id,
        "in_flight": st.in_flight, "consecutive_failures": st.consecutive_failures, "ejections": st.ejections,
        "ejected": st.ejected_until_ms is not None and st.ejected_until_ms > now_ms,
        "ejected_until_ms": st.ejected_until_ms,
        "cooling_down": st.cooldown_until_ms is not None and st.cooldown_until_ms > now_ms,
        "cooldown_until_ms": st.cooldown_until_ms, "ewma_ttfb_ms": st.ewma_ttfb_ms,
        "ewma_total_ms": st.ewma_total_ms, "successes": st.successes, "failures": st.failures,
        "last_error": st.last_error,
    }


def router_health(router: Router, beats: Iterable[WorkerBeat], now_ms: int) -> dict[str, Any]:
    """The `GET /admin/v1/routers/{id}/health` body: per target of `router` (`router_targets`),
    the matching target states of each beat's worker (one entry per state: a `provider/*` target
    may have several models on one worker) and a summary (sums; workers with an ejected or
    cooling state, each counted once). `beats`: the newest beat of each live worker. Pure:
    `now_ms` decides whether an ejection or cool-down is still on."""
    live: Sequence[WorkerBeat] = sorted(beats, key=lambda b: b.worker_id)
    targets = []
    for target in router_targets(router):
        workers = [_worker_view(b.worker_id, st, now_ms) for b in live for st in b.targets
                   if target_matches(router, target, st)]
        targets.append({
            "model": target.model, "provider_key_id": target.provider_key_id, "workers": workers,
            "summary": {
                "in_flight": sum(w["in_flight"] for w in workers),
                "successes": sum(w["successes"] for w in workers),
                "failures": sum(w["failures"] for w in workers),
                "workers_ejected": len({w["worker_id"] for w in workers if w["ejected"]}),
                "workers_cooling": len({w["worker_id"] for w in workers if w["cooling_down"]}),
            },
        })
    return {"router_id": router.id, "name": router.name, "strategy": router.strategy, "targets": targets,
            "workers": len(live)}


FLEET: web.AppKey[FleetMonitor] = web.AppKey("fleet", FleetMonitor)


async def get_fleet(request: web.Request) -> web.StreamResponse:
    """`{"revision": R, "workers": [{worker_id, host, pid, applied_revision, stale,
    last_heartbeat_ms, age_s}]}`, workers by id."""
    return web.Response(body=msgspec.json.encode(request.app[FLEET].report(_now_ms())),
                        content_type="application/json")
