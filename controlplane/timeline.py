"""Run and session timelines (issue 13): every event of one agent run or session, in order, with
its cost, latency, trace id and archived-body link, and the finance totals of the same run or
session.

Contracts:
* Items come from the event journal (`event_journal`, every event the ledger projector folded),
  ordered by `occurred_at`, then event id (a UUIDv7, so ties keep publication order). At most
  `limit` items (default 1000, at most 10000); `truncated` says whether there were more.
* Every item has `type`, `occurred_at` (ISO-8601, UTC), `request_id`, `trace_id` (may be null),
  `cost_usd` and `cost_nanos`: what the event costs, in the finance projection's terms
  (`events.finance`): an `llm.call`'s, `llm.repriced`'s or `tool.call`'s `cost_nanos`, a
  `tool.spend`'s or a `payment.outbound`'s `amount_nanos`; "0" for every other event. Revenue is
  not cost: a `payment.inbound` shows `revenue_usd`; a cache hit shows what it saved
  (`saved_usd`). Like the finance views, `cost_usd` counts USD amounts only (`cost_nanos` is in
  the item's `currency`).
  `llm.call` items carry `body_key` (null when only metadata was kept). A `tool.call` item (a
  tool called through the gateway's MCP endpoint) carries `server`, `tool`, `status` (ok | error
  | refused), `error_code`, `latency_ms` and its `vendor` (`mcp:<server>`).
* `totals` are the finance projection's sums for the same run (`GET /admin/v1/runs/{id}`: the
  same statement) or session: counts, then `<money>_usd` strings and `<money>_nanos` integers.
  Both projections fold the same stream through their own consumers, so for a moment after an
  event one may show it and the other not yet.
* Without `workspace_id` a run or session id is looked up in every workspace (items say which).
  404 `run_not_found` / `session_not_found` when neither the journal nor the finance projection
  knows the id. Read-only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import msgspec
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from controlplane.finance import Params, aggregates, metric_fields, run_sql
from events.ledger import bounded, mcp_vendor
from schemas.errors import NotFound
from schemas.events import (
    BudgetAlert,
    CacheHit,
    Event,
    LlmCall,
    LlmRepriced,
    PaymentEvent,
    PaymentInbound,
    PaymentOutbound,
    PolicyDecision,
    RunCompleted,
    ToolCall,
    ToolSpend,
    Usage,
    event_decoder,
    event_type,
)
from schemas.money import nanos_to_decimal_str

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
# The index (migration 0009) keys the first ID_PREFIX characters of an id, so an index row stays
# small whatever id a client sent; the full id is compared on the rows found.
ID_PREFIX = 256
KINDS = ("run", "session")


def parse_limit(values: Mapping[str, str]) -> tuple[str | None, int]:
    """(`workspace_id`, `limit`) from a timeline's query string; 400 on a bad limit or an unknown
    parameter."""
    p = Params(values)
    workspace = p.text("workspace_id")
    limit = p.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    p.finish()
    return workspace, limit


# -- item shaping (pure) ---------------------------------------------------------------------------

def event_cost(event: Event) -> tuple[int, str]:
    """(nano-units, currency) the event costs: what `events.finance` books as llm, tool or
    payments-out cost for it; 0 for the rest (revenue, memos, decisions)."""
    if isinstance(event, LlmCall):
        return max(0, event.cost_nanos), event.currency
    if isinstance(event, LlmRepriced | ToolCall):
        return event.cost_nanos, event.currency
    if isinstance(event, ToolSpend | PaymentOutbound):
        return event.amount_nanos, event.currency
    return 0, getattr(event, "currency", "USD")


def _usd(nanos: int, currency: str) -> str:
    return nanos_to_decimal_str(nanos) if currency == "USD" else "0"


def _usage(usage: Usage) -> dict[str, int]:
    return msgspec.to_builtins(usage)  # type: ignore[no-any-return]


def _details(event: Event) -> dict[str, Any]:
    """The fields worth showing for the event's type (beyond the envelope and the cost)."""
    if isinstance(event, LlmCall):
        return {"provider": event.provider, "model": event.model, "ingress": event.ingress,
                "endpoint": event.endpoint, "stream": event.stream, "status": event.status,
                "error_code": event.error_code, "decision": event.decision, "latency_ms": event.latency_ms,
                "ttfb_ms": event.ttfb_ms, "usage": _usage(event.usage), "usage_estimated": event.usage_estimated,
                "priced": event.priced, "cache": event.cache, "partial": event.partial, "key_id": event.key_id,
                "router_id": event.router_id, "attempts": len(event.attempts), "prompt_id": event.prompt_id,
                "prompt_version": event.prompt_version, "body_key": event.body_key}
    if isinstance(event, LlmRepriced):
        return {"provider": event.provider, "model": event.model, "original_event_id": str(event.original_event_id),
                "tokens": event.tokens, "price_id": event.price_id}
    if isinstance(event, PolicyDecision):
        return {"decision": event.outcome, "code": event.code, "rule": event.rule, "scope": event.scope,
                "scope_id": event.scope_id, "message": event.message, "model": event.model,
                "endpoint": event.endpoint, "key_id": event.key_id, "escalation_id": event.escalation_id}
    if isinstance(event, CacheHit):
        return {"provider": event.provider, "model": event.model, "cache": event.cache,
                "saved_usd": _usd(event.saved_nanos, event.currency), "saved_nanos": event.saved_nanos,
                "usage": _usage(event.usage), "key_id": event.key_id}
    if isinstance(event, ToolSpend):
        return {"vendor": event.vendor, "tool": event.tool, "description": event.description,
                "spend_id": event.spend_id, "amount_usd": _usd(event.amount_nanos, event.currency),
                "key_id": event.key_id}
    if isinstance(event, ToolCall):
        return {"server": event.server, "tool": event.tool, "status": event.status, "error_code": event.error_code,
                "latency_ms": event.latency_ms, "vendor": mcp_vendor(event.server),
                "mcp_server_id": event.mcp_server_id or None, "key_id": event.key_id, "body_key": event.body_key}
    if isinstance(event, PaymentOutbound):
        return {"rail": event.rail, "payment_id": event.payment_id,
                "amount_usd": _usd(event.amount_nanos, event.currency), "payee": event.payee,
                "resource": event.resource, "wallet_id": event.wallet_id, "asset": event.asset,
                "network": event.network, "amount_atomic": event.amount_atomic, "transaction": event.transaction}
    if isinstance(event, PaymentInbound):
        return {"rail": event.rail, "payment_id": event.payment_id, "endpoint_id": event.endpoint_id,
                "payer": event.payer, "amount_usd": _usd(event.amount_nanos, event.currency),
                "revenue_usd": _usd(event.amount_nanos, event.currency), "revenue_nanos": event.amount_nanos}
    if isinstance(event, PaymentEvent):
        return {"status": event.status, "rail": event.rail, "endpoint_id": event.endpoint_id,
                "amount_usd": _usd(event.amount_nanos, event.currency), "payer": event.payer,
                "reason": event.reason, "transaction": event.transaction}
    if isinstance(event, BudgetAlert):
        return {"budget_id": event.budget_id, "scope": event.scope, "scope_id": event.scope_id,
                "threshold_pct": event.threshold_pct, "period_start": event.period_start,
                "limit_usd": nanos_to_decimal_str(event.limit_nanos),
                "spent_usd": nanos_to_decimal_str(event.spent_nanos)}
    if isinstance(event, RunCompleted):
        return {"status": event.outcome, "outcome": event.outcome, "metadata": event.metadata}
    return {}


def timeline_item(event: Event) -> dict[str, Any]:
    """One timeline item: the envelope, the cost (see the module docstring), then the type's
    own fields."""
    nanos, currency = event_cost(event)
    return {
        "event_id": str(event.event_id), "type": event_type(event),
        "occurred_at": event.occurred_at.astimezone(dt.UTC).isoformat(),
        "workspace_id": event.workspace_id, "request_id": event.request_id, "agent_id": event.agent_id,
        "run_id": event.run_id, "session_id": event.session_id, "workflow_id": event.workflow_id,
        "trace_id": event.trace_id, "cost_usd": _usd(nanos, currency), "cost_nanos": nanos, "currency": currency,
        **_details(event),
    }


def raw_item(body: Mapping[str, Any]) -> dict[str, Any]:
    """An event this build cannot decode (a newer type, journalled by a newer projector): its
    envelope as stored, at no cost."""
    return {"event_id": body.get("event_id"), "type": body.get("type"), "occurred_at": body.get("occurred_at"),
            **{k: body.get(k) for k in ("workspace_id", "request_id", "agent_id", "run_id", "session_id",
                                        "workflow_id", "trace_id")},
            "cost_usd": "0", "cost_nanos": 0, "currency": "USD"}


def item_from_json(text: str) -> dict[str, Any]:
    """The timeline item of one journalled event body (JSON text)."""
    try:
        return timeline_item(event_decoder.decode(text))
    except msgspec.ValidationError:
        return raw_item(msgspec.json.decode(text))


# -- queries ---------------------------------------------------------------------------------------

def items_sql(kind: str, workspace_id: str | None) -> sql.Composable:
    """The journal rows of one run or session (`%(id)s`, `%(ws)s`, `%(n)s`), in timeline order.
    The prefix comparison is what the 0009 indexes key; with a workspace, the index order is the
    timeline order."""
    field = sql.Literal(f"{kind}_id")
    where = sql.SQL("left(body->>{f}, {p}) = left(%(id)s, {p}) AND body->>{f} = %(id)s").format(
        f=field, p=sql.Literal(ID_PREFIX))
    if workspace_id is not None:
        where = sql.SQL("{} AND workspace_id = %(ws)s").format(where)
    return sql.SQL("SELECT body::text AS body FROM event_journal WHERE {} ORDER BY occurred_at, event_id "
                   "LIMIT %(n)s").format(where)


def session_totals_sql() -> sql.Composable:
    """The finance sums of one session (`%(id)s` bounded as the projection stores it, `%(ws)s`)."""
    return sql.SQL("SELECT count(*) AS facts, {aggs} FROM finance_fact WHERE session_id = %(id)s "
                   "AND (%(ws)s::text IS NULL OR workspace_id = %(ws)s)").format(aggs=aggregates())


async def _rows(pool: AsyncConnectionPool[Any], query: sql.Composable,
                params: Mapping[str, Any]) -> list[dict[str, Any]]:
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        rows: list[dict[str, Any]] = await cur.fetchall()
        return rows


async def timeline(pool: AsyncConnectionPool[Any], kind: str, ident: str, workspace_id: str | None,
                   limit: int) -> dict[str, Any]:
    """The timeline of run or session (`kind`) `ident`: items, `truncated`, `totals` (see the
    module docstring). 404 `<kind>_not_found` when nothing is recorded for it."""
    if kind not in KINDS:
        raise ValueError(kind)
    rows = await _rows(pool, items_sql(kind, workspace_id), {"id": ident, "ws": workspace_id, "n": limit + 1})
    if kind == "run":
        facts_sql, _, params = run_sql(ident, workspace_id)
        totals_row = (await _rows(pool, facts_sql, params))[0]
        facts = int(totals_row["workspaces"])
    else:
        totals_row = (await _rows(pool, session_totals_sql(), {"id": bounded(ident), "ws": workspace_id}))[0]
        facts = int(totals_row["facts"])
    if not rows and facts == 0:
        where = f" in workspace '{workspace_id}'" if workspace_id is not None else ""
        raise NotFound(f"No events recorded for {kind} '{ident}'{where}.", param=f"{kind}_id",
                       code=f"{kind}_not_found")
    return {"object": f"{kind}.timeline", f"{kind}_id": ident, "workspace_id": workspace_id,
            "items": [item_from_json(r["body"]) for r in rows[:limit]], "truncated": len(rows) > limit,
            "limit": limit, "totals": metric_fields(totals_row)}
