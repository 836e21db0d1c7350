"""`RedisGovernor`: rate, concurrency and budget admission in one atomic Redis script per request,
settlements batched off the request path, and a local fallback when Redis is unreachable.

Normal operation (Redis reachable): `admit` is one EVALSHA of `governor_scripts.ADMIT`, which
sweeps expired holds, checks every GCRA rate limit, concurrency limit and budget
(`spent + held + hold <= limit`) and, only if all pass, charges them all. Budgets are exact:
**zero overspend** whenever each hold is a true upper bound of its call's cost (otherwise at most
the sum of `actual - hold` over the calls in flight). Settlements are queued and sent every
`settle_flush_interval_s` (sooner when `batch_max` are waiting), one pipeline per batch.

Transport: two pipelined connections of the governor's own (`governor_conn`; redis-py's
per-command overhead was most of a governed request's CPU): one for admissions, escalations and
probes, one for settlement batches and lease refreshes, so a batch never queues in front of an
admission. Each waits at most `timeout_s` (batches `batch_timeout_s`) for a reply; a reply overdue
closes its connection and fails every call waiting on it (replies come in order: the store has
been silent that long), and the next call reconnects.

Leases. While Redis is healthy the worker keeps, per active budget, a lease: a hold with id
`lease:<worker_id>` of min(`lease_pct`% of the limit, free / (2 * fleet_size)), refreshed every
`refresh_interval_s` with a TTL of `lease_ttl_s`. Requests on this worker draw on their own lease
first (inside the admit script), and a request that would be refused first reclaims the other
workers' leases, so in normal operation leases strand no capacity. Leases exist for the outage:

Redis failing (an error, or no reply within `timeout_s`; never raised to the caller) ->
`mode="local"`. A call whose Redis attempt failed has an unknown outcome there: it is voided in
Redis later, rate and concurrency limits are decided locally, and its budgets are refused ("did
not answer in time"). Once Redis has failed for `down_after_s` with no success in between, the
breaker opens (one probe per `probe_interval_s`) and the worker runs fully local:
* rate limits fail open onto a per-worker GCRA of limit / fleet_size (`local_admissions` counts
  what was allowed this way: the gateway's `limiter_failure_mode_allowed`);
* concurrency: a per-worker count of limit / fleet_size;
* budgets fail closed onto this worker's copy of its lease, until the lease's expiry; each such
  admission is recorded in Redis (moved from the lease to a request hold) when Redis is back,
  before this worker admits through Redis again.
Waiting `down_after_s` keeps a busy event loop (which can delay a reply past `timeout_s` while
Redis is fine) from spending leases that other workers may be reclaiming.

Overspend bound, per budget: at most the sum, over workers, of the lease each worker believed it
had when its breaker opened. A lease spent locally is double-counted only if Redis dropped it in
the meantime: it lapsed (the outage outlasted `lease_ttl_s` while other workers could still reach
Redis), another worker reclaimed it (the breaker opened while Redis was in fact reachable), or
Redis lost it (a failover or restart, which also drops the holds of calls in flight: those calls'
holds are the bound there, and `controlplane.budget_state.reconcile` restores `spent`).

Crash safety: holds, leases and concurrency entries carry expiries and are swept by every script
and by `run()`'s periodic refresh, so a dead worker's reservations return within
`hold_ttl_s` + `refresh_interval_s`. A live worker extends the holds of its calls still in
flight (up to `max_hold_s`), so a call longer than `hold_ttl_s` keeps its reservation.

Amounts are exact up to 2^53 nano-USD (about $9M) per budget window (Lua numbers are doubles).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis

from dataplane import governor_scripts as lua
from dataplane.governor_conn import Endpoint, ReplyError, RespConnection, pack
from dataplane.governor_local import Gcra, LocalState, local_share
from dataplane.governor_plan import (
    BudgetRef,
    Call,
    Plan,
    PlanCache,
    budget_refusal,
    build_plan,
    conc_refusal,
    lease_refusal,
    netstring,
    rate_headers,
    rate_refusal,
)
from dataplane.ports import Admission, AdmitRequest, BudgetCrossing
from schemas.budget_keys import escalation_key, lease_hold_id

log = structlog.get_logger(__name__)

_MARKER_TTL_MS = lua.MARKER_TTL_MS
_ACTIVE_MS = 300_000  # a budget unused this long gives its lease back ...
_FORGET_MS = 3_600_000  # ... and is no longer swept by this worker after this long


@dataclass(slots=True)
class _Ticket:
    """`Admission.token`: what `settle` needs."""

    plan: Plan
    local: bool
    settled: bool = False


@dataclass(slots=True)
class _Op:
    """A queued script call (settle, debit or void), applied in order by `flush`. (Not frozen:
    one is built per request, and nothing changes it.)"""

    kind: str
    call: Call


@dataclass(slots=True)
class _Watched:
    tag: str
    plan_budget: BudgetRef
    last_used_ms: int


class RedisGovernor:
    """`dataplane.ports.Governor` over Redis. Start `run()` as a task; `close()` flushes, gives
    the leases back and closes the connection. `redis` is a redis-py client or a URL: the governor
    takes its connection settings and talks to Redis over its own pipelined connection
    (`governor_conn`: every call shares it, no retries, `timeout_s` per reply and per connect)."""

    def __init__(self, redis: Redis | str, fleet_size: Callable[[], int], *, worker_id: str | None = None,
                 hold_ttl_s: float = 120.0, settle_flush_interval_s: float = 0.05, timeout_s: float = 1.0,
                 batch_timeout_s: float = 2.0, lease_ttl_s: float = 60.0, refresh_interval_s: float = 5.0,
                 lease_pct: int = 5, probe_interval_s: float = 0.5, down_after_s: float = 1.0,
                 batch_max: int = 256, queue_max: int = 100_000, max_hold_s: float = 900.0,
                 clock_ms: Callable[[], int] | None = None) -> None:
        endpoint = Endpoint.of(redis)
        self._conn = RespConnection(endpoint, connect_timeout_s=timeout_s)  # admissions, escalations, probes
        self._batches = RespConnection(endpoint, connect_timeout_s=timeout_s)  # settlements (leases: on _conn)
        self._fleet_size = fleet_size
        self.worker_id = worker_id or secrets.token_hex(6)
        self._lease_id = lease_hold_id(self.worker_id)
        self._lease_field = netstring(self._lease_id)
        self._plans = PlanCache()
        self._hold_ttl_ms = int(hold_ttl_s * 1000)
        self._max_hold_ms = int(max_hold_s * 1000)
        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        self._flush_interval_s = settle_flush_interval_s
        self._refresh_interval_s = refresh_interval_s
        self._timeout_s, self._batch_timeout_s = timeout_s, batch_timeout_s
        self._lease_pct = lease_pct
        self._probe_interval_s, self._down_after_s = probe_interval_s, down_after_s
        self._batch_max, self._queue_max = batch_max, queue_max
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        sources: dict[str, str] = {name: getattr(lua, name) for name in ("ADMIT", "SETTLE", "DEBIT", "VOID", "LEASE",
                                                                         "EXTEND")}
        self._scripts = {  # name -> (source, its SHA1: the name EVALSHA runs it by)
            name: (source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())
            for name, source in sources.items()}
        self._queue: deque[_Op] = deque()
        self._unrecorded = 0  # queued debit/void ops: Redis admits wait until they are applied
        self._watched: dict[str, _Watched] = {}
        # Admissions not settled yet, by hold id: their holds are kept from lapsing while this
        # worker lives (up to `max_hold_s`), so a long call keeps its reservation.
        self._open: dict[str, _Ticket] = {}
        self._run_task: asyncio.Task[None] | None = None
        self._local = LocalState()
        # The breaker: closed (`_healthy`) until Redis has failed for `down_after_s` with no
        # success in between; then open (local mode, leases) with one probe per `probe_interval_s`.
        self._healthy = True
        self._failing_since: float | None = None
        self._probe_at = 0.0
        self._closing = False
        self._refresh_requested = False
        # Metrics: admissions allowed by the local fallback; settlements dropped (queue full).
        self.local_admissions = 0
        self.dropped_settlements = 0

    # -- admission -------------------------------------------------------------------------------

    async def admit(self, req: AdmitRequest) -> Admission:
        """See `dataplane.ports.Governor.admit`. No IO when nothing is on the path. `req.request_id`
        names the holds and concurrency entries, so it must be unique per admission."""
        if not req.limits and not req.budgets:
            return Admission(ok=True, mode="none")
        plan = build_plan(req, self._plans)
        if isinstance(plan, Admission):
            return plan
        for b in plan.budgets:
            watched = self._watched.get(b.prefix)
            if watched is None:
                self._watched[b.prefix] = _Watched(plan.tag, b, req.now_ms)
                self._refresh_requested = True
                self._wake.set()
            else:
                watched.last_used_ms = req.now_ms
        attempted = False
        if self._usable() and (not self._unrecorded or await self._flush_within(self._timeout_s)):
            attempted = True
            try:
                command = pack("EVALSHA", self._scripts["ADMIT"][1], 1,
                               *plan.admit_call(self._hold_ttl_ms, self._lease_field))
                reply = await self._conn.call(command, self._timeout_s)
                if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                    await self._load_scripts(self._conn, self._timeout_s)
                    reply = await self._conn.call(command, self._timeout_s)
                if isinstance(reply, ReplyError):  # a script error: the store is not fit to decide
                    raise reply
            except Exception as exc:  # any fault of the store: decide locally, never raise
                self._failed("admit", exc)
            else:
                self._succeeded()
                try:
                    return self._from_reply(plan, reply)
                except Exception as exc:  # an unreadable reply is a lost one (voided below)
                    log.error("governor_bad_reply", error=type(exc).__name__, detail=str(exc)[:200])
        return self._admit_local(plan, req.now_ms, attempted=attempted)

    def _from_reply(self, plan: Plan, reply: list[int]) -> Admission:
        """Read ADMIT's flat reply (layout: `governor_scripts.ADMIT`)."""
        path = plan.path
        rates = path.rates
        end = 5 + 4 * len(rates)
        headers = rate_headers(rates, reply[6:end:4], reply[7:end:4], path.rate_values) if rates else {}
        if not reply[0]:
            _, fail_kind, fail_idx, fail_spent, fail_held = reply[:5]
            idx = fail_idx - 1
            if fail_kind == lua.FAIL_RATE:
                i = 5 + 4 * idx
                decision = Gcra(False, 0.0, reply[i + 1], reply[i + 2], reply[i + 3])
                return rate_refusal(rates[idx], plan.quantities[idx], decision, headers, local=False)
            if fail_kind == lua.FAIL_CONC:
                return conc_refusal(path.concs[idx], headers, local=False)
            return budget_refusal(path.budget_refs[idx], fail_spent, fail_held, plan.hold, headers)
        alerts: tuple[BudgetCrossing, ...] = ()
        remaining: int | None = None
        i = end
        set_lease = self._local.set_lease
        for b in path.budget_refs:
            left, lease_left, lease_exp, committed, n_crossed = reply[i:i + 5]
            set_lease(b.prefix, lease_left, lease_exp)
            if remaining is None or left < remaining:
                remaining = left
            i += 5
            if n_crossed:
                alerts += tuple(BudgetCrossing(b.budget, t, b.period_start, committed) for t in reply[i:i + n_crossed])
                i += n_crossed
        if i != len(reply):
            raise ValueError(f"ADMIT replied {len(reply)} values, expected {i}")
        ticket = self._track(_Ticket(plan, local=False))
        return Admission(ok=True, mode="redis", headers=headers, hold_nanos=plan.hold if path.budget_refs else 0,
                         remaining_nanos=remaining, alerts=alerts, token=ticket)

    def _admit_local(self, plan: Plan, now_ms: int, *, attempted: bool) -> Admission:
        if attempted and (plan.budgets or plan.concs):
            # The lost reply may hide an admission that did apply: undo it, whatever happens here
            # (a rate limiter it may have charged only errs towards refusing, briefly).
            self._enqueue(_Op("void", plan.void_call(_MARKER_TTL_MS)), unrecorded=True)
        fleet = max(1, self._fleet_size())
        shares = [local_share(r.value, fleet) for r in plan.rates]
        decisions = [self._local.rate(r.key, now_ms, r.period_ms, s, q)
                     for r, s, q in zip(plan.rates, shares, plan.quantities, strict=True)]
        headers = rate_headers(plan.rates, [d.remaining for d in decisions], [d.reset_ms for d in decisions], shares)
        for r, q, d in zip(plan.rates, plan.quantities, decisions, strict=True):
            if not d.ok:
                return rate_refusal(r, q, d, headers, local=True)
        for c in plan.concs:
            if self._local.in_flight.get(c.key, 0) >= local_share(c.value, fleet):
                return conc_refusal(c, headers, local=True)
        lefts: list[int] = []
        if plan.hold > 0:
            for b in plan.budgets:
                # Leases only once Redis is known to be down: a call that merely timed out (a slow
                # store, a busy event loop) may have been admitted, and the others may be
                # reclaiming this worker's lease right now.
                left = self._local.lease_covers(b.prefix, plan.hold, now_ms) if not self._healthy else -1
                if left < 0:
                    return lease_refusal(b, self._local.lease_left(b.prefix, now_ms), plan.hold, headers,
                                         store_down=not self._healthy)
                lefts.append(left)
        for r, d in zip(plan.rates, decisions, strict=True):
            self._local.charge_rate(r.key, d, now_ms)
        for c in plan.concs:
            self._local.take_slot(c.key)
        for b, left in zip(plan.budgets, lefts, strict=False):
            lease = self._local.leases[b.prefix]
            lease.nanos = left
        if plan.budgets:
            self._enqueue(_Op("debit", plan.debit_call(now_ms, self._hold_ttl_ms, self._lease_field, _MARKER_TTL_MS)),
                          unrecorded=True)
        self.local_admissions += 1
        remaining = min((self._local.lease_left(b.prefix, now_ms) for b in plan.budgets), default=None)
        ticket = self._track(_Ticket(plan, local=True))
        return Admission(ok=True, mode="local", headers=headers, hold_nanos=plan.hold if plan.budgets else 0,
                         remaining_nanos=remaining, token=ticket)

    def _track(self, ticket: _Ticket) -> _Ticket:
        if ticket.plan.budgets or ticket.plan.concs:
            self._open[ticket.plan.hold_id] = ticket
        return ticket

    # -- settlement ------------------------------------------------------------------------------

    def settle(self, admission: Admission, cost_nanos: int, tokens: int) -> None:
        """See `dataplane.ports.Governor.settle`: queued, applied by `run()`/`flush()` in batches."""
        ticket = admission.token
        if not isinstance(ticket, _Ticket) or ticket.settled:
            return
        ticket.settled = True
        try:
            plan = ticket.plan
            self._open.pop(plan.hold_id, None)
            if ticket.local:
                for c in plan.concs:
                    self._local.release_slot(c.key)
            call = plan.settle_call(max(0, cost_nanos), tokens, _MARKER_TTL_MS, redis_charged=not ticket.local)
            if call is not None:
                self._enqueue(_Op("settle", call))
        except Exception as exc:  # settle never raises: reconciliation restores spend from the ledger
            log.error("governor_settle_failed", error=type(exc).__name__, detail=str(exc)[:200])

    def _enqueue(self, op: _Op, *, unrecorded: bool = False) -> None:
        if len(self._queue) >= self._queue_max:
            dropped = next((o for o in self._queue if o.kind == "settle"), None)
            if dropped is not None:
                self._queue.remove(dropped)
                self.dropped_settlements += 1
                log.error("governor_settlement_dropped", dropped=self.dropped_settlements)
        self._queue.append(op)
        self._unrecorded += unrecorded
        if len(self._queue) >= self._batch_max:
            self._wake.set()

    async def flush(self, *, only_queued: bool = False) -> bool:
        """Send every queued settlement now (batches of `batch_max`, one pipeline each, in order),
        also those queued meanwhile, or with `only_queued` just those queued when it starts.
        True when those are applied; False if Redis failed (the rest stays queued: a batch is
        applied once however often it is sent, see `governor_scripts`)."""
        async with self._flush_lock:
            left = len(self._queue) if only_queued else -1  # ops still to send; -1: all there are
            while self._queue and left != 0:
                size = min(self._batch_max, len(self._queue), left if left > 0 else self._batch_max)
                batch = [self._queue[i] for i in range(size)]
                left -= size if left > 0 else 0
                try:
                    results = await self._run_scripts([(op.kind.upper(), op.call) for op in batch],
                                                      self._batch_timeout_s)
                except Exception as exc:
                    self._failed("flush", exc)
                    return False
                self._succeeded()
                for op, result in zip(batch, results, strict=True):
                    if isinstance(result, Exception):  # a script error is permanent: log, do not retry
                        log.error("governor_op_failed", op=op.kind, error=str(result)[:200])
                    self._queue.popleft()
                    self._unrecorded -= op.kind != "settle"
            return True

    async def _flush_within(self, timeout_s: float) -> bool:
        """`flush` on the request path: bounded by `timeout_s`, waiting for a running flush included."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self.flush()
        except TimeoutError as exc:
            self._failed("flush", exc)
            return False

    async def _run_scripts(self, calls: list[tuple[str, Call]], timeout_s: float,
                           conn: RespConnection | None = None) -> list[Any]:
        """One round trip of EVALSHAs on `conn` (default: the batch connection); their replies in
        order (a script error as a `ReplyError` value). After a NOSCRIPT (Redis restarted or
        flushed its scripts) the scripts are loaded and the whole batch sent once more: ADMIT did
        not run, the settlement scripts are idempotent, LEASE is a refresh, EXTEND touches only
        what exists."""
        conn = conn or self._batches
        commands = [pack("EVALSHA", self._scripts[name][1], 1, *call) for name, call in calls]
        results = await conn.pipeline(commands, timeout_s)
        if any(isinstance(r, ReplyError) and str(r).startswith("NOSCRIPT") for r in results):
            await self._load_scripts(conn, timeout_s)
            results = await conn.pipeline(commands, timeout_s)
        return results

    async def _load_scripts(self, conn: RespConnection, timeout_s: float) -> None:
        loaded = await conn.pipeline([pack("SCRIPT", "LOAD", source) for source, _ in self._scripts.values()],
                                     timeout_s)
        if errors := [r for r in loaded if isinstance(r, ReplyError)]:
            raise errors[0]

    # -- leases, sweeps, health ------------------------------------------------------------------

    async def refresh_leases(self, *, release: bool = False) -> None:
        """Sweep every budget this worker has seen in the last hour and size its lease (given back
        after five minutes without use, or now with `release`); keep the holds of calls in flight
        for more than half the hold TTL from lapsing. One pipeline; a failure counts against Redis.
        Skipped while local admissions are not recorded in Redis yet (they are part of the lease)."""
        if self._unrecorded:
            return
        now = self._clock_ms()
        fleet = max(1, self._fleet_size())
        for prefix in [p for p, w in self._watched.items() if now - w.last_used_ms > _FORGET_MS]:
            del self._watched[prefix]
        for hold_id in [h for h, t in self._open.items() if now - t.plan.now_ms > self._max_hold_ms]:
            log.warning("governor_hold_not_settled", hold_id=hold_id, after_s=self._max_hold_ms / 1000)
            del self._open[hold_id]  # its reservation now lapses like a dead worker's
        watched = list(self._watched.values())
        calls: list[tuple[str, Call]] = [
            ("LEASE", w.plan_budget.lease_call(
                w.tag, now, self._lease_field, self._lease_ttl_ms, fleet,
                0 if release or now - w.last_used_ms > _ACTIVE_MS else self._lease_pct))
            for w in watched]
        calls += [("EXTEND", t.plan.extend_call(now + self._hold_ttl_ms, self._hold_ttl_ms))
                  for t in self._open.values() if now - t.plan.now_ms >= self._hold_ttl_ms // 2]
        if not calls:
            return
        try:
            # On the admissions' connection: admission replies also report this worker's lease, and
            # one connection delivers replies in the order Redis ran the scripts, so an admission
            # that ran before a refresh can never overwrite the refreshed lease with its older view.
            results = await self._run_scripts(calls, self._batch_timeout_s, self._conn)
        except Exception as exc:
            self._failed("lease_refresh", exc)
            return
        self._succeeded()
        for w, result in zip(watched, results, strict=False):
            if isinstance(result, Exception):
                log.error("governor_lease_failed", error=str(result)[:200])
                continue
            self._local.set_lease(w.plan_budget.prefix, int(result[0]), int(result[1]))

    async def run(self) -> None:
        """The background task: flush settlements every `settle_flush_interval_s` (sooner when a
        batch is full), refresh leases and sweep every `refresh_interval_s`, probe Redis while it
        is down. Returns after `close()`."""
        self._run_task = asyncio.current_task()
        next_refresh = 0.0
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._flush_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                break
            if not self._healthy and not await self._probe():
                continue
            if self._queue:
                # What is queued now, not what arrives meanwhile: under steady traffic that would
                # be one round trip per settlement. A full batch waiting wakes the loop again.
                await self.flush(only_queued=True)
                if len(self._queue) >= self._batch_max:
                    self._wake.set()
            if self._refresh_requested or time.monotonic() >= next_refresh:
                self._refresh_requested = False
                next_refresh = time.monotonic() + self._refresh_interval_s
                await self.refresh_leases()

    async def close(self) -> None:
        """Stop `run()`, flush what is queued and give this worker's leases back (best effort,
        bounded by the batch timeout), then close the client if the governor owns it."""
        self._closing = True
        self._wake.set()
        if self._run_task is not None and not self._run_task.done():
            await asyncio.wait({self._run_task}, timeout=2 * self._batch_timeout_s)
        if (self._healthy or await self._probe()) and await self.flush():
            await self.refresh_leases(release=True)
        if self._queue:
            log.warning("governor_settlements_not_flushed", pending=len(self._queue))
        await self._conn.close()
        await self._batches.close()

    async def _probe(self) -> bool:
        if time.monotonic() < self._probe_at:
            return False
        self._probe_at = time.monotonic() + self._probe_interval_s
        try:
            if isinstance(pong := await self._conn.call(pack("PING"), self._timeout_s), ReplyError):
                raise pong  # e.g. LOADING: not ready to decide
        except Exception as exc:
            self._failed("probe", exc)
            return False
        self._succeeded()
        return True

    @property
    def store_healthy(self) -> bool:
        """False while the breaker is open (local mode); see `dataplane.ports.Governor`."""
        return self._healthy

    def _usable(self) -> bool:
        """Healthy, or down long enough that one request may try again (half-open breaker)."""
        if self._healthy:
            return True
        if time.monotonic() >= self._probe_at:
            self._probe_at = time.monotonic() + self._probe_interval_s
            return True
        return False

    def _failed(self, what: str, exc: BaseException) -> None:
        """A Redis call failed. The breaker opens once calls have failed for `down_after_s` with
        no success in between, not at the first timeout: under load the event loop itself can
        delay a reply past `timeout_s` while Redis is fine."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("governor_redis_failed", during=what, error=type(exc).__name__, detail=str(exc)[:200])
        if self._healthy and now - self._failing_since >= self._down_after_s:
            log.warning("governor_redis_down", local_mode=True)
            self._healthy = False
        self._probe_at = now + self._probe_interval_s

    def _succeeded(self) -> None:
        if not self._healthy:
            log.info("governor_redis_back")
        self._healthy = True
        self._failing_since = None

    # -- escalations -----------------------------------------------------------------------------

    async def use_escalation(self, workspace_id: str, escalation_id: str, ttl_s: int) -> bool:
        """SET NX EX: True the first time only, fleet-wide; False on any store fault (fails closed)."""
        if not self._usable():
            return False
        try:
            first = await self._conn.call(pack("SET", escalation_key(workspace_id, escalation_id), "1", "NX", "EX",
                                               max(1, int(ttl_s))), self._timeout_s)
            if isinstance(first, ReplyError):
                raise first
        except Exception as exc:
            self._failed("use_escalation", exc)
            return False
        self._succeeded()
        return first is not None
