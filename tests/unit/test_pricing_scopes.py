"""schemas/pricing.py with scopes (issue 9): which price prices a call (provider key > workspace >
platform > built-in > catalog > unpriced), negotiated discounts and per-request fees in exact
integers, the provenance an `llm.call` records, its client properties, the admin input rules for
prices, and the pure half of re-pricing (controlplane/repricing.py).

Expected costs are computed here with `fractions.Fraction` from the prices and token counts, not
with the code under test.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import uuid
from fractions import Fraction
from typing import Any

import msgspec
import pytest
from genai_prices import Usage as GPUsage
from genai_prices import calc_price
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.commands import PRICE, UpsertPrice, parse_command
from controlplane.repricing import repriced_event
from dataplane.decisions import AgentContext, KeyChoice, Target, agent_context
from dataplane.edge import MAX_PROPERTIES, MAX_PROPERTY_VALUE_BYTES
from schemas.entities import PriceOverride, Provider, VirtualKey, kv_key
from schemas.errors import InvalidRequest, InvalidValue
from schemas.events import LlmCall, Usage
from schemas.pricing import (
    MAX_CALL_COST_NANOS,
    MOCK_INPUT_PER_MTOK_NANOS,
    MOCK_OUTPUT_PER_MTOK_NANOS,
    call_cost_nanos,
    call_unit_prices,
    discount_fraction,
    price_call,
)
from schemas.snapshot import Snapshot
from tests.unit.conftest import bare_call

WS, OTHER_WS, PKEY = "ws_a", "ws_b", "pkey_1"
USAGE = Usage(input_tokens=1_234, output_tokens=567)


def half_up(x: Fraction) -> int:
    """Round a non-negative fraction half up (the rounding the ledger uses)."""
    return int(x + Fraction(1, 2))


def token_cost(per_in: int, per_out: int, usage: Usage = USAGE) -> Fraction:
    """Nano-USD of `usage` at per-million-token prices, exactly (no cache tokens in these tests)."""
    return Fraction(usage.input_tokens * per_in + usage.output_tokens * per_out, 1_000_000)


def catalog_cost(model: str, usage: Usage = USAGE) -> Fraction:
    """Nano-USD genai-prices charges for `usage`, exactly."""
    total = calc_price(GPUsage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens), model,
                       provider_id="openai").total_price
    return Fraction(total) * 1_000_000_000


def po(pid: str, *, model: str = "m1", provider: str = "acme", scope: str = "platform", ws: str | None = None,
       pkey: str | None = None, per_in: int | None = None, per_out: int | None = None, pct: str | None = None,
       fee: int | None = None) -> PriceOverride:
    return PriceOverride(id=pid, provider=provider, model=model, input_per_mtok_nanos=per_in,
                         output_per_mtok_nanos=per_out, scope=scope,  # type: ignore[arg-type]
                         workspace_id=ws, provider_key_id=pkey, discount_pct=pct, per_request_nanos=fee)


def snap(*prices: PriceOverride) -> Snapshot:
    return Snapshot.build({kv_key(p): p for p in prices}, 1)


# Token prices at each scope, all different, so a cost names its price.
PLATFORM = po("p_platform", per_in=1_000_000_000, per_out=2_000_000_000)
PLATFORM_ANY = po("p_platform_any", model="*", per_in=1_100_000_000, per_out=2_100_000_000)
WORKSPACE = po("p_ws", scope="workspace", ws=WS, per_in=3_000_000_000, per_out=4_000_000_000)
WORKSPACE_ANY = po("p_ws_any", model="*", scope="workspace", ws=WS, per_in=3_300_000_000, per_out=4_400_000_000)
KEY = po("p_key", scope="provider_key", pkey=PKEY, per_in=5_000_000_000, per_out=6_000_000_000)
KEY_ANY = po("p_key_any", model="*", scope="provider_key", pkey=PKEY, per_in=5_500_000_000, per_out=6_600_000_000)
OTHER_WORKSPACE = po("p_other_ws", scope="workspace", ws=OTHER_WS, per_in=7, per_out=7)
OTHER_KEY = po("p_other_key", scope="provider_key", pkey="pkey_2", per_in=9, per_out=9)
ALL = (PLATFORM, PLATFORM_ANY, WORKSPACE, WORKSPACE_ANY, KEY, KEY_ANY, OTHER_WORKSPACE, OTHER_KEY)


@pytest.mark.parametrize(("prices", "ws", "pkey", "winner"), [
    (ALL, WS, PKEY, KEY),
    (tuple(p for p in ALL if p is not KEY), WS, PKEY, KEY_ANY),
    (tuple(p for p in ALL if p not in (KEY, KEY_ANY)), WS, PKEY, WORKSPACE),
    (ALL, WS, None, WORKSPACE),  # a call without that key never sees its prices
    (ALL, WS, "pkey_9", WORKSPACE),
    (tuple(p for p in ALL if p is not WORKSPACE), WS, None, WORKSPACE_ANY),
    (ALL, "ws_c", None, PLATFORM),  # another workspace's price is not this one's
    (tuple(p for p in ALL if p is not PLATFORM), "ws_c", None, PLATFORM_ANY),
    ((WORKSPACE_ANY, PLATFORM), WS, None, WORKSPACE_ANY),  # scope before model: ws "*" over platform exact
], ids=["key", "key-any", "workspace", "no-key", "unknown-key", "workspace-any", "platform", "platform-any",
        "scope-before-model"])
def test_the_most_specific_override_prices_the_call(prices: tuple[PriceOverride, ...], ws: str, pkey: str | None,
                                                     winner: PriceOverride) -> None:
    result = price_call(snap(*prices), "acme", "openai", "m1", USAGE, workspace_id=ws, provider_key_id=pkey)
    assert winner.input_per_mtok_nanos is not None and winner.output_per_mtok_nanos is not None
    assert result.cost_nanos == half_up(token_cost(winner.input_per_mtok_nanos, winner.output_per_mtok_nanos))
    assert (result.priced, result.source, result.price_id, result.scope) == (True, "override", winner.id,
                                                                             winner.scope)
    assert result.catalog_version == ""


@pytest.mark.parametrize(("provider_type", "model", "source", "expected"), [
    ("mock", "echo", "builtin", half_up(token_cost(MOCK_INPUT_PER_MTOK_NANOS, MOCK_OUTPUT_PER_MTOK_NANOS))),
    ("openai", "gpt-4o-mini", "catalog", half_up(catalog_cost("gpt-4o-mini"))),
    ("openai", "acme-unknown-7b", "unpriced", 0),
    ("ollama", "llama3", "unpriced", 0),  # a type the catalog does not price
])
def test_without_an_override_builtin_then_catalog_then_unpriced(provider_type: str, model: str, source: str,
                                                                 expected: int) -> None:
    # Overrides of other providers, models and scopes change nothing.
    result = price_call(snap(*ALL), "other", provider_type, model, USAGE, workspace_id=WS, provider_key_id=PKEY)
    assert (result.cost_nanos, result.source, result.priced) == (expected, source, source != "unpriced")
    assert result.price_id == ("builtin-mock-echo" if source == "builtin" else None)
    assert result.scope == ""
    assert result.catalog_version == (importlib.metadata.version("genai-prices") if source == "catalog" else "")


def test_an_override_wins_over_the_builtin_and_the_catalog() -> None:
    for ptype, model in (("mock", "echo"), ("openai", "gpt-4o-mini")):
        own = po("own", provider="p", model=model, scope="workspace", ws=WS, per_in=10**9, per_out=10**9)
        result = price_call(snap(own), "p", ptype, model, USAGE, workspace_id=WS)
        assert (result.source, result.price_id, result.scope) == ("override", "own", "workspace")
        assert result.cost_nanos == half_up(token_cost(10**9, 10**9))


# -- discounts --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("pct", "kept"), [
    ("12.5", Fraction(875, 1000)), ("10", Fraction(9, 10)), ("0.000001", Fraction(99_999_999, 100_000_000)),
    ("99.999999", Fraction(1, 100_000_000)), ("33.333333", Fraction(66_666_667, 100_000_000)),
])
def test_discount_fraction_is_exact(pct: str, kept: Fraction) -> None:
    keep, scale = discount_fraction(pct)
    assert Fraction(keep, scale) == kept


@pytest.mark.parametrize("pct", ["0", "0.0", "100", "100.0", "-5", "12.", ".5", "1e1", "12.5000001", "012",
                                 "50%", "", " 5", "NaN", "Infinity"])
def test_discount_fraction_refuses_what_is_not_a_percentage(pct: str) -> None:
    with pytest.raises(ValueError, match="discount"):
        discount_fraction(pct)


def test_a_discount_on_own_token_prices_rounds_once_half_up() -> None:
    usage = Usage(input_tokens=333, output_tokens=1)
    price = po("d", per_in=1_000_000_003, per_out=7, pct="12.5")
    exact = token_cost(1_000_000_003, 7, usage) * Fraction(875, 1000)
    result = price_call(snap(price), "acme", "openai", "m1", usage)
    assert result.cost_nanos == half_up(exact)
    assert exact.denominator != 1  # the case exercises rounding


def test_a_discount_only_override_discounts_the_catalog_price() -> None:
    negotiated = po("neg", provider="oai", model="*", scope="workspace", ws=WS, pct="12.5")
    result = price_call(snap(negotiated), "oai", "openai", "gpt-4o-mini", USAGE, workspace_id=WS)
    assert result.cost_nanos == half_up(catalog_cost("gpt-4o-mini") * Fraction(875, 1000))
    assert (result.source, result.price_id, result.scope) == ("override", "neg", "workspace")
    assert result.catalog_version == importlib.metadata.version("genai-prices")
    # Not this workspace's contract: the catalog price, undiscounted.
    other = price_call(snap(negotiated), "oai", "openai", "gpt-4o-mini", USAGE, workspace_id=OTHER_WS)
    assert (other.cost_nanos, other.source) == (half_up(catalog_cost("gpt-4o-mini")), "catalog")


def test_a_discount_only_override_discounts_a_less_specific_override_and_does_not_stack() -> None:
    platform = po("plat", per_in=2_000_000_000, per_out=8_000_000_000, pct="50")
    key_discount = po("kd", scope="provider_key", pkey=PKEY, pct="10")
    result = price_call(snap(platform, key_discount), "acme", "openai", "m1", USAGE, provider_key_id=PKEY)
    assert result.cost_nanos == half_up(token_cost(2_000_000_000, 8_000_000_000) * Fraction(9, 10))
    assert (result.price_id, result.scope) == ("kd", "provider_key")


def test_a_discount_with_no_price_below_it_leaves_the_call_unpriced() -> None:
    result = price_call(snap(po("d", pct="10")), "acme", "openai", "acme-unknown-7b", USAGE)
    assert (result.cost_nanos, result.priced, result.source, result.price_id) == (0, False, "unpriced", None)


def test_a_discount_applies_to_budget_hold_unit_prices_rounded_up() -> None:
    price = po("d", per_in=1_000_000_001, per_out=3, pct="12.5")
    assert call_unit_prices(snap(price), "acme", "openai", "m1") == (875_000_001, 3)  # ceil(2.625) = 3


@settings(max_examples=200, deadline=None)
@given(per_in=st.integers(0, 10**13), per_out=st.integers(0, 10**13), tokens_in=st.integers(0, 10**7),
       tokens_out=st.integers(0, 10**7), off=st.integers(1, 99_999), fee=st.integers(0, 10**9))
def test_discounted_cost_is_the_exact_fraction_rounded_half_up(per_in: int, per_out: int, tokens_in: int,
                                                                tokens_out: int, off: int, fee: int) -> None:
    pct = f"{off // 1000}.{off % 1000:03d}"  # 0.001 .. 99.999
    usage = Usage(input_tokens=tokens_in, output_tokens=tokens_out)
    price = po("h", per_in=per_in, per_out=per_out, pct=pct, fee=fee or None)
    exact = token_cost(per_in, per_out, usage) * (1 - Fraction(off, 100_000))
    expected = min(min(half_up(exact), MAX_CALL_COST_NANOS) + fee, MAX_CALL_COST_NANOS)
    result = price_call(snap(price), "acme", "openai", "m1", usage)
    assert result.cost_nanos == expected
    assert result.cost_nanos - fee <= half_up(token_cost(per_in, per_out, usage))  # a discount never adds


# -- per-request fees -------------------------------------------------------------------------------

def test_a_per_request_fee_is_added_to_each_successful_call_only() -> None:
    price = po("f", per_in=1_000_000_000, per_out=2_000_000_000, fee=2_000_000)
    tokens = half_up(token_cost(1_000_000_000, 2_000_000_000))
    ok = price_call(snap(price), "acme", "openai", "m1", USAGE)
    failed = price_call(snap(price), "acme", "openai", "m1", USAGE, success=False)
    assert (ok.cost_nanos, failed.cost_nanos) == (tokens + 2_000_000, tokens)


def test_a_fee_only_price_prices_an_unknown_model_of_a_custom_backend() -> None:
    fee = po("fee", provider="vllm", model="*", scope="workspace", ws=WS, fee=1_500_000)
    result = price_call(snap(fee), "vllm", "openai", "acme-unknown-7b", USAGE, workspace_id=WS)
    assert (result.cost_nanos, result.priced, result.source, result.price_id) == (1_500_000, True, "override", "fee")
    # A less specific token price underneath still counts, with the fee on top.
    tokens = po("tok", provider="vllm", model="acme-unknown-7b", per_in=10**9, per_out=10**9)
    both = price_call(snap(fee, tokens), "vllm", "openai", "acme-unknown-7b", USAGE, workspace_id=WS)
    assert both.cost_nanos == half_up(token_cost(10**9, 10**9)) + 1_500_000
    assert both.price_id == "fee"


def test_the_fee_is_bounded_with_the_cost() -> None:
    price = po("big", per_in=10**15, per_out=10**15, fee=10**15)
    result = price_call(snap(price), "acme", "openai", "m1", USAGE)
    assert (result.cost_nanos, result.clamped) == (MAX_CALL_COST_NANOS, True)


# -- the platform-only interface and the snapshot index ----------------------------------------------

def test_call_cost_nanos_keeps_its_platform_only_contract() -> None:
    provider = Provider(id="x", workspace_id=WS, name="acme", type="openai")
    assert call_cost_nanos({("acme", "m1"): PLATFORM}, provider, "m1", USAGE) == (
        half_up(token_cost(1_000_000_000, 2_000_000_000)), True)
    assert call_cost_nanos({}, provider, "acme-unknown-7b", USAGE) == (0, False)


def test_snapshot_indexes_platform_prices_as_before_and_scoped_ones_apart() -> None:
    s = snap(*ALL)
    assert dict(s.prices) == {("acme", "m1"): PLATFORM}
    assert s.scoped_prices[("workspace", WS, "acme", "m1")] is WORKSPACE
    assert s.scoped_prices[("provider_key", PKEY, "acme", "*")] is KEY_ANY
    assert s.scoped_prices[("platform", "", "acme", "*")] is PLATFORM_ANY
    assert len(s.scoped_prices) == len(ALL) - 1


def test_snapshot_changes_of_scoped_prices_equal_a_rebuild() -> None:
    base = snap(*ALL)
    cheaper = msgspec.structs.replace(WORKSPACE, input_per_mtok_nanos=1)
    changed = base.with_changes({kv_key(cheaper): cheaper, kv_key(KEY): None, kv_key(PLATFORM): None}, 2)
    rebuilt = snap(*(p for p in ALL if p not in (KEY, PLATFORM, WORKSPACE)), cheaper)
    assert dict(changed.prices) == dict(rebuilt.prices) == {}
    assert dict(changed.scoped_prices) == dict(rebuilt.scoped_prices)
    assert changed.scoped_prices[("workspace", WS, "acme", "m1")] is cheaper


# -- what an llm.call records -------------------------------------------------------------------------

def priced_call(snapshot: Snapshot, provider: Provider, model: str, *, key_id: str | None = None,
                properties: tuple[tuple[str, str], ...] = (), status: int = 200) -> LlmCall:
    vk = VirtualKey(id="vk_1", workspace_id=WS, key_hash="h")
    ctx = AgentContext(request_id="req_1", agent_id="agent-1", run_id=None, session_id=None, workflow_id=None,
                       properties=properties)
    call = bare_call(snapshot, vk, ctx, Target(provider, model))
    call.provider_key = KeyChoice(key_id, "workspace" if key_id else "none", None)
    call.usage, call.status = USAGE, status
    call.price()
    return call.event()


ACME = Provider(id="ws_a.acme", workspace_id=WS, name="acme", type="openai")


@pytest.mark.parametrize(("model", "key_id", "fields"), [
    ("m1", PKEY, ("override", "p_key", "provider_key", "")),
    ("m1", None, ("override", "p_ws", "workspace", "")),
    ("gpt-4o-mini", None, ("override", "p_ws_any", "workspace", "")),
    ("acme-unknown-7b", None, ("override", "p_ws_any", "workspace", "")),
])
def test_the_event_names_the_price_that_priced_it(model: str, key_id: str | None,
                                                  fields: tuple[str, str, str, str]) -> None:
    event = priced_call(snap(*ALL), ACME, model, key_id=key_id)
    assert (event.price_source, event.price_id, event.price_scope, event.catalog_version) == fields
    assert event.priced and event.cost_nanos > 0


def test_the_event_of_a_catalog_builtin_and_unpriced_call() -> None:
    catalog = priced_call(Snapshot.empty(), ACME, "gpt-4o-mini")
    assert (catalog.price_source, catalog.price_id, catalog.price_scope) == ("catalog", None, "")
    assert catalog.catalog_version == importlib.metadata.version("genai-prices")
    assert catalog.cost_nanos == half_up(catalog_cost("gpt-4o-mini"))
    mock = priced_call(Snapshot.empty(), Provider(id="m", workspace_id=WS, name="mock", type="mock"), "echo")
    assert (mock.price_source, mock.price_id, mock.catalog_version) == ("builtin", "builtin-mock-echo", "")
    unpriced = priced_call(Snapshot.empty(), ACME, "acme-unknown-7b")
    assert (unpriced.price_source, unpriced.price_id, unpriced.priced, unpriced.cost_nanos) == (
        "unpriced", None, False, 0)


def test_a_failed_call_pays_no_per_request_fee() -> None:
    fee = po("fee", model="*", scope="workspace", ws=WS, per_in=0, per_out=0, fee=3_000_000)
    assert priced_call(snap(fee), ACME, "m1").cost_nanos == 3_000_000
    assert priced_call(snap(fee), ACME, "m1", status=502).cost_nanos == 0


def test_properties_reach_the_event_with_lower_cased_names() -> None:
    headers = {"Alephant-Property-Team": "Search", "alephant-property-COST-CENTER": "cc-42",
               "Authorization": "Bearer sk-secret", "Alephant-Agent-Id": "agent-1"}
    ctx = agent_context(headers, VirtualKey(id="vk_1", workspace_id=WS, key_hash="h"), lambda: "req_1")
    event = priced_call(Snapshot.empty(), ACME, "gpt-4o-mini", properties=ctx.properties)
    assert event.properties == {"team": "Search", "cost-center": "cc-42"}
    assert "sk-secret" not in msgspec.json.encode(event).decode()


def test_properties_are_bounded_in_count_and_size() -> None:
    vk = VirtualKey(id="vk_1", workspace_id=WS, key_hash="h")
    many = {f"Alephant-Property-P{i}": "v" for i in range(MAX_PROPERTIES + 1)}
    with pytest.raises(InvalidValue):
        agent_context(many, vk, lambda: "r")
    with pytest.raises(InvalidValue):
        agent_context({"Alephant-Property-Big": "x" * (MAX_PROPERTY_VALUE_BYTES + 1)}, vk, lambda: "r")
    with pytest.raises(InvalidValue):
        agent_context({"Alephant-Property-" + "n" * 65: "v"}, vk, lambda: "r")
    most = {f"Alephant-Property-P{i}": "v" * MAX_PROPERTY_VALUE_BYTES for i in range(MAX_PROPERTIES)}
    props = agent_context(most, vk, lambda: "r").properties
    event = priced_call(Snapshot.empty(), ACME, "gpt-4o-mini", properties=props)
    assert len(event.properties) == MAX_PROPERTIES
    assert all(isinstance(v, str) and len(v) == MAX_PROPERTY_VALUE_BYTES for v in event.properties.values())


def test_a_call_never_priced_records_no_provenance() -> None:
    vk = VirtualKey(id="vk_1", workspace_id=WS, key_hash="h")
    ctx = AgentContext(request_id="r", agent_id=None, run_id=None, session_id=None, workflow_id=None)
    event = bare_call(Snapshot.empty(), vk, ctx, None).event()
    assert (event.price_source, event.price_id, event.price_scope, event.properties) == ("", None, "", {})


# -- admin input rules -------------------------------------------------------------------------------

def upsert(**fields: Any) -> UpsertPrice:
    return parse_command({"provider": "acme", "model": "m1"} | fields, UpsertPrice)


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"scope": "regional", "input_per_mtok_nanos": 1, "output_per_mtok_nanos": 1}, "scope", "invalid_scope"),
    ({"scope": "workspace", "discount_pct": "5"}, "workspace_id", "missing_scope_id"),
    ({"scope": "provider_key", "discount_pct": "5"}, "provider_key_id", "missing_scope_id"),
    ({"workspace_id": "w", "discount_pct": "5"}, "workspace_id", "unexpected_scope_id"),
    ({"scope": "workspace", "workspace_id": "w", "provider_key_id": "k", "discount_pct": "5"}, "provider_key_id",
     "unexpected_scope_id"),
    ({"input_per_mtok_nanos": 1}, "output_per_mtok_nanos", "incomplete_price"),
    ({"cache_read_per_mtok_nanos": 1, "discount_pct": "5"}, "cache_read_per_mtok_nanos", "incomplete_price"),
    ({}, "input_per_mtok_nanos", "incomplete_price"),
    ({"discount_pct": "100"}, "discount_pct", "invalid_discount"),
    ({"discount_pct": "0"}, "discount_pct", "invalid_discount"),
    ({"discount_pct": "12,5"}, "discount_pct", "invalid_discount"),
    ({"per_request_usd": "0"}, "per_request_usd", "invalid_amount"),
    ({"per_request_usd": "0.0000000001"}, "per_request_usd", "invalid_amount"),
    ({"per_request_usd": "1e-3"}, "per_request_usd", "invalid_amount"),
])
def test_price_inputs_are_refused_with_the_field_named(fields: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        upsert(**fields)
    assert (caught.value.param, caught.value.code) == (param, code)


def test_price_inputs_that_are_accepted_and_their_ids() -> None:
    legacy = upsert(input_per_mtok_nanos=1, output_per_mtok_nanos=2)
    assert legacy.scope == "platform"
    ws = upsert(scope="workspace", workspace_id="w", discount_pct="12.5")
    key = upsert(scope="provider_key", provider_key_id="k", per_request_usd="0.002")
    ids = {PRICE.new_id(c) for c in (legacy, ws, key, upsert(scope="workspace", workspace_id="w2",
                                                               discount_pct="1"))}
    assert len(ids) == 4  # one price per provider, model and scope
    assert PRICE.new_id(legacy) == PRICE.new_id(upsert(input_per_mtok_nanos=5, output_per_mtok_nanos=5))


# -- re-pricing, the pure half --------------------------------------------------------------------

def unpriced_call(**kw: Any) -> LlmCall:
    fields: dict[str, Any] = {
        "event_id": uuid.UUID("01900000-0000-7000-8000-000000000001"),
        "occurred_at": dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "workspace_id": WS, "agent_id": "agent-1",
        "run_id": "run-1", "session_id": "s-1", "workflow_id": "wf-1", "request_id": "req_1",
        "provider": "acme", "model": "acme-unknown-7b", "usage": USAGE, "cost_nanos": 0, "priced": False,
        "department_id": "dept-1", "member_id": "member-1", "provider_key_id": None, "price_source": "unpriced"}
    return LlmCall(**(fields | kw))


NOW = dt.datetime(2030, 2, 1, tzinfo=dt.UTC)


def test_repriced_event_carries_the_attribution_and_the_new_cost() -> None:
    price = po("ws-price", model="acme-unknown-7b", scope="workspace", ws=WS, per_in=10**9, per_out=3 * 10**9)
    call = unpriced_call()
    event = repriced_event(call, snap(price), "openai", now=NOW, revision=7)
    assert event is not None
    assert event.event_id == uuid.uuid5(call.event_id, "ws-price")
    assert (event.original_event_id, event.original_occurred_at, event.occurred_at) == (
        call.event_id, call.occurred_at, NOW)
    assert (event.workspace_id, event.agent_id, event.run_id, event.session_id, event.workflow_id,
            event.department_id, event.member_id, event.request_id) == (
        WS, "agent-1", "run-1", "s-1", "wf-1", "dept-1", "member-1", "req_1")
    assert (event.provider, event.model, event.tokens) == ("acme", "acme-unknown-7b", 1_234 + 567)
    assert event.cost_nanos == half_up(token_cost(10**9, 3 * 10**9))
    assert (event.price_id, event.price_scope, event.snapshot_revision) == ("ws-price", "workspace", 7)
    # The same price again: the same event (the journal and the stream book it once).
    again = repriced_event(call, snap(price), "openai", now=NOW + dt.timedelta(days=1))
    assert again is not None and again.event_id == event.event_id


def test_repriced_event_honours_the_call_scope() -> None:
    price = po("ws-price", model="acme-unknown-7b", scope="workspace", ws=WS, per_in=10**9, per_out=10**9)
    assert repriced_event(unpriced_call(workspace_id=OTHER_WS), snap(price), "openai", now=NOW) is None
    keyed = po("k-price", model="*", scope="provider_key", pkey=PKEY, per_in=1, per_out=1)
    assert repriced_event(unpriced_call(), snap(keyed), "openai", now=NOW) is None
    event = repriced_event(unpriced_call(provider_key_id=PKEY), snap(keyed, price), "openai", now=NOW)
    assert event is not None and (event.price_id, event.price_scope) == ("k-price", "provider_key")


def test_repriced_event_of_a_call_with_nothing_to_book_is_none() -> None:
    price = po("p", model="acme-unknown-7b", per_in=10**9, per_out=10**9)
    assert repriced_event(unpriced_call(usage=Usage(), status=500), snap(price), "openai", now=NOW) is None
