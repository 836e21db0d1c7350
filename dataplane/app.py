"""The data-plane worker: an aiohttp app wired from the cleanup context.

Resources (NATS, the snapshot watcher, the event publisher, the upstream HTTP session) live in
`_resources`; handlers read them through the `WORKER` key. The worker is stateless: kill it and
start another anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import structlog
from aiohttp import web

from dataplane import tracing
from dataplane.access_log import enabled as access_log_enabled
from dataplane.bodies import BodyArchive
from dataplane.cache import ExactCache
from dataplane.cache_semantic import SemanticIndex
from dataplane.fleet import FleetView, run_fleet
from dataplane.governor import RedisGovernor
from dataplane.idempotency import RedisIdempotencyStore
from dataplane.ingress.alephant import RunCompleteEndpoint, SpendEndpoint
from dataplane.ingress.chat import ChatIngress
from dataplane.ingress.egress import EGRESS_ALIAS_ROUTE, EGRESS_ROUTE, egress
from dataplane.ingress.embeddings import Embeddings
from dataplane.ingress.mcp import MCP_ROUTE, MCP_SERVER_ROUTE, mcp
from dataplane.ingress.messages import CountTokens, MessagesIngress
from dataplane.ingress.paid import PAID_ROUTE, paid
from dataplane.ingress.passthrough import ROUTE as PASSTHROUGH_ROUTE
from dataplane.ingress.passthrough import passthrough
from dataplane.ingress.responses import ResponsesIngress
from dataplane.lifecycle import ModelCall
from dataplane.limits import STREAM_SLOTS, StreamSlots
from dataplane.metrics import REFRESH_S as METRICS_REFRESH_S
from dataplane.models import ModelCatalog
from dataplane.outbound import make_session
from dataplane.pipeline import Endpoint, run
from dataplane.pricing import warm
from dataplane.probes import run_probes
from dataplane.snapshot import SnapshotStore, SnapshotWatcher
from dataplane.state import WORKER, WorkerState
from events.jetstream import bus_auth, connect, ensure_kv
from events.publisher import EventPublisher
from events.spool import Spool
from schemas.http import error_middleware
from schemas.keys import KeyRing
from schemas.prometheus import render
from schemas.settings import Settings

log = structlog.get_logger(__name__)

# The young generation is collected after this many net allocations (CPython's default is 700):
# a request allocates a few hundred objects, so the default ran a collection every other request.
GC_GEN0_THRESHOLD = 20_000


async def _tune_gc(store: SnapshotStore) -> None:
    """Once the initial snapshot is loaded: collect, then `gc.freeze()` what start-up allocated
    (modules, the snapshot's keys, budgets and policies), so the periodic full collections no
    longer walk it (their pauses were a source of the p99 tail), and collect the young generation
    less often."""
    await store.ready.wait()
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    log.info("gc_tuned", frozen=gc.get_freeze_count(), gen0_threshold=GC_GEN0_THRESHOLD)

_encoder = msgspec.json.Encoder()


PUBLISHER: web.AppKey[EventPublisher] = web.AppKey("publisher", EventPublisher)
REFUSAL_FLUSH_S = 10.0


async def healthz(request: web.Request) -> web.Response:
    worker, publisher = request.app[WORKER], request.app[PUBLISHER]
    status = worker.store.status(int(time.time() * 1000))
    status["events_pending"] = publisher.pending
    status["events_published"] = publisher.published
    status["events_dead_lettered"] = publisher.dead_lettered
    status["policy_allows"] = worker.policy_allows
    # Admissions decided by this worker alone while Redis was unreachable (rates on local buckets,
    # budgets on leases): RELIABILITY's limiter_failure_mode_allowed.
    status["limiter_failure_mode_allowed"] = worker.governor.local_admissions
    status["budget_store"] = "ok" if worker.governor.store_healthy else "down (rates local, budgets on leases)"
    return web.json_response(status)


async def snapshot_digest(request: web.Request) -> web.Response:
    """`GET /healthz/snapshot`: the applied config revision, entity count and digest
    (`dataplane.snapshot.entities_digest`), to prove a worker holds exactly the bucket's config
    (RELIABILITY row 9: a watcher reset ends on a snapshot equal to a full bucket dump). Names no
    key and no value; one digest per snapshot, however often it is polled."""
    return web.json_response(request.app[WORKER].store.digest())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: every worker's metrics (merged in multiprocess mode), unauthenticated
    like /healthz; labels carry no key, agent, run or request ids."""
    worker = request.app[WORKER]
    worker.metrics.refresh(worker.store, request.app[PUBLISHER], worker.health)
    return render(worker.metrics.scrape())


async def _refresh_metrics(worker: WorkerState, publisher: EventPublisher) -> None:
    """Keep this worker's gauges current for scrapes another worker answers."""
    while True:
        worker.metrics.refresh(worker.store, publisher, worker.health)
        await asyncio.sleep(METRICS_REFRESH_S)


async def _flush_refusals(worker: WorkerState) -> None:
    """One `auth.refusals` event per interval for the unknown-key refusals counted meanwhile."""
    while True:
        await asyncio.sleep(REFUSAL_FLUSH_S)
        worker.refusals.flush(worker.events)


async def readyz(request: web.Request) -> web.Response:
    ready = request.app[WORKER].store.ready.is_set()
    return web.json_response({"ready": ready}, status=200 if ready else 503)


def _resources(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        keyring = KeyRing(settings.secret_key)
        warm()
        tracing.setup()  # only when the OTEL_* variables configure an exporter
        nc = await connect(settings.nats_url, "alephant-dataplane", bus_auth(settings, "dataplane"))
        js = nc.jetstream()
        # The control plane and `alephant migrate` raise the bucket's replicas; a worker may not.
        kv = await ensure_kv(js, settings.kv_bucket, settings.stream_replicas, raise_replicas=False)
        store = SnapshotStore(stale_after_s=settings.stale_after_s, refuse_stale=settings.stale_policy == "refuse")
        watcher = SnapshotWatcher(kv, store)
        # Each worker claims its own spool slot and replays what a previous (or dead) worker left.
        spool = Spool.open(Path(settings.spool_dir or Path(settings.state_dir) / "spool"),
                           fsync=settings.spool_fsync)
        publisher = EventPublisher(js, stream=settings.stream, subject_prefix=settings.subject_prefix,
                                   batch_max=settings.event_batch_max,
                                   flush_interval_s=settings.event_flush_interval_s,
                                   spool=spool, max_event_bytes=settings.event_max_bytes,
                                   spool_sync_interval_s=settings.spool_sync_interval_s)
        if spool.recovered:
            log.info("spool_replay", events=len(spool.recovered), slot=str(spool.slot))
            publisher.replay(spool.recovered)
            spool.recovered = []
        # Every upstream connection re-checks its address against the SSRF policy (connect time).
        session = make_session(settings)
        # Limits and budgets: Redis, with a local fallback sized by the fleet this worker hears.
        fleet = FleetView()
        governor = RedisGovernor(settings.redis_url, fleet.size, hold_ttl_s=settings.hold_ttl_s,
                                 timeout_s=settings.redis_timeout_s)
        idempotency = RedisIdempotencyStore(settings.redis_url, timeout_s=settings.redis_timeout_s)
        app[PUBLISHER] = publisher
        cache = ExactCache(settings.redis_url, settings.cache_timeout_s, settings.cache_max_entry_bytes)
        semantic = SemanticIndex.from_settings(settings)  # opens Qdrant on first use only
        bodies = BodyArchive(settings)
        app[WORKER] = worker = WorkerState(settings=settings, keyring=keyring, store=store, events=publisher,
                                           session=session, governor=governor, idempotency=idempotency, fleet=fleet,
                                           cache=cache, semantic=semantic, bodies=bodies,
                                           access_log=access_log_enabled(settings.access_log, settings.log_level))
        tasks = [asyncio.create_task(t, name=n) for n, t in (
            ("snapshot-watcher", watcher.run()),
            ("bucket-status", watcher.poll_bucket_seq()),
            ("stale-report", store.report_staleness()),
            ("event-publisher", publisher.run()),
            ("refusal-counts", _flush_refusals(worker)),
            ("governor", governor.run()),
            ("fleet", run_fleet(nc, settings.subject_prefix, store, fleet, targets=worker.health.states)),
            ("health-probes", run_probes(worker)),
            ("semantic-sweeps", semantic.run_sweeps()),
            ("metrics", _refresh_metrics(worker, publisher)),
            ("body-archive", bodies.run()),
            ("gc-tuning", _tune_gc(store)),
        )]
        yield
        worker.refusals.flush(publisher)
        await governor.close()  # settles what is queued, gives the leases back
        await idempotency.close()
        await cache.close()
        await semantic.close()
        await bodies.drain(timeout_s=3.0)
        flushed = await publisher.drain(timeout=5.0)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Counted after the publisher stopped, so a batch that was in flight is included.
        pending, spooled = publisher.pending, spool.close()
        if not flushed or pending:
            log.error("events_not_flushed_on_shutdown", pending=pending, spooled=spooled, spool=str(spool.slot),
                      hint="kept on disk; the next start of a worker publishes them")
        await session.close()
        # With NATS unreachable a drain never ends (nats-py even swallows its cancellation), and what
        # was not acked is in the spool already: give it a bounded wait, then leave.
        drain = asyncio.ensure_future(nc.drain())
        done, _ = await asyncio.wait({drain}, timeout=1.0 if pending else 5.0)
        if not done or drain.exception() is not None:
            log.warning("nats_drain_incomplete", pending=pending)
        worker.metrics.close()
        tracing.shutdown()

    return ctx


def _route(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await run(request, endpoint)

    return handler


API_PREFIXES = ("/v1", "/ai", "/router/{router_id}/v1")


def build_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app.cleanup_ctx.append(_resources(settings))
    app[STREAM_SLOTS] = StreamSlots(settings.max_streams, settings.max_streams_per_key)
    # The same API under `/v1`, `/ai` (the spec's surface; some clients are configured with it) and
    # `/router/{router_id}/v1` (through that router); one endpoint object per API serves all three.
    chat, messages, responses = ModelCall(ChatIngress()), ModelCall(MessagesIngress()), ModelCall(ResponsesIngress())
    count_tokens, embeddings, catalog = CountTokens(), Embeddings(), ModelCatalog()
    for prefix in API_PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", _route(chat))
        app.router.add_post(f"{prefix}/messages", _route(messages))
        # Claude Code adds ?beta=true to /v1/responses and /v1/messages: only a query.
        app.router.add_post(f"{prefix}/responses", _route(responses))
        app.router.add_post(f"{prefix}/messages/count_tokens", _route(count_tokens))
        app.router.add_post(f"{prefix}/embeddings", _route(embeddings))
        app.router.add_get(f"{prefix}/models", _route(catalog))
        app.router.add_get(f"{prefix}/models/{{model:.+}}", _route(catalog))
    app.router.add_post("/v1/alephant/spend", _route(SpendEndpoint()))
    app.router.add_post("/v1/alephant/runs/{run_id}/complete", _route(RunCompleteEndpoint()))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/healthz/snapshot", snapshot_digest)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", PAID_ROUTE, paid)
    app.router.add_route("*", EGRESS_ROUTE, egress)
    app.router.add_route("*", EGRESS_ALIAS_ROUTE, egress)
    app.router.add_route("*", MCP_ROUTE, mcp)
    app.router.add_route("*", MCP_SERVER_ROUTE, mcp)
    # Last: `/{provider}/*` must never shadow the routes above (reserved names never match it).
    app.router.add_route("*", PASSTHROUGH_ROUTE, passthrough)
    return app
