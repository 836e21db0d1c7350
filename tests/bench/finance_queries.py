"""Latency of the finance queries (issue 9) over a large `finance_fact`.

``python -m tests.bench.finance_queries [--rows 1000000] [--repeat 5] [--database-url URL] [--explain] [--json]``

Creates a scratch database (on ``--database-url``'s server, else on an embedded Postgres from the
project's launcher in a temporary directory), applies the migrations, loads ``--rows`` `llm`
finance_fact rows with COPY, ANALYZEs, then times the main queries through
`controlplane.finance` (the code the admin API runs) and drops the database.

The data: one month (January 2026) of calls, 4 workspaces (`ws0` holds 70% of the rows), 200
agents and 20,000 runs per workspace (a run belongs to one agent), 3 providers with 8 models,
2% of calls unpriced, 1% errors, and one run in 997 costing 20x. Queries (each timed
``--repeat`` times after one warm-up; the median is printed with min and max): the summary by
agent and day over the month of `ws0` (the dashboard query), by model and month, by a custom
property and day, by workspace over everything, the top 10 runs by cost and agents by margin,
spikes, unpriced usage, and one run's detail with and without its workspace. ``--explain``
prints each statement's plan (EXPLAIN ANALYZE, BUFFERS), to check which index it uses.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from controlplane import finance
from deploy.services import start_postgres
from events.db import migrate

MONTH_START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MONTH_END = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
WORKSPACES = ("ws0", "ws1", "ws2", "ws3")
WEIGHTS = (70, 10, 10, 10)
AGENTS, RUNS = 200, 20_000
MODELS = (("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("openai", "o3"), ("anthropic", "claude-sonnet-4"),
          ("anthropic", "claude-haiku-4"), ("anthropic", "claude-opus-4"), ("mistral", "mistral-large"),
          ("mistral", "codestral"))
COLUMNS = ("event_id", "workspace_id", "occurred_at", "kind", "agent_id", "run_id", "workflow_id", "member_id",
           "department_id", "provider", "model", "requests", "errors", "input_tokens", "output_tokens",
           "llm_cost_nanos", "estimated_cost_nanos", "unpriced_tokens", "properties")


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _rows(count: int, seed: int = 7, start: dt.datetime = MONTH_START, end: dt.datetime = MONTH_END,
          workspaces: tuple[str, ...] = WORKSPACES, run_span_s: float | None = None) -> Any:
    """`count` facts; with `run_span_s`, each run's calls fall within that many seconds of the
    run's own start (agent runs are minutes long), else anywhere in the window."""
    rng = random.Random(seed)
    span = (end - start).total_seconds()
    for _ in range(count):
        ws = rng.choices(workspaces, WEIGHTS)[0]
        run = rng.randrange(RUNS)
        agent = run % AGENTS  # a run belongs to one agent
        provider, model = MODELS[rng.randrange(len(MODELS))]
        tokens_in, tokens_out = rng.randrange(50, 4000), rng.randrange(10, 1500)
        unpriced = rng.random() < 0.02
        cost = 0 if unpriced else tokens_in * 2500 + tokens_out * 10_000
        if run % 997 == 0:  # a few runaway runs, for the spike query to find
            cost *= 20
        if run_span_s is None:
            at = start + dt.timedelta(seconds=rng.random() * span)
        else:
            run_start = (run * 7919 + workspaces.index(ws) * 613) % int(span - run_span_s)
            at = start + dt.timedelta(seconds=run_start + rng.random() * run_span_s)
        yield (uuid.UUID(int=rng.getrandbits(128), version=4), ws, at, "llm", f"agent-{agent}", f"run-{run}",
               f"wf-{run % 50}", f"member-{agent % 40}", f"dept-{agent % 8}", provider, model, 1,
               int(rng.random() < 0.01), tokens_in, tokens_out, cost, cost if rng.random() < 0.03 else 0,
               tokens_in + tokens_out if unpriced else 0, json.dumps({"customer": f"c{rng.randrange(30)}"}))


def load(url: str, count: int, **shape: Any) -> float:
    """COPY `count` rows into finance_fact, then ANALYZE; returns the seconds it took. `shape`:
    `_rows`'s window and workspaces."""
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor() as cur, cur.copy(sql.SQL("COPY finance_fact ({}) FROM STDIN").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS))) as copy:
            for row in _rows(count, **shape):
                copy.write_row(row)
        conn.execute("ANALYZE finance_fact")
    return time.perf_counter() - started


async def _time(fn: Callable[[], Awaitable[Any]], repeat: int) -> tuple[list[float], Any]:
    result = await fn()  # warm-up (plans, caches)
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = await fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples, result


async def _explain(pool: AsyncConnectionPool[Any], query: sql.Composable, params: dict[str, Any]) -> str:
    async with pool.connection() as conn:
        cur = await conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {}").format(query), params)
        return "\n".join(r[0] for r in await cur.fetchall())


async def measure(url: str, repeat: int, explain: bool) -> list[dict[str, Any]]:
    month = finance.Window(MONTH_START, MONTH_END)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT run_id FROM finance_fact WHERE workspace_id = 'ws0' LIMIT 1")
        run_id = str((await cur.fetchone() or ("run-0-0",))[0])
    by_agent_day = finance.SummaryQuery("agent", "ws0", month, "day", 100_000)
    by_model_month = finance.SummaryQuery("model", "ws0", month, "month")
    by_workspace = finance.SummaryQuery("workspace")
    by_property = finance.SummaryQuery("property:customer", "ws0", month, "day", 100_000)
    top_runs = finance.TopQuery("run", "cost", True, 10, "ws0", month)
    top_agents = finance.TopQuery("agent", "margin", True, 10, "ws0", month)
    spikes = finance.SpikeQuery(workspace_id="ws0", window=month)
    run_ws, _, run_ws_params = finance.run_sql(run_id, "ws0")
    run_any, _, run_any_params = finance.run_sql(run_id, None)
    cases: list[tuple[str, Callable[[AsyncConnectionPool[Any]], Awaitable[Any]], tuple[sql.Composable,
                                                                                        dict[str, Any]]]] = [
        ("summary agent x day, ws0, month", lambda p: finance.summary(p, by_agent_day),
         finance.summary_sql(by_agent_day)),
        ("summary model x month, ws0, month", lambda p: finance.summary(p, by_model_month),
         finance.summary_sql(by_model_month)),
        ("summary property x day, ws0, month", lambda p: finance.summary(p, by_property),
         finance.summary_sql(by_property)),
        ("summary workspace, all time", lambda p: finance.summary(p, by_workspace), finance.summary_sql(by_workspace)),
        ("top 10 runs by cost, ws0, month", lambda p: finance.top(p, top_runs), finance.top_sql(top_runs)),
        ("top 10 agents by margin, ws0, month", lambda p: finance.top(p, top_agents), finance.top_sql(top_agents)),
        ("spikes, ws0, month", lambda p: finance.spikes(p, spikes), finance.spikes_sql(spikes)),
        ("unpriced, ws0", lambda p: finance.unpriced(p, "ws0", finance.Window()),
         finance.unpriced_sql("ws0", finance.Window())),
        ("run detail (with workspace)", lambda p: finance.run_detail(p, run_id, "ws0"), (run_ws, run_ws_params)),
        ("run detail (any workspace)", lambda p: finance.run_detail(p, run_id, None), (run_any, run_any_params)),
    ]
    results = []
    async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as pool:
        for name, fn, (query, params) in cases:
            samples, result = await _time(lambda fn=fn: fn(pool), repeat)  # type: ignore[misc]
            rows = len(result.rows) if isinstance(result, finance.Table) else 1
            entry = {"query": name, "rows": rows, "median_ms": round(statistics.median(samples), 1),
                     "min_ms": round(min(samples), 1), "max_ms": round(max(samples), 1)}
            if explain:
                entry["plan"] = await _explain(pool, query, params)
            results.append(entry)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=1_000_000, help="finance_fact rows to load (default 1000000)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per query after a warm-up (default 5)")
    ap.add_argument("--database-url", help="a Postgres server to create the scratch database on (default: an "
                                           "embedded one in a temporary directory)")
    ap.add_argument("--explain", action="store_true", help="print each query's EXPLAIN ANALYZE plan")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="finance-bench-") as tmp:
        pg = None
        server = args.database_url
        if server is None:
            pg = start_postgres(Path(tmp))
            server = pg.url
        name = f"finance_bench_{secrets.token_hex(4)}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = _with_database(server, name)
        try:
            asyncio.run(migrate(url))
            load_s = load(url, args.rows)
            results = asyncio.run(measure(url, args.repeat, args.explain))
        finally:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            if pg is not None:
                pg.stop()
    if args.json:
        print(json.dumps({"rows": args.rows, "load_s": round(load_s, 1), "queries": results}))
        return 0
    print(f"finance_fact: {args.rows} rows loaded with COPY in {load_s:.1f} s; median of {args.repeat} runs")
    width = max(len(r["query"]) for r in results)
    for r in results:
        print(f"  {r['query']:<{width}}  {r['median_ms']:>9.1f} ms  (min {r['min_ms']:.1f}, max {r['max_ms']:.1f}; "
              f"{r['rows']} rows)")
        if "plan" in r:
            print("    " + r["plan"].replace("\n", "\n    "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
