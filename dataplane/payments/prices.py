"""What a paid call costs, shared by every rail: the endpoint's per-call price and its value in
the ledger's nano-USD (payment assets are USD stablecoins: atomic units scaled by
10^(9 - decimals); for more than 9 decimals the sub-nano remainder is dropped)."""

from __future__ import annotations

from typing import Protocol

from schemas.entities import PaidAmount


class _Price(Protocol):
    @property
    def per_call(self) -> PaidAmount | None: ...


class Priced(Protocol):
    """A paid endpoint, or anything shaped like one for pricing."""

    @property
    def slug(self) -> str: ...
    @property
    def price(self) -> _Price: ...


def per_call(endpoint: Priced) -> PaidAmount:
    """The endpoint's per-call price; ValueError when it has none."""
    price = endpoint.price.per_call
    if price is None:
        raise ValueError(f"paid endpoint {endpoint.slug!r} has no per-call price")
    return price


def amount_nanos(endpoint: Priced) -> int:
    """The per-call price in nano-USD (see the module docstring)."""
    price = per_call(endpoint)
    atomic = int(price.amount)
    scale: int = 10 ** abs(9 - price.decimals)
    return atomic * scale if price.decimals <= 9 else atomic // scale
