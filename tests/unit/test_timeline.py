"""Timeline items (controlplane/timeline.py) and their table rows (deploy/timeline_cli.py): pure."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import msgspec
import pytest

from controlplane.timeline import event_cost, item_from_json, items_sql, parse_limit, timeline_item
from deploy.timeline_cli import print_timeline, table_row
from events.finance import FACT_COLUMNS, finance_row
from schemas.errors import InvalidRequest
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
    ToolSpend,
    Usage,
    event_encoder,
)
from schemas.ids import uuid7

T = dt.datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=dt.UTC)


def env(**extra: Any) -> dict[str, Any]:
    return {"event_id": uuid7(), "occurred_at": T, "workspace_id": "ws", "run_id": "r1", "session_id": "s1",
            "agent_id": "a1", "request_id": "req-1", **extra}


def events() -> list[Event]:
    return [
        LlmCall(**env(trace_id="0af7651916cd43dd8448eb211c80319c"), provider="mock", model="echo", cost_nanos=1_500_000,
                usage=Usage(input_tokens=10, output_tokens=5), latency_ms=12.5, ttfb_ms=3.0, body_key="ws/k"),
        LlmCall(**env(), provider="mock", model="echo", cost_nanos=-5, status=500, error_code="upstream_error"),
        LlmRepriced(**env(), original_event_id=uuid7(), provider="p", model="m", tokens=30, cost_nanos=700,
                    price_id="pr-1"),
        ToolSpend(**env(), spend_id="sp", amount_nanos=2_000_000, vendor="serpapi", tool="search"),
        PaymentOutbound(**env(), payment_id="po", amount_nanos=3_000_000, rail="x402", payee="api.example.com"),
        PaymentInbound(**env(), payment_id="pi", amount_nanos=10_000_000, rail="x402", endpoint_id="ep"),
        PaymentEvent(**env(), endpoint_id="ep", status="refund_due", amount_nanos=400),
        CacheHit(**env(), provider="mock", model="echo", saved_nanos=400_000),
        PolicyDecision(**env(), outcome="deny", code="policy_denied", rule="policy:p1.models_deny"),
        BudgetAlert(**env(), budget_id="b1", scope="agent", scope_id="a1", threshold_pct=80, period_start="2026-03",
                    limit_nanos=10**9, spent_nanos=8 * 10**8),
        RunCompleted(**env(), outcome="succeeded"),
    ]


def test_every_item_has_the_contract_fields_and_a_decimal_cost() -> None:
    for event in events():
        item = timeline_item(event)
        for name in ("type", "occurred_at", "request_id", "cost_usd", "trace_id", "event_id", "run_id",
                     "session_id", "agent_id"):
            assert name in item, (name, item)
        assert item["occurred_at"] == "2026-03-01T12:00:00.123000+00:00"
        assert isinstance(item["cost_usd"], str)
        assert msgspec.json.decode(msgspec.json.encode(item)) == item  # plain JSON values


def test_the_cost_is_what_finance_books_as_cost_and_revenue_is_not_cost() -> None:
    """Per event, the item's cost equals the finance fact's llm + tool + payments out."""
    for event in events():
        row = finance_row(event)
        booked = 0
        if row is not None:
            names = [n for n, _ in FACT_COLUMNS]
            booked = sum(row[names.index(c)] for c in ("llm_cost_nanos", "tool_cost_nanos", "payments_out_nanos"))
        assert event_cost(event)[0] == booked, event


def test_type_fields() -> None:
    items = {i["type"] + str(n): i for n, i in enumerate(timeline_item(e) for e in events())}
    call = items["llm.call0"]
    assert (call["cost_usd"], call["cost_nanos"], call["latency_ms"], call["ttfb_ms"]) == (
        "0.0015", 1_500_000, 12.5, 3.0)
    assert call["body_key"] == "ws/k" and call["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert call["usage"]["input_tokens"] == 10 and (call["provider"], call["model"], call["status"]) == (
        "mock", "echo", 200)
    failed = items["llm.call1"]
    assert (failed["cost_usd"], failed["status"], failed["error_code"], failed["body_key"]) == (
        "0", 500, "upstream_error", None)
    assert items["llm.repriced2"]["cost_usd"] == "0.0000007"
    assert (items["tool.spend3"]["cost_usd"], items["tool.spend3"]["vendor"]) == ("0.002", "serpapi")
    assert (items["payment.outbound4"]["cost_usd"], items["payment.outbound4"]["rail"]) == ("0.003", "x402")
    inbound = items["payment.inbound5"]
    assert (inbound["cost_usd"], inbound["revenue_usd"], inbound["revenue_nanos"]) == ("0", "0.01", 10_000_000)
    assert (items["payment.event6"]["status"], items["payment.event6"]["cost_usd"]) == ("refund_due", "0")
    hit = items["cache.hit7"]
    assert (hit["cost_usd"], hit["saved_usd"], hit["cache"]) == ("0", "0.0004", "exact")
    decision = items["policy.decision8"]
    assert (decision["decision"], decision["code"], decision["rule"]) == ("deny", "policy_denied",
                                                                          "policy:p1.models_deny")
    assert items["budget.alert9"]["spent_usd"] == "0.8"
    assert items["run.completed10"]["status"] == "succeeded"


def test_another_currency_is_not_usd() -> None:
    item = timeline_item(ToolSpend(**env(), spend_id="sp", amount_nanos=5, vendor="v", currency="EUR"))
    assert (item["cost_usd"], item["cost_nanos"], item["currency"]) == ("0", 5, "EUR")


def test_a_journalled_body_decodes_and_an_unknown_type_keeps_its_envelope() -> None:
    event = events()[0]
    assert item_from_json(event_encoder.encode(event).decode()) == timeline_item(event)
    raw = msgspec.json.encode({"type": "future.thing", "event_id": "e", "occurred_at": "2026-03-01T12:00:00Z",
                               "workspace_id": "ws", "request_id": "r", "run_id": "r1"}).decode()
    item = item_from_json(raw)
    assert (item["type"], item["request_id"], item["cost_usd"], item["trace_id"]) == ("future.thing", "r", "0", None)


def test_limit_and_parameters() -> None:
    assert parse_limit({}) == (None, 1000)
    assert parse_limit({"workspace_id": "w", "limit": "10000"}) == ("w", 10000)
    for bad in ({"limit": "0"}, {"limit": "10001"}, {"limit": "x"}, {"workspace": "w"}):
        with pytest.raises(InvalidRequest):
            parse_limit(bad)


def test_the_query_uses_the_indexed_prefix_and_the_full_id() -> None:
    text = items_sql("session", "ws").as_string(None)
    assert "left(body->>'session_id', 256) = left(%(id)s, 256)" in text
    assert "body->>'session_id' = %(id)s" in text and "workspace_id = %(ws)s" in text
    assert "ORDER BY occurred_at, event_id" in text
    assert "workspace_id" not in items_sql("run", None).as_string(None)


def test_table_rows_and_totals() -> None:
    items = [timeline_item(e) for e in events()]
    rows = [table_row(i) for i in items]
    assert rows[0] == {"time": "2026-03-01 12:00:00.123", "type": "llm.call", "request_id": "req-1",
                       "what": "mock/echo", "status": "200", "cost_usd": "0.0015", "revenue_usd": None,
                       "latency": "12 ms"}
    assert rows[1]["status"] == "500 upstream_error"
    assert rows[3]["what"] == "serpapi/search" and rows[4]["what"] == "x402 api.example.com"
    assert rows[8]["status"] == "deny: policy_denied" and rows[8]["what"] == "policy:p1.models_deny"
    totals = {"requests": 2, "errors": 1, "input_tokens": 10, "output_tokens": 5, "unpriced_tokens": 0,
              **{f"{m}_usd": "0" for m in ("llm_cost", "tool_cost", "payments_out", "cost", "revenue", "margin",
                                           "cache_savings", "estimated_cost")}}
    totals["cost_usd"] = "0.0065007"
    out = io.StringIO()
    print_timeline({"items": items, "totals": totals}, out)
    text = out.getvalue()
    assert "revenue" in text.splitlines()[0] and "0.0015" in text
    assert "total cost 0.0065007" in text and "2 requests, 1 errors" in text


def test_the_routes_are_in_the_openapi_document() -> None:
    from controlplane.app import openapi_document

    paths = openapi_document()["paths"]
    for path in ("/admin/v1/runs/{id}/timeline", "/admin/v1/sessions/{id}"):
        op = paths[path]["get"]
        assert op["parameters"][0]["name"] == "id" and "time order" in op["summary"]
