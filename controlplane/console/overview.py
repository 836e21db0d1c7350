"""The overview page: spend today and this month against budgets, cost over time by provider or
agent (stacked, hour | day | month), top agents and runs, spikes, cache savings, revenue and
margin. Every figure is a finance query's (render.finance_table)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from controlplane.console.render import Page, finance_table, render, workspaces

# Granularity -> (how far back the chart reaches, the label format of a period).
GRANULARITY: dict[str, tuple[dt.timedelta, str]] = {
    "hour": (dt.timedelta(hours=48), "%m-%d %H:00"),
    "day": (dt.timedelta(days=31), "%Y-%m-%d"),
    "month": (dt.timedelta(days=366), "%Y-%m"),
}
CHART_BY = ("provider", "agent")
MAX_SERIES = 8  # more groups than this share one "other" series


def window_start(now: dt.datetime, granularity: str) -> dt.datetime:
    back, _ = GRANULARITY[granularity]
    start = now - back
    if granularity == "hour":
        return start.replace(minute=0, second=0, microsecond=0)
    if granularity == "day":
        return start.replace(hour=0, minute=0, second=0, microsecond=0)
    return start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def series_name(row: dict[str, Any], by: str) -> str:
    if by == "agent":
        return str(row.get("agent_id") or "(no agent)")
    return str(row.get("provider") or "tools & payments")  # spend with no model call behind it


def stacked(rows: list[dict[str, Any]], by: str, granularity: str) -> dict[str, Any]:
    """Chart data: period labels and one series per group of integer nano-USD costs (the
    costliest MAX_SERIES groups by name, the rest summed as "other")."""
    _, fmt = GRANULARITY[granularity]
    totals: dict[str, int] = {}
    for r in rows:
        totals[series_name(r, by)] = totals.get(series_name(r, by), 0) + int(r["cost_nanos"])
    ranked = sorted(totals, key=lambda n: (-totals[n], n))
    kept = set(ranked[:MAX_SERIES])
    periods = sorted({r["period_start"] for r in rows})
    index = {p: i for i, p in enumerate(periods)}
    series: dict[str, list[int]] = {}
    for r in rows:
        name = series_name(r, by)
        name = name if name in kept else "other"
        values = series.setdefault(name, [0] * len(periods))
        values[index[r["period_start"]]] += int(r["cost_nanos"])
    order = [n for n in ranked if n in series] + (["other"] if "other" in series and "other" not in kept else [])
    labels = [dt.datetime.fromisoformat(str(p)).astimezone(dt.UTC).strftime(fmt) for p in periods]
    return {"labels": labels, "unit": "nanos", "series": [{"name": n, "values": series[n]} for n in order]}


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat()


async def overview(request: web.Request) -> web.StreamResponse:
    choice = await workspaces(request)
    ws = choice[1]
    granularity = request.query.get("g", "day")
    granularity = granularity if granularity in GRANULARITY else "day"
    by = request.query.get("by", "provider")
    by = by if by in CHART_BY else "provider"
    now = dt.datetime.now(dt.UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = today.replace(day=1)
    since = window_start(now, granularity)
    totals = {}
    for name, start in (("today", today), ("month", month)):
        table = await finance_table(request, "summary", {"workspace_id": ws, "group_by": "workspace",
                                                         "from": _iso(start)})
        totals[name] = table["data"][0] if table["data"] else None
    chart_rows = await finance_table(request, "summary", {"workspace_id": ws, "group_by": by,
                                                          "interval": granularity, "from": _iso(since),
                                                          "limit": "20000"})
    window = {"workspace_id": ws, "from": _iso(since)}
    top_agents = await finance_table(request, "top", window | {"by": "agent", "limit": "10"})
    top_runs = await finance_table(request, "top", window | {"by": "run", "limit": "10"})
    spikes = await finance_table(request, "spikes", window | {"limit": "10"})
    budgets = await finance_table(request, "budgets", {"workspace_id": ws})
    return await render(
        request, "overview.html", page="overview", title="Overview", workspace_choice=choice,
        totals=totals, budgets=budgets["data"], granularity=granularity, granularities=tuple(GRANULARITY),
        by=by, chart_by=CHART_BY, chart=stacked(chart_rows["data"], by, granularity), chart_rows=chart_rows["data"],
        chart_more=chart_rows.get("has_more", False), since=_iso(since), top_agents=top_agents["data"],
        top_runs=top_runs["data"], spikes=spikes["data"])


PAGES: list[tuple[str, Page]] = [("/console", overview)]
ACTIONS: list[tuple[str, Page]] = []
