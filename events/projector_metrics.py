"""The projector's HTTP endpoints on `ALEPHANT_PROJECTOR_METRICS_PORT`: Prometheus `GET /metrics`,
and the probes `GET /healthz` (200 while the process serves: per projection its lag, whether its
durable consumer is bound and when this instance last committed a batch) and `GET /readyz`
(200 once every projection's consumer is bound, else 503).

Per projection (its durable consumer):
* `alephant_projector_lag_events`: events the projection has not acked yet (the consumer's
  pending plus delivered-unacked counts, asked from JetStream at scrape time);
* `alephant_projector_lag_seconds`: the age of the oldest of them: the first message of the
  batch in hand, else (none in hand, some pending) the newest acked one's age, an upper bound;
  0 when nothing is pending;
* `alephant_projector_events_folded_total`, `alephant_projector_dead_lettered_total` (poison
  messages, kept in `dead_letter`), `alephant_projector_batches_failed_total` (the database
  was unreachable: the batch is retried).

The counts are the projector's own since it started (counters reset on restart, as Prometheus
expects). The server binds `ALEPHANT_HOST`; a scrape does one consumer-info request per projection.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from events.projector import Projector
from schemas.prometheus import render

log = structlog.get_logger(__name__)

CONSUMER_INFO_TIMEOUT_S = 2.0


@dataclass
class Lag:
    """One projection's lag as last measured: events not acked, and the oldest one's age (s)."""

    events: int = 0
    seconds: float = 0.0


@dataclass(eq=False)  # registries key collectors by identity
class ProjectorCollector(Collector):
    """Reads the running projectors' counts and their last measured lag at collect time."""

    projectors: Sequence[Projector]
    lag: dict[str, Lag] = field(default_factory=dict)

    def collect(self) -> Iterable[Metric]:
        lag_events = GaugeMetricFamily("alephant_projector_lag_events", "Events the projection has not folded "
                                       "and acked yet.", labels=["projection"])
        lag_seconds = GaugeMetricFamily("alephant_projector_lag_seconds", "Age of the oldest event the projection "
                                        "has not folded yet (0 when none).", labels=["projection"])
        folded = CounterMetricFamily("alephant_projector_events_folded", "Events folded into the projection "
                                     "(new ones; redeliveries are not counted twice).", labels=["projection"])
        dead = CounterMetricFamily("alephant_projector_dead_lettered", "Poison events dead-lettered (undecodable "
                                   "or refused by the database for their data).", labels=["projection"])
        failed = CounterMetricFamily("alephant_projector_batches_failed", "Batches retried because the database "
                                     "was unreachable or busy.", labels=["projection"])
        for p in self.projectors:
            name = p.projection.name
            lag = self.lag.get(name, Lag())
            lag_events.add_metric([name], lag.events)
            lag_seconds.add_metric([name], lag.seconds)
            folded.add_metric([name], p.applied)
            dead.add_metric([name], p.dead)
            failed.add_metric([name], p.batches_failed)
        return [lag_events, lag_seconds, folded, dead, failed]


async def measure_lag(js: JetStreamContext, stream: str, projector: Projector, now: float) -> Lag | None:
    """The projection's lag from its consumer's info and what the projector holds; None when
    JetStream did not answer (the previous measure is kept)."""
    try:
        info = await js.consumer_info(stream, projector.projection.name, timeout=CONSUMER_INFO_TIMEOUT_S)
    except Exception as exc:
        log.debug("projector_lag_unknown", projection=projector.projection.name, error=type(exc).__name__)
        return None
    events = (info.num_pending or 0) + (info.num_ack_pending or 0)
    if not events:
        return Lag(0, 0.0)
    since = projector.in_hand_since if projector.in_hand_since is not None else projector.folded_until
    return Lag(events, 0.0 if since is None else max(0.0, now - since))


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def health(projectors: Sequence[Projector], lag: dict[str, Lag]) -> dict[str, object]:
    """The /healthz body: per projection `bound`, `lag_events`, `lag_seconds`, `last_commit_at`
    (ISO-8601 UTC, null before this instance's first commit), `folded` and `dead_lettered`."""
    return {"ok": True, "ready": all(p.bound for p in projectors), "projections": {
        p.projection.name: {"bound": p.bound, "lag_events": lag.get(p.projection.name, Lag()).events,
                            "lag_seconds": round(lag.get(p.projection.name, Lag()).seconds, 3),
                            "last_commit_at": _iso(p.last_commit_at), "folded": p.applied, "dead_lettered": p.dead}
        for p in projectors}}


def metrics_app(js: JetStreamContext, stream: str, projectors: Sequence[Projector]) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    collector = ProjectorCollector(projectors)
    registry.register(collector)

    async def refresh_lag() -> None:
        now = time.time()
        measured = await asyncio.gather(*(measure_lag(js, stream, p, now) for p in projectors))
        for p, lag in zip(projectors, measured, strict=True):
            if lag is not None:
                collector.lag[p.projection.name] = lag

    async def metrics(request: web.Request) -> web.Response:
        await refresh_lag()
        return render(registry)

    async def healthz(request: web.Request) -> web.Response:
        await refresh_lag()
        return web.json_response(health(projectors, collector.lag))

    async def readyz(request: web.Request) -> web.Response:
        ready = all(p.bound for p in projectors)
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@asynccontextmanager
async def serving_metrics(js: JetStreamContext, stream: str, projectors: Sequence[Projector],
                          host: str, port: int) -> AsyncIterator[int]:
    """Serve `/metrics` on `host:port` (0: any free port) while the block runs; yields the port."""
    runner = web.AppRunner(metrics_app(js, stream, projectors), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    log.info("projector_metrics_listening", host=host, port=bound)
    try:
        yield bound
    finally:
        await runner.cleanup()
