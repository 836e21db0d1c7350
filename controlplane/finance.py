"""Finance read queries (issue 9): one run, summaries by any dimension and period, top N, cost
spikes, unpriced usage and budget consumption, answered from the finance projection
(`finance_fact`, `run_outcome`; events/finance.py says what each event becomes).

Contracts shared by every query:
* Money is summed in integer nano-units and given twice: `<name>_nanos` (an integer) and
  `<name>_usd` (a decimal string). Only USD facts count towards money (another currency is
  neither converted nor added); counts (requests, errors, tokens) count every fact.
  `cost` = llm + tool + payments out; `margin` = revenue - cost.
* Windows are `[from, to)` on `occurred_at` (ISO-8601; no offset means UTC). A re-pricing is
  dated at the call it priced. Periods (`interval`: hour | day | month) start at UTC boundaries.
* Agents, runs, workflows, members and departments belong to a workspace: rows grouped by them
  also carry `workspace_id` (the same id in two workspaces is two rows). Providers, models and
  custom properties are grouped across the selected workspaces.
* Group columns and interval units come from whitelists (composed with `psycopg.sql`); every
  value a caller gives is a query parameter. Keys sort in byte order (COLLATE "C").
* A bad parameter raises `InvalidRequest` (400) naming it, before any query runs. Read-only.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from controlplane.governance import budget_usage
from events.ledger import bounded
from schemas.entities import Budget
from schemas.errors import InvalidRequest, NotFound
from schemas.money import decimal_to_nanos, nanos_to_decimal_str

COUNTS = ("requests", "errors", "input_tokens", "output_tokens", "unpriced_tokens")
# Amount columns of finance_fact (`<name>_nanos`), and every money field of a result row.
AMOUNTS = ("llm_cost", "tool_cost", "payments_out", "revenue", "cache_savings", "estimated_cost", "refunds_due")
MONEY = ("llm_cost", "tool_cost", "payments_out", "cost", "revenue", "margin", "cache_savings", "estimated_cost",
         "refunds_due")
METRIC_COLUMNS = (*COUNTS, *(f"{m}_usd" for m in MONEY), *(f"{m}_nanos" for m in MONEY))

# group_by -> the finance_fact columns that key a row (workspace-scoped ids carry the workspace).
GROUPS: dict[str, tuple[str, ...]] = {
    "workspace": ("workspace_id",),
    "agent": ("workspace_id", "agent_id"),
    "run": ("workspace_id", "run_id"),
    "workflow": ("workspace_id", "workflow_id"),
    "member": ("workspace_id", "member_id"),
    "department": ("workspace_id", "department_id"),
    "provider": ("provider",),
    "model": ("provider", "model"),
    "prompt": ("workspace_id", "prompt_id", "prompt_version"),
}
_NUMERIC_KEYS = frozenset({"prompt_version"})  # key columns that sort as numbers (no collation)
PROPERTY_PREFIX = "property:"
INTERVALS = ("hour", "day", "month")
TOP_BY = ("run", "agent", "workflow")
TOP_METRICS = ("cost", "revenue", "margin")
FORMATS = ("json", "csv")

_USD = sql.SQL("currency = 'USD'")
_COST = sql.SQL("coalesce(sum(llm_cost_nanos + tool_cost_nanos + payments_out_nanos) FILTER (WHERE {usd}), 0)").format(
    usd=_USD)
_REVENUE = sql.SQL("coalesce(sum(revenue_nanos) FILTER (WHERE {usd}), 0)").format(usd=_USD)
_METRIC_SQL = {"cost": _COST, "revenue": _REVENUE, "margin": sql.SQL("{r} - {c}").format(r=_REVENUE, c=_COST)}


def aggregates() -> sql.Composable:
    """The SELECT list of sums every result row is built from (`metric_fields`)."""
    parts = [sql.SQL("coalesce(sum({c}), 0) AS {c}").format(c=sql.Identifier(c)) for c in COUNTS]
    parts += [sql.SQL("coalesce(sum({c}) FILTER (WHERE {usd}), 0) AS {c}").format(c=sql.Identifier(f"{a}_nanos"),
                                                                                 usd=_USD) for a in AMOUNTS]
    return sql.SQL(", ").join(parts)


def metric_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """Counts, then each money field as decimal USD, then as integer nanos (METRIC_COLUMNS)."""
    nanos = {a: int(row[f"{a}_nanos"]) for a in AMOUNTS}
    nanos["cost"] = nanos["llm_cost"] + nanos["tool_cost"] + nanos["payments_out"]
    nanos["margin"] = nanos["revenue"] - nanos["cost"]
    out: dict[str, Any] = {c: int(row[c]) for c in COUNTS}
    out |= {f"{m}_usd": nanos_to_decimal_str(nanos[m]) for m in MONEY}
    out |= {f"{m}_nanos": nanos[m] for m in MONEY}
    return out


# -- parameters (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Window:
    """`[start, end)` on occurred_at; None = unbounded on that side."""

    start: dt.datetime | None = None
    end: dt.datetime | None = None

    def meta(self) -> dict[str, Any]:
        return {"from": _iso(self.start), "to": _iso(self.end)}


class Params:
    """The query string of one finance request: each getter validates one parameter (400 naming
    it); `finish()` refuses parameters nothing read, so a typo is an error, not ignored."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self._read: set[str] = {"format"}

    def text(self, name: str) -> str | None:
        self._read.add(name)
        value = self._values.get(name)
        return value if value else None

    def choice(self, name: str, choices: tuple[str, ...], default: str | None) -> str | None:
        value = self.text(name)
        if value is None:
            return default
        if value not in choices:
            raise InvalidRequest(f"'{name}' must be one of {', '.join(choices)}; got '{value}'.", param=name,
                                 code="invalid_value")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            number = lo - 1
        if not lo <= number <= hi:
            raise InvalidRequest(f"'{name}' must be an integer from {lo} to {hi}; got '{value}'.", param=name,
                                 code="invalid_value")
        return number

    def decimal(self, name: str, default: Decimal, lo: Decimal, hi: Decimal) -> Decimal:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = Decimal(value)
        except InvalidOperation:
            number = Decimal("NaN")
        if not number.is_finite() or not lo <= number <= hi:
            raise InvalidRequest(f"'{name}' must be a decimal number from {lo} to {hi}; got '{value}'.", param=name,
                                 code="invalid_value")
        return number

    def instant(self, name: str) -> dt.datetime | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            hint = " (a '+' in a query string reads as a space: write it %2B, or use Z)" if " " in value else ""
            raise InvalidRequest(f"'{name}' must be an ISO-8601 date or time, e.g. 2026-01-31 or "
                                 f"2026-01-31T12:00:00Z; got '{value}'{hint}.", param=name,
                                 code="invalid_value") from None
        return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)

    def window(self) -> Window:
        start, end = self.instant("from"), self.instant("to")
        if start is not None and end is not None and start >= end:
            raise InvalidRequest("'from' must be before 'to' (the window is [from, to)).", param="from",
                                 code="invalid_value")
        return Window(start, end)

    def finish(self) -> None:
        unknown = sorted(set(self._values) - self._read)
        if unknown:
            raise InvalidRequest(f"Unknown query parameter '{unknown[0]}'. This route takes: "
                                 f"{', '.join(sorted(self._read))}.", param=unknown[0], code="unknown_parameter")


def output_format(values: Mapping[str, str]) -> str:
    """`json` (default) or `csv`, from `?format=`."""
    return Params(values).choice("format", FORMATS, "json") or "json"


@dataclass(frozen=True, slots=True)
class SummaryQuery:
    group_by: str
    workspace_id: str | None = None
    window: Window = Window()
    interval: str | None = None
    limit: int = 1000

    @property
    def keys(self) -> tuple[str, ...]:
        return GROUPS.get(self.group_by, ())

    @property
    def property_name(self) -> str | None:
        return self.group_by.removeprefix(PROPERTY_PREFIX) if self.group_by.startswith(PROPERTY_PREFIX) else None


def parse_summary(values: Mapping[str, str]) -> SummaryQuery:
    p = Params(values)
    group_by = p.text("group_by") or "workspace"
    if group_by not in GROUPS and not (group_by.startswith(PROPERTY_PREFIX) and len(group_by) > len(PROPERTY_PREFIX)):
        raise InvalidRequest(f"'group_by' must be one of {', '.join(GROUPS)} or property:<name>; got '{group_by}'.",
                             param="group_by", code="invalid_value")
    q = SummaryQuery(group_by, p.text("workspace_id"), p.window(), p.choice("interval", INTERVALS, None),
                     p.integer("limit", 1000, 1, 100_000))
    p.finish()
    return q


@dataclass(frozen=True, slots=True)
class TopQuery:
    by: str = "run"
    metric: str = "cost"
    descending: bool = True
    limit: int = 10
    workspace_id: str | None = None
    window: Window = Window()


def parse_top(values: Mapping[str, str]) -> TopQuery:
    p = Params(values)
    q = TopQuery(p.choice("by", TOP_BY, "run") or "run", p.choice("metric", TOP_METRICS, "cost") or "cost",
                 p.choice("order", ("desc", "asc"), "desc") == "desc", p.integer("limit", 10, 1, 1000),
                 p.text("workspace_id"), p.window())
    p.finish()
    return q


@dataclass(frozen=True, slots=True)
class SpikeQuery:
    factor: Decimal = Decimal(3)
    min_runs: int = 5
    limit: int = 100
    workspace_id: str | None = None
    window: Window = Window()


def parse_spikes(values: Mapping[str, str]) -> SpikeQuery:
    p = Params(values)
    q = SpikeQuery(p.decimal("factor", Decimal(3), Decimal(1), Decimal(10**6)), p.integer("min_runs", 5, 1, 10**6),
                   p.integer("limit", 100, 1, 10_000), p.text("workspace_id"), p.window())
    p.finish()
    return q


# -- results ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """A query's rows (dicts whose keys are `columns`, in order) and what was asked (`meta`)."""

    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"object": "list", **self.meta, "columns": list(self.columns), "data": self.rows}

    def to_csv(self) -> str:
        """RFC 4180 with a header row; null is an empty cell, booleans true/false, objects JSON."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow([_cell(row.get(c)) for c in self.columns])
        return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return msgspec.json.encode(value).decode()
    return str(value)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat()


def _filters(workspace_id: str | None, window: Window, *extra: sql.Composable) -> tuple[sql.Composable,
                                                                                       dict[str, Any]]:
    conds: list[sql.Composable] = [sql.SQL("TRUE"), *extra]
    params: dict[str, Any] = {}
    if workspace_id is not None:
        conds.append(sql.SQL("workspace_id = %(ws)s"))
        params["ws"] = workspace_id
    if window.start is not None:
        conds.append(sql.SQL("occurred_at >= %(from)s"))
        params["from"] = window.start
    if window.end is not None:
        conds.append(sql.SQL("occurred_at < %(to)s"))
        params["to"] = window.end
    return sql.SQL(" AND ").join(conds), params


async def _fetch(pool: AsyncConnectionPool[Any], query: sql.Composable,
                 params: Mapping[str, Any]) -> list[dict[str, Any]]:
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        rows: list[dict[str, Any]] = await cur.fetchall()
        return rows


def _collated(names: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL('{} COLLATE "C"' if n not in _NUMERIC_KEYS else "{}").format(sql.Identifier(n))
                              for n in names)


# -- sources: the facts, or a rollup when it gives the same sums ----------------------------------

FACTS = "finance_fact"
# Rollups (events/migrations/0012): the table, its bucket, and the key columns it keeps.
DAILY = ("finance_daily", "day", frozenset({"workspace_id", "agent_id", "provider"}))
HOURLY = ("finance_hourly", "hour", frozenset({"workspace_id", "agent_id", "provider"}))
RUN_DAY = ("finance_run_day", "day", frozenset({"workspace_id", "run_id", "agent_id"}))


def _aligned(value: dt.datetime | None, grain: str) -> bool:
    if value is None:
        return True
    value = value.astimezone(dt.UTC)
    if value.minute or value.second or value.microsecond:
        return False
    return grain == "hour" or value.hour == 0


def source(window: Window, keys: frozenset[str], *rollups: tuple[str, str, frozenset[str]],
           interval: str | None = None) -> str:
    """The first of `rollups` that keeps every key column, whose buckets the window's bounds fall
    on, and no coarser than `interval` (so its sums are exactly the facts'), else the facts."""
    for table, grain, kept in rollups:
        if interval == "hour" and grain != "hour":
            continue
        if keys <= kept and _aligned(window.start, grain) and _aligned(window.end, grain):
            return table
    return FACTS


# -- summary ---------------------------------------------------------------------------------------

def summary_sql(q: SummaryQuery) -> tuple[sql.Composable, dict[str, Any]]:
    """The statement `summary` runs (it fetches `limit + 1` rows to tell `has_more`)."""
    prop = q.property_name
    key_names = ("group_value",) if prop is not None else q.keys
    select: list[sql.Composable] = (
        [sql.SQL("properties ->> %(prop)s AS group_value")] if prop is not None
        else [sql.Identifier(k) for k in q.keys])
    if q.interval is not None:
        select.append(sql.SQL("date_trunc({}, occurred_at, 'UTC') AS period_start").format(sql.Literal(q.interval)))
    where, params = _filters(q.workspace_id, q.window)
    params |= {"limit": q.limit + 1} | ({"prop": prop} if prop is not None else {})
    group_by = sql.SQL(", ").join(sql.Literal(i + 1) for i in range(len(select)))
    order: list[sql.Composable] = [sql.SQL("period_start")] if q.interval is not None else []
    order += [sql.SQL("llm_cost_nanos + tool_cost_nanos + payments_out_nanos DESC"), _collated(key_names)]
    table = FACTS if prop is not None else source(q.window, frozenset(q.keys), DAILY, HOURLY, interval=q.interval)
    query = sql.SQL("SELECT * FROM (SELECT {select}, {aggs} FROM {table} WHERE {where} GROUP BY {group_by}) g "
                    "ORDER BY {order} LIMIT %(limit)s").format(
        select=sql.SQL(", ").join(select), aggs=aggregates(), table=sql.Identifier(table), where=where,
        group_by=group_by, order=sql.SQL(", ").join(order))
    return query, params


async def summary(pool: AsyncConnectionPool[Any], q: SummaryQuery) -> Table:
    """One row per group (and period, with an interval): `group` (the group's value; for `model`
    "provider/model"), the key columns, `period_start`, then METRIC_COLUMNS. Ordered by period,
    then total cost (highest first), then key. At most `limit` rows (`has_more` says if cut)."""
    prop = q.property_name
    rows = await _fetch(pool, *summary_sql(q))
    out = []
    for r in rows[: q.limit]:
        row: dict[str, Any] = {"group": _group_value(q, r)}
        if prop is None:
            row |= {k: r[k] for k in q.keys}
        if q.interval is not None:
            row["period_start"] = _iso(r["period_start"])
        out.append(row | metric_fields(r))
    columns = ("group", *(() if prop is not None else q.keys), *(("period_start",) if q.interval else ()),
               *METRIC_COLUMNS)
    meta = {"group_by": q.group_by, "interval": q.interval, "workspace_id": q.workspace_id, **q.window.meta(),
            "has_more": len(rows) > q.limit}
    return Table(columns, out, meta)


def _group_value(q: SummaryQuery, r: Mapping[str, Any]) -> str | None:
    if q.property_name is not None:
        return r["group_value"]  # type: ignore[no-any-return]
    if q.group_by == "model":
        return None if r["model"] is None else f"{r['provider']}/{r['model']}"
    if q.group_by == "prompt":
        return None if r["prompt_id"] is None else f"{r['prompt_id']}@v{r['prompt_version']}"
    return r[q.keys[-1]]  # type: ignore[no-any-return]


# -- top N -----------------------------------------------------------------------------------------

def top_sql(q: TopQuery) -> tuple[sql.Composable, dict[str, Any]]:
    column = f"{q.by}_id"
    keys = ("workspace_id", column)
    where, params = _filters(q.workspace_id, q.window, sql.SQL("{} IS NOT NULL").format(sql.Identifier(column)))
    params["limit"] = q.limit
    table = source(q.window, frozenset(keys), DAILY, HOURLY, RUN_DAY)
    query = sql.SQL("SELECT workspace_id, {col}, {aggs} FROM {table} WHERE {where} GROUP BY 1, 2 "
                    "ORDER BY {metric} {direction}, {keys} LIMIT %(limit)s").format(
        col=sql.Identifier(column), aggs=aggregates(), table=sql.Identifier(table), where=where,
        metric=_METRIC_SQL[q.metric],
        direction=sql.SQL("DESC" if q.descending else "ASC"), keys=_collated(keys))
    return query, params


async def top(pool: AsyncConnectionPool[Any], q: TopQuery) -> Table:
    """The `limit` runs, agents or workflows (with their workspace) with the highest (or, with
    `order=asc`, lowest) cost, revenue or margin in the window; rows are `rank`, the keys, then
    METRIC_COLUMNS. Ties go to the smaller key."""
    column = f"{q.by}_id"
    keys = ("workspace_id", column)
    rows = await _fetch(pool, *top_sql(q))
    out = [{"rank": i + 1, "workspace_id": r["workspace_id"], column: r[column]} | metric_fields(r)
           for i, r in enumerate(rows)]
    meta = {"by": q.by, "metric": q.metric, "order": "desc" if q.descending else "asc", "limit": q.limit,
            "workspace_id": q.workspace_id, **q.window.meta()}
    return Table(("rank", *keys, *METRIC_COLUMNS), out, meta)


# -- spikes ----------------------------------------------------------------------------------------

# Per (workspace, agent, run): the run's total cost in the window. The baseline of a run is the
# median cost of the same agent's OTHER runs in the window (leave-one-out, so a spike does not
# raise its own bar), defined only when there are at least `min_runs` of them. In the agent's
# costs sorted ascending (c_1..c_n, the run at position `pos`), the median of the m = n - 1
# others is the mean of their positions lo = (m+1)/2 and hi = m/2 + 1, which are the sorted
# positions k (k < pos) or k + 1 (k >= pos): four positions per agent whatever its size, so one
# sort and one aggregate, no per-run array.
_SPIKES = """
WITH runs AS (
    SELECT workspace_id, agent_id, run_id, {cost} AS cost, min({first}) AS first_at, max({last}) AS last_at
    FROM {table} WHERE {where} GROUP BY 1, 2, 3
), ranked AS (
    SELECT runs.*,
           row_number() OVER (PARTITION BY workspace_id, agent_id ORDER BY cost, run_id COLLATE "C") AS pos,
           count(*) OVER (PARTITION BY workspace_id, agent_id) - 1 AS others
    FROM runs
), agents AS (
    SELECT workspace_id, agent_id,
           max(cost) FILTER (WHERE pos = (others + 1) / 2) AS lo0,
           max(cost) FILTER (WHERE pos = (others + 1) / 2 + 1) AS lo1,
           max(cost) FILTER (WHERE pos = others / 2 + 1) AS hi0,
           max(cost) FILTER (WHERE pos = others / 2 + 2) AS hi1
    FROM ranked WHERE others >= %(min_runs)s GROUP BY 1, 2
), based AS (
    SELECT r.*, (CASE WHEN (r.others + 1) / 2 < r.pos THEN a.lo0 ELSE a.lo1 END
                 + CASE WHEN r.others / 2 + 1 < r.pos THEN a.hi0 ELSE a.hi1 END) / 2.0 AS baseline
    FROM ranked r JOIN agents a USING (workspace_id, agent_id)
)
SELECT workspace_id, agent_id, run_id, cost, baseline, round(cost / baseline, 2) AS ratio, others, first_at, last_at
FROM based WHERE baseline > 0 AND cost > %(factor)s * baseline
ORDER BY cost / baseline DESC, workspace_id COLLATE "C", agent_id COLLATE "C", run_id COLLATE "C"
LIMIT %(limit)s
"""


def spikes_sql(q: SpikeQuery) -> tuple[sql.Composable, dict[str, Any]]:
    where, params = _filters(q.workspace_id, q.window, sql.SQL("run_id IS NOT NULL AND agent_id IS NOT NULL"))
    params |= {"min_runs": q.min_runs, "factor": q.factor, "limit": q.limit}
    table = source(q.window, frozenset({"workspace_id", "agent_id", "run_id"}), RUN_DAY)
    first, last = ("first_at", "last_at") if table != FACTS else ("occurred_at", "occurred_at")
    return sql.SQL(_SPIKES).format(cost=_COST, where=where, table=sql.Identifier(table),
                                   first=sql.Identifier(first), last=sql.Identifier(last)), params


async def spikes(pool: AsyncConnectionPool[Any], q: SpikeQuery) -> Table:
    """Runs whose total cost (USD) is more than `factor` times their agent's baseline: the median
    cost of that agent's other runs in the same window, when it has at least `min_runs` others
    (a run with several agents counts once per agent, with that agent's share). Rows: workspace,
    agent, run, `cost_*`, `baseline_*` (nanos rounded half up), `ratio` (cost / baseline, 2
    decimals, a string), `baseline_runs`, first and last event; highest ratio first."""
    rows = await _fetch(pool, *spikes_sql(q))
    out = []
    for r in rows:
        cost, baseline = int(r["cost"]), int(Decimal(r["baseline"]).to_integral_value("ROUND_HALF_UP"))
        out.append({"workspace_id": r["workspace_id"], "agent_id": r["agent_id"], "run_id": r["run_id"],
                    "cost_usd": nanos_to_decimal_str(cost), "cost_nanos": cost,
                    "baseline_usd": nanos_to_decimal_str(baseline), "baseline_nanos": baseline,
                    "ratio": str(r["ratio"]), "baseline_runs": int(r["others"]),
                    "first_at": _iso(r["first_at"]), "last_at": _iso(r["last_at"])})
    meta = {"factor": str(q.factor), "min_runs": q.min_runs, "workspace_id": q.workspace_id, **q.window.meta(),
            "baseline": "median cost of the agent's other runs in the window"}
    columns = ("workspace_id", "agent_id", "run_id", "cost_usd", "cost_nanos", "baseline_usd", "baseline_nanos",
               "ratio", "baseline_runs", "first_at", "last_at")
    return Table(columns, out, meta)


# -- unpriced usage --------------------------------------------------------------------------------

def unpriced_sql(workspace_id: str | None, window: Window) -> tuple[sql.Composable, dict[str, Any]]:
    where, params = _filters(workspace_id, window, sql.SQL("unpriced_tokens <> 0"))
    query = sql.SQL(
        "SELECT provider, model, sum(unpriced_tokens) AS unpriced_tokens, "
        "count(*) FILTER (WHERE kind = 'llm') - count(*) FILTER (WHERE kind = 'repriced') AS unpriced_calls, "
        "count(DISTINCT workspace_id) AS workspaces, min(occurred_at) FILTER (WHERE kind = 'llm') AS first_at, "
        "max(occurred_at) FILTER (WHERE kind = 'llm') AS last_at "
        "FROM finance_fact WHERE {where} GROUP BY 1, 2 HAVING sum(unpriced_tokens) <> 0 "
        'ORDER BY 3 DESC, provider COLLATE "C", model COLLATE "C"').format(where=where)
    return query, params


async def unpriced(pool: AsyncConnectionPool[Any], workspace_id: str | None, window: Window) -> Table:
    """Per provider and model, the tokens of calls no price covered and not re-priced since
    (`unpriced_tokens`), how many such calls (`unpriced_calls`), in how many workspaces, and the
    first and last of them; most tokens first. Reads the partial index on unpriced rows."""
    rows = await _fetch(pool, *unpriced_sql(workspace_id, window))
    out = [{"provider": r["provider"], "model": r["model"], "unpriced_tokens": int(r["unpriced_tokens"]),
            "unpriced_calls": int(r["unpriced_calls"]), "workspaces": int(r["workspaces"]),
            "first_at": _iso(r["first_at"]), "last_at": _iso(r["last_at"])} for r in rows]
    columns = ("provider", "model", "unpriced_tokens", "unpriced_calls", "workspaces", "first_at", "last_at")
    return Table(columns, out, {"workspace_id": workspace_id, **window.meta()})


# -- budgets ---------------------------------------------------------------------------------------

async def budgets(pool: AsyncConnectionPool[Any], redis: Redis | None, workspace_id: str | None,
                  now: dt.datetime) -> Table:
    """Each live budget (of a workspace, or all) with its current period's consumption from the
    budget store (`controlplane.governance.budget_usage`: null amounts and `budget_store:
    unavailable` when Redis is down) and `used_pct` = (spent + held) / limit, 1 decimal."""
    rows = await _fetch(pool, sql.SQL(
        "SELECT body FROM config_entity WHERE kind = 'budget' AND deleted_at IS NULL "
        "AND (%(ws)s::text IS NULL OR workspace_id = %(ws)s) ORDER BY created_at, id"), {"ws": workspace_id})
    out = []
    for r in rows:
        budget = msgspec.convert(r["body"], Budget)
        usage = await budget_usage(redis, budget, now)
        used = None
        if usage["spent_usd"] is not None and budget.limit_nanos > 0:
            consumed = decimal_to_nanos(Decimal(usage["spent_usd"]) + Decimal(usage["held_usd"]))
            used = str((Decimal(consumed * 100) / budget.limit_nanos).quantize(Decimal("0.1")))
        out.append({"id": budget.id, "workspace_id": budget.workspace_id, "scope": budget.scope,
                    "scope_id": budget.scope_id, "period": budget.period,
                    "limit_usd": nanos_to_decimal_str(budget.limit_nanos), "limit_nanos": budget.limit_nanos,
                    "spent_usd": usage["spent_usd"], "held_usd": usage["held_usd"],
                    "remaining_usd": usage["remaining_usd"], "used_pct": used,
                    "period_start": usage.get("period_start"), "period_end": usage.get("period_end"),
                    "budget_store": usage["budget_store"]})
    columns = ("id", "workspace_id", "scope", "scope_id", "period", "limit_usd", "limit_nanos", "spent_usd",
               "held_usd", "remaining_usd", "used_pct", "period_start", "period_end", "budget_store")
    return Table(columns, out, {"workspace_id": workspace_id})


# -- one run ---------------------------------------------------------------------------------------

def run_sql(run_id: str, workspace_id: str | None) -> tuple[sql.Composable, sql.Composable, dict[str, Any]]:
    """The two statements of `run_detail` (facts, outcome) and their parameters."""
    params = {"run": bounded(run_id), "ws": workspace_id}  # the run id as the projection stored it
    facts = sql.SQL(
        "SELECT count(DISTINCT workspace_id) AS workspaces, {aggs}, min(occurred_at) AS first_at, "
        "max(occurred_at) AS last_at, coalesce(array_agg(DISTINCT agent_id) FILTER (WHERE agent_id IS NOT NULL), "
        "'{{}}') AS agents FROM finance_fact WHERE run_id = %(run)s "
        "AND (%(ws)s::text IS NULL OR workspace_id = %(ws)s)").format(aggs=aggregates())
    outcome = sql.SQL(
        "SELECT outcome, metadata, completed_at FROM run_outcome WHERE run_id = %(run)s "
        "AND (%(ws)s::text IS NULL OR workspace_id = %(ws)s) ORDER BY completed_at DESC, event_id DESC LIMIT 1")
    return facts, outcome, params


async def run_detail(pool: AsyncConnectionPool[Any], run_id: str, workspace_id: str | None) -> dict[str, Any]:
    """Totals of one run (in one workspace, or summed over every workspace that has it): counts,
    money (METRIC_COLUMNS; `cost_*` is the total), its agents, first and last event, and
    `outcome` (the latest `run.completed`: outcome, metadata, completed_at; null if none). A run
    exists from its first event of any kind; 404 `run_not_found` before that."""
    facts_sql, outcome_sql, params = run_sql(run_id, workspace_id)
    facts = await _fetch(pool, facts_sql, params)
    outcome = await _fetch(pool, outcome_sql, params)
    row = facts[0]
    if row["workspaces"] == 0 and not outcome:
        raise NotFound(f"No events recorded for run '{run_id}' yet.", code="run_not_found")
    fields = metric_fields(row)
    return {"run_id": run_id, **fields, "agents": sorted(row["agents"]),
            "first_at": _iso(row["first_at"]), "last_at": _iso(row["last_at"]),
            "outcome": None if not outcome else {"outcome": outcome[0]["outcome"],
                                                 "metadata": outcome[0]["metadata"],
                                                 "completed_at": _iso(outcome[0]["completed_at"])}}


# -- the routes' entry points: (pool, redis, query string, now) -> Table ------------------------------

Query = Callable[[AsyncConnectionPool[Any], "Redis | None", Mapping[str, str], dt.datetime], Awaitable[Table]]


async def _summary(pool: AsyncConnectionPool[Any], redis: Redis | None, values: Mapping[str, str],
                   now: dt.datetime) -> Table:
    return await summary(pool, parse_summary(values))


async def _top(pool: AsyncConnectionPool[Any], redis: Redis | None, values: Mapping[str, str],
               now: dt.datetime) -> Table:
    return await top(pool, parse_top(values))


async def _spikes(pool: AsyncConnectionPool[Any], redis: Redis | None, values: Mapping[str, str],
                  now: dt.datetime) -> Table:
    return await spikes(pool, parse_spikes(values))


async def _unpriced(pool: AsyncConnectionPool[Any], redis: Redis | None, values: Mapping[str, str],
                    now: dt.datetime) -> Table:
    p = Params(values)
    ws, window = p.text("workspace_id"), p.window()
    p.finish()
    return await unpriced(pool, ws, window)


async def _budgets(pool: AsyncConnectionPool[Any], redis: Redis | None, values: Mapping[str, str],
                   now: dt.datetime) -> Table:
    p = Params(values)
    ws = p.text("workspace_id")
    p.finish()
    return await budgets(pool, redis, ws, now)


QUERIES: dict[str, Query] = {"summary": _summary, "top": _top, "spikes": _spikes, "unpriced": _unpriced,
                             "budgets": _budgets}
