"""schemas/events.py and schemas/ids.py: the event envelope on the wire, and UUIDv7 ids."""

from __future__ import annotations

import datetime as dt
import uuid

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import ConfigChanged, LlmCall, Usage, event_decoder, event_encoder, event_type, subject_for
from schemas.ids import new_id, uuid7

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


def llm_call(**kw: object) -> LlmCall:
    base: dict[str, object] = {
        "event_id": uuid7(1_700_000_000_000),
        "occurred_at": T0,
        "workspace_id": "ws_1",
        "provider": "openai",
        "model": "gpt-4o-mini",
    }
    base.update(kw)
    return LlmCall(**base)  # type: ignore[arg-type]


# --- encode / decode ---------------------------------------------------------------------------


def test_llm_call_round_trip_with_all_fields() -> None:
    event = llm_call(
        agent_id="agent_1", run_id="run_1", session_id="s_1", workflow_id="wf_1", request_id="req_1",
        snapshot_revision=42, ingress="chat.completions", stream=True, status=502, error_code="upstream_error",
        usage=Usage(input_tokens=10, output_tokens=5, cache_read_tokens=2, cache_write_tokens=1,
                    reasoning_tokens=3),
        cost_nanos=123_456, priced=False, key_id="vk_1", latency_ms=12.5, ttfb_ms=3.25, cache="hit",
        partial=True,
    )
    data = event_encoder.encode(event)
    decoded = event_decoder.decode(data)
    assert decoded == event
    assert type(decoded) is LlmCall
    assert msgspec.json.decode(data)["type"] == "llm.call"


def test_config_changed_round_trip() -> None:
    event = ConfigChanged(
        event_id=uuid7(1_700_000_000_000), occurred_at=T0, workspace_id="ws_1",
        entity="provider", entity_id="prov_1", op="create", actor="admin:alice",
        data={"name": "openai", "nested": {"list": [1, 2.5, None, True]}},
    )
    decoded = event_decoder.decode(event_encoder.encode(event))
    assert decoded == event
    assert type(decoded) is ConfigChanged
    assert event_type(decoded) == "config.changed"


def test_minimal_llm_call_uses_defaults() -> None:
    data = msgspec.json.encode({
        "type": "llm.call", "event_id": str(uuid7()), "occurred_at": "2025-03-01T12:00:00Z",
        "workspace_id": "ws_1", "provider": "mock", "model": "echo",
    })
    event = event_decoder.decode(data)
    assert isinstance(event, LlmCall)
    assert event.usage == Usage()
    assert (event.cost_nanos, event.currency, event.priced, event.status) == (0, "USD", True, 200)
    assert event.agent_id is None


def test_decoder_ignores_unknown_fields() -> None:
    event = llm_call(cost_nanos=7)
    doc = msgspec.json.decode(event_encoder.encode(event))
    doc["from_the_future"] = {"anything": [1, 2]}
    doc["usage"]["audio_tokens"] = 99
    decoded = event_decoder.decode(msgspec.json.encode(doc))
    assert decoded == event


def test_decoder_rejects_unknown_event_type() -> None:
    doc = msgspec.json.decode(event_encoder.encode(llm_call()))
    doc["type"] = "llm.unknown"
    with pytest.raises(msgspec.ValidationError):
        event_decoder.decode(msgspec.json.encode(doc))


def test_events_are_frozen() -> None:
    event = llm_call()
    with pytest.raises(AttributeError):
        event.cost_nanos = 1  # type: ignore[misc]


def test_events_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        LlmCall(uuid7(), T0, "ws_1", provider="p", model="m")  # type: ignore[call-arg]


counts = st.integers(min_value=0, max_value=2**53)
usages = st.builds(
    Usage, input_tokens=counts, output_tokens=counts, cache_read_tokens=counts,
    cache_write_tokens=counts, reasoning_tokens=counts,
)
ids = st.none() | st.text(min_size=1, max_size=40)


@given(
    usage=usages,
    cost=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    latency=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    ttfb=st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False),
    agent=ids,
    revision=st.integers(min_value=0, max_value=2**63 - 1),
    when=st.datetimes(timezones=st.just(dt.UTC)),
    priced=st.booleans(),
)
def test_llm_call_round_trip_property(
    usage: Usage, cost: int, latency: float, ttfb: float | None, agent: str | None, revision: int,
    when: dt.datetime, priced: bool,
) -> None:
    event = llm_call(
        usage=usage, cost_nanos=cost, latency_ms=latency, ttfb_ms=ttfb, agent_id=agent,
        snapshot_revision=revision, occurred_at=when, priced=priced, event_id=uuid7(),
    )
    assert event_decoder.decode(event_encoder.encode(event)) == event


# --- subjects ----------------------------------------------------------------------------------


def test_subject_for() -> None:
    assert subject_for(llm_call(workspace_id="ws_9"), "events") == "events.ws_9.llm.call"
    changed = ConfigChanged(event_id=uuid7(), occurred_at=T0, workspace_id="ws_2", entity="vk",
                            entity_id="vk_1", op="delete")
    assert subject_for(changed, "test.events") == "test.events.ws_2.config.changed"


# --- ids ---------------------------------------------------------------------------------------


@given(ms=st.integers(min_value=0, max_value=2**48 - 1))
def test_uuid7_version_variant_and_timestamp(ms: int) -> None:
    value = uuid7(ms)
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert value.int >> 80 == ms


@given(a=st.integers(min_value=0, max_value=2**48 - 2), gap=st.integers(min_value=1, max_value=2**40))
def test_uuid7_orders_by_time(a: int, gap: int) -> None:
    b = min(a + gap, 2**48 - 1)
    assert uuid7(a) < uuid7(b)
    assert str(uuid7(a)) < str(uuid7(b))


def test_uuid7_without_argument_uses_the_clock() -> None:
    before = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    value = uuid7()
    after = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    assert before - 1 <= value.int >> 80 <= after + 1


def test_uuid7_is_random_within_one_millisecond() -> None:
    assert len({uuid7(1_700_000_000_000) for _ in range(500)}) == 500


def test_new_id_has_prefix_and_random_part() -> None:
    a, b = new_id("ws"), new_id("ws")
    assert a.startswith("ws_")
    assert len(a) == len("ws_") + 16
    assert a != b
