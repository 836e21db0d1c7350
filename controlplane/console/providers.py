"""The providers page: the workspace's providers with their error rates, its routers with each
target's health (cool-downs and ejections), the data-plane workers and the price overrides that
apply to the workspace's providers. Read-only.

Every figure is an admin API's: providers, routers and prices are `commands.list` (public views,
no secret: a provider shows only whether it has a key); error rates are the finance summary by
provider over the last ERROR_WINDOW (`errors / requests`, as `GET /admin/v1/finance/summary`);
target health is `GET /admin/v1/routers/{id}/health`'s (`fleet.router_health` over the live
workers' beats) and the workers are `GET /admin/v1/fleet`'s.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from aiohttp import web

from controlplane.console.render import Page, finance_table, render, workspaces
from controlplane.fleet import FLEET, router_health
from schemas.money import nanos_to_decimal_str

ERROR_WINDOW = dt.timedelta(hours=24)
MAX_ROUTERS = 100  # routers whose health the page gathers (one entity load each)
SCOPE_ORDER = {"provider_key": 0, "workspace": 1, "platform": 2}
PRICE_FIELDS = ("input", "output", "cache_read", "cache_write")


def error_rate(errors: int, requests: int) -> str:
    """`errors / requests` as a percentage with one decimal ("—" without requests)."""
    if requests <= 0:
        return "—"
    return f"{(Decimal(errors) * 100 / Decimal(requests)).quantize(Decimal('0.1'))}%"


def provider_rows(providers: Iterable[Mapping[str, Any]], usage: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per provider of the workspace (by name), with its requests, errors, error rate and
    cost from the finance summary; then the summary's providers the workspace does not configure
    (`configured` false), e.g. calls refused before any upstream."""
    by_name = {str(u.get("provider") or ""): u for u in usage}
    rows: list[dict[str, Any]] = []
    for p in sorted(providers, key=lambda p: str(p["name"])):
        rows.append(dict(p) | {"configured": True} | _traffic(by_name.pop(str(p["name"]), None)))
    for name, u in sorted(by_name.items()):
        rows.append({"name": name, "configured": False} | _traffic(u))
    return rows


def _traffic(u: Mapping[str, Any] | None) -> dict[str, Any]:
    requests, errors = (int(u["requests"]), int(u["errors"])) if u else (0, 0)
    return {"requests": requests, "errors": errors, "error_rate": error_rate(errors, requests),
            "cost_usd": u["cost_usd"] if u else "0"}


def _at(ms: int | None) -> dt.datetime | None:
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def target_view(target: Mapping[str, Any]) -> dict[str, Any]:
    """A target of `router_health` with its state across the workers (ejected, cooling down,
    healthy, or idle: no live worker used it lately), ejections summed, the latest time an
    ejection or cool-down runs until and the newest error any worker saw."""
    workers = list(target["workers"])
    summary = target["summary"]
    if summary["workers_ejected"]:
        state = "ejected"
    elif summary["workers_cooling"]:
        state = "cooling down"
    elif workers:
        state = "healthy"
    else:
        state = "idle"
    until = [w["ejected_until_ms"] for w in workers if w["ejected"]] + \
        [w["cooldown_until_ms"] for w in workers if w["cooling_down"]]
    return dict(target) | {
        "state": state, "ejections": sum(int(w["ejections"]) for w in workers),
        "until": _at(max(until)) if until else None,
        "last_error": next((w["last_error"] for w in workers if w["last_error"]), ""),
        "workers": [dict(w) | {"ejected_until": _at(w["ejected_until_ms"]),
                               "cooldown_until": _at(w["cooldown_until_ms"])} for w in workers],
    }


async def router_rows(request: web.Request, ws: str, now_ms: int) -> tuple[list[dict[str, Any]], bool]:
    """Each router of the workspace (at most MAX_ROUTERS) with its targets' health, and whether
    there were more."""
    from controlplane.app import ADMIN  # the admin app module imports this package

    commands = request.app[ADMIN].commands
    listed = await commands.list("router", ws)
    beats = request.app[FLEET].live_beats(now_ms)
    rows = []
    for view in listed[:MAX_ROUTERS]:
        router = await commands.load("router", view["id"])
        if router is None:  # deleted meanwhile
            continue
        health = router_health(router, beats, now_ms)
        rows.append(health | {"targets": [target_view(t) for t in health["targets"]]})
    return rows, len(listed) > MAX_ROUTERS


def price_rows(prices: Iterable[Mapping[str, Any]], ws: str, provider_names: set[str]) -> list[dict[str, Any]]:
    """The price overrides that can price this workspace's calls: its own (workspace scope, and
    provider-key scope for its keys) and those of every workspace (platform scope, operator keys)
    for a provider name it uses. Prices as USD per million tokens (decimal strings)."""
    rows = []
    for p in prices:
        mine = p.get("workspace_id") == ws
        shared = p.get("workspace_id") is None and p["provider"] in provider_names
        if not (mine or shared):
            continue
        usd = {f"{f}_usd": None if p.get(f"{f}_per_mtok_nanos") is None
               else nanos_to_decimal_str(int(p[f"{f}_per_mtok_nanos"])) for f in PRICE_FIELDS}
        rows.append(dict(p) | usd)
    rows.sort(key=lambda p: (p["provider"], p["model"], SCOPE_ORDER.get(p.get("scope", ""), 9),
                             p.get("provider_key_id") or ""))
    return rows


async def providers_page(request: web.Request) -> web.StreamResponse:
    from controlplane.app import ADMIN

    choice = await workspaces(request)
    ws = choice[1]
    commands = request.app[ADMIN].commands
    now = dt.datetime.now(dt.UTC)
    now_ms = int(now.timestamp() * 1000)
    since = now - ERROR_WINDOW
    usage = await finance_table(request, "summary", {"workspace_id": ws, "group_by": "provider",
                                                     "from": since.isoformat()})
    providers = provider_rows(await commands.list("provider", ws), usage["data"])
    routers, routers_more = await router_rows(request, ws, now_ms)
    fleet = request.app[FLEET].report(now_ms)
    names = {str(p["name"]) for p in providers}
    prices = price_rows(await commands.list("price", None), ws, names)
    return await render(
        request, "providers.html", page="providers", title="Providers & routers", workspace_choice=choice,
        since=since, providers=providers, usage_more=usage.get("has_more", False), routers=routers,
        routers_more=routers_more, max_routers=MAX_ROUTERS, fleet=fleet, prices=prices)


PAGES: list[tuple[str, Page]] = [("/console/providers", providers_page)]
ACTIONS: list[tuple[str, Page]] = []
