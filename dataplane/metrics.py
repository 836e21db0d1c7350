"""The data plane's Prometheus metrics: one `DataPlaneMetrics` per worker (`WorkerState.metrics`).

Per request, `observe(call)` is called once, from the pipeline's `finish`, with the call as it
ended. It costs a few dictionary lookups and float additions (about 3 µs): the label children
of each label tuple are resolved once and kept (`_series`, `_spend`), and increments are tallied
in plain Python (`_Tally`, `_HistogramTally`) and written to prometheus-client's values by
`flush`, every `REFRESH_S` and before a scrape. (In multiprocess mode every value write is an
mmap write under a lock, about 1.3 µs; a call touches up to 13 of them.)

Labels are bounded. Never an agent, run, request or key id. `ingress` and `status` come from code;
`provider` is a configured provider's name (at most `MAX_PROVIDERS`, the rest `other`); `model` is
a model the catalog or a price override knows for that provider, at most `MAX_MODELS` of them, and
`other` for anything else (a client may send any string as a model); `none` before a model was
resolved (a call refused at authentication). Refusal `reason`s are the decision codes, capped too.

Workers share one port (SO_REUSEPORT) and are separate processes: with `PROMETHEUS_MULTIPROC_DIR`
set (the stack sets it), every worker writes its values there and a scrape, whichever worker
answers it, merges them all. Gauges say how they merge (`multiprocess_mode`): the spool depth is
summed over live workers, its oldest event's age and the snapshot staleness are the worst worker's,
the snapshot revision the lowest one applied. Without the variable (tests' in-process apps) the
metrics are this process's own. Gauges and the totals the worker keeps elsewhere (the health
board's retries, ejections and cool-downs; the publisher's counts) are copied in by `refresh`,
every `REFRESH_S` and before a scrape.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.catalog import offers
from schemas.prometheus import NONE, BoundedLabel, forget_dead_workers, multiproc_dir, scrape_registry, worker_exits

if TYPE_CHECKING:
    from dataplane.call import Call
    from dataplane.health import HealthBoard
    from dataplane.snapshot import SnapshotStore
    from events.publisher import EventPublisher
    from schemas.entities import Provider
    from schemas.snapshot import Snapshot

MAX_PROVIDERS = 64
MAX_MODELS = 200
MAX_REASONS = 64
MAX_WORKSPACES = 200
REFRESH_S = 1.0

# Seconds. Model calls run from milliseconds (a cache hit, a refusal) to minutes (long streams).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
NANOS_PER_USD = 1_000_000_000

_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def status_class(status: int) -> str:
    return _STATUS_CLASS.get(status // 100, "other")


def known_model(snap: Snapshot, provider: Provider, model: str, workspace_id: str) -> bool:
    """Whether `model` is one the gateway knows for `provider`: in the bundled catalog (or a
    built-in provider's list), or priced by a platform or workspace override. Pure."""
    return (offers(provider.type, model) or (provider.name, model) in snap.prices
            or ("workspace", workspace_id, provider.name, model) in snap.scoped_prices)


class _Tally:
    """Increments of one counter child, not written yet."""

    __slots__ = ("child", "n")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.n = 0.0

    def flush(self) -> None:
        if self.n:
            self.child.inc(self.n)
            self.n = 0.0


class _HistogramTally:
    """Observations of one histogram child, as bucket counts and a sum, not written yet."""

    __slots__ = ("bounds", "child", "counts", "sum")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.bounds = tuple(child._upper_bounds)  # ends with +Inf: every value has a bucket
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def flush(self) -> None:
        if not self.sum and not any(self.counts):
            return
        # The child's own values (what `Histogram.observe` writes), once per bucket per flush.
        for i, n in enumerate(self.counts):
            if n:
                self.child._buckets[i].inc(n)
                self.counts[i] = 0
        self.child._sum.inc(self.sum)
        self.sum = 0.0


class _Counters:
    """Totals kept elsewhere as plain ints, copied into counters by their increase."""

    __slots__ = ("last", "pairs")

    def __init__(self, pairs: list[tuple[Counter, Callable[[], int]]]) -> None:
        self.pairs = pairs
        self.last = [0] * len(pairs)

    def sync(self) -> None:
        for i, (counter, read) in enumerate(self.pairs):
            now = read()
            if now > self.last[i]:
                counter.inc(now - self.last[i])
            self.last[i] = now


class DataPlaneMetrics:
    """One worker's metrics, in a registry of its own. `shared`: the multiprocess directory
    (default: `PROMETHEUS_MULTIPROC_DIR`, absent in tests' in-process apps)."""

    def __init__(self, shared: Path | None = None, *, from_env: bool = True) -> None:
        self.shared = shared if shared is not None or not from_env else multiproc_dir()
        if self.shared is not None:
            self.shared.mkdir(parents=True, exist_ok=True)
            forget_dead_workers(self.shared)
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.requests = Counter("alephant_requests", "Requests answered, by API, provider, model and HTTP status.",
                                ("ingress", "provider", "model", "status"), registry=r)
        self.duration = Histogram("alephant_request_duration_seconds",
                                  "Time from the first byte received to the last byte sent, by API, provider, "
                                  "model and status class (2xx, 4xx, 5xx).",
                                  ("ingress", "provider", "model", "status_class"), buckets=DURATION_BUCKETS,
                                  registry=r)
        self.ttfb = Histogram("alephant_time_to_first_byte_seconds",
                              "Time from the request to the upstream's first byte, for calls that reached one.",
                              ("ingress", "provider", "model"), buckets=TTFB_BUCKETS, registry=r)
        self.tokens = Counter("alephant_tokens", "Tokens used upstream, by provider and direction (input|output).",
                              ("provider", "direction"), registry=r)
        self.cost = Counter("alephant_cost_usd", "What calls cost, in USD, by provider.", ("provider",), registry=r)
        self.ws_tokens = Counter("alephant_workspace_tokens", "Tokens used upstream, by workspace and direction "
                                 f"(at most {MAX_WORKSPACES} workspaces per worker, the rest 'other').",
                                 ("workspace", "direction"), registry=r)
        self.ws_cost = Counter("alephant_workspace_cost_usd", "What calls cost, in USD, by workspace.",
                               ("workspace",), registry=r)
        self.refusals = Counter("alephant_refusals", "Calls refused by authentication, policy, limits or budgets, "
                                "by reason (the refusal's code).", ("reason",), registry=r)
        self.cache = Counter("alephant_cache", "Response-cache lookups by result (hit, semantic-hit, miss, skip).",
                             ("result",), registry=r)
        self.spool_depth = Gauge("alephant_event_spool_depth", "Events not yet acknowledged by the event stream "
                                 "(queued, in flight, retrying or spooled), summed over live workers.",
                                 registry=r, multiprocess_mode="livesum")
        self.spool_age = Gauge("alephant_event_spool_oldest_age_seconds",
                               "Age of the oldest event queued or retrying (0 when none), the worst live worker's.",
                               registry=r, multiprocess_mode="livemax")
        self.revision = Gauge("alephant_snapshot_revision", "The config snapshot revision applied (the lowest "
                              "over live workers).", registry=r, multiprocess_mode="livemin")
        self.staleness = Gauge("alephant_snapshot_staleness_seconds", "Age of the newest config heartbeat seen "
                               "(+Inf before the first), the worst live worker's.", registry=r,
                               multiprocess_mode="livemax")
        retries = Counter("alephant_upstream_retries", "Upstream attempts that were retries or fallbacks.",
                          registry=r)
        ejections = Counter("alephant_upstream_ejections", "Upstream targets ejected (outlier detection).",
                            registry=r)
        cooldowns = Counter("alephant_upstream_cooldowns", "Credential cool-downs begun on a provider's "
                            "Retry-After.", registry=r)
        readmissions = Counter("alephant_upstream_readmissions", "Ejected targets readmitted by a health probe.",
                               registry=r)
        self._health_counters: tuple[Counter, ...] = (retries, ejections, cooldowns, readmissions)
        self.published = Counter("alephant_events_published", "Events acknowledged by the event stream.",
                                 registry=r)
        self.dead_lettered = Counter("alephant_events_dead_lettered", "Events dead-lettered locally (too large, "
                                     "unencodable, refused by the stream).", registry=r)
        self.served_stale = Counter("alephant_snapshot_served_stale", "Calls served while the config "
                                    "snapshot was stale.", registry=r)
        self._providers = BoundedLabel(MAX_PROVIDERS)
        self._models = BoundedLabel(MAX_MODELS)
        self._reasons = BoundedLabel(MAX_REASONS)
        self._workspaces = BoundedLabel(MAX_WORKSPACES)
        self._series: dict[tuple[str, str, str, int], tuple[_Tally, _HistogramTally, _HistogramTally]] = {}
        self._spend: dict[str, tuple[_Tally, _Tally, _Tally]] = {}
        self._ws_spend: dict[str, tuple[_Tally, _Tally, _Tally]] = {}
        self._reason_children: dict[str, _Tally] = {}
        self._cache_children: dict[str, _Tally] = {}
        self._tallies: list[_Tally | _HistogramTally] = []
        self._synced: _Counters | None = None

    def _tally(self, child: Counter) -> _Tally:
        tally = _Tally(child)
        self._tallies.append(tally)
        return tally

    def _histogram(self, child: Histogram) -> _HistogramTally:
        tally = _HistogramTally(child)
        self._tallies.append(tally)
        return tally

    # ---- per request -----------------------------------------------------------------------

    def observe(self, call: Call) -> None:
        """Count one finished call (its status, latency, time to first byte, usage, cost,
        refusal reason and cache result). Never raises on a call's content; O(1)."""
        target = call.target
        if target is None:
            provider = model = NONE
        else:
            provider = self._providers(target.provider.name)
            model = (self._models(target.model)
                     if known_model(call.snap, target.provider, target.model, call.vk.workspace_id) else "other")
        status = call.status
        key = (call.ingress, provider, model, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                self._tally(self.requests.labels(call.ingress, provider, model, str(status))),
                self._histogram(self.duration.labels(call.ingress, provider, model, status_class(status))),
                self._histogram(self.ttfb.labels(call.ingress, provider, model)))
        series[0].n += 1
        series[1].observe(time.perf_counter() - call.started)
        if call.ttfb_ms is not None:
            series[2].observe(call.ttfb_ms / 1000)
        usage, cost = call.usage, call.cost_nanos
        if usage is not None or cost:
            spend = self._spend.get(provider)
            if spend is None:
                spend = self._spend[provider] = (self._tally(self.tokens.labels(provider, "input")),
                                                 self._tally(self.tokens.labels(provider, "output")),
                                                 self._tally(self.cost.labels(provider)))
            ws = self._workspaces(call.vk.workspace_id or NONE)
            ws_spend = self._ws_spend.get(ws)
            if ws_spend is None:
                ws_spend = self._ws_spend[ws] = (self._tally(self.ws_tokens.labels(ws, "input")),
                                                 self._tally(self.ws_tokens.labels(ws, "output")),
                                                 self._tally(self.ws_cost.labels(ws)))
            if usage is not None:
                spend[0].n += usage.input_tokens
                ws_spend[0].n += usage.input_tokens
                spend[1].n += usage.output_tokens
                ws_spend[1].n += usage.output_tokens
            if cost:
                spend[2].n += cost / NANOS_PER_USD
                ws_spend[2].n += cost / NANOS_PER_USD
        if status >= 400 and call.decision != "allow":
            self._count(self._reason_children, self.refusals, self._reasons(call.decision))
        # Calls that looked the cache up (refused before the lookup: not), and those told to skip it.
        if (call.cache_plan is not None and call.decision == "allow") or call.cache == "skip":
            self._count(self._cache_children, self.cache, call.cache)

    def _count(self, children: dict[str, _Tally], counter: Counter, label: str) -> None:
        tally = children.get(label)
        if tally is None:
            tally = children[label] = self._tally(counter.labels(label))
        tally.n += 1

    # ---- periodic --------------------------------------------------------------------------

    def refresh(self, store: SnapshotStore, publisher: EventPublisher | None, health: HealthBoard) -> None:
        """Write what calls tallied, and copy the worker's gauges and outside totals in (every
        `REFRESH_S`, and before a scrape)."""
        self.flush()
        now = time.time()
        self.revision.set(store.current.revision)
        age = store.heartbeat_age_s(now)
        self.staleness.set(float("inf") if age is None else age)
        if self._synced is None:
            c = self._health_counters
            pairs: list[tuple[Counter, Callable[[], int]]] = [
                (c[0], lambda: health.retries_total), (c[1], lambda: health.ejections_total),
                (c[2], lambda: health.cooldowns_total), (c[3], lambda: health.readmissions_total),
                (self.served_stale, lambda: store.served_stale)]
            if publisher is not None:
                pairs += [(self.published, lambda: publisher.published),
                          (self.dead_lettered, lambda: publisher.dead_lettered)]
            self._synced = _Counters(pairs)
        self._synced.sync()
        if publisher is not None:
            self.spool_depth.set(publisher.pending)
            oldest = publisher.oldest_pending_ms()
            self.spool_age.set(0.0 if oldest is None else max(0.0, now - oldest / 1000))

    def flush(self) -> None:
        """Write the calls' tallies into prometheus-client's values (this worker's file, in
        multiprocess mode). Bounded by the number of series, not of calls."""
        for tally in self._tallies:
            tally.flush()

    def scrape(self) -> CollectorRegistry:
        """The registry `/metrics` renders (every worker's values merged, in multiprocess mode),
        with this worker's tallies written first."""
        self.flush()
        return scrape_registry(self.registry, self.shared)

    def close(self) -> None:
        """At a clean worker exit: write what is tallied, and drop this worker's live gauges."""
        self.flush()
        worker_exits(self.shared)
