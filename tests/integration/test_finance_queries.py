"""Finance queries (issue 9) against a brute-force recomputation.

A generated workload (3 workspaces, agents, runs, workflows, departments, members, 3 providers,
priced, unpriced, re-priced, errored and estimated llm calls, tool spends (one in EUR), outbound
payments, revenue, cache hits, run outcomes reported twice, a run with tool spend only, a run
with an outcome only, a run id shared by two workspaces, a planted cost spike, and replayed
duplicates) is folded with `apply_batch` for every projection in PROJECTIONS into a database of
its own on the stack's Postgres server. Every query of `controlplane.finance` (each group_by,
each interval, windows, limits, top N for each metric both ways, spikes, unpriced, one run) and
each BI view of migration 0006 is then checked against plain Python over the generated events:
`expected_facts` reads the events as the README documents them, independently of
events/finance.py and of the code under test.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import random
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg_pool import AsyncConnectionPool

from controlplane import finance
from events.projector import PROJECTIONS, apply_batch
from schemas.errors import NotFound
from schemas.events import (
    CacheHit,
    Event,
    LlmCall,
    LlmRepriced,
    PaymentInbound,
    PaymentOutbound,
    RunCompleted,
    ToolSpend,
    Usage,
    event_encoder,
    event_type,
)
from schemas.ids import uuid7
from tests.conftest import Gateway
from tests.integration.conftest import scratch_database

T0 = dt.datetime(2026, 1, 30, 18, 0, tzinfo=dt.UTC)  # 72 h from here: 4 days, 2 months, many hours
SPAN_S = 72 * 3600
NANO = Decimal(1_000_000_000)


# -- the workload --------------------------------------------------------------------------------

@dataclass
class Workload:
    tag: str
    workspaces: list[str]
    providers: list[str]
    events: list[Event] = field(default_factory=list)
    spike: tuple[str, str, str] = ("", "", "")  # (workspace, agent, run) planted far above its agent

    @property
    def unique(self) -> list[Event]:
        return list({e.event_id: e for e in self.events}.values())


def generate(tag: str, seed: int = 9) -> Workload:
    rng = random.Random(seed)
    wss = [f"fq{tag}{c}" for c in "abc"]
    priced_models = [(f"prov{tag}", "small"), (f"prov{tag}", "large"), (f"alt{tag}", "chat")]
    unpriced_model = (f"new{tag}", "mystery")
    w = Workload(tag, wss, [f"prov{tag}", f"alt{tag}", f"new{tag}"])
    w.spike = (wss[0], "agent-1", "run-agent-1-5")

    def at(base: dt.datetime | None = None) -> dt.datetime:
        if base is not None:
            return base + dt.timedelta(seconds=rng.randrange(0, 1800), microseconds=rng.randrange(10**6))
        return T0 + dt.timedelta(seconds=rng.randrange(0, SPAN_S), microseconds=rng.randrange(10**6))

    def money(cls: type[Any], ws: str, agent: str | None, run: str | None, when: dt.datetime,
              **kw: Any) -> Any:
        return cls(event_id=uuid7(), occurred_at=when, workspace_id=ws, agent_id=agent, run_id=run, **kw)

    for ws in wss:
        for a in range(1, 5):
            agent = f"agent-{a}"
            dims = {"department_id": f"dept-{a % 2}", "member_id": f"member-{a % 3}"}
            for r in range(8):
                run = f"run-{agent}-{r}"
                flow = f"wf-{r % 3}"
                start = at()
                calm = ws == wss[0] and agent == "agent-1"  # steady costs, one planted spike
                for _ in range(3 if calm else rng.randint(1, 5)):
                    when = at(start)
                    usage = Usage(input_tokens=rng.randrange(10, 5000), output_tokens=rng.randrange(0, 2000))
                    props = {"customer": rng.choice(["acme", "globex"])} if rng.random() < 0.5 else {}
                    roll = rng.random()
                    if calm:
                        cost = 1_000_000 + rng.randrange(-50_000, 50_000)
                        if run == w.spike[2]:
                            cost *= 40
                        w.events.append(money(LlmCall, ws, agent, run, when, workflow_id=flow, provider=f"prov{tag}",
                                              model="small", usage=usage, cost_nanos=cost, price_source="catalog",
                                              **dims))
                    elif roll < 0.12:  # no price known: tokens only, re-priced later for some
                        call = money(LlmCall, ws, agent, run, when, workflow_id=flow, provider=unpriced_model[0],
                                     model=unpriced_model[1], usage=usage, cost_nanos=0, priced=False,
                                     price_source="unpriced", properties=props, **dims)
                        w.events.append(call)
                        if rng.random() < 0.5:
                            w.events.append(money(
                                LlmRepriced, ws, agent, run, T0 + dt.timedelta(days=5), workflow_id=flow,
                                original_event_id=call.event_id, provider=call.provider, model=call.model,
                                tokens=usage.input_tokens + usage.output_tokens, cost_nanos=rng.randrange(1, 10**7),
                                price_id="price-late", original_occurred_at=when, **dims))
                    else:
                        provider, model = rng.choice(priced_models)
                        status = 500 if roll > 0.92 else 200
                        cost = 0 if status == 500 and rng.random() < 0.5 else rng.randrange(1, 5 * 10**7)
                        w.events.append(money(
                            LlmCall, ws, agent, run, when, workflow_id=flow, provider=provider, model=model,
                            usage=usage, cost_nanos=cost, status=status, usage_estimated=rng.random() < 0.15,
                            price_source="catalog", properties=props, **dims))
                if calm:
                    continue
                if rng.random() < 0.45:
                    currency = "EUR" if rng.random() < 0.1 else "USD"
                    w.events.append(money(ToolSpend, ws, agent, run, at(start), workflow_id=flow,
                                          spend_id=f"sp-{secrets.token_hex(4)}", amount_nanos=rng.randrange(1, 10**7),
                                          currency=currency, vendor="serpapi", tool="search",
                                          properties={"customer": "acme"} if rng.random() < 0.3 else {}, **dims))
                if rng.random() < 0.25:
                    w.events.append(money(PaymentOutbound, ws, agent, run, at(start), workflow_id=flow,
                                          payment_id=f"po-{secrets.token_hex(4)}", amount_nanos=rng.randrange(1, 10**8),
                                          rail="x402", payee="api.example.com", **dims))
                if rng.random() < 0.35:
                    w.events.append(money(PaymentInbound, ws, agent, run, at(start), workflow_id=flow,
                                          payment_id=f"pi-{secrets.token_hex(4)}",
                                          amount_nanos=rng.randrange(1, 2 * 10**8), rail="x402", endpoint_id="ep-1",
                                          payer="0xabc", **dims))
                if rng.random() < 0.25:
                    w.events.append(money(CacheHit, ws, agent, run, at(start), workflow_id=flow,
                                          provider=f"prov{tag}", model="small", saved_nanos=rng.randrange(1, 10**6),
                                          **dims))
                if rng.random() < 0.7:
                    done = start + dt.timedelta(hours=1)
                    w.events.append(money(RunCompleted, ws, agent, run, done, outcome="succeeded",
                                          metadata={"attempt": "1"}))
                    if rng.random() < 0.2:  # a later report wins
                        w.events.append(money(RunCompleted, ws, agent, run, done + dt.timedelta(minutes=5),
                                              outcome="failed", metadata={"attempt": "2"}))
        # Unattributed spend, spend outside any run, a run made by a tool spend alone, a run known
        # only from its outcome.
        w.events.append(money(LlmCall, ws, None, None, at(), provider=f"prov{tag}", model="large",
                              usage=Usage(input_tokens=100, output_tokens=50), cost_nanos=123_456))
        w.events.append(money(ToolSpend, ws, "agent-2", None, at(), spend_id="sp-norun", amount_nanos=777,
                              vendor="serpapi"))
        w.events.append(money(ToolSpend, ws, "agent-9", "tool-only", at(), spend_id="sp-only",
                              amount_nanos=4_200_000, vendor="browserbase", tool="session"))
        w.events.append(money(RunCompleted, ws, "agent-9", "outcome-only", at(), outcome="failed"))
    for ws in wss[:2]:  # one run id in two workspaces
        w.events.append(money(LlmCall, ws, "agent-1", "shared-run", at(), provider=f"alt{tag}", model="chat",
                              usage=Usage(input_tokens=10, output_tokens=10), cost_nanos=1000))
    # Replays: the same events delivered again, in later batches.
    w.events += rng.sample(w.events, 25)
    return w


# -- brute force -----------------------------------------------------------------------------------

@dataclass
class Fact:
    ws: str
    at: dt.datetime
    kind: str
    currency: str
    dims: dict[str, str | None]
    props: dict[str, str]
    counts: dict[str, int]
    amounts: dict[str, int]


COUNT_NAMES = ("requests", "errors", "input_tokens", "output_tokens", "unpriced_tokens")
AMOUNT_NAMES = ("llm_cost", "tool_cost", "payments_out", "revenue", "cache_savings", "estimated_cost")


def expected_facts(events: list[Event]) -> list[Fact]:
    """What each money event means (README, issue 9), one record per unique event id."""
    out = []
    for e in {e.event_id: e for e in events}.values():
        counts = dict.fromkeys(COUNT_NAMES, 0)
        amounts = dict.fromkeys(AMOUNT_NAMES, 0)
        dims: dict[str, str | None] = {
            "workspace_id": e.workspace_id, "agent_id": e.agent_id, "run_id": e.run_id, "workflow_id": e.workflow_id,
            "member_id": getattr(e, "member_id", None), "department_id": getattr(e, "department_id", None),
            "provider": getattr(e, "provider", None), "model": getattr(e, "model", None)}
        when, currency = e.occurred_at, getattr(e, "currency", "USD")
        if isinstance(e, LlmCall):
            kind = "llm"
            counts |= {"requests": 1, "errors": int(e.status >= 400), "input_tokens": e.usage.input_tokens,
                       "output_tokens": e.usage.output_tokens}
            amounts["llm_cost"] = e.cost_nanos
            if e.usage_estimated:
                amounts["estimated_cost"] = e.cost_nanos
            if not e.priced:
                counts["unpriced_tokens"] = e.usage.input_tokens + e.usage.output_tokens
        elif isinstance(e, LlmRepriced):
            kind, when = "repriced", e.original_occurred_at or e.occurred_at  # booked when the call was made
            amounts["llm_cost"] = e.cost_nanos
            counts["unpriced_tokens"] = -e.tokens
        elif isinstance(e, ToolSpend):
            kind, amounts["tool_cost"] = "tool", e.amount_nanos
        elif isinstance(e, PaymentOutbound):
            kind, amounts["payments_out"] = "payment_out", e.amount_nanos
        elif isinstance(e, PaymentInbound):
            kind, amounts["revenue"] = "revenue", e.amount_nanos
        elif isinstance(e, CacheHit):
            kind, amounts["cache_savings"] = "cache_hit", e.saved_nanos
        else:
            continue
        out.append(Fact(e.workspace_id, when, kind, currency, dims, dict(getattr(e, "properties", {}) or {}), counts,
                        amounts))
    return out


@dataclass
class Totals:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_NAMES, 0))
    amounts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AMOUNT_NAMES, 0))

    def add(self, f: Fact) -> None:
        for k in COUNT_NAMES:
            self.counts[k] += f.counts[k]
        if f.currency == "USD":  # money in USD only; counts of everything
            for k in AMOUNT_NAMES:
                self.amounts[k] += f.amounts[k]

    @property
    def cost(self) -> int:
        return self.amounts["llm_cost"] + self.amounts["tool_cost"] + self.amounts["payments_out"]

    def money(self) -> dict[str, int]:
        return self.amounts | {"cost": self.cost, "margin": self.amounts["revenue"] - self.cost}

    def check(self, row: dict[str, Any], where: Any) -> None:
        for k in COUNT_NAMES:
            assert row[k] == self.counts[k], (where, k, row[k], self.counts[k])
        for k, nanos in self.money().items():
            assert row[f"{k}_nanos"] == nanos, (where, k, row[f"{k}_nanos"], nanos)
            assert Decimal(row[f"{k}_usd"]) == Decimal(nanos) / NANO, (where, k, row[f"{k}_usd"], nanos)


def in_window(f: Fact, ws: str | None, start: dt.datetime | None, end: dt.datetime | None) -> bool:
    return ((ws is None or f.ws == ws) and (start is None or f.at >= start) and (end is None or f.at < end))


def period(at: dt.datetime, interval: str | None) -> dt.datetime | None:
    at = at.astimezone(dt.UTC)
    if interval == "hour":
        return at.replace(minute=0, second=0, microsecond=0)
    if interval == "day":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "month":
        return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


KEYS: dict[str, Callable[[Fact], tuple[str | None, ...]]] = {
    "workspace": lambda f: (f.ws,),
    "agent": lambda f: (f.ws, f.dims["agent_id"]),
    "run": lambda f: (f.ws, f.dims["run_id"]),
    "workflow": lambda f: (f.ws, f.dims["workflow_id"]),
    "member": lambda f: (f.ws, f.dims["member_id"]),
    "department": lambda f: (f.ws, f.dims["department_id"]),
    "provider": lambda f: (f.dims["provider"],),
    "model": lambda f: (f.dims["provider"], f.dims["model"]),
    "property:customer": lambda f: (f.props.get("customer"),),
}


def expected_groups(facts: list[Fact], key: Callable[[Fact], tuple[str | None, ...]], ws: str | None = None,
                    start: dt.datetime | None = None, end: dt.datetime | None = None,
                    interval: str | None = None) -> dict[tuple[Any, ...], Totals]:
    groups: dict[tuple[Any, ...], Totals] = defaultdict(Totals)
    for f in facts:
        if in_window(f, ws, start, end):
            groups[(*key(f), period(f.at, interval))].add(f)
    return dict(groups)


def byte_order(value: str | None) -> tuple[bool, bytes]:
    """Postgres's ascending order under COLLATE "C": bytes, nulls last."""
    return (value is None, (value or "").encode())


def row_key(q: finance.SummaryQuery, row: dict[str, Any]) -> tuple[Any, ...]:
    keys: tuple[Any, ...] = (row["group"],) if q.property_name else tuple(row[k] for k in q.keys)
    start = row.get("period_start")
    return (*keys, None if start is None else dt.datetime.fromisoformat(start))


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def database(gateway: Gateway) -> Iterator[str]:
    """A database of its own on the stack's Postgres server, migrated (0006 included)."""
    with scratch_database(gateway.database_url, "finance") as url:
        yield url


async def fold(url: str, events: list[Event], stream: str, batch: int = 97) -> None:
    """`apply_batch` for every projection, in batches, as the projector would (sequence numbers
    in publish order); asserts nothing was dead-lettered."""
    msgs = [(i + 1, f"events.{e.workspace_id}.{event_type(e)}", event_encoder.encode(e)) for i, e in enumerate(events)]
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for projection in PROJECTIONS:
            for lo in range(0, len(msgs), batch):
                result = await apply_batch(conn, stream, msgs[lo:lo + batch], projection)
                assert result.dead == 0, (projection.name, result)


@pytest.fixture(scope="module")
def workload() -> Workload:
    return generate(secrets.token_hex(3))


@pytest.fixture(scope="module")
def facts(workload: Workload) -> list[Fact]:
    return expected_facts(workload.events)


@pytest_asyncio.fixture(scope="module")
async def pool(database: str, workload: Workload) -> AsyncIterator[AsyncConnectionPool[Any]]:
    await fold(database, workload.events, "FINANCE_TEST")
    await fold(database, workload.events, "FINANCE_TEST")  # a full redelivery changes nothing
    async with AsyncConnectionPool(database, min_size=1, max_size=4, open=False) as p:
        yield p


# -- summary ---------------------------------------------------------------------------------------

async def check_summary(pool: AsyncConnectionPool[Any], facts: list[Fact], q: finance.SummaryQuery) -> int:
    table = await finance.summary(pool, q)
    expected = expected_groups(facts, KEYS[q.group_by], q.workspace_id, q.window.start, q.window.end, q.interval)
    got = {row_key(q, r): r for r in table.rows}
    assert set(got) == set(expected), q
    for key, totals in expected.items():
        totals.check(got[key], (q, key))
    assert not table.meta["has_more"]
    assert list(table.rows[0]) == list(table.columns) if table.rows else True
    return len(table.rows)


@pytest.mark.parametrize("group_by", list(KEYS))
async def test_summary_by_each_group(pool: AsyncConnectionPool[Any], facts: list[Fact], workload: Workload,
                                     group_by: str) -> None:
    rows = 0
    for ws in [*workload.workspaces, None]:
        rows += await check_summary(pool, facts, finance.SummaryQuery(group_by, ws))
    assert rows > len(workload.workspaces)


@pytest.mark.parametrize("interval", ["hour", "day", "month"])
@pytest.mark.parametrize("group_by", ["agent", "model", "workspace", "property:customer"])
async def test_summary_per_period(pool: AsyncConnectionPool[Any], facts: list[Fact], workload: Workload,
                                  group_by: str, interval: str) -> None:
    for ws in (workload.workspaces[0], None):
        await check_summary(pool, facts, finance.SummaryQuery(group_by, ws, interval=interval, limit=100_000))
    periods = {period(f.at, interval) for f in facts}
    assert len(periods) > 1  # the workload spans several of each


WINDOWS = [
    (T0 + dt.timedelta(hours=24), T0 + dt.timedelta(hours=48)),
    (T0 + dt.timedelta(hours=30, minutes=17), None),
    (None, dt.datetime(2026, 2, 1, tzinfo=dt.UTC)),
    (dt.datetime(2026, 2, 1, 3, tzinfo=dt.timezone(dt.timedelta(hours=2))), T0 + dt.timedelta(days=3)),
    # UTC days: answered from the per-run-day rollup (hours: the hourly one; else the facts).
    (T0 + dt.timedelta(hours=6), T0 + dt.timedelta(hours=54)),
]


@pytest.mark.parametrize(("start", "end"), WINDOWS)
async def test_summary_windows(pool: AsyncConnectionPool[Any], facts: list[Fact], workload: Workload,
                               start: dt.datetime | None, end: dt.datetime | None) -> None:
    window = finance.Window(start, end)
    for group_by, interval in (("agent", "day"), ("run", None), ("workspace", "month"), ("model", "hour")):
        await check_summary(pool, facts, finance.SummaryQuery(group_by, None, window, interval, 100_000))
        await check_summary(pool, facts, finance.SummaryQuery(group_by, workload.workspaces[1], window, interval,
                                                              100_000))


async def test_summary_order_and_limit(pool: AsyncConnectionPool[Any], facts: list[Fact], workload: Workload) -> None:
    """Period first, then total cost (highest first), then key; `limit` cuts and `has_more` says so."""
    ws = workload.workspaces[0]
    expected = expected_groups(facts, KEYS["agent"], ws, interval="day")
    order = sorted(expected, key=lambda k: (k[2], -expected[k].cost, byte_order(k[0]), byte_order(k[1])))
    q = finance.SummaryQuery("agent", ws, interval="day", limit=5)
    table = await finance.summary(pool, q)
    assert [row_key(q, r) for r in table.rows] == order[:5]
    assert table.meta["has_more"] is True
    full = await finance.summary(pool, finance.SummaryQuery("agent", ws, interval="day", limit=len(order)))
    assert [row_key(q, r) for r in full.rows] == order and full.meta["has_more"] is False


async def test_summary_csv_is_the_json_rows(pool: AsyncConnectionPool[Any], workload: Workload) -> None:
    table = await finance.summary(pool, finance.SummaryQuery("model", workload.workspaces[0], interval="day"))
    parsed = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert parsed and list(parsed[0]) == list(table.columns)
    assert parsed == [{k: "" if v is None else str(v) for k, v in row.items()} for row in table.rows]


# -- top N ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("by", ["run", "agent", "workflow"])
async def test_top_by_each_metric(pool: AsyncConnectionPool[Any], facts: list[Fact], workload: Workload,
                                  by: str) -> None:
    column = f"{by}_id"
    for ws, window in ((workload.workspaces[2], finance.Window()), (None, finance.Window(*WINDOWS[0])),
                       (workload.workspaces[0], finance.Window(*WINDOWS[4])), (None, finance.Window(*WINDOWS[1]))):
        groups = expected_groups(facts, lambda f: (f.ws, f.dims[column]), ws, window.start, window.end)
        groups = {k: t for k, t in groups.items() if k[1] is not None}
        for metric in ("cost", "revenue", "margin"):
            for descending in (True, False):
                def value(k: tuple[Any, ...], metric: str = metric,
                          groups: dict[tuple[Any, ...], Totals] = groups) -> int:
                    return groups[k].money()[metric]

                sign = -1 if descending else 1
                order = sorted(groups, key=lambda k: (sign * value(k), byte_order(k[0]), byte_order(k[1])))
                table = await finance.top(pool, finance.TopQuery(by, metric, descending, 7, ws, window))
                assert [(r["workspace_id"], r[column], None) for r in table.rows] == order[:7], (by, metric, ws)
                assert [r["rank"] for r in table.rows] == list(range(1, len(table.rows) + 1))
                for r in table.rows:
                    groups[(r["workspace_id"], r[column], None)].check(r, (by, metric))


# -- spikes --------------------------------------------------------------------------------------

def expected_spikes(facts: list[Fact], q: finance.SpikeQuery) -> list[tuple[Any, ...]]:
    """Leave-one-out median of the agent's other runs, at least `min_runs` of them."""
    runs: dict[tuple[str, str, str], int] = defaultdict(int)
    for f in facts:
        agent, run = f.dims["agent_id"], f.dims["run_id"]
        if agent is None or run is None or not in_window(f, q.workspace_id, q.window.start, q.window.end):
            continue
        cost = f.amounts["llm_cost"] + f.amounts["tool_cost"] + f.amounts["payments_out"]
        runs[(f.ws, agent, run)] += cost if f.currency == "USD" else 0
    by_agent: dict[tuple[str, str], list[int]] = defaultdict(list)
    for (ws, agent, _), cost in runs.items():
        by_agent[(ws, agent)].append(cost)
    found = []
    for (ws, agent, run), cost in runs.items():
        others = sorted(by_agent[(ws, agent)])
        others.remove(cost)
        if len(others) < q.min_runs:
            continue
        m = len(others)
        median = Fraction(others[(m - 1) // 2] + others[m // 2], 2)
        if median > 0 and cost > Fraction(q.factor) * median:
            ratio = Fraction(cost) / median
            baseline = int(Decimal(median.numerator) / Decimal(median.denominator) + Decimal("0.5"))
            shown = (Decimal(ratio.numerator) / Decimal(ratio.denominator)).quantize(Decimal("0.01"), ROUND_HALF_UP)
            found.append((ratio, ws, agent, run, cost, baseline, str(shown), m))
    found.sort(key=lambda s: (-s[0], byte_order(s[1]), byte_order(s[2]), byte_order(s[3])))
    return [s[1:] for s in found[: q.limit]]


async def test_spikes_against_the_leave_one_out_median(pool: AsyncConnectionPool[Any], facts: list[Fact],
                                                       workload: Workload) -> None:
    queries = [finance.SpikeQuery(workspace_id=workload.workspaces[0]), finance.SpikeQuery(),
               finance.SpikeQuery(Decimal("1.5"), 3, 100, None, finance.Window(*WINDOWS[0])),
               finance.SpikeQuery(Decimal("2.25"), 1, 4, workload.workspaces[1]),
               finance.SpikeQuery(Decimal("1.5"), 2, 100, None, finance.Window(*WINDOWS[4])),
               finance.SpikeQuery(Decimal("1.5"), 2, 100, None, finance.Window(*WINDOWS[1])),
               finance.SpikeQuery(Decimal(1), 1, 10_000)]  # every run above its median: the whole mapping
    for q in queries:
        table = await finance.spikes(pool, q)
        got = [(r["workspace_id"], r["agent_id"], r["run_id"], r["cost_nanos"], r["baseline_nanos"], r["ratio"],
                r["baseline_runs"]) for r in table.rows]
        assert got == expected_spikes(facts, q), q
        for r in table.rows:
            assert Decimal(r["cost_usd"]) == Decimal(r["cost_nanos"]) / NANO
    planted = await finance.spikes(pool, finance.SpikeQuery(workspace_id=workload.workspaces[0]))
    first = planted.rows[0]
    assert (first["workspace_id"], first["agent_id"], first["run_id"]) == workload.spike
    assert Decimal(first["ratio"]) > 30


# -- unpriced ------------------------------------------------------------------------------------

async def test_unpriced_usage(pool: AsyncConnectionPool[Any], facts: list[Fact], workload: Workload) -> None:
    for ws, window in ((None, finance.Window()), (workload.workspaces[1], finance.Window()),
                       (None, finance.Window(*WINDOWS[0]))):
        tokens: dict[tuple[Any, Any], int] = defaultdict(int)
        calls: dict[tuple[Any, Any], int] = defaultdict(int)
        spaces: dict[tuple[Any, Any], set[str]] = defaultdict(set)
        for f in facts:
            if f.counts["unpriced_tokens"] and in_window(f, ws, window.start, window.end):
                key = (f.dims["provider"], f.dims["model"])
                tokens[key] += f.counts["unpriced_tokens"]
                calls[key] += 1 if f.kind == "llm" else -1
                spaces[key].add(f.ws)
        expected = {k: (v, calls[k], len(spaces[k])) for k, v in tokens.items() if v}
        table = await finance.unpriced(pool, ws, window)
        assert {(r["provider"], r["model"]): (r["unpriced_tokens"], r["unpriced_calls"], r["workspaces"])
                for r in table.rows} == expected
        assert expected  # re-pricing took back only some of the unpriced calls


# -- one run -------------------------------------------------------------------------------------

async def test_run_detail_for_every_run(pool: AsyncConnectionPool[Any], facts: list[Fact],
                                        workload: Workload) -> None:
    runs = expected_groups(facts, lambda f: (f.ws, f.dims["run_id"]))
    outcomes: dict[tuple[str, str], RunCompleted] = {}
    for e in workload.unique:
        if isinstance(e, RunCompleted) and e.run_id:
            key = (e.workspace_id, e.run_id)
            if key not in outcomes or (e.occurred_at, e.event_id) > (outcomes[key].occurred_at, outcomes[key].event_id):
                outcomes[key] = e
    checked = 0
    for (ws, run, _), totals in runs.items():
        if run is None:
            continue
        detail = await finance.run_detail(pool, run, ws)
        totals.check(detail, (ws, run))
        run_facts = [f for f in facts if f.ws == ws and f.dims["run_id"] == run]
        assert detail["agents"] == sorted({f.dims["agent_id"] for f in run_facts if f.dims["agent_id"]})
        assert dt.datetime.fromisoformat(detail["first_at"]) == min(f.at for f in run_facts)
        assert dt.datetime.fromisoformat(detail["last_at"]) == max(f.at for f in run_facts)
        done = outcomes.get((ws, run))
        if done is None:
            assert detail["outcome"] is None
        else:
            assert detail["outcome"] == {"outcome": done.outcome, "metadata": done.metadata,
                                         "completed_at": done.occurred_at.isoformat()}
        checked += 1
    assert checked > 90
    # A run made by a tool spend alone exists; so does one known only from its outcome.
    only_tool = await finance.run_detail(pool, "tool-only", workload.workspaces[0])
    assert (only_tool["requests"], only_tool["tool_cost_nanos"], only_tool["cost_usd"]) == (0, 4_200_000, "0.0042")
    outcome_only = await finance.run_detail(pool, "outcome-only", workload.workspaces[0])
    assert outcome_only["requests"] == 0 and outcome_only["outcome"]["outcome"] == "failed"
    # Without a workspace, a run id is summed over the workspaces that have it.
    shared = await finance.run_detail(pool, "shared-run", None)
    assert (shared["requests"], shared["llm_cost_nanos"]) == (2, 2000)
    with pytest.raises(NotFound):
        await finance.run_detail(pool, "no-such-run", None)


# -- the BI views (migration 0006) ---------------------------------------------------------------

async def test_bi_views_match(pool: AsyncConnectionPool[Any], facts: list[Fact], workload: Workload) -> None:
    wss = workload.workspaces

    def usd(nanos: int) -> Decimal:
        return Decimal(nanos) / NANO

    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT workspace_id, run_id, cost_usd, revenue_usd, margin_usd, llm_cost_usd, requests, outcome "
            "FROM finance_by_run WHERE workspace_id = ANY(%s)", (wss,))
        by_run = {(r[0], r[1]): r[2:] for r in await cur.fetchall()}
        cur = await conn.execute("SELECT workspace_id, agent_id, day, cost_usd, cache_savings_usd, input_tokens "
                                 "FROM finance_by_agent_day WHERE workspace_id = ANY(%s)", (wss,))
        by_agent_day = {(r[0], r[1], r[2]): r[3:] for r in await cur.fetchall()}
        cur = await conn.execute("SELECT workspace_id, month, cost_usd, margin_usd, payments_out_usd, "
                                 "estimated_cost_usd FROM finance_by_workspace_month WHERE workspace_id = ANY(%s)",
                                 (wss,))
        by_month = {(r[0], r[1]): r[2:] for r in await cur.fetchall()}
        cur = await conn.execute("SELECT workspace_id, run_id, margin_pct FROM margin_by_run "
                                 "WHERE workspace_id = ANY(%s)", (wss,))
        margins = {(r[0], r[1]): r[2] for r in await cur.fetchall()}
        cur = await conn.execute("SELECT pg_typeof(cost_usd)::text FROM finance_by_run LIMIT 1")
        assert (await cur.fetchone()) == ("numeric",)  # never float
    runs = {k[:2]: t for k, t in expected_groups(facts, KEYS["run"]).items() if k[1] is not None}
    assert set(by_run) == set(runs)
    for key, t in runs.items():
        m = t.money()
        assert by_run[key][:5] == (usd(m["cost"]), usd(m["revenue"]), usd(m["margin"]), usd(m["llm_cost"]),
                                   t.counts["requests"]), key
        expected_pct = None if m["revenue"] <= 0 else (Decimal(m["margin"] * 100) / m["revenue"]).quantize(
            Decimal("0.01"), ROUND_HALF_UP)
        assert margins[key] == expected_pct, key
    days = expected_groups(facts, KEYS["agent"], interval="day")
    assert {(k[0], k[1], k[2].date()) for k in days} == set(by_agent_day)
    for k, t in days.items():
        assert by_agent_day[(k[0], k[1], k[2].date())] == (usd(t.cost), usd(t.amounts["cache_savings"]),
                                                          t.counts["input_tokens"])
    months = expected_groups(facts, KEYS["workspace"], interval="month")
    assert {(k[0], k[1].date()) for k in months} == set(by_month)
    for k, t in months.items():
        m = t.money()
        assert by_month[(k[0], k[1].date())] == (usd(m["cost"]), usd(m["margin"]), usd(m["payments_out"]),
                                                 usd(m["estimated_cost"]))


async def test_two_outcomes_of_one_run_in_one_batch(database: str, workload: Workload) -> None:
    """Two reports of one run in one batch: the later wins."""
    ws, run = workload.workspaces[2], "run-reported-twice"
    first = RunCompleted(event_id=uuid7(), occurred_at=T0, workspace_id=ws, run_id=run, outcome="succeeded")
    second = RunCompleted(event_id=uuid7(), occurred_at=T0 + dt.timedelta(seconds=1), workspace_id=ws, run_id=run,
                          outcome="failed")
    await fold(database, [first, second], "FINANCE_TEST_TWICE")
    async with AsyncConnectionPool(database, min_size=1, max_size=1, open=False) as p:
        detail = await finance.run_detail(p, run, ws)
    assert detail["outcome"]["outcome"] == "failed"


async def test_the_rollups_hold_the_facts_sums_and_answer_aligned_windows(pool: AsyncConnectionPool[Any]) -> None:
    """The trigger-maintained rollups (migration 0012) equal the facts' sums after batches and a
    full redelivery; aligned windows read them, others the facts."""
    sums = ("sum(requests)::numeric, sum(errors)::numeric, sum(input_tokens)::numeric, sum(unpriced_tokens)::numeric, "
            "coalesce(sum(llm_cost_nanos) FILTER (WHERE currency = 'USD'), 0), "
            "coalesce(sum(revenue_nanos) FILTER (WHERE currency = 'USD'), 0)")
    async with pool.connection() as conn:
        facts_by_hour = await (await conn.execute(
            f"SELECT workspace_id, date_trunc('hour', occurred_at, 'UTC'), agent_id, provider, {sums} "
            "FROM finance_fact GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4")).fetchall()
        hourly = await (await conn.execute(
            f"SELECT workspace_id, occurred_at, agent_id, provider, {sums} FROM finance_hourly "
            "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4")).fetchall()
        facts_by_run = await (await conn.execute(
            f"SELECT workspace_id, run_id, agent_id, min(occurred_at), max(occurred_at), {sums} "
            "FROM finance_fact WHERE run_id IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")).fetchall()
        run_days = await (await conn.execute(
            f"SELECT workspace_id, run_id, agent_id, min(first_at), max(last_at), {sums} "
            "FROM finance_run_day GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")).fetchall()
    assert hourly == facts_by_hour and len(hourly) > 10
    async with pool.connection() as conn:
        facts_by_day = await (await conn.execute(
            f"SELECT workspace_id, date_trunc('day', occurred_at, 'UTC'), agent_id, provider, {sums} "
            "FROM finance_fact GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4")).fetchall()
        daily = await (await conn.execute(
            f"SELECT workspace_id, occurred_at, agent_id, provider, {sums} FROM finance_daily "
            "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4")).fetchall()
    assert daily == facts_by_day and len(daily) > 10
    assert run_days == facts_by_run and len(run_days) > 10
    hour, day = finance.Window(*WINDOWS[0]), finance.Window(*WINDOWS[4])
    assert finance.source(hour, frozenset({"workspace_id", "agent_id"}), finance.DAILY, finance.HOURLY) == \
        "finance_hourly"
    assert finance.source(day, frozenset({"workspace_id", "agent_id"}), finance.DAILY, finance.HOURLY) == \
        "finance_daily"
    assert finance.source(day, frozenset({"workspace_id"}), finance.DAILY, finance.HOURLY, interval="hour") == \
        "finance_hourly"
    assert finance.source(day, frozenset({"workspace_id", "run_id"}), finance.HOURLY, finance.RUN_DAY) == \
        "finance_run_day"
    assert finance.source(hour, frozenset({"workspace_id", "run_id"}), finance.RUN_DAY) == "finance_fact"
    assert finance.source(finance.Window(*WINDOWS[1]), frozenset({"workspace_id"}), finance.HOURLY) == "finance_fact"
    assert finance.source(finance.Window(), frozenset({"workspace_id", "model"}), finance.HOURLY) == "finance_fact"
