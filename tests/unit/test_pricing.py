"""dataplane/pricing.py: operator overrides (exact integers), the genai-prices catalog, unpriced calls."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from genai_prices import Usage as GPUsage
from genai_prices import calc_price
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.pricing import call_cost_nanos, override_cost_nanos
from dataplane.providers import mock
from schemas.catalog import MOCK_MODELS, catalog_models
from schemas.entities import PriceOverride, Provider
from schemas.events import Usage
from schemas.money import decimal_to_nanos

OPENAI = Provider(id="prov_1", workspace_id="ws_1", name="openai", type="openai")
MOCK = Provider(id="prov_2", workspace_id="ws_1", name="mock", type="mock")
NO_OVERRIDES: dict[tuple[str, str], PriceOverride] = {}


def price(**kw: int | None) -> PriceOverride:
    return PriceOverride(id="price_1", provider="openai", model="gpt-4o-mini", **kw)  # type: ignore[arg-type]


# --- override_cost_nanos ---------------------------------------------------------------------


def test_override_plain_input_and_output() -> None:
    # $2 / Mtok in, $8 / Mtok out: 1000 in + 500 out = 2000 + 4000 micro-USD.
    p = price(input_per_mtok_nanos=2_000_000_000, output_per_mtok_nanos=8_000_000_000)
    assert override_cost_nanos(p, Usage(input_tokens=1000, output_tokens=500)) == 6_000_000


def test_override_uses_cache_read_and_write_prices() -> None:
    p = price(
        input_per_mtok_nanos=1_000_000_000,
        output_per_mtok_nanos=4_000_000_000,
        cache_read_per_mtok_nanos=100_000_000,
        cache_write_per_mtok_nanos=1_250_000_000,
    )
    usage = Usage(input_tokens=10_000, cache_read_tokens=6_000, cache_write_tokens=2_000, output_tokens=1_000)
    # 2000 uncached, 6000 cache reads, 2000 cache writes, 1000 output tokens, each at its own price.
    expected = (2_000 * 1_000_000_000 + 6_000 * 100_000_000 + 2_000 * 1_250_000_000
                + 1_000 * 4_000_000_000) // 1_000_000
    assert override_cost_nanos(p, usage) == expected == 9_100_000


def test_override_cache_prices_fall_back_to_the_input_price() -> None:
    p = price(input_per_mtok_nanos=1_000_000_000, output_per_mtok_nanos=0)
    cached = Usage(input_tokens=10_000, cache_read_tokens=6_000, cache_write_tokens=2_000)
    uncached = Usage(input_tokens=10_000)
    assert override_cost_nanos(p, cached) == override_cost_nanos(p, uncached) == 10_000_000


def test_override_explicit_zero_cache_price_is_not_a_fallback() -> None:
    p = price(input_per_mtok_nanos=1_000_000_000, cache_read_per_mtok_nanos=0)
    assert override_cost_nanos(p, Usage(input_tokens=1_000, cache_read_tokens=1_000)) == 0


def test_override_rounds_half_up_to_a_whole_nano() -> None:
    # One token at 500_000 nanos/Mtok is exactly half a nano.
    assert override_cost_nanos(price(input_per_mtok_nanos=500_000), Usage(input_tokens=1)) == 1
    assert override_cost_nanos(price(input_per_mtok_nanos=499_999), Usage(input_tokens=1)) == 0
    assert override_cost_nanos(price(input_per_mtok_nanos=1_500_000), Usage(input_tokens=1)) == 2
    assert override_cost_nanos(price(input_per_mtok_nanos=2_500_000), Usage(input_tokens=1)) == 3


def test_override_reasoning_tokens_are_already_in_output() -> None:
    p = price(output_per_mtok_nanos=1_000_000_000)
    with_reasoning = Usage(output_tokens=1_000, reasoning_tokens=800)
    assert override_cost_nanos(p, with_reasoning) == override_cost_nanos(p, Usage(output_tokens=1_000))


prices_nanos = st.integers(min_value=0, max_value=10**12)
token_counts = st.integers(min_value=0, max_value=10**7)

overrides = st.builds(
    PriceOverride,
    id=st.just("price_1"),
    provider=st.just("openai"),
    model=st.just("m"),
    input_per_mtok_nanos=prices_nanos,
    output_per_mtok_nanos=prices_nanos,
    cache_read_per_mtok_nanos=st.none() | prices_nanos,
    cache_write_per_mtok_nanos=st.none() | prices_nanos,
)


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    cache_read = draw(token_counts)
    cache_write = draw(token_counts)
    uncached = draw(token_counts)
    output = draw(token_counts)
    return Usage(
        input_tokens=uncached + cache_read + cache_write,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        output_tokens=output,
        reasoning_tokens=draw(st.integers(min_value=0, max_value=output)),
    )


@given(p=overrides, u=usages())
def test_override_matches_exact_decimal_arithmetic(p: PriceOverride, u: Usage) -> None:
    read = p.input_per_mtok_nanos if p.cache_read_per_mtok_nanos is None else p.cache_read_per_mtok_nanos
    write = p.input_per_mtok_nanos if p.cache_write_per_mtok_nanos is None else p.cache_write_per_mtok_nanos
    uncached = u.input_tokens - u.cache_read_tokens - u.cache_write_tokens
    exact = (Decimal(uncached * p.input_per_mtok_nanos + u.cache_read_tokens * read
                     + u.cache_write_tokens * write + u.output_tokens * p.output_per_mtok_nanos)
             / Decimal(1_000_000))
    cost = override_cost_nanos(p, u)
    assert type(cost) is int
    assert cost == int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@given(p=overrides, u=usages(), more_in=token_counts, more_out=token_counts, more_read=token_counts)
def test_override_cost_is_monotone_in_tokens(
    p: PriceOverride, u: Usage, more_in: int, more_out: int, more_read: int
) -> None:
    bigger = Usage(
        input_tokens=u.input_tokens + more_in + more_read,
        cache_read_tokens=u.cache_read_tokens + more_read,
        cache_write_tokens=u.cache_write_tokens,
        output_tokens=u.output_tokens + more_out,
    )
    base = override_cost_nanos(p, u)
    assert base >= 0
    assert override_cost_nanos(p, bigger) >= base


# --- call_cost_nanos -------------------------------------------------------------------------


def test_override_beats_the_catalog() -> None:
    p = price(input_per_mtok_nanos=1_000_000_000, output_per_mtok_nanos=1_000_000_000)
    usage = Usage(input_tokens=1_000, output_tokens=1_000)
    catalog_cost, _ = call_cost_nanos(NO_OVERRIDES, OPENAI, "gpt-4o-mini", usage)
    cost, priced = call_cost_nanos({("openai", "gpt-4o-mini"): p}, OPENAI, "gpt-4o-mini", usage)
    assert (cost, priced) == (2_000_000, True)
    assert cost != catalog_cost


def test_override_is_keyed_by_provider_name_and_model() -> None:
    p = price(input_per_mtok_nanos=1_000_000_000)
    usage = Usage(input_tokens=1_000)
    other_model = call_cost_nanos({("openai", "gpt-4o"): p}, OPENAI, "gpt-4o-mini", usage)
    assert other_model == call_cost_nanos(NO_OVERRIDES, OPENAI, "gpt-4o-mini", usage)


def catalog_nanos(model: str, usage: Usage) -> int:
    result = calc_price(
        GPUsage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens or None,
        ),
        model,
        provider_id="openai",
    )
    return decimal_to_nanos(result.total_price)


def test_catalog_prices_a_known_openai_model() -> None:
    usage = Usage(input_tokens=1_000, output_tokens=500)
    cost, priced = call_cost_nanos(NO_OVERRIDES, OPENAI, "gpt-4o-mini", usage)
    assert priced is True
    assert type(cost) is int
    assert cost > 0
    assert cost == catalog_nanos("gpt-4o-mini", usage)


def test_catalog_discounts_cached_input() -> None:
    full = call_cost_nanos(NO_OVERRIDES, OPENAI, "gpt-4o-mini", Usage(input_tokens=10_000))[0]
    cached = call_cost_nanos(
        NO_OVERRIDES, OPENAI, "gpt-4o-mini", Usage(input_tokens=10_000, cache_read_tokens=8_000)
    )[0]
    assert 0 < cached < full


@settings(max_examples=40)
@given(
    uncached=st.integers(min_value=0, max_value=200_000),
    cached=st.integers(min_value=0, max_value=100_000),
    output=st.integers(min_value=0, max_value=50_000),
)
def test_catalog_cost_matches_genai_prices(uncached: int, cached: int, output: int) -> None:
    usage = Usage(input_tokens=uncached + cached, cache_read_tokens=cached, output_tokens=output)
    assert call_cost_nanos(NO_OVERRIDES, OPENAI, "gpt-4o-mini", usage) == (
        catalog_nanos("gpt-4o-mini", usage), True
    )


def test_unknown_model_is_unpriced() -> None:
    usage = Usage(input_tokens=1_000, output_tokens=500)
    assert call_cost_nanos(NO_OVERRIDES, OPENAI, "no-such-model-zz9", usage) == (0, False)


def test_mock_models_have_a_builtin_price() -> None:
    usage = Usage(input_tokens=1_000, output_tokens=500)
    expected = (1_000 * mock.INPUT_PER_MTOK_NANOS + 500 * mock.OUTPUT_PER_MTOK_NANOS + 500_000) // 1_000_000
    for model in MOCK_MODELS:
        assert call_cost_nanos(NO_OVERRIDES, MOCK, model, usage) == (expected, True)
    assert expected == 450_000


def test_builtin_price_follows_the_provider_type_not_its_name() -> None:
    renamed = Provider(id="prov_9", workspace_id="ws_1", name="demo", type="mock")
    usage = Usage(input_tokens=1_000, output_tokens=500)
    assert call_cost_nanos(NO_OVERRIDES, renamed, "echo", usage) == call_cost_nanos(NO_OVERRIDES, MOCK, "echo", usage)


@pytest.mark.parametrize("model", ["gpt-4o-mini", "no-such-mock-model"])
def test_mock_provider_is_unpriced_for_other_models(model: str) -> None:
    # The catalog prices OpenAI's gpt-4o-mini, but not when a mock provider serves it.
    usage = Usage(input_tokens=1_000, output_tokens=500)
    assert call_cost_nanos(NO_OVERRIDES, MOCK, model, usage) == (0, False)


def test_operator_override_beats_the_builtin_mock_price() -> None:
    p = PriceOverride(id="price_2", provider="mock", model="echo", input_per_mtok_nanos=3_000_000_000)
    usage = Usage(input_tokens=1_000, output_tokens=500)
    assert call_cost_nanos({("mock", "echo"): p}, MOCK, "echo", usage) == (3_000_000, True)
    free = PriceOverride(id="price_3", provider="mock", model="echo")
    assert call_cost_nanos({("mock", "echo"): free}, MOCK, "echo", usage) == (0, True)


def test_catalog_models_lists_openai_and_nothing_for_mock() -> None:
    ids = [model for model, _ in catalog_models("openai")]
    assert "gpt-4o-mini" in ids
    assert catalog_models("mock") == ()
