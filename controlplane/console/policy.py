"""The policy page: recent policy decisions by rule, and the escalation queue with approve and
reject.

Decisions come from the journalled `policy.decision` events of the selected workspace (only
non-allow outcomes are emitted: deny, throttle, escalate, clamp, strip), read through the
journal's (workspace_id, type, occurred_at) index with bounded scans: the counts cover the
newest DECISION_SCAN decisions of the window at most (the page says so when it is cut), the
list the newest RECENT. Escalations are the admin API's (controlplane/escalations.py), and
approving or rejecting one runs the very same command under the signed-in actor
(`render.act`), so its `decided_by` is `console:<name>`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web
from psycopg.rows import dict_row

from controlplane.console.render import Page, act, query_string, render, workspaces
from controlplane.escalations import DEFAULT_GRANT_TTL_S, ApproveEscalation
from schemas.errors import NotFound

WINDOW = dt.timedelta(days=7)
DECISION_SCAN = 50_000  # the counts read at most this many of the window's newest decisions
RULE_GROUPS = 200  # (rule, decision) rows shown at most
RECENT = 50
PENDING_LIMIT = 100
DECIDED_LIMIT = 20
MAX_ID = 256

_COUNTS = """
SELECT rule, outcome, count(*) AS decisions, max(occurred_at) AS last_at FROM (
    SELECT body->>'rule' AS rule, body->>'outcome' AS outcome, occurred_at FROM event_journal
    WHERE workspace_id = %(ws)s AND type = 'policy.decision' AND occurred_at >= %(since)s
    ORDER BY occurred_at DESC LIMIT %(scan)s) d
GROUP BY rule, outcome ORDER BY decisions DESC, rule COLLATE "C", outcome COLLATE "C" LIMIT %(groups)s
"""
_RECENT = """
SELECT occurred_at, body->>'agent_id' AS agent_id, body->>'run_id' AS run_id, body->>'rule' AS rule,
       body->>'outcome' AS outcome, body->>'code' AS code, body->>'message' AS message,
       body->>'escalation_id' AS escalation_id, body->>'model' AS model
FROM event_journal WHERE workspace_id = %(ws)s AND type = 'policy.decision' AND occurred_at >= %(since)s
ORDER BY occurred_at DESC, event_id DESC LIMIT %(n)s
"""


async def decisions(request: web.Request, ws: str, since: dt.datetime) -> tuple[list[dict[str, Any]],
                                                                                bool, list[dict[str, Any]]]:
    """(counts by rule and decision, whether the counts' scan was cut, the newest decisions)."""
    from controlplane.app import ADMIN  # the admin app module imports this package

    params = {"ws": ws, "since": since, "scan": DECISION_SCAN, "groups": RULE_GROUPS, "n": RECENT}
    async with request.app[ADMIN].pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_COUNTS, params)
        counts = await cur.fetchall()
        await cur.execute(_RECENT, params)
        recent = await cur.fetchall()
    cut = sum(int(r["decisions"]) for r in counts) >= DECISION_SCAN
    return counts, cut, recent


async def escalation_queue(request: web.Request, ws: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pending, newest first; the latest decided ones, newest decision first)."""
    from controlplane.app import ADMIN

    escalations = request.app[ADMIN].escalations
    pending = await escalations.list(ws, "pending", PENDING_LIMIT)
    decided = [*await escalations.list(ws, "approved", DECIDED_LIMIT),
               *await escalations.list(ws, "rejected", DECIDED_LIMIT)]
    decided.sort(key=lambda r: (r["decided_at"] or "", r["id"]), reverse=True)
    return pending, decided[:DECIDED_LIMIT]


async def policy_page(request: web.Request) -> web.StreamResponse:
    choice = await workspaces(request)
    ws = choice[1]
    since = dt.datetime.now(dt.UTC) - WINDOW
    counts, cut, recent = await decisions(request, ws, since)
    pending, decided = await escalation_queue(request, ws)
    return await render(
        request, "policy.html", page="policy", title="Policy & escalations", workspace_choice=choice,
        since=since, counts=counts, counts_cut=cut, scan=DECISION_SCAN, recent=recent, recent_limit=RECENT,
        pending=pending, pending_more=len(pending) >= PENDING_LIMIT, decided=decided,
        grant_minutes=DEFAULT_GRANT_TTL_S // 60)


def _back(request: web.Request, form_ws: Any) -> str:
    ws = form_ws if isinstance(form_ws, str) else request.query.get("ws", "")
    return "/console/policy?" + query_string(ws=ws[:MAX_ID]) + "#escalations"


async def _decide(request: web.Request, verb: str) -> web.StreamResponse:
    from controlplane.app import ADMIN

    form = await request.post()
    back = _back(request, form.get("ws"))
    esc_id = request.match_info["id"]
    escalations = request.app[ADMIN].escalations
    if len(esc_id) > MAX_ID or not esc_id.isprintable():
        return await act(request, "", _no_such, back)
    if verb == "approve":
        done = (f"Escalation {esc_id} approved: the agent may retry once with Alephant-Escalation-Id within "
                f"{DEFAULT_GRANT_TTL_S // 60} minutes.")
        return await act(request, done, lambda: escalations.approve(esc_id, ApproveEscalation(), None), back)
    done = f"Escalation {esc_id} rejected: the agent's call stays refused."
    return await act(request, done, lambda: escalations.reject(esc_id, None), back)


async def _no_such() -> None:
    raise NotFound("No escalation with that id.", code="escalation_not_found")


async def approve(request: web.Request) -> web.StreamResponse:
    return await _decide(request, "approve")


async def reject(request: web.Request) -> web.StreamResponse:
    return await _decide(request, "reject")


PAGES: list[tuple[str, Page]] = [("/console/policy", policy_page)]
ACTIONS: list[tuple[str, Page]] = [("/console/escalations/{id}/approve", approve),
                                   ("/console/escalations/{id}/reject", reject)]
