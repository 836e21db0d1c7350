"""Money is an integer count of nano-units (1e-9 of the currency) plus a currency code.

Floats never carry money. Decimal appears only at the edges: when a price library hands us a
Decimal, and when we render a decimal string for a header or an API response.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

NANOS_PER_UNIT = 1_000_000_000
_NANO = Decimal(NANOS_PER_UNIT)


def decimal_to_nanos(amount: Decimal) -> int:
    """Convert a Decimal amount in whole units to integer nano-units, rounding half up."""
    return int((amount * _NANO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def nanos_to_decimal_str(nanos: int) -> str:
    """Render nano-units as a plain decimal string with no exponent and no trailing zeros.

    `1_500_000` becomes `"0.0015"`; zero becomes `"0"`.
    """
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_UNIT)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")


def per_million_to_nanos_per_token(price_per_million: Decimal) -> Decimal:
    """A price per million tokens, as nano-units per single token (exact Decimal)."""
    return price_per_million * _NANO / Decimal(1_000_000)
