"""schemas/money.py: integer nano-units and their decimal rendering."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.money import (
    NANOS_PER_UNIT,
    decimal_to_nanos,
    nanos_to_decimal_str,
    per_million_to_nanos_per_token,
)


@pytest.mark.parametrize(
    ("amount", "nanos"),
    [
        ("0", 0),
        ("1", 1_000_000_000),
        ("0.00045", 450_000),
        ("0.000000001", 1),
        ("0.0000000005", 1),  # exactly half a nano rounds up
        ("0.00000000049", 0),
        ("0.0000000015", 2),
        ("0.0000000025", 3),  # half-up, not banker's rounding (which would give 2)
        ("-0.0000000005", -1),  # half-up rounds away from zero
        ("-0.0000000004", 0),
        ("12.3456789014", 12_345_678_901),
        ("1E-9", 1),
    ],
)
def test_decimal_to_nanos(amount: str, nanos: int) -> None:
    result = decimal_to_nanos(Decimal(amount))
    assert result == nanos
    assert type(result) is int


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "0"),
        (1, "0.000000001"),
        (10, "0.00000001"),
        (1_500_000, "0.0015"),
        (450_000, "0.00045"),
        (NANOS_PER_UNIT, "1"),
        (7 * NANOS_PER_UNIT, "7"),
        (12_345_678_901, "12.345678901"),
        (1_500_000_000, "1.5"),
        (-1, "-0.000000001"),
        (-1_500_000, "-0.0015"),
        (-2 * NANOS_PER_UNIT, "-2"),
    ],
)
def test_nanos_to_decimal_str(nanos: int, text: str) -> None:
    assert nanos_to_decimal_str(nanos) == text


# Decimal's default context keeps 28 significant digits, i.e. up to about 1e18 USD of nano-units.
@given(st.integers(min_value=-(10**27), max_value=10**27))
def test_decimal_string_round_trips_exactly(nanos: int) -> None:
    text = nanos_to_decimal_str(nanos)
    assert "e" not in text.lower()
    assert Decimal(text) * NANOS_PER_UNIT == nanos
    assert decimal_to_nanos(Decimal(text)) == nanos


@given(st.integers())
def test_decimal_string_parses_back_exactly_without_decimal(nanos: int) -> None:
    text = nanos_to_decimal_str(nanos)
    negative = text.startswith("-")
    whole, _, frac = text.removeprefix("-").partition(".")
    assert len(frac) <= 9
    value = int(whole) * NANOS_PER_UNIT + int(frac.ljust(9, "0"))
    assert (-value if negative else value) == nanos


@given(st.integers(min_value=-(10**20), max_value=10**20))
def test_decimal_string_is_canonical(nanos: int) -> None:
    text = nanos_to_decimal_str(nanos)
    if "." in text:
        assert not text.endswith("0")
        assert not text.endswith(".")
    assert text != "-0"


@given(st.decimals(min_value=-(10**6), max_value=10**6, allow_nan=False, allow_infinity=False, places=12))
def test_decimal_to_nanos_is_within_half_a_nano(amount: Decimal) -> None:
    nanos = decimal_to_nanos(amount)
    assert abs(Decimal(nanos) - amount * NANOS_PER_UNIT) <= Decimal("0.5")


def test_per_million_to_nanos_per_token_is_exact() -> None:
    # $0.15 per million tokens is 150 nano-USD per token.
    assert per_million_to_nanos_per_token(Decimal("0.15")) == 150
    assert per_million_to_nanos_per_token(Decimal("0.000001")) == Decimal("0.001")
    assert per_million_to_nanos_per_token(Decimal("2.5")) * 1_000_000 == Decimal("2.5") * NANOS_PER_UNIT
