"""What a paid call costs, shared by every rail: the amount the challenge asks for and its value in
the ledger's nano-USD (payment assets are USD stablecoins: atomic units scaled by
10^(9 - decimals); for more than 9 decimals the sub-nano remainder is dropped).

A per-call price asks its amount. A per-token price asks its `max_amount` (the authorization,
settled whole) and charges `metered` (tokens at its rates, rounded up, at most the maximum):
the difference is owed back to the payer."""

from __future__ import annotations

from typing import Protocol

from schemas.entities import PaidAmount, PaidPerToken
from schemas.events import Usage


class _Price(Protocol):  # and, on a `PaidPrice`, `per_token`
    @property
    def per_call(self) -> PaidAmount | None: ...


class Priced(Protocol):
    """A paid endpoint, or anything shaped like one for pricing."""

    @property
    def slug(self) -> str: ...
    @property
    def price(self) -> _Price: ...


def per_call(endpoint: Priced) -> PaidAmount:
    """What one call's challenge asks for: the per-call price, or a per-token price's maximum
    authorization. ValueError when the endpoint has neither."""
    price = endpoint.price.per_call
    if price is not None:
        return price
    metered_price: PaidPerToken | None = getattr(endpoint.price, "per_token", None)
    if metered_price is not None:
        return PaidAmount(amount=metered_price.max_amount, asset=metered_price.asset, decimals=metered_price.decimals)
    raise ValueError(f"paid endpoint {endpoint.slug!r} has no price")


def atomic_nanos(atomic: int, decimals: int) -> int:
    """Atomic units of a USD stablecoin with `decimals`, in nano-USD (see the module docstring)."""
    scale: int = 10 ** abs(9 - decimals)
    return atomic * scale if decimals <= 9 else atomic // scale


def amount_nanos(endpoint: Priced) -> int:
    """What the challenge asks for, in nano-USD (see the module docstring)."""
    price = per_call(endpoint)
    return atomic_nanos(int(price.amount), price.decimals)


def metered(price: PaidPerToken, usage: Usage | None) -> int:
    """A per-token price's charge for `usage`, in atomic units: input and output tokens at their
    rates per million, rounded up, at most `max_amount` (no usage: nothing)."""
    if usage is None:
        return 0
    total = usage.input_tokens * int(price.input_per_mtok) + usage.output_tokens * int(price.output_per_mtok)
    return min(int(price.max_amount), -(-total // 1_000_000))
