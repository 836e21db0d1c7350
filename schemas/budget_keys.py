"""Where governance state lives in Redis, and which calendar window a budget is in. Pure.

Shared by the data plane (`dataplane.governor`, which writes these keys) and the control plane
(`controlplane.budget_state`, which reads and reconciles them), so neither imports the other.

Every key of a workspace carries the hash tag `{<workspace_id>}`: in Redis Cluster all of a
workspace's keys live in one slot, so one script may touch all the limits and budgets on a
request's path. Every key is `workspace_tag(ws) + ":" + <suffix>`; the governor's scripts get the
tag as their one declared key and build the other names from it and the suffixes below
(`budget_suffix`, `rate_suffix`, `concurrency_suffix`, the `BudgetKeys` field names), so every
key a script touches is in its declared key's slot. Layout (`<ws>` = workspace id,
`<pk>` = `period_window(...)[0]`):

    gov:{<ws>}:b:<budget_id>:<pk>:spent    STRING  settled spend, integer nano-USD
    gov:{<ws>}:b:<budget_id>:<pk>:holds    HASH    hold_id -> nanos (requests and worker leases)
    gov:{<ws>}:b:<budget_id>:<pk>:hexp     ZSET    hold_id -> expiry, epoch ms
    gov:{<ws>}:b:<budget_id>:<pk>:held     STRING  sum of the values in `holds` (kept by the scripts)
    gov:{<ws>}:b:<budget_id>:<pk>:leases   SET     hold ids in `holds` that are worker leases
    gov:{<ws>}:b:<budget_id>:<pk>:alerts   SET     alert thresholds (percent) already reported
    gov:{<ws>}:l:<limit_id>:<rpm|rpd|tpm|tpd>  STRING  GCRA theoretical arrival time, epoch ms
    gov:{<ws>}:l:<limit_id>:conc           ZSET    request_id -> expiry, epoch ms
    gov:{<ws>}:esc:<escalation_id>         STRING  set once: the escalation was used
    gov:{<ws>}:op:<op_id>                  STRING  a settlement already applied (idempotency marker)

A worker's lease is a hold whose id is `lease:<worker_id>` (`LEASE_PREFIX`). Budget keys expire
at the end of their window plus `KEY_GRACE` (a `total` budget's never expire).
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple
from zoneinfo import ZoneInfo

from schemas.entities import Budget

LEASE_PREFIX = "lease:"
# Budget keys outlive their window by this much: late settlements of calls that started before
# the boundary still land in the right period, and the reconciler can still compare it.
KEY_GRACE = dt.timedelta(days=2)
# The start reported for a `total` budget (it has no calendar window).
TOTAL_START = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

RateKind = str  # one of RATE_KINDS
RATE_KINDS: tuple[str, ...] = ("rpm", "rpd", "tpm", "tpd")
# Length of each rate limit's period, in ms.
RATE_PERIOD_MS: dict[str, int] = {"rpm": 60_000, "rpd": 86_400_000, "tpm": 60_000, "tpd": 86_400_000}


class BudgetKeys(NamedTuple):
    """The keys of one budget in one period (all in the workspace's slot)."""

    spent: str
    holds: str
    hexp: str
    held: str
    leases: str
    alerts: str


def workspace_tag(workspace_id: str) -> str:
    """`gov:{<workspace_id>}`: the start of every key of the workspace. Raises ValueError for an
    id that cannot be a hash tag."""
    if not workspace_id or "{" in workspace_id or "}" in workspace_id:
        # A brace would end the hash tag early and scatter the workspace over slots.
        raise ValueError(f"workspace id {workspace_id!r} cannot be a Redis hash tag")
    return f"gov:{{{workspace_id}}}"


def budget_suffix(budget_id: str, period_key: str) -> str:
    """The budget window's prefix after the tag; its keys add `:<BudgetKeys field>`."""
    return f"b:{budget_id}:{period_key}"


def rate_suffix(limit_id: str, kind: RateKind) -> str:
    if kind not in RATE_PERIOD_MS:
        raise ValueError(f"unknown rate kind {kind!r}")
    return f"l:{limit_id}:{kind}"


def concurrency_suffix(limit_id: str) -> str:
    return f"l:{limit_id}:conc"


def budget_prefix(workspace_id: str, budget_id: str, period_key: str) -> str:
    return f"{workspace_tag(workspace_id)}:{budget_suffix(budget_id, period_key)}"


def budget_keys(workspace_id: str, budget_id: str, period_key: str) -> BudgetKeys:
    p = budget_prefix(workspace_id, budget_id, period_key)
    return BudgetKeys(*(f"{p}:{name}" for name in BudgetKeys._fields))


def rate_key(workspace_id: str, limit_id: str, kind: RateKind) -> str:
    return f"{workspace_tag(workspace_id)}:{rate_suffix(limit_id, kind)}"


def concurrency_key(workspace_id: str, limit_id: str) -> str:
    return f"{workspace_tag(workspace_id)}:{concurrency_suffix(limit_id)}"


def escalation_key(workspace_id: str, escalation_id: str) -> str:
    return f"{workspace_tag(workspace_id)}:esc:{escalation_id}"


def op_marker_key(workspace_id: str, op_id: str) -> str:
    """`op_id` is `<kind>:<hold id>` (kind `s` settle, `d` debit, `v` void: the scripts build
    the same name from the tag and the hold id)."""
    return f"{workspace_tag(workspace_id)}:op:{op_id}"


def lease_hold_id(worker_id: str) -> str:
    return f"{LEASE_PREFIX}{worker_id}"


def _midnight(day: dt.date, tz: ZoneInfo) -> dt.datetime:
    # fold=0: where midnight does not exist (a DST gap at 00:00) this names the first instant of
    # the day; where it repeats, the first of the two.
    return dt.datetime(day.year, day.month, day.day, tzinfo=tz)


def period_window(budget: Budget, now: dt.datetime) -> tuple[str, dt.datetime, dt.datetime | None]:
    """`(period_key, start, end)` of the window of `budget` that contains `now` (timezone-aware).

    Windows are calendar periods in `budget.timezone` (an IANA name): `day` from local midnight
    to the next, `week` from Monday's midnight (ISO weeks), `month` from the 1st; `start` and
    `end` are aware datetimes in that zone, `end` exclusive. A day is 23 or 25 hours long across
    a DST change. `total` has one window: key `"total"`, start `TOTAL_START`, end None.
    Raises ValueError for a naive `now` and ZoneInfoNotFoundError for an unknown zone.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("period_window needs a timezone-aware `now`")
    if budget.period == "total":
        return "total", TOTAL_START, None
    tz = ZoneInfo(budget.timezone)
    today = now.astimezone(tz).date()
    if budget.period == "day":
        first, after = today, today + dt.timedelta(days=1)
        key = first.isoformat()
    elif budget.period == "week":
        first = today - dt.timedelta(days=today.weekday())
        after = first + dt.timedelta(days=7)
        iso = first.isocalendar()
        key = f"{iso.year}-W{iso.week:02d}"
    else:
        first = today.replace(day=1)
        after = (first + dt.timedelta(days=32)).replace(day=1)
        key = f"{first.year:04d}-{first.month:02d}"
    return key, _midnight(first, tz), _midnight(after, tz)


def key_expire_at_ms(end: dt.datetime | None) -> int:
    """Epoch ms at which a window's keys may go (its end plus `KEY_GRACE`); 0 means never."""
    if end is None:
        return 0
    return int((end + KEY_GRACE).timestamp() * 1000)


def epoch_ms_to_datetime(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
