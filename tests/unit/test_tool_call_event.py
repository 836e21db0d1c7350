"""The `tool.call` event (issue 16: a tool called through the gateway's MCP endpoint) through the
pure rules: the event union, the ledger's transfers, what the journal refuses, the finance fact,
the publisher's size cap, the timeline item and its CLI row."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from controlplane.timeline import event_cost, item_from_json, timeline_item
from deploy.timeline_cli import table_row
from events.finance import FACT_COLUMNS, finance_row
from events.ledger import UNATTRIBUTED_AGENT, journal_rejection, transfers_for
from events.publisher import TRUNCATED_FIELD_CHARS, reduced_call
from schemas.events import Event, ToolCall, ToolSpend, event_decoder, event_encoder, event_type, subject_for
from schemas.ids import uuid7
from schemas.log_delivery import EVENT_TYPES

T = dt.datetime(2026, 10, 2, 9, 30, tzinfo=dt.UTC)
COLUMNS = [name for name, _ in FACT_COLUMNS]


def tool_call(cost: int = 2_500_000, status: str = "ok", agent: str | None = "agent_1", **kw: Any) -> ToolCall:
    env: dict[str, Any] = {"event_id": uuid7(), "occurred_at": T, "workspace_id": "ws_1", "agent_id": agent,
                           "run_id": "run_1", "session_id": "sess_1", "workflow_id": "flow_1", "request_id": "req_1",
                           "key_id": "vk_1", "department_id": "dep_1", "member_id": "mem_1",
                           "properties": {"team": "search"}, "server": "search", "tool": "lookup",
                           "latency_ms": 41.5, "mcp_server_id": "mcp_1"}
    return ToolCall(**(env | kw), status=status, cost_nanos=cost)


def _fact(event: Event) -> dict[str, Any]:
    row = finance_row(event)
    assert row is not None
    return dict(zip(COLUMNS, row, strict=True))


def test_the_event_is_in_the_union_with_its_subject() -> None:
    event = tool_call()
    assert event_type(event) == "tool.call" and "tool.call" in EVENT_TYPES
    assert subject_for(event, "events") == "events.ws_1.tool.call"
    assert event_decoder.decode(event_encoder.encode(event)) == event
    defaults = event_decoder.decode(b'{"type": "tool.call", "event_id": "0192f0c4-8a1e-7c3e-9a55-3b8f4b1f2a10", '
                                    b'"occurred_at": "2026-10-02T09:30:00Z", "workspace_id": "w", '
                                    b'"server": "s", "tool": "t", "newer_field": 1}')
    assert isinstance(defaults, ToolCall)
    assert (defaults.status, defaults.cost_nanos, defaults.currency, defaults.error_code) == ("ok", 0, "USD", None)


def test_a_priced_call_posts_one_transfer_like_a_tool_spend() -> None:
    event = tool_call(2_500_000)
    [transfer] = transfers_for(event)
    assert (transfer.debit, transfer.credit) == ("agent:ws_1:agent_1:tool_cost", "vendor:ws_1:mcp:search:payable")
    assert (transfer.amount, transfer.currency, transfer.code, transfer.leg) == (2_500_000, "USD", "tool_call", 0)
    assert transfers_for(event) == [transfer]  # the transfer id derives from the event id
    assert transfer.id != event.event_id and transfer.id != transfers_for(tool_call(2_500_000))[0].id
    spend = ToolSpend(event_id=uuid7(), occurred_at=T, workspace_id="ws_1", agent_id="agent_1", spend_id="sp",
                      amount_nanos=1, vendor="mcp:search")
    [booked] = transfers_for(spend)
    assert (booked.debit, booked.credit) == (transfer.debit, transfer.credit)


def test_a_free_failed_or_refused_call_posts_nothing() -> None:
    assert transfers_for(tool_call(0)) == []
    assert transfers_for(tool_call(0, status="error", error_code="upstream_timeout")) == []
    assert transfers_for(tool_call(0, status="refused", error_code="policy_denied")) == []


def test_an_unattributed_call_books_to_the_unattributed_agent() -> None:
    [transfer] = transfers_for(tool_call(5, agent=None))
    assert transfer.debit == f"agent:ws_1:{UNATTRIBUTED_AGENT}:tool_cost"


def test_the_journal_refuses_a_cost_no_column_holds() -> None:
    for cost in (-1, 10**38):
        event = tool_call(cost)
        assert journal_rejection(event, event_encoder.encode(event)) == "out_of_range: cost_nanos"
    event = tool_call(10**37)
    assert journal_rejection(event, event_encoder.encode(event)) is None


def test_the_finance_fact_is_a_tool_request_with_its_attribution() -> None:
    fact = _fact(tool_call(2_500_000))
    assert (fact["kind"], fact["vendor"], fact["tool"], fact["currency"]) == ("tool", "mcp:search", "lookup", "USD")
    assert (fact["requests"], fact["errors"], fact["tool_cost_nanos"]) == (1, 0, 2_500_000)
    assert fact["llm_cost_nanos"] == fact["payments_out_nanos"] == fact["revenue_nanos"] == 0
    assert (fact["agent_id"], fact["run_id"], fact["workflow_id"], fact["session_id"]) == (
        "agent_1", "run_1", "flow_1", "sess_1")
    assert (fact["key_id"], fact["department_id"], fact["member_id"]) == ("vk_1", "dep_1", "mem_1")
    assert msgspec.json.decode(fact["properties"]) == {"team": "search"}
    assert fact["provider"] is None and fact["model"] is None


def test_a_failed_or_refused_call_is_an_error_at_no_cost() -> None:
    for status in ("error", "refused"):
        fact = _fact(tool_call(0, status=status, error_code="x"))
        assert (fact["requests"], fact["errors"], fact["tool_cost_nanos"]) == (1, 1, 0), status


@given(st.lists(st.tuples(st.integers(0, 10**12), st.sampled_from(["ok", "error", "refused"]),
                          st.sampled_from(["USD", "EUR"])), max_size=20))
def test_finance_tool_cost_equals_the_ledger_per_currency(calls: list[tuple[int, str, str]]) -> None:
    """What `ledger reconcile` checks: the facts' tool cost equals the transfers' amounts."""
    finance: Counter[str] = Counter()
    ledger: Counter[str] = Counter()
    for cost, status, currency in calls:
        event = tool_call(cost, status=status, currency=currency)
        finance[currency] += _fact(event)["tool_cost_nanos"]
        for t in transfers_for(event):
            ledger[t.currency] += t.amount
    assert +finance == +ledger


def test_an_oversized_call_is_cut_not_dropped() -> None:
    event = tool_call(7, tool="t" * 100_000, error_code="e" * 100_000)
    reduced = reduced_call(event, 4096)
    assert reduced is not None
    smaller, payload = reduced
    assert isinstance(smaller, ToolCall) and len(payload) <= 4096
    assert (len(smaller.tool), len(smaller.error_code or "")) == (TRUNCATED_FIELD_CHARS, TRUNCATED_FIELD_CHARS)
    assert (smaller.cost_nanos, smaller.latency_ms, smaller.server, smaller.event_id) == (
        7, 41.5, "search", event.event_id)


def test_the_timeline_item_shows_the_call_and_its_cost() -> None:
    event = tool_call(2_500_000)
    item = timeline_item(event)
    assert (item["type"], item["cost_usd"], item["cost_nanos"], item["currency"]) == ("tool.call", "0.0025",
                                                                                      2_500_000, "USD")
    assert (item["server"], item["tool"], item["status"], item["latency_ms"], item["error_code"]) == (
        "search", "lookup", "ok", 41.5, None)
    assert (item["vendor"], item["mcp_server_id"], item["run_id"], item["request_id"]) == (
        "mcp:search", "mcp_1", "run_1", "req_1")
    assert event_cost(event) == (2_500_000, "USD")
    assert item_from_json(event_encoder.encode(event).decode()) == item
    assert msgspec.json.decode(msgspec.json.encode(item)) == item
    refused = timeline_item(tool_call(0, status="refused", error_code="policy_denied"))
    assert (refused["cost_usd"], refused["status"], refused["error_code"]) == ("0", "refused", "policy_denied")


def test_the_cli_row_names_the_server_tool_and_status() -> None:
    row = table_row(timeline_item(tool_call(2_500_000)))
    assert (row["type"], row["what"], row["status"], row["cost_usd"], row["latency"]) == (
        "tool.call", "mcp:search/lookup", "ok", "0.0025", "42 ms")
    failed = table_row(timeline_item(tool_call(0, status="error", error_code="upstream_unavailable")))
    assert failed["status"] == "error upstream_unavailable"
