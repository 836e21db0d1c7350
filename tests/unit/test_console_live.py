"""The Live page's pure parts: the whitelisted row, the filters, the SSE framing, the bounded
per-client queue and the cap on streams."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from controlplane.console import live
from schemas.events import LlmCall, Usage, subject_for


def call(**extra: object) -> LlmCall:
    fields: dict[str, object] = {
        "event_id": uuid.UUID("0190a0b0-0000-7000-8000-000000000001"),
        "occurred_at": dt.datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=dt.UTC),
        "workspace_id": "demo", "agent_id": "a1", "run_id": "r1", "request_id": "req-1",
        "provider": "mock", "model": "echo", "usage": Usage(input_tokens=12, output_tokens=34),
        "cost_nanos": 1_500_000, "latency_ms": 12.6, "key_id": "key-secret-id", "provider_key_id": "pk-1",
        "properties": {"customer": "acme"}, "body_key": "bodies/x#req-1", "trace_id": "ab" * 16,
    }
    fields.update(extra)
    return LlmCall(**fields)  # type: ignore[arg-type]


def test_a_row_has_the_display_fields_only() -> None:
    row = live.call_row(call())
    assert row == {
        "event_id": "0190a0b0-0000-7000-8000-000000000001", "request_id": "req-1",
        "time": "2025-03-04 05:06:07 UTC", "agent_id": "a1", "run_id": "r1", "provider": "mock", "model": "echo",
        "status": 200, "error_code": None, "latency_ms": 13, "input_tokens": 12, "output_tokens": 34,
        "cost": "0.0015", "currency": "USD", "cost_usd": "0.0015", "priced": True, "cache": "miss",
    }


def test_a_row_in_another_currency_has_no_usd_figure() -> None:
    row = live.call_row(call(currency="EUR", cost_nanos=2_000_000_001))
    assert (row["cost"], row["currency"], row["cost_usd"]) == ("2.000000001", "EUR", None)


def test_filters_match_the_workspace_agent_and_run_exactly() -> None:
    event = call()
    assert live.matches(event, "demo", "", "")
    assert live.matches(event, "demo", "a1", "r1")
    assert not live.matches(event, "other", "", "")
    assert not live.matches(event, "demo", "a", "")
    assert not live.matches(event, "demo", "", "r2")
    assert not live.matches(call(agent_id=None), "demo", "a1", "")


def test_the_subject_is_the_publishers() -> None:
    assert live.subject("events", "demo") == subject_for(call(), "events")
    assert live.subject_token_ok("demo-ws_1")
    for bad in ("", "a.b", "*", ">", "a b"):
        assert not live.subject_token_ok(bad)


def test_query_filters_are_stripped_and_bounded() -> None:
    assert live.filters({}) == ("", "")
    assert live.filters({"agent": " a1 ", "run": "x" * 1000}) == ("a1", "x" * live.FILTER_MAX)


def test_an_event_is_one_json_data_line() -> None:
    assert live.sse({"a": "line\nbreak"}) == b'data: {"a":"line\\nbreak"}\n\n'
    assert live.sse({"dropped": 3}, "dropped") == b'event: dropped\ndata: {"dropped":3}\n\n'
    frame = live.sse(live.call_row(call(agent_id="</script><b>x")))
    assert json.loads(frame.decode().removeprefix("data: "))["agent_id"] == "</script><b>x"


async def test_a_full_queue_drops_its_oldest_rows_and_counts_them() -> None:
    queue = live.CallQueue(3)
    assert not queue.ready.is_set()
    for i in range(5):
        queue.put({"n": i})
    assert queue.ready.is_set()
    assert queue.take() == ([{"n": 2}, {"n": 3}, {"n": 4}], 2)
    assert not queue.ready.is_set()
    assert queue.take() == ([], 0)
    queue.close()
    assert queue.ready.is_set() and queue.closed
    queue.take()
    assert queue.ready.is_set()  # a closed queue stays ready, so its stream ends


async def test_streams_are_capped_and_closed_together() -> None:
    streams = live.LiveStreams(2)
    first, second = streams.open(4), streams.open(4)
    assert first is not None and second is not None
    assert streams.open(4) is None
    streams.release(first)
    third = streams.open(4)
    assert third is not None and len(streams) == 2
    streams.close()
    assert second.closed and third.closed and not first.closed
    streams.release(second)
    assert streams.open(4) is None  # closing: no new streams


def test_recent_calls_use_the_filters_indexes() -> None:
    plain, params = live.recent_sql("", "")
    assert "FROM event_journal j WHERE" in plain and "finance_fact" not in plain and params == {"n": live.RECENT}
    by_agent, params = live.recent_sql("a1", "")
    assert "finance_fact f JOIN event_journal j" in by_agent and params["agent_b"] == "a1"
    by_run, params = live.recent_sql("a1", "r1")
    assert "finance_fact" not in by_run and "left(j.body->>'run_id', 256)" in by_run
    assert params == {"n": live.RECENT, "run": "r1", "agent": "a1"}
