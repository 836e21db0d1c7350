"""schemas/budget_keys.py: the Redis key layout and budget calendar windows."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.budget_keys import (
    KEY_GRACE,
    TOTAL_START,
    budget_keys,
    concurrency_key,
    escalation_key,
    key_expire_at_ms,
    lease_hold_id,
    op_marker_key,
    period_window,
    rate_key,
)
from schemas.entities import Budget, BudgetPeriod

UTC = dt.UTC


def budget(period: BudgetPeriod, tz: str = "UTC") -> Budget:
    return Budget(id="bud_1", workspace_id="ws_1", scope="agent", scope_id="agent_1", period=period,
                  limit_nanos=10**9, timezone=tz)


def test_every_key_of_a_workspace_carries_its_hash_tag() -> None:
    keys = [*budget_keys("ws_1", "bud_1", "2025-03"), rate_key("ws_1", "lim_1", "tpm"),
            concurrency_key("ws_1", "lim_1"), escalation_key("ws_1", "esc_1"), op_marker_key("ws_1", "s:req_1")]
    assert all(k.startswith("gov:{ws_1}:") for k in keys)
    assert budget_keys("ws_1", "bud_1", "2025-03").spent == "gov:{ws_1}:b:bud_1:2025-03:spent"
    assert budget_keys("ws_1", "bud_1", "2025-03").hexp == "gov:{ws_1}:b:bud_1:2025-03:hexp"
    assert rate_key("ws_1", "lim_1", "rpm") == "gov:{ws_1}:l:lim_1:rpm"
    assert concurrency_key("ws_1", "lim_1") == "gov:{ws_1}:l:lim_1:conc"
    assert escalation_key("ws_1", "esc_9") == "gov:{ws_1}:esc:esc_9"
    assert lease_hold_id("w1") == "lease:w1"


@pytest.mark.parametrize("bad", ["", "a{b", "a}b"])
def test_a_workspace_id_that_would_break_the_hash_tag_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="hash tag"):
        budget_keys(bad, "bud_1", "total")


def test_unknown_rate_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="rate kind"):
        rate_key("ws_1", "lim_1", "rph")


def test_day_window_in_utc() -> None:
    key, start, end = period_window(budget("day"), dt.datetime(2025, 3, 9, 23, 59, 59, tzinfo=UTC))
    assert key == "2025-03-09"
    assert start == dt.datetime(2025, 3, 9, tzinfo=UTC)
    assert end == dt.datetime(2025, 3, 10, tzinfo=UTC)


def test_day_window_follows_the_budget_timezone() -> None:
    # 02:00 UTC on the 10th is still the 9th in New York.
    key, start, end = period_window(budget("day", "America/New_York"), dt.datetime(2025, 3, 10, 2, tzinfo=UTC))
    assert key == "2025-03-09"
    assert start.isoformat() == "2025-03-09T00:00:00-05:00"
    assert end is not None and end.isoformat() == "2025-03-10T00:00:00-04:00"


def test_a_day_across_a_dst_change_is_23_or_25_hours() -> None:
    ny = budget("day", "America/New_York")
    # (Subtracting datetimes of one zone gives wall-clock time; elapsed time needs UTC.)
    _, start, end = period_window(ny, dt.datetime(2025, 3, 9, 12, tzinfo=UTC))  # spring forward
    assert end is not None and end.astimezone(UTC) - start.astimezone(UTC) == dt.timedelta(hours=23)
    _, start, end = period_window(ny, dt.datetime(2025, 11, 2, 12, tzinfo=UTC))  # fall back
    assert end is not None and end.astimezone(UTC) - start.astimezone(UTC) == dt.timedelta(hours=25)


def test_a_dst_gap_at_midnight_starts_the_day_at_its_first_instant() -> None:
    # Santiago springs forward at 00:00 -> 01:00 on 2024-09-08: that day has no midnight.
    _, start, end = period_window(budget("day", "America/Santiago"), dt.datetime(2024, 9, 8, 12, tzinfo=UTC))
    assert start.astimezone(UTC) == dt.datetime(2024, 9, 8, 4, tzinfo=UTC)  # 01:00 -03:00
    assert end is not None and end.astimezone(UTC) == dt.datetime(2024, 9, 9, 3, tzinfo=UTC)


def test_week_starts_on_monday_and_uses_the_iso_year() -> None:
    # Wednesday 2025-01-01 is in ISO week 2025-W01, which starts Monday 2024-12-30.
    key, start, end = period_window(budget("week"), dt.datetime(2025, 1, 1, 10, tzinfo=UTC))
    assert key == "2025-W01"
    assert start == dt.datetime(2024, 12, 30, tzinfo=UTC)
    assert end == dt.datetime(2025, 1, 6, tzinfo=UTC)
    # Sunday 2021-01-03 is in ISO week 2020-W53.
    key, start, _ = period_window(budget("week"), dt.datetime(2021, 1, 3, 23, tzinfo=UTC))
    assert key == "2020-W53"
    assert start == dt.datetime(2020, 12, 28, tzinfo=UTC)


def test_month_windows_across_year_end_and_february() -> None:
    key, start, end = period_window(budget("month"), dt.datetime(2024, 12, 31, 23, 59, tzinfo=UTC))
    assert (key, start, end) == ("2024-12", dt.datetime(2024, 12, 1, tzinfo=UTC), dt.datetime(2025, 1, 1, tzinfo=UTC))
    key, start, end = period_window(budget("month"), dt.datetime(2024, 2, 29, 12, tzinfo=UTC))
    assert (key, start, end) == ("2024-02", dt.datetime(2024, 2, 1, tzinfo=UTC), dt.datetime(2024, 3, 1, tzinfo=UTC))


def test_month_in_a_timezone_ahead_of_utc() -> None:
    # 2024-12-31 15:00 UTC is already January in Tokyo.
    key, start, end = period_window(budget("month", "Asia/Tokyo"), dt.datetime(2024, 12, 31, 15, tzinfo=UTC))
    assert key == "2025-01"
    assert start.astimezone(UTC) == dt.datetime(2024, 12, 31, 15, tzinfo=UTC)
    assert end is not None and end.astimezone(UTC) == dt.datetime(2025, 1, 31, 15, tzinfo=UTC)


def test_total_has_one_endless_window() -> None:
    assert period_window(budget("total"), dt.datetime(2030, 1, 1, tzinfo=UTC)) == ("total", TOTAL_START, None)
    assert key_expire_at_ms(None) == 0


def test_keys_expire_after_the_window_plus_grace() -> None:
    end = dt.datetime(2025, 4, 1, tzinfo=UTC)
    assert key_expire_at_ms(end) == int((end + KEY_GRACE).timestamp() * 1000)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        period_window(budget("day"), dt.datetime(2025, 1, 1))


ZONES = st.sampled_from(["UTC", "America/New_York", "Europe/Berlin", "Asia/Kolkata", "Australia/Lord_Howe",
                         "America/Santiago", "Pacific/Apia"])
INSTANTS = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2040, 1, 1), timezones=st.just(UTC))


@given(period=st.sampled_from(["day", "week", "month"]), tz=ZONES, now=INSTANTS)
def test_the_window_contains_now_and_the_next_one_starts_where_it_ends(
        period: BudgetPeriod, tz: str, now: dt.datetime) -> None:
    b = budget(period, tz)
    key, start, end = period_window(b, now)
    assert end is not None
    assert start <= now < end
    next_key, next_start, _ = period_window(b, end)
    assert next_start == end and next_key != key
    assert start.tzinfo == ZoneInfo(tz)
    # Every instant of the window maps to the same key (checked at its last millisecond).
    assert period_window(b, end - dt.timedelta(milliseconds=1))[0] == key
