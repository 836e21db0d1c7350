"""The client edge: pure string checks (dataplane/edge.py), JSON nesting (schemas/http.py), the usage and cost clamps
(dataplane/pricing.py), and the mapping of client-caused exceptions to 4xx (http, http_server)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import zlib

import msgspec
import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, ContentEncodingError, LineTooLong
from aiohttp.web_protocol import RequestPayloadError
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, istr

from dataplane.call import Call
from dataplane.decisions import AgentContext, Target, agent_context
from dataplane.edge import (
    MAX_MODEL_LEN,
    MAX_PROPERTIES,
    MAX_PROPERTY_VALUE_BYTES,
    check_model,
    check_properties,
    check_text,
)
from dataplane.http_server import protocol_error
from dataplane.pricing import (
    MAX_CALL_COST_NANOS,
    MAX_TOKENS_PER_CALL,
    bounded_usage,
    call_cost_nanos,
    override_cost_nanos,
)
from schemas.entities import PriceOverride, Provider, VirtualKey
from schemas.errors import InvalidRequest, InvalidValue
from schemas.events import Usage, event_encoder
from schemas.http import MAX_JSON_DEPTH, check_json_depth, client_fault, decode_json, json_depth_exceeds
from schemas.snapshot import Snapshot
from tests.unit.conftest import bare_call
from tests.unit.test_decisions import VK_FREE

# --- check_text / check_model --------------------------------------------------------------------

BAD_STRINGS = {
    "nul": "mock/echo\x00x",
    "newline": "mock/echo\nx",
    "carriage return": "a\rb",
    "tab": "a\tb",
    "escape": "a\x1bb",
    "delete": "a\x7fb",
    "c1 control": "a\x85b",
    "lone surrogate (invalid utf-8 in a header)": "caf\udcc3\udca9",
    "line separator": "a\u2028b",
}


@pytest.mark.parametrize("value", BAD_STRINGS.values(), ids=BAD_STRINGS.keys())
def test_control_characters_and_invalid_utf8_are_refused(value: str) -> None:
    with pytest.raises(InvalidValue) as info:
        check_model(value)
    err = info.value
    assert (err.status, err.type, err.code, err.param) == (400, "invalid_request_error", "invalid_value", "model")
    assert value not in err.message  # never echoed


@pytest.mark.parametrize("value", ["mock/echo", "openai/gpt-4o-mini", "fast", "bedrock/anthropic.claude-3:0",
                                   "ollama/llama3.1:8b-instruct", "café/modèle", "a b", "x" * MAX_MODEL_LEN])
def test_ordinary_models_pass_unchanged(value: str) -> None:
    assert check_model(value) is value


def test_model_length_cap() -> None:
    with pytest.raises(InvalidValue) as info:
        check_model("m" * (MAX_MODEL_LEN + 1))
    assert info.value.param == "model"
    assert "256" in info.value.message


def test_huge_model_is_refused_by_length_first() -> None:
    huge = "m" * 1_200_000 + "\x00"
    with pytest.raises(InvalidValue) as info:
        check_model(huge)
    assert "limit" in info.value.message


@given(st.text(max_size=300))
def test_check_text_accepts_exactly_what_an_event_can_carry(value: str) -> None:
    """Whatever passes is encodable as event JSON and carries no NUL or control character."""
    try:
        check_text(value, "field", 200)
    except InvalidValue as err:
        assert err.param == "field"
        return
    assert len(value) <= 200
    assert "\x00" not in value and not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value)
    assert msgspec.json.decode(event_encoder.encode({"v": value})) == {"v": value}


def test_invalid_value_is_an_invalid_request() -> None:
    # Handlers and tests catching InvalidRequest keep working; the lifecycle tells them apart.
    assert issubclass(InvalidValue, InvalidRequest)


# --- headers: agent context and properties ---------------------------------------------------------


@pytest.mark.parametrize("name", ["Alephant-Agent-Id", "Alephant-Run-Id", "Alephant-Session-Id",
                                  "Alephant-Workflow-Id", "Alephant-Request-Id"])
@pytest.mark.parametrize("value", ["a\x00b", "caf\udcc3\udca9", "x" * 201])
def test_context_headers_are_checked(name: str, value: str) -> None:
    with pytest.raises(InvalidValue) as info:
        agent_context(CIMultiDict({name: value}), VK_FREE, lambda: "req_1")
    assert info.value.param == name
    assert info.value.code == "invalid_value"


def test_properties_pass_and_keep_their_names() -> None:
    headers = [("Alephant-Property-Team", "search"), ("alephant-property-cost-center", "42"), ("X-Other", "\x00")]
    assert check_properties(headers) == (("Team", "search"), ("cost-center", "42"))


def test_property_names_are_plain_strings() -> None:
    # aiohttp hands header names over as multidict `istr`; msgspec cannot encode those.
    headers = CIMultiDict([(istr("Alephant-Property-Team"), "search")])
    ((name, _),) = check_properties(headers.items())
    assert type(name) is str
    with pytest.raises(InvalidValue) as info:
        check_properties(CIMultiDict([(istr("Alephant-Property-Team"), "\x00")]).items())
    assert type(info.value.param) is str
    assert msgspec.json.encode(info.value.detail())


def test_property_count_cap() -> None:
    ok = [(f"Alephant-Property-P{i}", "v") for i in range(MAX_PROPERTIES)]
    assert len(check_properties(ok)) == MAX_PROPERTIES
    with pytest.raises(InvalidValue) as info:
        check_properties([*ok, ("Alephant-Property-One-Too-Many", "v")])
    assert info.value.param == "Alephant-Property-*"


def test_property_value_cap_is_in_utf8_bytes() -> None:
    assert check_properties([("Alephant-Property-A", "x" * MAX_PROPERTY_VALUE_BYTES)])
    with pytest.raises(InvalidValue) as info:
        check_properties([("Alephant-Property-A", "é" * (MAX_PROPERTY_VALUE_BYTES // 2 + 1))])
    assert info.value.param == "Alephant-Property-A"


@pytest.mark.parametrize(("header", "value"), [
    ("Alephant-Property-", "v"),
    ("Alephant-Property-" + "n" * 65, "v"),
    ("Alephant-Property-Team", "a\x00b"),
    ("Alephant-Property-Team", "caf\udcc3"),
])
def test_bad_properties_name_the_header(header: str, value: str) -> None:
    with pytest.raises(InvalidValue) as info:
        check_properties([(header, value)])
    assert info.value.param == header


# --- JSON nesting ---------------------------------------------------------------------------------


def nested(depth: int, kind: str = "array") -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("kind", ["array", "object"])
def test_nesting_up_to_the_limit_is_accepted(kind: str) -> None:
    body = nested(MAX_JSON_DEPTH, kind)
    assert decode_json(body) is not None


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 100_000])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_deeper_nesting_is_400(depth: int, kind: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_json(nested(depth, kind))
    assert (info.value.status, info.value.code) == (400, "json_too_deep")


def test_brackets_inside_strings_do_not_count() -> None:
    body = b'{"model":"m","text":"' + b"[" * 5000 + b'"}'
    assert decode_json(body)["text"] == "[" * 5000


def test_wide_bodies_are_not_deep() -> None:
    wide = msgspec.json.encode({"input": [[1, 2, 3]] * 2048, "messages": [{"role": "user", "content": "hi"}] * 500})
    check_json_depth(wide, msgspec.json.decode(wide))


@given(st.recursive(st.none() | st.integers() | st.text(max_size=3),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
                    max_leaves=40))
def test_depth_walk_matches_a_recursive_definition(value: object) -> None:
    def depth(v: object) -> int:
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0

    d = depth(value)
    assert not json_depth_exceeds(value, d)
    assert json_depth_exceeds(value, d - 1) == (d > 0)


# --- usage and cost clamps ------------------------------------------------------------------------

PROVIDER = Provider(id="prov_1", workspace_id="ws_1", name="fake", type="openai")
PRICE = PriceOverride(id="p", provider="fake", model="m", input_per_mtok_nanos=150_000_000,
                      output_per_mtok_nanos=600_000_000)


def test_sane_usage_is_left_alone() -> None:
    assert bounded_usage(Usage(input_tokens=MAX_TOKENS_PER_CALL, output_tokens=0)) is None


@pytest.mark.parametrize("usage", [
    Usage(input_tokens=10**19),
    Usage(output_tokens=10**30),
    Usage(input_tokens=-5, output_tokens=3),
    Usage(cache_read_tokens=2**63, reasoning_tokens=-(2**63)),
])
def test_impossible_usage_is_clamped(usage: Usage) -> None:
    bounded = bounded_usage(usage)
    assert bounded is not None
    for field in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens"):
        assert 0 <= getattr(bounded, field) <= MAX_TOKENS_PER_CALL
    assert bounded_usage(bounded) is None


def test_huge_override_price_cannot_overflow() -> None:
    absurd = PriceOverride(id="p", provider="fake", model="m", input_per_mtok_nanos=2**80,
                           output_per_mtok_nanos=2**80)
    cost = override_cost_nanos(absurd, Usage(input_tokens=1000, output_tokens=1000))
    assert cost == MAX_CALL_COST_NANOS < 2**63
    negative = PriceOverride(id="p", provider="fake", model="m", input_per_mtok_nanos=-(2**80),
                             output_per_mtok_nanos=0)
    assert override_cost_nanos(negative, Usage(input_tokens=1000)) == 0


def test_catalog_cost_of_clamped_usage_fits_a_bigint() -> None:
    usage = bounded_usage(Usage(input_tokens=10**19, output_tokens=10**19))
    assert usage is not None
    cost, priced = call_cost_nanos({}, Provider(id="p", workspace_id="w", name="openai", type="openai"),
                                   "gpt-4o", usage)
    assert priced and 0 < cost <= MAX_CALL_COST_NANOS


def record(usage: Usage | None, prices: dict[tuple[str, str], PriceOverride] | None = None) -> Call:
    snap = dataclasses.replace(Snapshot.empty(), prices=prices or {})
    vk = VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="h")
    ctx = AgentContext(request_id="req_1", agent_id=None, run_id=None, session_id=None, workflow_id=None)
    rec = bare_call(snap, vk, ctx, Target(PROVIDER, "m"))
    rec.usage = usage
    return rec


def test_call_record_clamps_and_flags_absurd_usage() -> None:
    rec = record(Usage(input_tokens=10**19, output_tokens=7), {("fake", "m"): PRICE})
    rec.price()
    event = rec.event()
    assert event.usage.input_tokens == MAX_TOKENS_PER_CALL
    assert event.usage.output_tokens == 7
    assert event.anomalies == ("usage_clamped",)
    assert 0 < event.cost_nanos <= MAX_CALL_COST_NANOS
    rec.price()  # pricing again (e.g. after a stream error) does not flag twice
    assert rec.event().anomalies == ("usage_clamped",)


def test_call_record_flags_a_clamped_cost() -> None:
    absurd = msgspec.structs.replace(PRICE, input_per_mtok_nanos=2**80)
    rec = record(Usage(input_tokens=100), {("fake", "m"): absurd})
    rec.price()
    assert rec.event().cost_nanos == MAX_CALL_COST_NANOS
    assert rec.event().anomalies == ("cost_clamped",)


def test_event_bounds_usage_even_when_never_priced() -> None:
    rec = record(Usage(output_tokens=-3))
    event = rec.event()
    assert event.usage.output_tokens == 0
    assert event.anomalies == ("usage_clamped",)


def test_ordinary_call_has_no_anomalies() -> None:
    rec = record(Usage(input_tokens=10, output_tokens=5), {("fake", "m"): PRICE})
    rec.price()
    assert rec.event().anomalies == ()


# --- client-caused exceptions -> 4xx ----------------------------------------------------------------


def _payload_error() -> RequestPayloadError:
    try:
        try:
            zlib.decompress(b"not gzip")
        except zlib.error as exc:
            raise ContentEncodingError("Can not decode content-encoding: gzip") from exc
    except ContentEncodingError as exc:
        err = RequestPayloadError("Authorization: Bearer sk-secret")
        err.__cause__ = exc
        return err
    raise AssertionError


@pytest.mark.parametrize(("exc", "status", "code"), [
    (_payload_error(), 400, "invalid_body_encoding"),
    (ContentEncodingError("Can not decode content-encoding: brotli (br)"), 415, "unsupported_content_encoding"),
    (LineTooLong(b"Authorization: Bearer sk-secret" * 400, 8190), 400, "header_too_large"),
    (BadHttpMessage("Too many headers received"), 400, "malformed_request"),
    (BadStatusLine("POST / HTTP/1.1\nAuthorization: Bearer sk-secret\n"), 400, "malformed_request"),
    (RecursionError("maximum recursion depth exceeded"), 400, "json_too_deep"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 400, "invalid_encoding"),
])
def test_client_faults_are_4xx_without_echo(exc: BaseException, status: int, code: str) -> None:
    for err in (client_fault(exc), protocol_error(400, exc)):
        assert err is not None
        assert (err.status, err.code, err.type) == (status, code, "invalid_request_error")
        assert "sk-secret" not in err.message and "Authorization" not in err.message


def test_bugs_stay_500() -> None:
    assert client_fault(KeyError("x")) is None
    assert protocol_error(500, KeyError("x")).status == 500
    assert protocol_error(504, None).status == 504
    assert protocol_error(400, None).code == "malformed_request"


def test_no_gateway_process_raises_the_recursion_limit_its_json_depth_guard_relies_on() -> None:
    """py_ecc (under eth-account, which payment tests use) raises the limit to 100000 on import;
    with it, a deeply nested body overflows the C stack instead of raising RecursionError. The
    gateway's processes must never import it (checked in a fresh interpreter)."""
    probe = ("import sys, dataplane.app, controlplane.app, events.projector, deploy.cli; "
             "print(sys.getrecursionlimit(), 'py_ecc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["1000", "False"], out.stdout
