"""events/publisher.py pure rules: shrinking an oversized llm.call, subject checks, failure kinds."""

from __future__ import annotations

import datetime as dt

import nats.errors
from nats.js.errors import APIError, ServiceUnavailableError

from events.publisher import TRUNCATED_ANOMALY, TRUNCATED_FIELD_CHARS, is_permanent, reduced_call, subject_ok
from schemas.events import LlmCall, Usage
from schemas.ids import uuid7


def _call(**kw: object) -> LlmCall:
    base: dict[str, object] = {"event_id": uuid7(), "occurred_at": dt.datetime.now(dt.UTC), "workspace_id": "ws",
                               "provider": "mock", "model": "echo", "usage": Usage(input_tokens=9, output_tokens=4),
                               "cost_nanos": 77, "anomalies": ("usage_clamped",)}
    return LlmCall(**(base | kw))  # type: ignore[arg-type]


def test_an_oversized_call_keeps_its_money_facts_and_is_flagged() -> None:
    big = _call(model="m" * 1_000_000, run_id="r" * 5000)
    reduced = reduced_call(big, 4096)
    assert reduced is not None
    smaller, payload = reduced
    assert len(payload) <= 4096
    assert smaller.model == "m" * TRUNCATED_FIELD_CHARS and smaller.run_id == "r" * TRUNCATED_FIELD_CHARS
    assert smaller.anomalies == ("usage_clamped", TRUNCATED_ANOMALY)
    assert (smaller.usage, smaller.cost_nanos, smaller.event_id, smaller.workspace_id) == (
        big.usage, big.cost_nanos, big.event_id, big.workspace_id)


def test_a_call_that_cannot_fit_is_not_reduced() -> None:
    assert reduced_call(_call(workspace_id="w" * 10_000), 4096) is None  # the workspace is never cut


def test_subjects_nats_would_refuse() -> None:
    assert subject_ok("events.ws_1.llm.call")
    for bad in ("events.a b.llm.call", "events.*.llm.call", "events.>.x", "events..llm.call", "", "x\r\nPUB"):
        assert not subject_ok(bad)


def test_permanent_and_transient_failures() -> None:
    assert is_permanent(nats.errors.MaxPayloadError())
    assert is_permanent(nats.errors.BadSubjectError())
    assert is_permanent(APIError(code=400, err_code=10054, description="message size exceeds maximum allowed"))
    for transient in (nats.errors.TimeoutError(), nats.errors.NoRespondersError(), ServiceUnavailableError(),
                      nats.errors.ConnectionClosedError(), APIError(code=400, err_code=10060)):
        assert not is_permanent(transient)
