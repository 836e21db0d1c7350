"""What one admission touches, and how its outcome reads. Pure: no IO, no clock.

`build_plan` turns an `AdmitRequest` into a `Plan`: the Redis keys of each budget window, rate
limiter and concurrency limiter on the path, and the arguments of each governor script in their
packed form (`governor_scripts`: one workspace tag, one field string, the hold id). What depends
only on an entity and its current window (keys, window, expiry, packed fields) is memoised in a
`PlanCache`. The refusal and header helpers render outcomes for clients: amounts in dollars from
integer nano-USD, reset times the way OpenAI writes them ("20ms", "1.5s", "6m0s").
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
    budget_suffix,
    concurrency_suffix,
    epoch_ms_to_datetime,
    key_expire_at_ms,
    period_window,
    rate_suffix,
    workspace_tag,
)
from schemas.entities import Budget, Limit
from schemas.money import nanos_to_decimal_str

# A script call: KEYS[1] (the workspace tag), ARGV[1] (the packed fields), ARGV[2] (the hold id,
# "" for scripts without one). See `governor_scripts`.
Call = tuple[str, str, str]

_UNITS = {"rpm": ("requests", "minute"), "rpd": ("requests", "day"), "tpm": ("tokens", "minute"),
          "tpd": ("tokens", "day")}
CONCURRENCY_RETRY_S = 1.0  # a slot frees as soon as any call ends
_NO_END_MS = 2**63  # a `total` window's end (it has none)


def netstring(value: str) -> str:
    """A string field of a packed script argument: `<byte length>:<bytes>,`."""
    return f"{len(value.encode())}:{value},"


@dataclass(frozen=True, slots=True)
class BudgetRef:
    """One budget in its window containing some instant; valid for `start_ms <= now < end_ms`."""

    budget: Budget
    prefix: str  # the window's key prefix (its keys add `:spent`, ...); also its local lease's name
    period_key: str
    period_start: str  # ISO 8601, in the budget's zone
    expire_at_ms: int  # 0 = never
    start_ms: int
    end_ms: int
    suffix_field: str  # netstring of the prefix after the tag
    admit_fields: str  # this budget's part of ADMIT's fields
    settle_fields: str  # ... of SETTLE's and DEBIT's
    hexp_field: str  # netstring of its hold-expiry ZSET's suffix (EXTEND)

    def lease_call(self, tag: str, now_ms: int, lease_field: str, lease_ttl_ms: int, fleet: int, pct: int) -> Call:
        """`LEASE` for this window: a cap of `pct`% of the limit (0 gives the lease back)."""
        cap = self.budget.limit_nanos * pct // 100
        return tag, (f"{now_ms},{lease_ttl_ms},{self.budget.limit_nanos},{cap},{fleet},{self.expire_at_ms},"
                     f"{self.suffix_field}{lease_field}"), ""


@dataclass(frozen=True, slots=True)
class RateRef:
    limit: Limit
    kind: str
    key: str
    value: int
    period_ms: int
    per_token: bool  # tpm/tpd (charged the request's tokens) rather than rpm/rpd (one request)
    suffix_field: str
    admit_fields: str  # ADMIT's fields but the quantity


@dataclass(frozen=True, slots=True)
class ConcRef:
    limit: Limit
    key: str
    value: int
    suffix_field: str
    admit_fields: str


@dataclass(frozen=True, slots=True)
class Plan:
    workspace_id: str
    tag: str
    hold_id: str
    hold: int
    tokens: int
    now_ms: int
    budgets: tuple[BudgetRef, ...]
    rates: tuple[RateRef, ...]
    quantities: tuple[int, ...]  # what each rate limiter is charged
    concs: tuple[ConcRef, ...]

    def admit_call(self, hold_ttl_ms: int, lease_field: str) -> Call:
        """`ADMIT`; `lease_field` is this worker's lease hold id as a `netstring`."""
        parts = [f"{self.now_ms},{self.hold},{hold_ttl_ms},{len(self.budgets)},{len(self.rates)},{len(self.concs)},",
                 lease_field]
        parts += [b.admit_fields for b in self.budgets]
        for r, q in zip(self.rates, self.quantities, strict=True):
            parts += (r.admit_fields, f"{q},")
        parts += [c.admit_fields for c in self.concs]
        return self.tag, "".join(parts), self.hold_id

    def settle_call(self, cost_nanos: int, tokens: int, marker_ttl_ms: int, *, redis_charged: bool) -> Call | None:
        """`SETTLE`, or None when there is nothing in Redis to settle. Rate and concurrency
        entries exist in Redis only if the admission was made there (`redis_charged`)."""
        delta = tokens - self.tokens
        token_rates = [r for r in self.rates if r.per_token] if redis_charged and delta else []
        concs = self.concs if redis_charged else ()
        if not (self.budgets or token_rates or concs):
            return None
        parts = [f"{cost_nanos},{marker_ttl_ms},{len(self.budgets)},{len(token_rates)},{len(concs)},"]
        parts += [b.settle_fields for b in self.budgets]
        for r in token_rates:
            parts += (r.suffix_field, f"{delta * r.period_ms / r.value!r},")
        parts += [c.suffix_field for c in concs]
        return self.tag, "".join(parts), self.hold_id

    def debit_call(self, now_ms: int, hold_ttl_ms: int, lease_field: str, marker_ttl_ms: int) -> Call:
        return self.tag, "".join([f"{now_ms},{self.hold},{hold_ttl_ms},{marker_ttl_ms},{len(self.budgets)},",
                                  lease_field, *(b.settle_fields for b in self.budgets)]), self.hold_id

    def extend_call(self, expires_ms: int, ttl_ms: int) -> Call:
        zsets = [b.hexp_field for b in self.budgets] + [c.suffix_field for c in self.concs]
        return self.tag, "".join([f"{expires_ms},{ttl_ms},{len(zsets)},", *zsets]), self.hold_id

    def void_call(self, marker_ttl_ms: int) -> Call:
        return self.tag, "".join([f"{marker_ttl_ms},{len(self.budgets)},{len(self.concs)},",
                                  *(b.suffix_field for b in self.budgets), *(c.suffix_field for c in self.concs)]), \
            self.hold_id


def _window(budget: Budget, now: dt.datetime) -> tuple[str, dt.datetime, dt.datetime | None]:
    try:
        return period_window(budget, now)
    except (ValueError, ZoneInfoNotFoundError):
        # The admin API validates zones; a bad one that slipped through is read as UTC rather
        # than leaving the budget unenforced.
        return period_window(msgspec.structs.replace(budget, timezone="UTC"), now)


def _budget_ref(tag: str, b: Budget, now_ms: int) -> BudgetRef:
    period_key, start, end = _window(b, epoch_ms_to_datetime(now_ms))
    suffix = budget_suffix(b.id, period_key)
    expire_at = key_expire_at_ms(end)
    suffix_field = netstring(suffix)
    alerts = "".join(f"{t}," for t in b.alert_at)
    return BudgetRef(b, f"{tag}:{suffix}", period_key, start.isoformat(), expire_at,
                     int(start.timestamp() * 1000) if end is not None else 0,
                     int(end.timestamp() * 1000) if end is not None else _NO_END_MS, suffix_field,
                     f"{suffix_field}{b.limit_nanos},{expire_at},{len(b.alert_at)},{alerts}",
                     f"{suffix_field}{expire_at},", netstring(f"{suffix}:hexp"))


# A limit's rate and concurrency limiters, or the (code, message) refusing every request (a 0).
_LimitRefs = tuple[tuple[RateRef, ...], tuple[ConcRef, ...], tuple[str, str] | None]


def _limit_refs(tag: str, limit: Limit) -> _LimitRefs:
    rates: list[RateRef] = []
    for kind in RATE_KINDS:
        value: int | None = getattr(limit, kind)
        if value is None:
            continue
        if value <= 0:
            what, per = _UNITS[kind]
            return (), (), ("rate_limit_exceeded", f"Rate limit {limit.id} ({_scope(limit)}) allows no {what} per "
                                                   f"{per}.")
        suffix = rate_suffix(limit.id, kind)
        period = RATE_PERIOD_MS[kind]
        rates.append(RateRef(limit, kind, f"{tag}:{suffix}", value, period, kind in ("tpm", "tpd"),
                             netstring(suffix), f"{netstring(suffix)}{period},{value},"))
    concs: tuple[ConcRef, ...] = ()
    if limit.concurrency is not None:
        if limit.concurrency <= 0:
            return (), (), ("concurrency_limit_exceeded",
                            f"Concurrency limit {limit.id} ({_scope(limit)}) allows no calls.")
        suffix = concurrency_suffix(limit.id)
        concs = (ConcRef(limit, f"{tag}:{suffix}", limit.concurrency, netstring(suffix),
                         f"{netstring(suffix)}{limit.concurrency},"),)
    return tuple(rates), concs, None


class PlanCache:
    """What `build_plan` derives from one entity (and, for a budget, its current window), kept
    while the entity object and the window stay the same. Entities are frozen: a changed one is a
    new object, so entries are keyed by object identity (the entry holds the object, so its id is
    not reused while cached). Bounded: cleared whole when it reaches `max_entries`."""

    def __init__(self, max_entries: int = 20_000) -> None:
        self._max = max_entries
        self._budgets: dict[tuple[int, str], BudgetRef] = {}
        self._limits: dict[tuple[int, str], tuple[Limit, _LimitRefs]] = {}

    def budget(self, tag: str, b: Budget, now_ms: int) -> BudgetRef:
        key = (id(b), tag)
        ref = self._budgets.get(key)
        if ref is None or ref.budget is not b or not ref.start_ms <= now_ms < ref.end_ms:
            if len(self._budgets) >= self._max:
                self._budgets.clear()
            ref = self._budgets[key] = _budget_ref(tag, b, now_ms)
        return ref

    def limit(self, tag: str, limit: Limit) -> _LimitRefs:
        key = (id(limit), tag)
        entry = self._limits.get(key)
        if entry is None or entry[0] is not limit:
            if len(self._limits) >= self._max:
                self._limits.clear()
            entry = self._limits[key] = (limit, _limit_refs(tag, limit))
        return entry[1]


def build_plan(req: AdmitRequest, cache: PlanCache | None = None) -> Plan | Admission:
    """The plan of `req`, or a refusal that needs no IO (a limit of 0 admits nothing). Without a
    `cache`, everything is derived afresh (same result)."""
    cache = cache or PlanCache()
    tag = workspace_tag(req.workspace_id)
    budgets = tuple(cache.budget(tag, b, req.now_ms) for b in req.budgets)
    rates: list[RateRef] = []
    concs: list[ConcRef] = []
    for limit in req.limits:
        limit_rates, limit_concs, refusal = cache.limit(tag, limit)
        if refusal is not None:
            return Admission(ok=False, code=refusal[0], mode="none", message=refusal[1])
        rates += limit_rates
        concs += limit_concs
    tokens = max(0, req.tokens)
    return Plan(req.workspace_id, tag, req.request_id, max(0, req.hold_nanos), tokens, req.now_ms, budgets,
                tuple(rates), tuple(tokens if r.per_token else 1 for r in rates), tuple(concs))


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
    tightest: list[tuple[int, int, int] | None] = [None, None]  # requests, tokens: (remaining, limit, reset)
    for r, d, lim in zip(rates, decisions, limits, strict=True):
        best = tightest[r.per_token]
        if best is None or (d.remaining, lim) < best[:2]:
            tightest[r.per_token] = (d.remaining, lim, d.reset_ms)
    headers: dict[str, str] = {}
    for family, best in zip(("requests", "tokens"), tightest, strict=True):
        if best is not None:
            remaining, lim, reset_ms = best
            headers[f"x-ratelimit-limit-{family}"] = str(lim)
            headers[f"x-ratelimit-remaining-{family}"] = str(max(0, remaining))
            headers[f"x-ratelimit-reset-{family}"] = format_reset(reset_ms)
    return headers


def _scope(entity: Budget | Limit) -> str:
    return f"{entity.scope} {entity.scope_id}"


def rate_refusal(r: RateRef, quantity: int, d: Gcra, headers: dict[str, str], *, local: bool) -> Admission:
    what, per = _UNITS[r.kind]
    mode = "local" if local else "redis"
    where = " (this worker's share while the limit store is unreachable)" if local else ""
    if quantity > r.value:
        return Admission(ok=False, code="rate_limit_exceeded", mode=mode, headers=headers,
                         message=f"This request needs {quantity} {what}, more than rate limit {r.limit.id} "
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
