"""Call pricing for the data plane: the pure code lives in `schemas.pricing` (the control plane
re-prices unpriced calls with the same function); this module re-exports it for the data plane's
existing importers."""

from __future__ import annotations

from schemas.pricing import (
    BUILTIN_PRICES,
    MAX_CALL_COST_NANOS,
    MAX_TOKENS_PER_CALL,
    CallPrice,
    bounded_usage,
    call_cost_nanos,
    call_unit_prices,
    hold_nanos,
    override_cost_nanos,
    price_call,
    unit_prices,
    warm,
)

__all__ = [
    "BUILTIN_PRICES", "MAX_CALL_COST_NANOS", "MAX_TOKENS_PER_CALL", "CallPrice", "bounded_usage", "call_cost_nanos",
    "call_unit_prices", "hold_nanos", "override_cost_nanos", "price_call", "unit_prices", "warm",
]
