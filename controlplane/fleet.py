"""`GET /admin/v1/fleet`: which config revision each live data-plane worker has applied.

The control plane listens to the workers' beats (schemas/fleet.py) and keeps the newest per worker;
workers silent for more than `LISTED_LIVE_S` are dropped. `revision` is the control plane's latest
relayed KV revision: once every listed worker's `applied_revision` is at least the
`snapshot_revision` a change returned, the whole fleet enforces it (`alephant ... --wait`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.fleet import FleetRoster, beat_decoder, fleet_report, fleet_subject

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


FLEET: web.AppKey[FleetMonitor] = web.AppKey("fleet", FleetMonitor)


async def get_fleet(request: web.Request) -> web.StreamResponse:
    """`{"revision": R, "workers": [{worker_id, host, pid, applied_revision, stale,
    last_heartbeat_ms, age_s}]}`, workers by id."""
    return web.Response(body=msgspec.json.encode(request.app[FLEET].report(_now_ms())),
                        content_type="application/json")
