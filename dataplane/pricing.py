"""Call cost in integer nano-USD, from provider-reported usage.

Resolution order: an operator `PriceOverride` in the snapshot, then a built-in provider's own
price (the `mock` provider), then the bundled `genai-prices` catalog, then "unpriced" (cost 0,
`priced=False` on the event so finance can find it).
Pure apart from genai-prices' in-memory catalog; no IO, no clock.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from decimal import Decimal

from genai_prices import Usage as GPUsage
from genai_prices import calc_price

from dataplane.providers import mock
from schemas.catalog import CATALOG_PROVIDER, MOCK_EMBEDDING_MODELS, MOCK_MODELS, catalog_models
from schemas.entities import PriceOverride, Provider
from schemas.events import Usage
from schemas.money import decimal_to_nanos

_MILLION = 1_000_000

# Prices that ship with a built-in provider type, keyed by (provider type, model).
BUILTIN_PRICES = {
    ("mock", model): PriceOverride(id=f"builtin-mock-{model}", provider="mock", model=model,
                                   input_per_mtok_nanos=mock.INPUT_PER_MTOK_NANOS,
                                   output_per_mtok_nanos=mock.OUTPUT_PER_MTOK_NANOS)
    for model in (*MOCK_MODELS, *MOCK_EMBEDDING_MODELS)
}


# The most tokens one call may record, per count. Far above any real call (the largest context
# windows are a few million tokens), and small enough that counts times any catalog price stay
# well inside a Postgres bigint: a provider reporting 1e19 tokens must not overflow the ledger.
MAX_TOKENS_PER_CALL = 10**9
# The most one call may cost: $1,000,000 in nano-USD. A bigint holds about 9.2e18 nanos, so even
# thousands of calls at the cap sum without overflow; an override price so large that a real call
# reaches it is an operator error, clamped here and flagged on the event (`cost_clamped`).
MAX_CALL_COST_NANOS = 10**15


def bounded_usage(usage: Usage) -> Usage | None:
    """None when every count of `usage` is within 0..MAX_TOKENS_PER_CALL (the usual case: a few
    comparisons); else a copy with each count clamped into that range (negative -> 0)."""
    counts = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
              usage.reasoning_tokens)
    if all(0 <= n <= MAX_TOKENS_PER_CALL for n in counts):
        return None
    i, o, cr, cw, r = (min(max(n, 0), MAX_TOKENS_PER_CALL) for n in counts)
    return Usage(input_tokens=i, output_tokens=o, cache_read_tokens=cr, cache_write_tokens=cw, reasoning_tokens=r)


def override_cost_nanos(price: PriceOverride, usage: Usage) -> int:
    """Exact integer arithmetic: token counts times nano-USD per million tokens, rounded half up,
    then bounded to 0..MAX_CALL_COST_NANOS whatever the price (a cost at the cap is flagged by
    the caller)."""
    cache_read_price = price.input_per_mtok_nanos if price.cache_read_per_mtok_nanos is None \
        else price.cache_read_per_mtok_nanos
    cache_write_price = price.input_per_mtok_nanos if price.cache_write_per_mtok_nanos is None \
        else price.cache_write_per_mtok_nanos
    uncached = max(0, usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens)
    micro = (
        uncached * price.input_per_mtok_nanos
        + usage.cache_read_tokens * cache_read_price
        + usage.cache_write_tokens * cache_write_price
        + usage.output_tokens * price.output_per_mtok_nanos
    )
    return min(max((micro + _MILLION // 2) // _MILLION, 0), MAX_CALL_COST_NANOS)


@functools.lru_cache(maxsize=4096)
def _catalog_cost(provider_id: str, model: str, usage: Usage) -> Decimal | None:
    try:
        result = calc_price(
            GPUsage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cache_read_tokens or None,
                cache_write_tokens=usage.cache_write_tokens or None,
            ),
            model,
            provider_id=provider_id,
        )
    except LookupError:
        return None
    return result.total_price


def call_cost_nanos(prices: Mapping[tuple[str, str], PriceOverride], provider: Provider, model: str,
                    usage: Usage) -> tuple[int, bool]:
    """`(cost_nanos, priced)` for one call. `prices` is the snapshot's override index. The cost
    never exceeds MAX_CALL_COST_NANOS; pass usage already bounded (`bounded_usage`)."""
    override = prices.get((provider.name, model)) or BUILTIN_PRICES.get((provider.type, model))
    if override is not None:
        return override_cost_nanos(override, usage), True
    catalog_id = CATALOG_PROVIDER.get(provider.type)
    if catalog_id is None:
        return 0, False
    total = _catalog_cost(catalog_id, model, usage)
    if total is None:
        return 0, False
    return min(decimal_to_nanos(total), MAX_CALL_COST_NANOS), True


_PER_MTOK_IN = Usage(input_tokens=_MILLION)
_PER_MTOK_OUT = Usage(output_tokens=_MILLION)


def unit_prices(prices: Mapping[tuple[str, str], PriceOverride], provider: Provider,
                model: str) -> tuple[int, int] | None:
    """`(input, output)` nano-USD per million tokens for `provider`/`model` (same resolution as
    `call_cost_nanos`: override, built-in, catalog base tier), or None when unpriced. For budget
    holds: a catalog model with tiered prices is held at its base tier."""
    override = prices.get((provider.name, model)) or BUILTIN_PRICES.get((provider.type, model))
    if override is not None:
        # A cache write can cost more than plain input (Anthropic: 1.25x): hold at the dearer.
        held_input = max(override.input_per_mtok_nanos, override.cache_write_per_mtok_nanos or 0)
        return held_input, override.output_per_mtok_nanos
    catalog_id = CATALOG_PROVIDER.get(provider.type)
    if catalog_id is None:
        return None
    per_in, per_out = _catalog_cost(catalog_id, model, _PER_MTOK_IN), _catalog_cost(catalog_id, model, _PER_MTOK_OUT)
    if per_in is None or per_out is None:
        return None
    return decimal_to_nanos(per_in), decimal_to_nanos(per_out)


def hold_nanos(unit: tuple[int, int] | None, input_tokens: int, output_tokens: int) -> int:
    """The most a call of at most `input_tokens` in and `output_tokens` out can cost at `unit`
    prices, rounded up (and capped like a call's cost): the budget hold."""
    if unit is None:
        return 0
    micro = input_tokens * unit[0] + output_tokens * unit[1]
    return min(-(-micro // _MILLION), MAX_CALL_COST_NANOS)


def warm(provider_types: Iterable[str] = ("openai",)) -> None:
    """Load the catalog before the first request pays for it (about 150 ms)."""
    for ptype in provider_types:
        catalog_models(ptype)
