"""What one admission touches, and how its outcome reads. Pure: no IO, no clock.

`build_plan` turns an `AdmitRequest` into a `Plan`: the Redis keys of each budget window, rate
limiter and concurrency limiter on the path, and the arguments of each governor script
(`governor_scripts`). The refusal and header helpers render outcomes for clients: amounts in
dollars from integer nano-USD, reset times the way OpenAI writes them ("20ms", "1.5s", "6m0s").
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfoNotFoundError

import msgspec

from dataplane.governor_local import Gcra
from dataplane.ports import Admission, AdmitRequest
from schemas.budget_keys import (
    RATE_KINDS,
    RATE_PERIOD_MS,
    BudgetKeys,
    budget_keys,
    budget_prefix,
    concurrency_key,
    epoch_ms_to_datetime,
    key_expire_at_ms,
    period_window,
    rate_key,
)
from schemas.entities import Budget, Limit
from schemas.money import nanos_to_decimal_str

Call = tuple[tuple[str, ...], tuple[str | int, ...]]  # a script's KEYS and ARGV

_UNITS = {"rpm": ("requests", "minute"), "rpd": ("requests", "day"), "tpm": ("tokens", "minute"),
          "tpd": ("tokens", "day")}
CONCURRENCY_RETRY_S = 1.0  # a slot frees as soon as any call ends


@dataclass(frozen=True, slots=True)
class BudgetRef:
    budget: Budget
    keys: BudgetKeys
    prefix: str
    period_key: str
    period_start: str  # ISO 8601, in the budget's zone
    expire_at_ms: int  # 0 = never

    def lease_call(self, now_ms: int, lease_id: str, lease_ttl_ms: int, fleet: int, pct: int) -> Call:
        """`LEASE` for this window: a cap of `pct`% of the limit (0 gives the lease back)."""
        cap = self.budget.limit_nanos * pct // 100
        return ((self.keys.spent, self.keys.holds, self.keys.hexp, self.keys.held, self.keys.leases),
                (now_ms, lease_id, lease_ttl_ms, self.budget.limit_nanos, cap, fleet, self.expire_at_ms))


@dataclass(frozen=True, slots=True)
class RateRef:
    limit: Limit
    kind: str
    key: str
    value: int
    period_ms: int
    quantity: int


@dataclass(frozen=True, slots=True)
class ConcRef:
    limit: Limit
    key: str
    value: int


@dataclass(frozen=True, slots=True)
class Plan:
    workspace_id: str
    hold_id: str
    hold: int
    tokens: int
    now_ms: int
    budgets: tuple[BudgetRef, ...]
    rates: tuple[RateRef, ...]
    concs: tuple[ConcRef, ...]

    def admit_keys(self) -> list[str]:
        return [k for b in self.budgets for k in b.keys] + [r.key for r in self.rates] + [c.key for c in self.concs]

    def admit_args(self, hold_ttl_ms: int, lease_id: str) -> list[str | int]:
        args: list[str | int] = [self.now_ms, self.hold_id, self.hold, hold_ttl_ms, lease_id, len(self.budgets),
                                 len(self.rates), len(self.concs)]
        for b in self.budgets:
            args += [b.budget.limit_nanos, b.expire_at_ms, ",".join(str(t) for t in b.budget.alert_at)]
        for r in self.rates:
            args += [r.period_ms, r.value, r.quantity]
        args += [c.value for c in self.concs]
        return args

    def settle_call(self, marker: str, cost_nanos: int, tokens: int, marker_ttl_ms: int, *,
                    redis_charged: bool) -> Call | None:
        """`SETTLE`, or None when there is nothing in Redis to settle. Rate and concurrency
        entries exist in Redis only if the admission was made there (`redis_charged`)."""
        delta = tokens - self.tokens
        token_rates = [r for r in self.rates if r.kind in ("tpm", "tpd")] if redis_charged and delta else []
        concs = list(self.concs) if redis_charged else []
        if not (self.budgets or token_rates or concs):
            return None
        keys = [marker]
        for b in self.budgets:
            keys += [b.keys.spent, b.keys.holds, b.keys.hexp, b.keys.held]
        keys += [r.key for r in token_rates] + [c.key for c in concs]
        args: list[str | int] = [self.hold_id, cost_nanos, marker_ttl_ms, len(self.budgets), len(token_rates),
                                 len(concs)]
        args += [b.expire_at_ms for b in self.budgets]
        args += [repr(delta * r.period_ms / r.value) for r in token_rates]
        return tuple(keys), tuple(args)

    def debit_call(self, marker: str, now_ms: int, hold_ttl_ms: int, lease_id: str, marker_ttl_ms: int) -> Call:
        keys = [marker] + [k for b in self.budgets
                           for k in (b.keys.spent, b.keys.holds, b.keys.hexp, b.keys.held, b.keys.leases)]
        args: list[str | int] = [now_ms, self.hold_id, self.hold, hold_ttl_ms, lease_id, marker_ttl_ms,
                                 len(self.budgets)]
        return tuple(keys), tuple(args + [b.expire_at_ms for b in self.budgets])

    def extend_call(self, expires_ms: int, ttl_ms: int) -> Call:
        keys = [b.keys.hexp for b in self.budgets] + [c.key for c in self.concs]
        return tuple(keys), (self.hold_id, expires_ms, ttl_ms)

    def void_call(self, marker: str, marker_ttl_ms: int) -> Call:
        keys = [marker] + [k for b in self.budgets for k in (b.keys.holds, b.keys.hexp, b.keys.held)]
        keys += [c.key for c in self.concs]
        return tuple(keys), (self.hold_id, marker_ttl_ms, len(self.budgets))


def _window(budget: Budget, now: dt.datetime) -> tuple[str, dt.datetime, dt.datetime | None]:
    try:
        return period_window(budget, now)
    except (ValueError, ZoneInfoNotFoundError):
        # The admin API validates zones; a bad one that slipped through is read as UTC rather
        # than leaving the budget unenforced.
        return period_window(msgspec.structs.replace(budget, timezone="UTC"), now)


def build_plan(req: AdmitRequest) -> Plan | Admission:
    """The plan of `req`, or a refusal that needs no IO (a limit of 0 admits nothing)."""
    now = epoch_ms_to_datetime(req.now_ms)
    budgets: list[BudgetRef] = []
    for b in req.budgets:
        period_key, start, end = _window(b, now)
        budgets.append(BudgetRef(b, budget_keys(req.workspace_id, b.id, period_key),
                                 budget_prefix(req.workspace_id, b.id, period_key), period_key, start.isoformat(),
                                 key_expire_at_ms(end)))
    rates: list[RateRef] = []
    concs: list[ConcRef] = []
    for limit in req.limits:
        for kind in RATE_KINDS:
            value: int | None = getattr(limit, kind)
            if value is None:
                continue
            if value <= 0:
                what, per = _UNITS[kind]
                return Admission(ok=False, code="rate_limit_exceeded", mode="none",
                                 message=f"Rate limit {limit.id} ({_scope(limit)}) allows no {what} per {per}.")
            quantity = 1 if kind in ("rpm", "rpd") else max(0, req.tokens)
            rates.append(RateRef(limit, kind, rate_key(req.workspace_id, limit.id, kind), value, RATE_PERIOD_MS[kind],
                                 quantity))
        if limit.concurrency is not None:
            if limit.concurrency <= 0:
                return Admission(ok=False, code="concurrency_limit_exceeded", mode="none",
                                 message=f"Concurrency limit {limit.id} ({_scope(limit)}) allows no calls.")
            concs.append(ConcRef(limit, concurrency_key(req.workspace_id, limit.id), limit.concurrency))
    return Plan(req.workspace_id, req.request_id, max(0, req.hold_nanos), max(0, req.tokens), req.now_ms,
                tuple(budgets), tuple(rates), tuple(concs))


# -- rendering -------------------------------------------------------------------------------------


def usd(nanos: int) -> str:
    """Dollars with at least two decimals: `990_000_000` -> "0.99", `1_500_000` -> "0.0015"."""
    whole, _, frac = nanos_to_decimal_str(nanos).partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def format_reset(ms: int) -> str:
    """A duration as OpenAI's reset headers write it: "0s", "20ms", "1s", "7.66s", "6m0s", "1h2m3s"."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    seconds = math.ceil(ms / 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def rate_headers(rates: Sequence[RateRef], decisions: Sequence[Gcra], limits: Sequence[int]) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} of the tightest request limiter
    (rpm/rpd) and token limiter (tpm/tpd): the fewest remaining, then the smallest limit.
    `limits` are the enforced values (the local shares in local mode)."""
    headers: dict[str, str] = {}
    for family, kinds in (("requests", ("rpm", "rpd")), ("tokens", ("tpm", "tpd"))):
        found = [(d.remaining, lim, d.reset_ms) for r, d, lim in zip(rates, decisions, limits, strict=True)
                 if r.kind in kinds]
        if found:
            remaining, lim, reset_ms = min(found, key=lambda x: (x[0], x[1]))
            headers[f"x-ratelimit-limit-{family}"] = str(lim)
            headers[f"x-ratelimit-remaining-{family}"] = str(max(0, remaining))
            headers[f"x-ratelimit-reset-{family}"] = format_reset(reset_ms)
    return headers


def _scope(entity: Budget | Limit) -> str:
    return f"{entity.scope} {entity.scope_id}"


def rate_refusal(r: RateRef, d: Gcra, headers: dict[str, str], *, local: bool) -> Admission:
    what, per = _UNITS[r.kind]
    mode = "local" if local else "redis"
    where = " (this worker's share while the limit store is unreachable)" if local else ""
    if r.quantity > r.value:
        return Admission(ok=False, code="rate_limit_exceeded", mode=mode, headers=headers,
                         message=f"This request needs {r.quantity} {what}, more than rate limit {r.limit.id} "
                                 f"({_scope(r.limit)}) allows: {r.value} {what} per {per}{where}.")
    return Admission(ok=False, code="rate_limit_exceeded", mode=mode, headers=headers,
                     retry_after_s=d.retry_after_ms / 1000,
                     message=f"Rate limit {r.limit.id} ({_scope(r.limit)}) reached: {r.value} {what} per {per}"
                             f"{where}. Retry in {format_reset(d.retry_after_ms)}.")


def conc_refusal(c: ConcRef, headers: dict[str, str], *, local: bool) -> Admission:
    where = " (this worker's share while the limit store is unreachable)" if local else ""
    return Admission(ok=False, code="concurrency_limit_exceeded", mode="local" if local else "redis",
                     headers=headers, retry_after_s=CONCURRENCY_RETRY_S,
                     message=f"Concurrency limit {c.limit.id} ({_scope(c.limit)}) reached: {c.value} calls in "
                             f"flight{where}. Retry when one has finished.")


def budget_refusal(b: BudgetRef, spent: int, held: int, hold: int, headers: dict[str, str]) -> Admission:
    budget = b.budget
    return Admission(ok=False, code="budget_exceeded", mode="redis", headers=headers,
                     message=f"Budget {budget.id} ({_scope(budget)}, {budget.period}) would be exceeded: "
                             f"spent ${usd(spent)} + held ${usd(held)} + this call ${usd(hold)} > limit "
                             f"${usd(budget.limit_nanos)}.")


def lease_refusal(b: BudgetRef, lease_left: int, hold: int, headers: dict[str, str], *,
                  store_down: bool) -> Admission:
    """A budget refused in local mode: the store is down and this worker's lease cannot pay the
    hold, or (`store_down` False) the store did not answer in time, so the call's outcome there is
    unknown and no lease may be used."""
    budget = b.budget
    what = (f"the budget store is unreachable and this worker's lease of the budget is spent (${usd(lease_left)} "
            f"left, this call ${usd(hold)})") if store_down else "the budget store did not answer in time"
    return Admission(ok=False, code="budget_exceeded", mode="local", headers=headers,
                     message=f"Budget {budget.id} ({_scope(budget)}, {budget.period}): {what}. Retry shortly.")
