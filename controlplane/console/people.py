"""The agents, members and departments page (`/console/agents`): each one's month-to-date spend
and its budgets as gauges, the workspace's limits and policies in words, and its virtual keys
with create, rotate and revoke; a budget's limit can be changed in place.

Every figure is a finance query's (`render.finance_table`: the budgets exactly as
`GET /admin/v1/finance/budgets`, spend from the summary by agent, member and department); the
entities come from `ConfigCommands.list`. Every action is the admin API's own command
(`revoke_virtual_key`, `rotate_virtual_key`, `create_virtual_key`, the budget PATCH), run under
the signed-in actor. Create and rotate answer with a page that shows the new key's plaintext
once: it is never put in the flash notice, which is stored in Postgres.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from controlplane import commands as c
from controlplane import governance as g
from controlplane.console.render import (
    SESSIONS,
    Page,
    act,
    finance_table,
    query_string,
    render,
    session_of,
    workspaces,
)
from controlplane.inputs import now_ms
from schemas.entities import ConfigEntity
from schemas.errors import GatewayError, InvalidRequest

if TYPE_CHECKING:
    from controlplane.app import AdminState

# Keys listed: every live one up to this many (newest first), then the most recently revoked.
MAX_LIVE_KEYS = 500
MAX_REVOKED_KEYS = 50
# Rotation overlaps offered (seconds the old key keeps working), the first the default.
OVERLAPS = ((3600, "1 hour"), (0, "no overlap (stops now)"), (86400, "1 day"))
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
LIMIT_WORDS = (("rpm", "requests a minute"), ("rpd", "requests a day"), ("tpm", "tokens a minute"),
               ("tpd", "tokens a day"), ("concurrency", "concurrent requests"))
SCOPE_WORDS = {"workspace": "Workspace", "department": "Department", "member": "Member", "agent": "Agent",
               "key": "Key", "workflow": "Workflow"}


def _admin(request: web.Request) -> AdminState:
    from controlplane.app import ADMIN  # the admin app module imports this package

    return request.app[ADMIN]


def back_to(ws: str) -> str:
    return f"/console/agents?{query_string(ws=ws)}"


# ---- reading the page's data -------------------------------------------------------------------

async def virtual_keys(request: web.Request, ws: str, now_ms_: int) -> list[dict[str, Any]]:
    """The workspace's keys as the API shows them (`public_view`: no hash) plus `created_at`,
    `revoked_at` and `status` (active | expired | revoked): the newest MAX_LIVE_KEYS live keys,
    then the MAX_REVOKED_KEYS most recently revoked (a revoked key is a deleted config row)."""
    async with _admin(request).pool.connection() as conn:
        cur = await conn.execute(
            "(SELECT body, created_at, deleted_at FROM config_entity WHERE kind = 'vk' AND workspace_id = %s "
            " AND deleted_at IS NULL ORDER BY created_at DESC, id LIMIT %s) UNION ALL "
            "(SELECT body, created_at, deleted_at FROM config_entity WHERE kind = 'vk' AND workspace_id = %s "
            " AND deleted_at IS NOT NULL ORDER BY deleted_at DESC, id LIMIT %s)",
            (ws, MAX_LIVE_KEYS, ws, MAX_REVOKED_KEYS))
        rows = await cur.fetchall()
    keys = []
    for body, created_at, deleted_at in rows:
        entity = msgspec.convert(dict(body) | {"kind": "vk"}, ConfigEntity)
        view = c.public_view(entity)
        expires = view.get("expires_at_ms")
        status = ("revoked" if deleted_at is not None else
                  "expired" if expires is not None and expires <= now_ms_ else "active")
        keys.append(view | {"created_at": created_at, "revoked_at": deleted_at, "status": status})
    return keys


def spend_by(rows: list[dict[str, Any]], column: str) -> dict[str, dict[str, Any]]:
    """Summary rows keyed by their group id (`agent_id`, `member_id`, `department_id`)."""
    return {str(r[column]): r for r in rows if r.get(column)}


def budgets_by_scope(budgets: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for b in budgets:
        out.setdefault((b["scope"], b["scope_id"]), []).append(b)
    return out


def scope_label(scope: str, scope_id: str, names: Mapping[tuple[str, str], str]) -> str:
    """Where a rule attaches, in words: "Agent Researcher (agent-1)", "Workflow nightly", "Workspace"."""
    word = SCOPE_WORDS.get(scope, scope)
    name = names.get((scope, scope_id))
    return f"{word} {name} ({scope_id})" if name else f"{word} {scope_id}"


def limit_rules(limit: Mapping[str, Any]) -> list[str]:
    """A limit as phrases: "60 requests a minute", "5 concurrent requests"."""
    return [f"{limit[f]:,} {words}" for f, words in LIMIT_WORDS if limit.get(f) is not None]


def _usd(text: str) -> str:
    return f"${text}"


def _days(days: list[int]) -> str:
    chosen = sorted(set(days))
    if chosen == list(range(7)):
        return "every day"
    if len(chosen) > 2 and chosen == list(range(chosen[0], chosen[-1] + 1)):
        return f"{DAYS[chosen[0]]} to {DAYS[chosen[-1]]}"
    return ", ".join(DAYS[d] for d in chosen)


def policy_rules(policy: Mapping[str, Any]) -> list[str]:
    """A policy's rules as sentences (the ones it sets; an empty policy constrains nothing)."""
    rules = []
    for field, words in (("models_allow", "Models allowed"), ("models_deny", "Models denied"),
                         ("endpoints_allow", "Endpoints allowed"), ("prompts_allow", "Prompts allowed")):
        if policy.get(field):
            rules.append(f"{words}: {', '.join(policy[field])}")
    tool_verb = "stripped from the request" if policy.get("tool_action") == "strip" else "refused"
    if policy.get("tools_allow"):
        rules.append(f"Tools allowed: {', '.join(policy['tools_allow'])} (others {tool_verb})")
    if policy.get("tools_deny"):
        rules.append(f"Tools denied: {', '.join(policy['tools_deny'])} ({tool_verb})")
    for w in policy.get("windows") or ():
        rules.append(f"Allowed {_days(w.get('days', list(range(7))))}, {w.get('start', '00:00')} to "
                     f"{w.get('end', '24:00')} {w.get('timezone', 'UTC')}")
    if policy.get("max_tokens_cap") is not None:
        action = "clamped" if policy.get("max_tokens_action", "clamp") == "clamp" else "refused"
        rules.append(f"max_tokens above {policy['max_tokens_cap']:,} {action}")
    if policy.get("max_cost_usd") is not None:
        rules.append(f"Calls estimated above {_usd(policy['max_cost_usd'])} refused")
    if policy.get("escalate_over_usd") is not None:
        rules.append(f"Calls estimated above {_usd(policy['escalate_over_usd'])} need an approved escalation")
    return rules or ["No rules (constrains nothing)"]


async def agents_page(request: web.Request) -> web.StreamResponse:
    choice = await workspaces(request)
    ws = choice[1]
    commands = _admin(request).commands
    now = dt.datetime.now(dt.UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).isoformat()
    agents = await commands.list("agent", ws)
    members = await commands.list("member", ws)
    departments = await commands.list("dept", ws)
    limits = await commands.list("limit", ws)
    policies = await commands.list("policy", ws)
    keys = await virtual_keys(request, ws, now_ms())
    budgets = (await finance_table(request, "budgets", {"workspace_id": ws}))["data"]
    spend: dict[str, dict[str, dict[str, Any]]] = {}
    for group in ("agent", "member", "department"):
        table = await finance_table(request, "summary", {"workspace_id": ws, "group_by": group, "from": month,
                                                         "limit": "100000"})
        spend[group] = spend_by(table["data"], f"{group}_id")
    names: dict[tuple[str, str], str] = {}
    for scope, items in (("agent", agents), ("member", members), ("department", departments)):
        names |= {(scope, i["id"]): i["name"] for i in items}
    names |= {("key", k["id"]): k["name"] or k["prefix"] for k in keys}
    return await render(
        request, "agents.html", page="people", title="Agents, members and departments", workspace_choice=choice,
        agents=agents, members=members, departments=departments, keys=keys, budgets=budgets,
        scoped=budgets_by_scope(budgets), spend=spend, month=month, names=names, overlaps=OVERLAPS,
        limits=[(scope_label(x["scope"], x["scope_id"], names), x, limit_rules(x)) for x in limits],
        policies=[(scope_label(x["scope"], x["scope_id"], names), x, policy_rules(x)) for x in policies],
        budget_scope={b["id"]: scope_label(b["scope"], b["scope_id"], names) for b in budgets},
        more_keys=sum(k["status"] != "revoked" for k in keys) >= MAX_LIVE_KEYS)


# ---- actions -----------------------------------------------------------------------------------

def _field(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _path_id(request: web.Request) -> str:
    """The `{id}` of an action's path, with the admin API's rules for path parameters."""
    value = request.match_info["id"]
    if len(value) > 256 or c.CONTROL_CHARS.search(value):
        raise InvalidRequest("'id' must be at most 256 characters, without control characters.", param="id")
    return value


async def _shown_once(request: web.Request, ws: str, run: Callable[[], Awaitable[dict[str, Any]]],
                      heading: str) -> web.StreamResponse:
    """Run a command that answers with a key's plaintext (create, rotate) under the session's
    actor, like `render.act`, and show the key on a page of its own, once. A refusal is flashed
    and goes back to the list (303)."""
    session = session_of(request)
    token = c.ACTOR.set(session.audit_actor)
    try:
        result = await run()
    except GatewayError as err:
        await request.app[SESSIONS].flash(session, f"Refused: {err.message}")
        raise web.HTTPSeeOther(back_to(ws) + "#keys") from None
    finally:
        c.ACTOR.reset(token)
    return await render(request, "key_created.html", page="people", title=heading, created=result,
                        back=back_to(ws) + "#keys")


async def create_key(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    ws = _field(form, "ws")
    raw: dict[str, Any] = {"workspace_id": ws, "name": _field(form, "name")}
    if _field(form, "agent_id"):
        raw["agent_id"] = _field(form, "agent_id")

    async def run() -> dict[str, Any]:
        cmd = c.parse_command(raw, c.CreateVirtualKey)
        return await _admin(request).commands.create_virtual_key(cmd)

    return await _shown_once(request, ws, run, "New virtual key")


async def rotate_key(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    ws = _field(form, "ws")
    overlap = _field(form, "overlap_s") or str(OVERLAPS[0][0])

    async def run() -> dict[str, Any]:
        key_id = _path_id(request)
        if not overlap.isdigit():
            raise InvalidRequest("'overlap_s' must be a whole number of seconds.", param="overlap_s")
        cmd = c.parse_command({"overlap_s": int(overlap)}, c.RotateVirtualKey)
        return await _admin(request).commands.rotate_virtual_key(key_id, cmd)

    return await _shown_once(request, ws, run, "Rotated virtual key")


async def revoke_key(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    ws = _field(form, "ws")
    key_id = request.match_info["id"]

    async def run() -> None:
        await _admin(request).commands.revoke_virtual_key(_path_id(request))

    return await act(request, f"Revoked key {key_id[:64]}.", run, back_to(ws) + "#keys")


async def set_budget_limit(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    ws = _field(form, "ws")
    limit_usd = _field(form, "limit_usd").removeprefix("$")
    budget_id = request.match_info["id"]

    async def run() -> None:
        patch = c.parse_command({"limit_usd": limit_usd}, g.PatchBudget)
        await _admin(request).commands.patch(g.BUDGET, _path_id(request), patch)

    return await act(request, f"Budget {budget_id[:64]} now limits spend to ${limit_usd[:32]}.", run,
                     back_to(ws) + "#budgets")


PAGES: list[tuple[str, Page]] = [("/console/agents", agents_page)]
ACTIONS: list[tuple[str, Page]] = [
    ("/console/keys", create_key),
    ("/console/keys/{id}/rotate", rotate_key),
    ("/console/keys/{id}/revoke", revoke_key),
    ("/console/budgets/{id}/limit", set_budget_limit),
]
