"""What one admission touches, and how its outcome reads. Pure: no IO, no clock.

`build_plan` turns an `AdmitRequest` into a `Plan`: the Redis keys of each budget window, rate
limiter and concurrency limiter on the path, and the arguments of each governor script in their
packed form (`governor_scripts`: one workspace tag, one field string, the hold id). What depends
only on the request's path and its entities (keys, each budget's current window and expiry, the
packed fields) is memoised in a `PlanCache`, so a request builds only its own numbers. The
refusal and header helpers render outcomes for clients: amounts in dollars from integer nano-USD,
reset times the way OpenAI writes them ("20ms", "1.5s", "6m0s").
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
class PathRefs:
    """What `build_plan` derives from one request path (a workspace, its limits and budgets, as
    the tuples the governance stage keeps per path), valid while those tuples and every budget's
    window stay the same (`start_ms <= now < end_ms`)."""

    tag: str
    limits: tuple[Limit, ...]
    budgets: tuple[Budget, ...]
    budget_refs: tuple[BudgetRef, ...]
    rates: tuple[RateRef, ...]
    concs: tuple[ConcRef, ...]
    refusal: tuple[str, str] | None  # (code, message) of a limit that admits nothing
    start_ms: int
    end_ms: int
    counts: str  # ADMIT's "n_budgets,n_rates,n_conc,"
    budget_fields: str  # the budgets' part of ADMIT's fields, joined
    conc_fields: str
    ones: tuple[int, ...]  # the quantities when no rate limiter counts tokens
    per_token: bool  # some rate limiter counts tokens
    rate_values: tuple[int, ...]
    token_rates: tuple[RateRef, ...]  # the rate limiters that count tokens


@dataclass(slots=True)
class Plan:
    """One admission's plan. Not frozen only because it is built on every request (a frozen
    dataclass sets each field through `object.__setattr__`); nothing changes it."""

    workspace_id: str
    hold_id: str
    hold: int
    tokens: int
    now_ms: int
    quantities: tuple[int, ...]  # what each rate limiter is charged
    path: PathRefs

    @property
    def tag(self) -> str:
        return self.path.tag

    @property
    def budgets(self) -> tuple[BudgetRef, ...]:
        return self.path.budget_refs

    @property
    def rates(self) -> tuple[RateRef, ...]:
        return self.path.rates

    @property
    def concs(self) -> tuple[ConcRef, ...]:
        return self.path.concs

    def admit_call(self, hold_ttl_ms: int, lease_field: str) -> Call:
        """`ADMIT`; `lease_field` is this worker's lease hold id as a `netstring`."""
        path = self.path
        parts = [f"{self.now_ms},{self.hold},{hold_ttl_ms},", path.counts, lease_field, path.budget_fields]
        for r, q in zip(path.rates, self.quantities, strict=True):
            parts += (r.admit_fields, f"{q},")
        parts.append(path.conc_fields)
        return path.tag, "".join(parts), self.hold_id

    def settle_call(self, cost_nanos: int, tokens: int, marker_ttl_ms: int, *, redis_charged: bool) -> Call | None:
        """`SETTLE`, or None when there is nothing in Redis to settle. Rate and concurrency
        entries exist in Redis only if the admission was made there (`redis_charged`)."""
        path = self.path
        delta = tokens - self.tokens
        token_rates = path.token_rates if redis_charged and delta else ()
        concs = path.concs if redis_charged else ()
        if not (path.budget_refs or token_rates or concs):
            return None
        parts = [f"{cost_nanos},{marker_ttl_ms},{len(path.budget_refs)},{len(token_rates)},{len(concs)},"]
        parts += [b.settle_fields for b in path.budget_refs]
        for r in token_rates:
            parts += (r.suffix_field, f"{delta * r.period_ms / r.value!r},")
        parts += [c.suffix_field for c in concs]
        return path.tag, "".join(parts), self.hold_id

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
    """What `build_plan` derives from a request path and from each entity on it (for a budget,
    in its current window), kept while they stay the same. Entities and the governance stage's
    per-path tuples are immutable: a change is a new object, so entries are keyed by object
    identity (each entry holds its objects, so their ids are not reused while cached). Bounded:
    each map is cleared whole when it reaches `max_entries`."""

    def __init__(self, max_entries: int = 20_000) -> None:
        self._max = max_entries
        self._paths: dict[tuple[int, int, str], PathRefs] = {}
        self._budgets: dict[tuple[int, str], BudgetRef] = {}
        self._limits: dict[tuple[int, str], tuple[Limit, _LimitRefs]] = {}

    def path(self, workspace_id: str, limits: tuple[Limit, ...], budgets: tuple[Budget, ...], now_ms: int) -> PathRefs:
        key = (id(limits), id(budgets), workspace_id)
        path = self._paths.get(key)
        if (path is None or path.limits is not limits or path.budgets is not budgets
                or not path.start_ms <= now_ms < path.end_ms):
            if len(self._paths) >= self._max:
                self._paths.clear()
            path = self._paths[key] = self._build_path(workspace_id, limits, budgets, now_ms)
        return path

    def _build_path(self, workspace_id: str, limits: tuple[Limit, ...], budgets: tuple[Budget, ...],
                    now_ms: int) -> PathRefs:
        tag = workspace_tag(workspace_id)
        refs = tuple(self._budget(tag, b, now_ms) for b in budgets)
        rates: list[RateRef] = []
        concs: list[ConcRef] = []
        refusal: tuple[str, str] | None = None
        for limit in limits:
            limit_rates, limit_concs, refusal = self._limit(tag, limit)
            if refusal is not None:
                break
            rates += limit_rates
            concs += limit_concs
        return PathRefs(tag, limits, budgets, refs, tuple(rates), tuple(concs), refusal,
                        max((b.start_ms for b in refs), default=0), min((b.end_ms for b in refs), default=_NO_END_MS),
                        f"{len(refs)},{len(rates)},{len(concs)},", "".join(b.admit_fields for b in refs),
                        "".join(c.admit_fields for c in concs), (1,) * len(rates), any(r.per_token for r in rates),
                        tuple(r.value for r in rates), tuple(r for r in rates if r.per_token))

    def _budget(self, tag: str, b: Budget, now_ms: int) -> BudgetRef:
        key = (id(b), tag)
        ref = self._budgets.get(key)
        if ref is None or ref.budget is not b or not ref.start_ms <= now_ms < ref.end_ms:
            if len(self._budgets) >= self._max:
                self._budgets.clear()
            ref = self._budgets[key] = _budget_ref(tag, b, now_ms)
        return ref

    def _limit(self, tag: str, limit: Limit) -> _LimitRefs:
        key = (id(limit), tag)
        entry = self._limits.get(key)
        if entry is None or entry[0] is not limit:
            if len(self._limits) >= self._max:
                self._limits.clear()
            entry = self._limits[key] = (limit, _limit_refs(tag, limit))
        return entry[1]


def build_plan(req: AdmitRequest, cache: PlanCache | None = None) -> Plan | Admission:
    """The plan of `req`, or a refusal that needs no IO (a limit of 0 admits nothing). Without a
    `cache`, everything is derived afresh (same result). Raises ValueError for a workspace id that
    cannot be a Redis hash tag."""
    path = (cache or PlanCache()).path(req.workspace_id, req.limits, req.budgets, req.now_ms)
    if path.refusal is not None:
        return Admission(ok=False, code=path.refusal[0], mode="none", message=path.refusal[1])
    tokens = max(0, req.tokens)
    quantities = tuple([tokens if r.per_token else 1 for r in path.rates]) if path.per_token else path.ones
    return Plan(req.workspace_id, req.request_id, max(0, req.hold_nanos), tokens, req.now_ms, quantities, path)


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


_HEADER_NAMES = tuple((f"x-ratelimit-limit-{family}", f"x-ratelimit-remaining-{family}", f"x-ratelimit-reset-{family}")
                      for family in ("requests", "tokens"))


def rate_headers(rates: Sequence[RateRef], remaining: Sequence[int], reset_ms: Sequence[int],
                 limits: Sequence[int]) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} of the tightest request limiter
    (rpm/rpd) and token limiter (tpm/tpd): the fewest remaining, then the smallest limit.
    `remaining` and `reset_ms` are each limiter's decision (`Gcra`), `limits` the enforced values
    (the local shares in local mode)."""
    tightest = [-1, -1]  # index of the tightest request limiter, token limiter
    for i, r in enumerate(rates):
        j = tightest[r.per_token]
        if j < 0 or (remaining[i], limits[i]) < (remaining[j], limits[j]):
            tightest[r.per_token] = i
    headers: dict[str, str] = {}
    for j, (limit_name, remaining_name, reset_name) in zip(tightest, _HEADER_NAMES, strict=True):
        if j >= 0:
            headers[limit_name] = str(limits[j])
            headers[remaining_name] = str(max(0, remaining[j]))
            headers[reset_name] = format_reset(reset_ms[j])
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
