"""Call cost in integer nano-USD, from provider-reported usage, and which price priced it.

Pure data and functions shared by both planes: the data plane prices each call with them
(`dataplane.call.Call.price`), the control plane re-prices calls recorded as unpriced once a price
exists (`controlplane.repricing`), with the very same function, so the two never disagree.

Resolution for one call, most specific first (`resolve`):

1. operator `PriceOverride`s that match the call: its provider key's, its workspace's, then the
   platform's; at each scope the exact model before the provider's `*`;
2. the price of a built-in provider type (the `mock`), `BUILTIN_PRICES`;
3. the bundled genai-prices catalog;
4. else unpriced: cost 0, `priced=False` (the ledger parks the tokens in suspense).

Of the matching overrides, field by field the most specific one that sets a field wins: token
prices (input and output per million tokens), `discount_pct`, `per_request_nanos`. An override
without token prices (a negotiated discount, a per-request fee) applies to the token prices found
further down the order (a less specific override, the built-in, the catalog). Discounts never
stack: only the most specific one applies. The provenance (`CallPrice.source`, `price_id`,
`scope`) names the most specific matching override, the one an operator would change.

Arithmetic is exact: token counts times nano-USD per million tokens (or the catalog's exact
Decimal), times `(100 - pct) / 100`, rounded half up once, bounded to MAX_CALL_COST_NANOS, plus
the per-request fee on a successful call. No floats, no IO, no clock; genai-prices' catalog is
read in memory.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, Protocol

import msgspec
from genai_prices import Usage as GPUsage
from genai_prices import calc_price

from schemas.catalog import CATALOG_PROVIDER, MOCK_EMBEDDING_MODELS, MOCK_MODELS, catalog_models
from schemas.entities import PriceOverride, Provider
from schemas.events import Usage
from schemas.money import NANOS_PER_UNIT, decimal_to_nanos
from schemas.snapshot import ANY_MODEL, ScopedPriceKey, platform_price_key, scoped_price_key

__all__ = [
    "ANY_MODEL", "BUILTIN_PRICES", "CATALOG_VERSION", "MAX_CALL_COST_NANOS", "MAX_TOKENS_PER_CALL",
    "MOCK_INPUT_PER_MTOK_NANOS", "MOCK_OUTPUT_PER_MTOK_NANOS", "CallPrice", "PriceIndex", "Resolved",
    "ScopedPriceKey", "bounded_usage", "call_cost_nanos", "call_unit_prices", "discount_fraction", "hold_nanos",
    "override_cost_nanos", "platform_price_key", "price_call", "resolve", "scoped_price_key", "unit_prices", "warm",
]

_MILLION = 1_000_000

# The built-in `mock` provider is priced like a small hosted model ($0.15 / $0.60 per million
# tokens), so the demo's ledger shows real, non-zero integer costs. Nano-USD per million tokens;
# here (not in the mock adapter) so the control plane prices mock calls without the data plane.
MOCK_INPUT_PER_MTOK_NANOS = 150_000_000
MOCK_OUTPUT_PER_MTOK_NANOS = 600_000_000

# Prices that ship with a built-in provider type, keyed by (provider type, model).
BUILTIN_PRICES = {
    ("mock", model): PriceOverride(id=f"builtin-mock-{model}", provider="mock", model=model,
                                   input_per_mtok_nanos=MOCK_INPUT_PER_MTOK_NANOS,
                                   output_per_mtok_nanos=MOCK_OUTPUT_PER_MTOK_NANOS)
    for model in (*MOCK_MODELS, *MOCK_EMBEDDING_MODELS)
}

# The genai-prices release whose catalog prices calls: recorded on each catalog-priced call.
CATALOG_VERSION = importlib.metadata.version("genai-prices")

# The most tokens one call may record, per count. Far above any real call (the largest context
# windows are a few million tokens), and small enough that counts times any catalog price stay
# well inside a Postgres bigint: a provider reporting 1e19 tokens must not overflow the ledger.
MAX_TOKENS_PER_CALL = 10**9
# The most one call may cost: $1,000,000 in nano-USD. A bigint holds about 9.2e18 nanos, so even
# thousands of calls at the cap sum without overflow; an override price so large that a real call
# reaches it is an operator error, clamped here and flagged on the event (`cost_clamped`).
MAX_CALL_COST_NANOS = 10**15


class PriceIndex(Protocol):
    """Where overrides are looked up (a `schemas.snapshot.Snapshot` is one): `prices` holds the
    platform overrides of one model by `(provider, model)`, `scoped_prices` every other override
    by `scoped_price_key`."""

    @property
    def prices(self) -> Mapping[tuple[str, str], PriceOverride]: ...

    @property
    def scoped_prices(self) -> Mapping[ScopedPriceKey, PriceOverride]: ...


# -- discounts ----------------------------------------------------------------------------------
_PCT = re.compile(r"^(0|[1-9][0-9]?)(\.[0-9]{1,6})?$")


def discount_fraction(pct: str) -> tuple[int, int]:
    """`(keep, scale)`: the share of the price kept after a discount of `pct` percent, as the exact
    fraction keep/scale. `pct` is a decimal string, 0 < pct < 100, at most 6 decimals ("12.5"
    keeps 875/1000). ValueError otherwise (the admin API refuses such a value with a 400)."""
    if not _PCT.match(pct):
        raise ValueError("a discount is a decimal string of percent, more than 0 and less than 100, such as "
                         "'12.5' (at most 6 decimals)")
    whole, _, frac = pct.partition(".")
    scale = 100 * 10 ** len(frac)
    off = int(whole + frac)
    if not 0 < off < scale:
        raise ValueError("a discount is more than 0 and less than 100 percent")
    return scale - off, scale


# -- usage bounds -------------------------------------------------------------------------------

def bounded_usage(usage: Usage) -> Usage | None:
    """None when every count of `usage` is within 0..MAX_TOKENS_PER_CALL (the usual case: a few
    comparisons); else a copy with each count clamped into that range (negative -> 0)."""
    counts = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
              usage.reasoning_tokens)
    if all(0 <= n <= MAX_TOKENS_PER_CALL for n in counts):
        return None
    i, o, cr, cw, r = (min(max(n, 0), MAX_TOKENS_PER_CALL) for n in counts)
    return Usage(input_tokens=i, output_tokens=o, cache_read_tokens=cr, cache_write_tokens=cw, reasoning_tokens=r)


# -- token costs as exact fractions of a nano-USD -------------------------------------------------

def _override_micro(price: PriceOverride, usage: Usage) -> int:
    """Tokens times nano-USD per million tokens: the cost in nano-USD times 10**6, exactly."""
    per_in = price.input_per_mtok_nanos or 0
    cache_read = per_in if price.cache_read_per_mtok_nanos is None else price.cache_read_per_mtok_nanos
    cache_write = per_in if price.cache_write_per_mtok_nanos is None else price.cache_write_per_mtok_nanos
    uncached = max(0, usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens)
    return (uncached * per_in + usage.cache_read_tokens * cache_read + usage.cache_write_tokens * cache_write
            + usage.output_tokens * (price.output_per_mtok_nanos or 0))


def _round_half_up(num: int, den: int) -> int:
    """num/den rounded half up, bounded to 0..MAX_CALL_COST_NANOS (den > 0)."""
    if num <= 0:
        return 0
    return min((2 * num + den) // (2 * den), MAX_CALL_COST_NANOS)


def override_cost_nanos(price: PriceOverride, usage: Usage) -> int:
    """Exact integer arithmetic: token counts times nano-USD per million tokens, rounded half up,
    then bounded to 0..MAX_CALL_COST_NANOS whatever the price (a cost at the cap is flagged by
    the caller). Token prices only: no discount, no per-request fee (see `price_call`)."""
    return _round_half_up(_override_micro(price, usage), _MILLION)


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


@functools.lru_cache(maxsize=1024)
def _catalog_knows(provider_id: str, model: str) -> bool:
    return _catalog_cost(provider_id, model, Usage()) is not None


# -- resolution ---------------------------------------------------------------------------------
PriceSource = Literal["override", "builtin", "catalog", "unpriced"]


class Resolved(msgspec.Struct, frozen=True, gc=False):
    """What prices a call to one provider/model, before usage is known.

    `tokens`: the override (or built-in) whose token prices apply, else None; `catalog_id`: the
    genai-prices provider id when the catalog supplies them instead; `discount` the kept
    fraction `(keep, scale)` or None; `per_request_nanos` the fee per successful call (0: none);
    `head` the most specific matching override (the provenance), None when no override matched."""

    tokens: PriceOverride | None
    catalog_id: str | None
    discount: tuple[int, int] | None
    per_request_nanos: int
    head: PriceOverride | None


def _matching(index: PriceIndex, provider_name: str, model: str, workspace_id: str | None,
              provider_key_id: str | None) -> list[PriceOverride]:
    """The overrides matching a call, most specific first."""
    platform = index.prices.get((provider_name, model))
    scoped = index.scoped_prices
    if not scoped:  # the usual case: a few platform prices at most
        return [] if platform is None else [platform]
    found = (
        scoped.get(("provider_key", provider_key_id, provider_name, model)) if provider_key_id else None,
        scoped.get(("provider_key", provider_key_id, provider_name, ANY_MODEL)) if provider_key_id else None,
        scoped.get(("workspace", workspace_id, provider_name, model)) if workspace_id else None,
        scoped.get(("workspace", workspace_id, provider_name, ANY_MODEL)) if workspace_id else None,
        platform,
        scoped.get(("platform", "", provider_name, ANY_MODEL)),
    )
    return [p for p in found if p is not None]


def _base(provider_type: str, model: str) -> tuple[PriceOverride | None, str | None]:
    """Token prices when no override has them: the built-in's, else the catalog id, else neither."""
    builtin = BUILTIN_PRICES.get((provider_type, model))
    if builtin is not None:
        return builtin, None
    cid = CATALOG_PROVIDER.get(provider_type)
    return None, (cid if cid is not None and _catalog_knows(cid, model) else None)


@functools.lru_cache(maxsize=256)
def _stored_discount(pct: str) -> tuple[int, int] | None:
    # A stored value the admin API would refuse is ignored, not raised: pricing never fails a call.
    try:
        return discount_fraction(pct)
    except ValueError:
        return None


def resolve(index: PriceIndex, provider_name: str, provider_type: str, model: str, *,
            workspace_id: str | None = None, provider_key_id: str | None = None) -> Resolved:
    """The prices that apply to a call of `provider_name/model` (a provider of `provider_type`)
    in `workspace_id` through the upstream credential `provider_key_id` (see the module
    docstring for the order). A stored discount the admin API would refuse is ignored (pricing
    never fails a call)."""
    chain = _matching(index, provider_name, model, workspace_id, provider_key_id)
    if not chain:
        return Resolved(*_base(provider_type, model), None, 0, None)
    tokens: PriceOverride | None = None
    pct: str | None = None
    per_request = 0
    for p in chain:
        if tokens is None and p.has_token_prices:
            tokens = p
        if pct is None and p.discount_pct:
            pct = p.discount_pct
        if not per_request and p.per_request_nanos:
            per_request = max(p.per_request_nanos, 0)
    catalog_id = None
    if tokens is None:
        tokens, catalog_id = _base(provider_type, model)
    return Resolved(tokens, catalog_id, None if pct is None else _stored_discount(pct), per_request, chain[0])


class CallPrice(msgspec.Struct, frozen=True, gc=False):
    """The cost of one call and the price behind it, as recorded on its `llm.call` event.

    `cost_nanos`: integer nano-USD, 0..MAX_CALL_COST_NANOS (`clamped` when it hit the cap);
    `priced`: False when no price is known (cost 0); `source`: override | builtin | catalog |
    unpriced; `price_id`: the PriceOverride id (override, builtin); `scope`: platform |
    workspace | provider_key (override); `catalog_version`: the genai-prices release, when the
    catalog supplied the token prices (also under an override that only discounts them)."""

    cost_nanos: int
    priced: bool
    source: PriceSource
    price_id: str | None = None
    scope: str = ""
    catalog_version: str = ""
    clamped: bool = False


UNPRICED = CallPrice(cost_nanos=0, priced=False, source="unpriced")


def price_call(index: PriceIndex, provider_name: str, provider_type: str, model: str, usage: Usage, *,
               workspace_id: str | None = None, provider_key_id: str | None = None,
               success: bool = True) -> CallPrice:
    """The cost of one call with `usage` (pass it bounded: `bounded_usage`) and its provenance.

    Token cost times the discount, rounded half up once, bounded; plus the per-request fee when
    `success` (a call the upstream answered, status < 400); bounded again. Unpriced (cost 0,
    `priced=False`) when no token price is known and no per-request fee applies."""
    r = resolve(index, provider_name, provider_type, model, workspace_id=workspace_id,
                provider_key_id=provider_key_id)
    version = ""
    if r.tokens is not None:
        num, den = _override_micro(r.tokens, usage), _MILLION
    elif r.catalog_id is not None:
        total = _catalog_cost(r.catalog_id, model, usage)
        if total is None:  # the model is known but this usage is not priceable (never seen; be safe)
            num, den = 0, 1
        else:
            n, d = total.as_integer_ratio()
            num, den = n * NANOS_PER_UNIT, d
        version = CATALOG_VERSION
    elif r.per_request_nanos:
        num, den = 0, 1
    else:
        return UNPRICED
    if r.discount is not None:
        keep, scale = r.discount
        num, den = num * keep, den * scale
    cost = _round_half_up(num, den)
    if success and r.per_request_nanos:
        cost = min(cost + r.per_request_nanos, MAX_CALL_COST_NANOS)
    clamped = cost >= MAX_CALL_COST_NANOS
    if r.head is not None:
        return CallPrice(cost, True, "override", r.head.id, r.head.scope, version, clamped)
    if r.tokens is not None:
        return CallPrice(cost, True, "builtin", r.tokens.id, "", "", clamped)
    return CallPrice(cost, True, "catalog", None, "", version, clamped)


# -- the interface from before scopes (a platform-only index) ---------------------------------------

@dataclass(frozen=True, slots=True)
class _PlatformOnly:
    prices: Mapping[tuple[str, str], PriceOverride]
    scoped_prices: Mapping[ScopedPriceKey, PriceOverride]


_NO_SCOPED: Mapping[ScopedPriceKey, PriceOverride] = {}


def call_cost_nanos(prices: Mapping[tuple[str, str], PriceOverride], provider: Provider, model: str,
                    usage: Usage) -> tuple[int, bool]:
    """`(cost_nanos, priced)` for one call priced by the platform overrides `prices` (by
    `(provider, model)`) alone, the built-ins and the catalog: `price_call` without scopes."""
    result = price_call(_PlatformOnly(prices, _NO_SCOPED), provider.name, provider.type, model, usage)
    return result.cost_nanos, result.priced


_PER_MTOK_IN = Usage(input_tokens=_MILLION)
_PER_MTOK_OUT = Usage(output_tokens=_MILLION)


def call_unit_prices(index: PriceIndex, provider_name: str, provider_type: str, model: str, *,
                     workspace_id: str | None = None, provider_key_id: str | None = None) -> tuple[int, int] | None:
    """`(input, output)` nano-USD per million tokens for a call (same resolution as
    `price_call`, discount applied and rounded up), or None when no token price is known. For
    budget holds: a catalog model with tiered prices is held at its base tier; a cache write can
    cost more than plain input (Anthropic: 1.25x), so input is held at the dearer. The
    per-request fee is not included (add it to the hold separately)."""
    r = resolve(index, provider_name, provider_type, model, workspace_id=workspace_id,
                provider_key_id=provider_key_id)
    if r.tokens is not None:
        per_in = max(r.tokens.input_per_mtok_nanos or 0, r.tokens.cache_write_per_mtok_nanos or 0)
        per_out = r.tokens.output_per_mtok_nanos or 0
    elif r.catalog_id is not None:
        total_in = _catalog_cost(r.catalog_id, model, _PER_MTOK_IN)
        total_out = _catalog_cost(r.catalog_id, model, _PER_MTOK_OUT)
        if total_in is None or total_out is None:
            return None
        per_in, per_out = decimal_to_nanos(total_in), decimal_to_nanos(total_out)
    else:
        return None
    if r.discount is not None:
        keep, scale = r.discount
        per_in, per_out = -(-per_in * keep // scale), -(-per_out * keep // scale)
    return per_in, per_out


def unit_prices(prices: Mapping[tuple[str, str], PriceOverride], provider: Provider,
                model: str) -> tuple[int, int] | None:
    """`call_unit_prices` with the platform overrides `prices` alone (the interface from before
    scopes)."""
    return call_unit_prices(_PlatformOnly(prices, _NO_SCOPED), provider.name, provider.type, model)


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
