"""Log delivery, the pure rules (schemas/log_delivery.py), the admin input checks
(controlplane/log_destinations.py) and one destination worker's settling (events/delivery.py)
over fake messages, a fake sender and a fake book."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.commands import parse_command, public_view
from controlplane.log_destinations import CreateLogDestination, http_allowed
from events.delivery import Dead, DeliveryConfig, DestinationWorker
from events.delivery_senders import Attempt, Item
from schemas.entities import LogDestination
from schemas.errors import InvalidRequest
from schemas.events import LlmCall, event_encoder
from schemas.ids import uuid7
from schemas.log_delivery import (
    EVENT_TYPES,
    S3Target,
    envelope_decoder,
    http_outcome,
    ndjson,
    otlp_logs_body,
    otlp_logs_url,
    otlp_record,
    parse_s3_url,
    retry_delay_s,
    s3_object_key,
    settle,
    signature,
    subject_parts,
    verify_signature,
    wants,
)

DEST = LogDestination(id="logdest_1", type="webhook", url="https://example.com/hook")


# -- signature ---------------------------------------------------------------------------------------

def test_signature_is_the_documented_hmac_over_timestamp_dot_body() -> None:
    body = b'{"type":"llm.call"}'
    header = signature("whsec", 1_700_000_000, body)
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    assert t == "1700000000"
    assert v1 == hmac.new(b"whsec", b"1700000000." + body, hashlib.sha256).hexdigest()


@given(st.text(min_size=1, max_size=40), st.binary(max_size=200), st.integers(0, 2**40))
def test_a_signature_verifies_and_any_change_breaks_it(secret: str, body: bytes, t: int) -> None:
    header = signature(secret, t, body)
    assert verify_signature(secret, header, body, now=t)
    assert not verify_signature(secret + "x", header, body, now=t)
    assert not verify_signature(secret, header, body + b" ", now=t)
    assert not verify_signature(secret, header, body, now=t + 301)  # outside the replay window
    assert verify_signature(secret, header, body, now=t + 300)


def test_verify_refuses_malformed_headers() -> None:
    for header in ("", "v1=ab", "t=1", "t=x,v1=ab", "t=1,t=2,v1=ab"):
        assert not verify_signature("s", header, b"{}", now=1)


# -- filtering ---------------------------------------------------------------------------------------

def test_subject_parts_split_the_workspace_from_a_dotted_type() -> None:
    assert subject_parts("events.demo.llm.call", "events") == ("demo", "llm.call")
    assert subject_parts("ev.x.demo.budget.alert", "ev.x") == ("demo", "budget.alert")
    assert subject_parts("events-fleet.heartbeat", "events") is None
    assert subject_parts("events.demo", "events") is None


def test_wants_filters_by_workspace_and_event_type() -> None:
    anything = DEST
    assert wants(anything, "demo", "llm.call") and wants(anything, "_system", "config.changed")
    one_ws = msgspec.structs.replace(DEST, workspace_id="demo")
    assert wants(one_ws, "demo", "policy.decision") and not wants(one_ws, "other", "policy.decision")
    calls = msgspec.structs.replace(DEST, workspace_id="demo", event_types=("llm.call", "cache.hit"))
    assert wants(calls, "demo", "cache.hit") and not wants(calls, "demo", "config.changed")
    assert not wants(calls, "other", "llm.call")


def test_the_known_event_types_are_the_union_tags() -> None:
    assert {"llm.call", "config.changed", "policy.decision", "payment.inbound", "run.completed"} <= EVENT_TYPES


# -- retries -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "outcome"), [
    (200, "delivered"), (204, "delivered"), (301, "retry"), (400, "permanent"), (401, "permanent"),
    (404, "permanent"), (408, "retry"), (410, "permanent"), (429, "retry"), (500, "retry"), (503, "retry"),
])
def test_http_outcomes(status: int, outcome: str) -> None:
    assert http_outcome(status) == outcome


def test_settle_retries_until_the_attempts_run_out() -> None:
    assert settle("delivered", 9, 3) == "ack"
    assert settle("retry", 1, 3) == "retry" and settle("retry", 2, 3) == "retry"
    assert settle("retry", 3, 3) == "dead"
    assert settle("permanent", 1, 3) == "dead"


@given(st.integers(1, 40), st.floats(0, 1, exclude_max=True))
def test_backoff_doubles_with_jitter_and_is_capped(attempt: int, jitter: float) -> None:
    delay = retry_delay_s(attempt, 2.0, 300.0, jitter)
    full = min(300.0, 2.0 * 2 ** (attempt - 1))
    assert full / 2 <= delay <= full
    assert retry_delay_s(1, 2.0, 300.0, 0.0) == 1.0 and retry_delay_s(3, 2.0, 300.0, 0.0) == 4.0


# -- payload shapes ----------------------------------------------------------------------------------

def _call(**kw: Any) -> LlmCall:
    base: dict[str, Any] = {"event_id": uuid7(), "occurred_at": dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC),
                            "workspace_id": "demo", "agent_id": "bot", "run_id": "run-1", "request_id": "req-1",
                            "provider": "mock", "model": "echo"}
    return LlmCall(**(base | kw))


def test_an_otlp_record_carries_the_ids_and_the_trace() -> None:
    event = _call(trace_id="0af7651916cd43dd8448eb211c80319c", status=502)
    body = event_encoder.encode(event)
    record = otlp_record(envelope_decoder.decode(body), body, 5, 6)
    attrs = {a["key"]: a["value"]["stringValue"] for a in record["attributes"]}
    assert attrs == {"event.name": "llm.call", "alephant.event.id": str(event.event_id),
                     "alephant.workspace.id": "demo", "alephant.agent.id": "bot", "alephant.run.id": "run-1",
                     "alephant.request.id": "req-1"}
    assert record["traceId"] == "0af7651916cd43dd8448eb211c80319c"
    assert record["severityText"] == "ERROR" and record["timeUnixNano"] == "5"
    assert json.loads(record["body"]["stringValue"])["event_id"] == str(event.event_id)
    whole = json.loads(otlp_logs_body([record]))
    assert whole["resourceLogs"][0]["scopeLogs"][0]["logRecords"] == [record]
    no_trace = envelope_decoder.decode(event_encoder.encode(_call()))
    assert "traceId" not in otlp_record(no_trace, b"{}", 1, 1)


def test_otlp_url_and_s3_targets() -> None:
    assert otlp_logs_url("https://otel.example.com/") == "https://otel.example.com/v1/logs"
    assert otlp_logs_url("https://otel.example.com/v1/logs") == "https://otel.example.com/v1/logs"
    assert parse_s3_url("s3://my-logs/alephant/prod/") == S3Target("my-logs", "alephant/prod")
    assert parse_s3_url("s3://my-logs") == S3Target("my-logs", "")
    for bad in ("https://my-logs/x", "s3://My_Logs/x", "s3://ab/x", "s3://a..b/x", "s3://logs/a//b", "s3://"):
        assert parse_s3_url(bad) is None, bad
    key = s3_object_key(S3Target("b", "p/q"), "logdest_1", "2026-05-01", 7, 3, 9)
    assert key == "p/q/dt=2026-05-01/hour=07/00000000000000000003-00000000000000000009-logdest_1.ndjson"


def test_ndjson_is_one_event_per_line() -> None:
    out = ndjson([b'{"a":1}', b'{\n "b": 2\n}'])
    assert out.splitlines() == [b'{"a":1}', b'{"b":2}'] and out.endswith(b"\n")


# -- admin input -------------------------------------------------------------------------------------

def _create(**body: Any) -> CreateLogDestination:
    return parse_command({"kind": "webhook", "url": "https://example.com/hook"} | body, CreateLogDestination)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"kind": "kafka"}, "kind", "invalid_kind"),
    ({"url": "ftp://example.com/x"}, "url", "invalid_url"),
    ({"kind": "s3", "url": "https://example.com"}, "url", "invalid_s3_url"),
    ({"event_types": ["llm.call", "llm.nope"]}, "event_types[1]", "unknown_event_type"),
    ({"secret": "s\u00e9cret-zq9"}, "secret", "invalid_secret"),
    ({"kind": "s3", "url": "s3://logs/x", "secret": "no-colon"}, "secret", "invalid_secret"),
    ({"workspace_id": "a b"}, "workspace_id", "invalid_workspace_id"),
])
def test_bad_input_is_refused_naming_the_field(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        _create(**body)
    assert (err.value.param, err.value.code) == (param, code)
    assert "zq9" not in err.value.message and "no-colon" not in err.value.message  # secrets never echoed


def test_good_input_passes() -> None:
    _create(event_types=["llm.call"], secret="whsec_123", workspace_id="demo", name="siem")
    _create(kind="s3", url="s3://logs/alephant", secret="AKIA:abc")
    _create(kind="otlp", url="https://otel.example.com", workspace_id="")


def test_http_only_to_allow_listed_hosts() -> None:
    allow = ("127.0.0.1", "::1", "localhost")
    assert http_allowed("http://127.0.0.1:9000/hook", allow)
    assert http_allowed("http://localhost:9000/hook", allow)
    assert not http_allowed("http://example.com/hook", allow)
    assert not http_allowed("http://10.0.0.1/hook", allow)


def test_the_view_hides_the_secret_and_names_the_kind() -> None:
    view = public_view(msgspec.structs.replace(DEST, secret_enc="gAAAA-ciphertext", created_at_ms=1000))
    assert "secret_enc" not in view and view["has_secret"] is True
    assert view["kind"] == "webhook" and "type" not in view and view["created_at"] == "1970-01-01T00:00:01Z"
    assert "gAAAA" not in json.dumps(view)


# -- one worker's settling ---------------------------------------------------------------------------

@dataclass
class FakeMsg:
    subject: str
    data: bytes
    seq: int
    num_delivered: int = 1
    settled: list[tuple[str, float | None]] = field(default_factory=list)

    @property
    def metadata(self) -> Any:
        return SimpleNamespace(sequence=SimpleNamespace(stream=self.seq), num_delivered=self.num_delivered,
                               timestamp=dt.datetime(2026, 5, 1, tzinfo=dt.UTC))

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))


class FakeSender:
    def __init__(self, outcomes: dict[int, Attempt]) -> None:
        self.outcomes = outcomes
        self.seen: list[int] = []

    async def send(self, items: Sequence[Item]) -> list[Attempt]:
        self.seen += [i.seq for i in items]
        return [self.outcomes.get(i.seq, Attempt("delivered")) for i in items]


class FakeBook:
    def __init__(self) -> None:
        self.dead: list[Dead] = []
        self.counts: list[tuple[int, int, str | None]] = []

    async def dead_letter(self, dest_id: str, dead: Sequence[Dead]) -> int:
        self.dead += dead
        return len(dead)

    async def record(self, dest_id: str, delivered: int, failed: int, last_error: str | None) -> None:
        self.counts.append((delivered, failed, last_error))


async def test_a_worker_acks_delivered_naks_retries_and_dead_letters() -> None:
    dest = msgspec.structs.replace(DEST, workspace_id="demo", event_types=("llm.call",))

    def msg(seq: int, ws: str = "demo", kind: str = "llm.call", attempt: int = 1, data: bytes | None = None) -> FakeMsg:
        return FakeMsg(f"events.{ws}.{kind}", data if data is not None else event_encoder.encode(_call()), seq,
                       attempt)

    msgs = [msg(1), msg(2, ws="other"), msg(3, kind="config.changed"), msg(4), msg(5, attempt=3), msg(6),
            msg(7, data=b"not json")]
    sender = FakeSender({4: Attempt("retry", "HTTP 500"), 5: Attempt("retry", "timeout after 1 s"),
                         6: Attempt("permanent", "HTTP 410")})
    book = FakeBook()
    config = DeliveryConfig(stream="S", subject_prefix="events", max_attempts=3, backoff_s=2.0)
    worker = DestinationWorker(None, dest, sender, book, config, jitter=lambda: 0.0)  # type: ignore[arg-type]
    await worker.process(msgs)  # type: ignore[arg-type]
    assert sender.seen == [1, 4, 5, 6]  # the filters: not the other workspace, not config.changed, not the poison
    assert [m.settled for m in msgs] == [[("ack", None)], [("ack", None)], [("ack", None)], [("nak", 1.0)],
                                         [("ack", None)], [("ack", None)], [("ack", None)]]
    assert sorted((d.item_seq, d.attempts) for d in book.dead) == [(5, 3), (6, 1), (7, 1)]
    assert {d.item_seq: d.reason for d in book.dead}[6] == "refused by the destination: HTTP 410"
    assert book.counts == [(1, 3, "HTTP 410")]
    assert (worker.delivered, worker.failed, worker.dead) == (1, 3, 3)
