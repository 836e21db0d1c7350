"""The control plane's Prometheus metrics: admin API requests by route template and status, and
the config revision it has published.

`GET /metrics` sits on the admin listener without the admin token, as Prometheus expects: it
shows counts, latencies and the revision only (labels are route templates such as
`/admin/v1/virtual-keys/{id}`, never the ids in a path, nor tokens or bodies). Restrict the admin
port at the network (it binds `ALEPHANT_ADMIN_HOST`, loopback by default) if even that is too much.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.http import Handler
from schemas.prometheus import render

METHODS = frozenset({"GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED = "unmatched"  # a path no route serves (404, 405)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AdminMetrics:
    """The admin API's metrics, in a registry of their own. `revision` reads the config revision
    last published (set once the relay exists)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.requests = Counter("alephant_admin_requests", "Admin API requests by method, route template and "
                                "HTTP status.", ("method", "route", "status"), registry=r)
        self.duration = Histogram("alephant_admin_request_duration_seconds", "Admin API request latency by method "
                                  "and route template.", ("method", "route"), buckets=BUCKETS, registry=r)
        self.config_revision = Gauge("alephant_config_revision", "The config revision the control plane last "
                                     "published to the workers' bucket.", registry=r)
        self.revision: Callable[[], int | None] = lambda: None

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


METRICS: web.AppKey[AdminMetrics] = web.AppKey("admin_metrics", AdminMetrics)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def metrics_middleware(metrics: AdminMetrics) -> Middleware:
    """Outermost: times every request and counts it with the status the client got (an error the
    error middleware rendered included; an exception that escapes it is a 500)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if request.path != "/metrics":
                metrics.observe(request.method, _route(request), status, time.perf_counter() - start)

    return middleware


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    revision = metrics.revision()
    if revision is not None:
        metrics.config_revision.set(revision)
    return render(metrics.registry)
