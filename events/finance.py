"""Pure rules of the finance projection: the `finance_fact` row each money-relevant event
becomes (`finance_rows`) and the run outcomes (`outcome_rows`). Rows follow `FACT_COLUMNS`.

Amount columns (nano-units of the event's currency) are separate, so any grouping is one SUM:
* `llm.call`: one request (an error when its status is >= 400), its tokens, `llm_cost_nanos`, the
  prompt template and version that built it (if any);
  `estimated_cost_nanos` too when the gateway estimated its usage; `unpriced_tokens` when no
  price was known (cost 0 and `priced` false);
* `llm.repriced`: the cost of an unpriced call priced later, dated at the original call, and its
  tokens taken back out of `unpriced_tokens`;
* `tool.spend`: `tool_cost_nanos`; `tool.call` (the gateway's MCP endpoint): one request (an error
  unless its status is ok), `tool_cost_nanos`, vendor `mcp:<server>` and the tool;
  `payment.outbound`: `payments_out_nanos`;
  `payment.inbound`: `revenue_nanos`; `cache.hit`: `cache_savings_nanos` (a memo); a
  `payment.event` `refund_due`: `refunds_due_nanos` (owed back to a payer; revenue was booked net
  of it, so it is a memo for what to pay back, not a cost).
Total cost = llm + tool + payments out; margin = revenue - total cost.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from events.ledger import bounded, call_tokens, mcp_vendor
from schemas.events import (
    CacheHit,
    Event,
    LlmCall,
    LlmRepriced,
    PaymentEvent,
    PaymentInbound,
    PaymentOutbound,
    RunCompleted,
    ToolCall,
    ToolSpend,
)

FACT_COLUMNS = (
    ("event_id", "uuid"), ("workspace_id", "text"), ("occurred_at", "timestamptz"), ("kind", "text"),
    ("currency", "text"), ("agent_id", "text"), ("run_id", "text"), ("workflow_id", "text"), ("session_id", "text"),
    ("member_id", "text"), ("department_id", "text"), ("key_id", "text"), ("provider", "text"), ("model", "text"),
    ("vendor", "text"), ("tool", "text"), ("rail", "text"), ("endpoint_id", "text"), ("requests", "integer"),
    ("errors", "integer"), ("input_tokens", "bigint"), ("output_tokens", "bigint"), ("llm_cost_nanos", "numeric"),
    ("tool_cost_nanos", "numeric"), ("payments_out_nanos", "numeric"), ("revenue_nanos", "numeric"),
    ("cache_savings_nanos", "numeric"), ("estimated_cost_nanos", "numeric"), ("unpriced_tokens", "bigint"),
    ("price_source", "text"), ("price_id", "text"), ("properties", "jsonb"), ("prompt_id", "text"),
    ("prompt_version", "integer"), ("refunds_due_nanos", "numeric"),
)
_INDEX = {name: i for i, (name, _) in enumerate(FACT_COLUMNS)}


def _dim(value: str | None) -> str | None:
    return None if value is None else bounded(value)


def _row(event: Event, kind: str, currency: str, occurred_at: dt.datetime | None = None,
         **values: Any) -> tuple[Any, ...]:
    row: list[Any] = [None] * len(FACT_COLUMNS)
    for name in ("requests", "errors", "input_tokens", "output_tokens", "llm_cost_nanos", "tool_cost_nanos",
                 "payments_out_nanos", "revenue_nanos", "cache_savings_nanos", "estimated_cost_nanos",
                 "unpriced_tokens", "refunds_due_nanos"):
        row[_INDEX[name]] = 0
    row[_INDEX["event_id"]] = event.event_id
    row[_INDEX["workspace_id"]] = event.workspace_id
    row[_INDEX["occurred_at"]] = occurred_at or event.occurred_at
    row[_INDEX["kind"]] = kind
    row[_INDEX["currency"]] = currency
    for name in ("agent_id", "run_id", "workflow_id", "session_id"):
        row[_INDEX[name]] = _dim(getattr(event, name))
    for name in ("member_id", "department_id", "key_id"):
        row[_INDEX[name]] = _dim(getattr(event, name, None))
    props = getattr(event, "properties", None) or {}
    row[_INDEX["properties"]] = msgspec.json.encode(props).decode()
    for name, value in values.items():
        row[_INDEX[name]] = _dim(value) if isinstance(value, str) else value
    return tuple(row)


def finance_row(event: Event) -> tuple[Any, ...] | None:
    """The `finance_fact` row of `event`, or None for an event with no money in it."""
    if isinstance(event, LlmCall):
        unpriced = call_tokens(event.usage) if not event.priced and event.cost_nanos <= 0 else 0
        return _row(event, "llm", event.currency, provider=event.provider, model=event.model, requests=1,
                    errors=1 if event.status >= 400 else 0, input_tokens=event.usage.input_tokens,
                    output_tokens=event.usage.output_tokens, llm_cost_nanos=max(0, event.cost_nanos),
                    estimated_cost_nanos=max(0, event.cost_nanos) if event.usage_estimated else 0,
                    unpriced_tokens=unpriced, price_source=event.price_source or None, price_id=event.price_id,
                    prompt_id=event.prompt_id, prompt_version=event.prompt_version)
    if isinstance(event, LlmRepriced):
        # The cost belongs to when the call was made.
        return _row(event, "repriced", event.currency, event.original_occurred_at, provider=event.provider,
                    model=event.model, llm_cost_nanos=event.cost_nanos, unpriced_tokens=-event.tokens,
                    price_source="override", price_id=event.price_id)
    if isinstance(event, ToolSpend):
        return _row(event, "tool", event.currency, vendor=event.vendor, tool=event.tool or None,
                    tool_cost_nanos=event.amount_nanos)
    if isinstance(event, ToolCall):
        return _row(event, "tool", event.currency, vendor=mcp_vendor(event.server), tool=event.tool, requests=1,
                    errors=0 if event.status == "ok" else 1, tool_cost_nanos=event.cost_nanos)
    if isinstance(event, PaymentOutbound):
        return _row(event, "payment_out", event.currency, rail=event.rail, vendor=event.payee or None,
                    payments_out_nanos=event.amount_nanos)
    if isinstance(event, PaymentInbound):
        return _row(event, "revenue", event.currency, rail=event.rail, endpoint_id=event.endpoint_id,
                    revenue_nanos=event.amount_nanos)
    if isinstance(event, PaymentEvent) and event.status == "refund_due" and event.amount_nanos > 0:
        return _row(event, "refund_due", event.currency, rail=event.rail, endpoint_id=event.endpoint_id,
                    refunds_due_nanos=event.amount_nanos)
    if isinstance(event, CacheHit):
        return _row(event, "cache_hit", event.currency, provider=event.provider, model=event.model,
                    cache_savings_nanos=event.saved_nanos)
    return None


def finance_rows(events: list[Event]) -> list[tuple[Any, ...]]:
    return [row for e in events if (row := finance_row(e)) is not None]


def outcome_rows(events: list[Event]) -> list[tuple[Any, ...]]:
    """`run_outcome` rows (workspace, run, outcome, metadata json, event id, completed at): per
    run the latest report (by time, then event id), so one statement touches each row once."""
    latest: dict[tuple[str, str], RunCompleted] = {}
    for e in events:
        if isinstance(e, RunCompleted) and e.run_id:
            key = (e.workspace_id, bounded(e.run_id))
            seen = latest.get(key)
            if seen is None or (e.occurred_at, e.event_id) > (seen.occurred_at, seen.event_id):
                latest[key] = e
    return [(ws, run, e.outcome, msgspec.json.encode(e.metadata).decode(), e.event_id, e.occurred_at)
            for (ws, run), e in sorted(latest.items())]
