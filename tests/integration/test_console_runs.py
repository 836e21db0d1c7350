"""The console's runs list query (`controlplane.console.runs.list_runs`) on the stack's Postgres,
against the finance API's own summary: a workload with known times is published to the stack's
stream and folded by its projector; each listed run's numbers equal
`finance.summary(group_by=run)` over the same window, whatever the filter."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest_asyncio
from psycopg_pool import AsyncConnectionPool

from controlplane import finance
from controlplane.console.runs import RunFilter, list_runs, parse_filter
from events.jetstream import connect
from events.publisher import EventPublisher
from schemas.events import Event, LlmCall, RunCompleted, ToolSpend, Usage
from schemas.ids import uuid7
from tests.conftest import Gateway, eventually

T = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.UTC)
HOUR, DAY = dt.timedelta(hours=1), dt.timedelta(days=1)
# Runs named with LIKE's wildcards: a search for "a%b" must find only the run that has it.
RUNS = ("r-one", "r-two", "r-a%b", "r-axb", "r_early")


@dataclass(frozen=True)
class Seeded:
    ws: str
    pool: AsyncConnectionPool[Any]


def workload(ws: str) -> list[Event]:
    """r-one: a1 then a2 (calls of $0.001 and $0.002, a $0.0005 tool spend), succeeded; r-two: a2,
    $0.003 and a failed call (no cost; the shared stack's ledger must stay balanced per currency, so
    no foreign-currency call here: test_finance_queries covers those on a database of its own);
    r-a%b and r-axb: a1, $0.0001 each, an hour apart; r_early: a1, $0.004 two days before the rest,
    and $0.0002 inside the window."""
    def env(run: str, agent: str, at: dt.datetime, **extra: Any) -> dict[str, Any]:
        return {"event_id": uuid7(), "occurred_at": at, "workspace_id": ws, "run_id": run, "agent_id": agent,
                "workflow_id": "wf-x" if run == "r-one" else None, **extra}

    return [
        LlmCall(**env("r-one", "a1", T), provider="mock", model="echo", usage=Usage(input_tokens=10),
                cost_nanos=1_000_000),
        LlmCall(**env("r-one", "a2", T + HOUR), provider="mock", model="echo", cost_nanos=2_000_000),
        ToolSpend(**env("r-one", "a2", T + 2 * HOUR), spend_id=f"sp-{ws}", amount_nanos=500_000, vendor="serpapi"),
        RunCompleted(**env("r-one", "a2", T + 3 * HOUR), outcome="succeeded"),
        LlmCall(**env("r-two", "a2", T + 4 * HOUR), provider="mock", model="echo", cost_nanos=3_000_000),
        LlmCall(**env("r-two", "a2", T + 5 * HOUR), provider="mock", model="echo", status=500,
                error_code="upstream_error"),
        LlmCall(**env("r-a%b", "a1", T + 6 * HOUR), provider="mock", model="echo", cost_nanos=100_000),
        LlmCall(**env("r-axb", "a1", T + 7 * HOUR), provider="mock", model="echo", cost_nanos=100_000),
        LlmCall(**env("r_early", "a1", T - 2 * DAY), provider="mock", model="echo", cost_nanos=4_000_000),
        LlmCall(**env("r_early", "a1", T + HOUR / 2), provider="mock", model="echo", cost_nanos=200_000),
    ]


@pytest_asyncio.fixture(scope="module")
async def seeded(gateway: Gateway) -> AsyncIterator[Seeded]:
    ws = f"cr{secrets.token_hex(4)}"
    gateway.admin.call("POST", "/admin/v1/workspaces", {"id": ws, "name": "Console runs test"})
    nc = await connect(gateway.nats_url, "alephant-tests")
    try:
        publisher = EventPublisher(nc.jetstream(), stream=gateway.stream, subject_prefix=gateway.subject_prefix)
        for event in workload(ws):
            await publisher.publish(event)
    finally:
        await nc.close()
    async with AsyncConnectionPool(gateway.database_url, min_size=1, max_size=2, open=False) as pool:
        everything = RunFilter(first=(T - 3 * DAY).date(), last=(T + DAY).date())

        async def folded() -> bool | None:
            rows, _ = await list_runs(pool, ws, everything)
            outcomes = {r["run_id"]: r["outcome"] for r in rows}
            return True if sum(r["requests"] for r in rows) == 8 and outcomes.get("r-one") == "succeeded" else None

        await eventually(folded, timeout=60)
        yield Seeded(ws, pool)


async def _finance(pool: AsyncConnectionPool[Any], ws: str, f: RunFilter) -> dict[str, dict[str, Any]]:
    table = await finance.summary(pool, finance.SummaryQuery("run", ws, finance.Window(f.start, f.end)))
    return {row["run_id"]: row for row in table.rows}


def _money(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in finance.METRIC_COLUMNS}


async def test_every_run_in_the_window_with_the_finance_summarys_numbers_newest_first(seeded: Seeded) -> None:
    f = RunFilter(first=T.date(), last=T.date())  # one day: r_early's first call is outside it
    rows, matching = await list_runs(seeded.pool, seeded.ws, f)
    assert [r["run_id"] for r in rows] == ["r-axb", "r-a%b", "r-two", "r-one", "r_early"]
    assert matching == 5
    expected = await _finance(seeded.pool, seeded.ws, f)
    for row in rows:
        assert _money(row) == _money(expected[row["run_id"]]), row["run_id"]
    one = rows[3]
    assert (one["agents"], one["workflows"], one["outcome"], one["cost_usd"]) == (
        ["a1", "a2"], ["wf-x"], "succeeded", "0.0035")
    assert (one["first_at"], one["last_at"]) == (T, T + 2 * HOUR)
    two = rows[2]
    assert (two["requests"], two["cost_usd"], two["outcome"]) == (2, "0.003", None)
    assert rows[4]["cost_usd"] == "0.0002"
    wider, _ = await list_runs(seeded.pool, seeded.ws, RunFilter(first=(T - 3 * DAY).date(), last=T.date()))
    assert next(r for r in wider if r["run_id"] == "r_early")["cost_usd"] == "0.0042"


async def test_filters_and_pages(seeded: Seeded) -> None:
    day = {"from": T.date().isoformat(), "to": T.date().isoformat()}

    async def runs(**values: str) -> tuple[list[str], int]:
        f, errors = parse_filter(day | values, T.date())
        assert errors == []
        rows, matching = await list_runs(seeded.pool, seeded.ws, f)
        return [r["run_id"] for r in rows], matching

    assert await runs(q="a%b") == (["r-a%b"], 1)  # no LIKE wildcards
    assert await runs(q="_") == (["r_early"], 1)
    assert await runs(q="r-") == (["r-axb", "r-a%b", "r-two", "r-one"], 4)
    # An agent's runs keep their whole totals: r-one shows a1's and a2's spend.
    rows, _ = await list_runs(seeded.pool, seeded.ws, parse_filter(day | {"agent": "a2"}, T.date())[0])
    assert [(r["run_id"], r["cost_usd"]) for r in rows] == [("r-two", "0.003"), ("r-one", "0.0035")]
    assert await runs(workflow="wf-x") == (["r-one"], 1)
    assert await runs(agent="a1", q="ax") == (["r-axb"], 1)
    assert await runs(agent="nobody") == ([], 0)
    assert await runs(per="2") == (["r-axb", "r-a%b"], 5)
    assert await runs(per="2", page="2") == (["r-two", "r-one"], 5)
    assert await runs(per="2", page="3") == (["r_early"], 5)


async def test_bad_parameters_fall_back_and_are_reported() -> None:
    today = dt.date(2026, 5, 20)
    f, errors = parse_filter({"from": "yesterday", "to": "2026-05-01", "per": "100000", "page": "-3",
                              "q": "x" * 300}, today)
    assert (f.first, f.last, f.per, f.page, f.search) == (dt.date(2026, 4, 20), dt.date(2026, 5, 1), 200, 1, "")
    assert len(errors) == 2 and errors[0].startswith("From must be a date")
    f, errors = parse_filter({"from": "2026-05-10", "to": "2026-05-01"}, today)
    assert (f.first, f.last) == (dt.date(2026, 4, 20), today) and errors == ["From must not be after To."]
    f, errors = parse_filter({}, today)
    assert (f.first, f.last, f.per, f.page, errors) == (dt.date(2026, 4, 20), today, 50, 1, [])
    assert f.end == dt.datetime(2026, 5, 21, tzinfo=dt.UTC)
