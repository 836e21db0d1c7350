"""The console's Runs pages: a searchable, paged list of a workspace's agent runs, one run's totals
and timeline, and a model call's archived bodies.

* `GET /console/runs` lists runs with spend in a window (`from`/`to`: dates, UTC, both included;
  the last DEFAULT_DAYS by default), newest activity first, PER_PAGE a page (`?per=` up to
  MAX_PER; `?page=` from 1). Filters: `q` (a run id substring), `agent` and `workflow` (exact
  ids: runs in which that agent or workflow took part, with the whole run's totals). Numbers come
  from `finance_fact` through the finance API's own aggregation (`finance.aggregates`,
  `finance.metric_fields`): a row's money is the run's facts in the window, as
  `GET /admin/v1/finance/summary?group_by=run` with the same window sums them. The query is two
  steps so it stays fast on a large workspace: rank the matching runs by their last fact (one
  `max` per run over the workspace's window, `finance_fact_ws_time` or `finance_fact_agent`),
  then sum every metric for the page's runs only (`finance_fact_run`).
* `GET /console/runs/{run_id}` shows `queries.run_summary` (what `GET /admin/v1/runs/{id}` answers)
  and `timeline.timeline` (what `GET /admin/v1/runs/{id}/timeline` answers), at most
  TIMELINE_LIMIT items. An unknown run is a 404 page.
* `GET /console/requests/{request_id}/body` shows `bodies_admin.archived_body` as escaped,
  indented JSON; its errors (not archived, archive off, gone) are a page with their status.
Read-only.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from controlplane import bodies_admin
from controlplane.console.render import Page, query_string, render, workspaces
from controlplane.finance import aggregates, metric_fields
from controlplane.inputs import CONTROL_CHARS
from controlplane.queries import run_summary
from controlplane.timeline import timeline
from schemas.errors import GatewayError, NotFound

log = structlog.get_logger(__name__)

PER_PAGE = 50
MAX_PER = 200
MAX_PAGE = 10_000
DEFAULT_DAYS = 30
TIMELINE_LIMIT = 1000
MAX_TEXT = 256  # a filter or id longer than this cannot match (the admin API's limit for ids)


# -- the list's parameters (pure) --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RunFilter:
    """What the runs list shows: the window is `[start, end)`; `first`/`last` are the form's dates."""

    search: str = ""
    agent: str = ""
    workflow: str = ""
    first: dt.date = dt.date.min
    last: dt.date = dt.date.max
    page: int = 1
    per: int = PER_PAGE

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(self.first, dt.time(), dt.UTC)

    @property
    def end(self) -> dt.datetime:
        return dt.datetime.combine(self.last, dt.time(), dt.UTC) + dt.timedelta(days=1)

    def query(self, ws: str, **change: Any) -> dict[str, Any]:
        """The list's query string parameters (for `qs`), with `change` applied."""
        params: dict[str, Any] = {"ws": ws, "q": self.search, "agent": self.agent, "workflow": self.workflow,
                                  "from": self.first.isoformat(), "to": self.last.isoformat(),
                                  "per": self.per if self.per != PER_PAGE else None,
                                  "page": self.page if self.page != 1 else None}
        return params | change


def _text(values: Mapping[str, str], name: str, errors: list[str], label: str) -> str:
    value = values.get(name, "").strip()
    if len(value) > MAX_TEXT or CONTROL_CHARS.search(value):
        errors.append(f"{label} must be at most {MAX_TEXT} characters, without control characters.")
        return ""
    return value


def _date(values: Mapping[str, str], name: str, default: dt.date, errors: list[str], label: str) -> dt.date:
    value = values.get(name, "").strip()
    if not value:
        return default
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        errors.append(f"{label} must be a date like 2026-01-31; got '{value[:40]}'.")
        return default


def _number(values: Mapping[str, str], name: str, default: int, hi: int) -> int:
    try:
        return min(max(int(values.get(name, default)), 1), hi)
    except ValueError:
        return default


def parse_filter(values: Mapping[str, str], today: dt.date) -> tuple[RunFilter, list[str]]:
    """The list's filter from its query string, and what was wrong with it (each wrong field falls
    back to its default, so the page still shows something). Page and page size are clamped."""
    errors: list[str] = []
    first = _date(values, "from", today - dt.timedelta(days=DEFAULT_DAYS), errors, "From")
    last = _date(values, "to", today, errors, "To")
    if first > last:
        errors.append("From must not be after To.")
        first, last = today - dt.timedelta(days=DEFAULT_DAYS), today
    found = RunFilter(_text(values, "q", errors, "Run id"), _text(values, "agent", errors, "Agent"),
                      _text(values, "workflow", errors, "Workflow"), first, last,
                      _number(values, "page", 1, MAX_PAGE), _number(values, "per", PER_PAGE, MAX_PER))
    return found, errors


# -- the list's query ---------------------------------------------------------------------------------

def runs_sql(ws: str, f: RunFilter) -> tuple[sql.Composable, dict[str, Any]]:
    """One page of runs (see the module docstring), each with `matching` (how many runs match)."""
    conds: list[sql.Composable] = [sql.SQL("workspace_id = %(ws)s AND occurred_at >= %(from)s AND occurred_at < %(to)s "
                     "AND run_id IS NOT NULL")]
    params: dict[str, Any] = {"ws": ws, "from": f.start, "to": f.end, "limit": f.per, "offset": (f.page - 1) * f.per}
    if f.search:
        conds.append(sql.SQL("strpos(run_id, %(q)s) > 0"))
        params["q"] = f.search
    for name in ("agent", "workflow"):
        if getattr(f, name):
            conds.append(sql.SQL("{} = %({})s").format(sql.Identifier(f"{name}_id"), sql.SQL(name)))
            params[name] = getattr(f, name)
    query = sql.SQL(
        "WITH page AS ("
        " SELECT run_id AS page_run, max(occurred_at) AS page_last, count(*) OVER () AS matching"
        " FROM finance_fact WHERE {where} GROUP BY run_id"
        ' ORDER BY page_last DESC, run_id COLLATE "C" LIMIT %(limit)s OFFSET %(offset)s) '
        "SELECT page_run AS run_id, matching, min(occurred_at) AS first_at, max(occurred_at) AS last_at,"
        " coalesce(array_agg(DISTINCT agent_id) FILTER (WHERE agent_id IS NOT NULL), '{{}}') AS agents,"
        " coalesce(array_agg(DISTINCT workflow_id) FILTER (WHERE workflow_id IS NOT NULL), '{{}}') AS workflows,"
        " {aggs},"
        " (SELECT outcome FROM run_outcome o WHERE o.workspace_id = %(ws)s AND o.run_id = page_run) AS outcome "
        "FROM page JOIN finance_fact ON run_id = page_run AND workspace_id = %(ws)s"
        " AND occurred_at >= %(from)s AND occurred_at < %(to)s "
        'GROUP BY page_run, page_last, matching ORDER BY page_last DESC, page_run COLLATE "C"').format(
        where=sql.SQL(" AND ").join(conds), aggs=aggregates())
    return query, params


async def list_runs(pool: AsyncConnectionPool[Any], ws: str, f: RunFilter) -> tuple[list[dict[str, Any]], int]:
    """(the page's runs: run id, agents, workflows, first and last fact, outcome, then
    `finance.METRIC_COLUMNS`; how many runs match in all)."""
    query, params = runs_sql(ws, f)
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        rows = await cur.fetchall()
    out = [{"run_id": r["run_id"], "agents": sorted(r["agents"]), "workflows": sorted(r["workflows"]),
            "first_at": r["first_at"], "last_at": r["last_at"], "outcome": r["outcome"]} | metric_fields(r)
           for r in rows]
    return out, int(rows[0]["matching"]) if rows else 0


async def _agent_ids(pool: AsyncConnectionPool[Any], ws: str) -> list[str]:
    """The workspace's configured agents (suggestions for the agent filter)."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM config_entity WHERE kind = 'agent' AND workspace_id = %s "
                                 'AND deleted_at IS NULL ORDER BY id COLLATE "C" LIMIT 500', (ws,))
        return [str(r[0]) for r in await cur.fetchall()]


# -- timeline rows (pure) -------------------------------------------------------------------------------

def _join(*parts: Any) -> str:
    return " / ".join(str(p) for p in parts if p not in (None, ""))


def timeline_row(item: Mapping[str, Any]) -> dict[str, Any]:
    """What the run page shows of a timeline item: `what` (provider/model, vendor/tool or rail),
    `status` and whether it is `bad`, `detail` (tokens, savings, revenue, rule, ...), `latency_ms`
    and whether its bodies were archived (`body`)."""
    kind = str(item.get("type") or "")
    what, status, bad, detail = "", "", False, ""
    if kind == "llm.call":
        what = _join(item.get("provider"), item.get("model"))
        status = _join(item.get("status"), item.get("error_code"))
        bad = int(item.get("status") or 0) >= 400
        usage = item.get("usage") or {}
        detail = "; ".join(p for p in (
            f"{usage.get('input_tokens', 0)} in / {usage.get('output_tokens', 0)} out tokens"
            + (" (estimated)" if item.get("usage_estimated") else ""),
            f"cache {item['cache']}" if item.get("cache") else "",
            "unpriced" if item.get("priced") is False else "",
            f"{item['attempts']} attempts" if int(item.get("attempts") or 0) > 1 else "") if p)
    elif kind == "llm.repriced":
        what, detail = _join(item.get("provider"), item.get("model")), f"re-priced {item.get('tokens')} tokens"
    elif kind == "policy.decision":
        what = _join(item.get("model") or item.get("endpoint"))
        status = _join(item.get("decision"), item.get("code"))
        bad = item.get("decision") != "allow"
        detail = _join(item.get("rule"), item.get("message"))
    elif kind == "cache.hit":
        what, status = _join(item.get("provider"), item.get("model")), str(item.get("cache") or "hit")
        detail = f"saved ${item.get('saved_usd')}"
    elif kind == "tool.call":  # a tool called through the MCP gateway
        what = _join(item.get("vendor") or f"mcp:{item.get('server')}", item.get("tool"))
        status = _join(item.get("status"), item.get("error_code"))
        bad = item.get("status") != "ok"
    elif kind == "tool.spend":
        what, detail = _join(item.get("vendor"), item.get("tool")), str(item.get("description") or "")
    elif kind == "payment.outbound":
        what, detail = _join(item.get("rail"), item.get("payee")), str(item.get("resource") or "")
    elif kind == "payment.inbound":
        what, detail = _join(item.get("rail"), item.get("endpoint_id")), f"revenue ${item.get('revenue_usd')}"
    elif kind.startswith("payment."):
        what, status = _join(item.get("rail"), item.get("endpoint_id")), str(item.get("status") or "")
        bad, detail = True, str(item.get("reason") or "")
    elif kind == "budget.alert":
        what = _join(item.get("scope"), item.get("scope_id"))
        detail = f"budget {item.get('budget_id')} passed {item.get('threshold_pct')}%"
    elif kind == "run.completed":
        status = str(item.get("outcome") or "")
        bad = status != "succeeded"
    return {"type": kind, "occurred_at": item.get("occurred_at"), "request_id": item.get("request_id"),
            "agent_id": item.get("agent_id"), "what": what, "status": status, "bad": bad, "detail": detail,
            "cost_usd": item.get("cost_usd"), "latency_ms": item.get("latency_ms"),
            "body": bool(item.get("body_key"))}


# -- handlers -------------------------------------------------------------------------------------------

def _pool(request: web.Request) -> AsyncConnectionPool[Any]:
    from controlplane.app import ADMIN  # the admin app module imports this package

    return request.app[ADMIN].pool


async def runs_page(request: web.Request) -> web.StreamResponse:
    choice = await workspaces(request)
    ws = choice[1]
    found, errors = parse_filter(request.query, dt.datetime.now(dt.UTC).date())
    rows, matching = await list_runs(_pool(request), ws, found)
    if not rows and found.page > 1:  # past the last page (runs left the window): the first page
        raise web.HTTPSeeOther("/console/runs?" + query_string(**found.query(ws, page=None)))
    pages = max(1, -(-matching // found.per))
    return await render(
        request, "runs.html", page="runs", title="Runs", workspace_choice=choice, status=400 if errors else 200,
        f=found, errors=errors, runs=rows, matching=matching, pages=pages, per_default=PER_PAGE,
        agents=await _agent_ids(_pool(request), ws))


def _id(value: str) -> str | None:
    return value if value and len(value) <= MAX_TEXT and not CONTROL_CHARS.search(value) else None


async def run_page(request: web.Request) -> web.StreamResponse:
    choice = await workspaces(request)
    ws = choice[1]
    run_id = request.match_info["run_id"]
    title = f"Run {run_id[:80]}"
    try:
        if _id(run_id) is None:
            raise NotFound("That is not a run id.", code="run_not_found")
        summary = await run_summary(_pool(request), run_id, ws)
        view = await timeline(_pool(request), "run", run_id, ws, TIMELINE_LIMIT)
    except NotFound:
        return await render(request, "run.html", page="runs", title=title, workspace_choice=choice, status=404,
                            run_id=run_id, summary=None, items=[], truncated=False, limit=TIMELINE_LIMIT)
    return await render(request, "run.html", page="runs", title=title, workspace_choice=choice, run_id=run_id,
                        summary=summary, items=[timeline_row(i) for i in view["items"]],
                        truncated=view["truncated"], limit=TIMELINE_LIMIT)


def pretty(value: Any) -> str:
    """A body as shown: JSON indented (a streamed response, already text, as it is)."""
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False, default=str)


def plain(value: Any) -> str:
    """A field of the archived record as shown: text as it is, null as a dash, the rest as JSON."""
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


async def body_page(request: web.Request) -> web.StreamResponse:
    from controlplane.app import ADMIN

    choice = await workspaces(request)
    ws = choice[1]
    request_id = request.match_info["request_id"]
    st = request.app[ADMIN]
    title = f"Bodies of {request_id[:80]}"
    status, error, record = 200, "", None
    try:
        if _id(request_id) is None:
            raise NotFound("That is not a request id.", code="request_not_found")
        record = await bodies_admin.archived_body(st.pool, st.settings, request_id, ws)
    except GatewayError as err:
        status, error = err.status, err.message
    except Exception as exc:  # the archive unreachable or refusing: say so, not a bare 500
        log.warning("console_body_unavailable", request_id=request_id, error=type(exc).__name__)
        status, error = 503, "The body archive could not be read just now. Retry in a moment."
    shown = None if record is None else {
        "meta": {k: plain(v) for k, v in record.items() if k not in ("request", "response", "object")},
        "request": pretty(record.get("request")), "response": pretty(record.get("response")),
        "run_id": record.get("run_id")}
    return await render(request, "body.html", page="runs", title=title, workspace_choice=choice, status=status,
                        request_id=request_id, error=error, record=shown)


# Ids may hold any printable character, `/` too (links quote the rest): the patterns take it.
PAGES: list[tuple[str, Page]] = [("/console/runs", runs_page), ("/console/runs/{run_id:.+}", run_page),
                                 ("/console/requests/{request_id:.+}/body", body_page)]
ACTIONS: list[tuple[str, Page]] = []
