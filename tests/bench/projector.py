"""Projector throughput: events per second folded from JetStream into Postgres (issue 9).

``python -m tests.bench.projector [--events 50000] [--json]``; ``make bench`` runs it too, after
the load runs, with the gateway stack stopped.

It starts its own NATS (JetStream) and Postgres from the project's launchers under a temp dir
(or uses ``ALEPHANT_NATS_URL`` / ``ALEPHANT_DATABASE_URL`` when set: a fresh stream and fresh
projection checkpoints there, so existing data is untouched apart from the rows it adds), applies
the migrations, publishes a workload into a fresh stream (90% priced ``llm.call`` over 500 runs
and 20 agents, then unpriced calls, tool spend, outbound and inbound payments, cache hits), and
only then starts the projectors as ``alephant projector`` runs them: every projection of
``events.projector.PROJECTIONS`` concurrently, each on its own durable consumer. Timed: from their
start until every projection's checkpoint reaches the stream's last sequence.

Printed: events per second through all projections together (each event folded by each of
them), per projection, and each projection on its own (a fresh stream each time; what one
`alephant projector` process per projection would do, given the cores). Issue 9's bar: at least
10,000 events/s here; printed for reference, nothing is enforced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import structlog

from events.db import migrate
from events.jetstream import connect, ensure_stream
from events.projector import PROJECTIONS, Projection, Projector
from schemas.events import (
    CacheHit,
    Event,
    LlmCall,
    PaymentInbound,
    PaymentOutbound,
    ToolSpend,
    Usage,
    event_encoder,
    subject_for,
)
from schemas.ids import uuid7

BAR_EVENTS_PER_S = 10_000


def workload(n: int, workspace: str, seed: int = 7) -> list[Event]:
    """`n` events of the mix the module docstring describes, deterministic for a seed."""
    rng = random.Random(seed)
    t0 = dt.datetime.now(dt.UTC)
    out: list[Event] = []
    for i in range(n):
        env: dict[str, Any] = {"event_id": uuid7(), "occurred_at": t0 + dt.timedelta(milliseconds=i),
                               "workspace_id": workspace, "agent_id": f"agent-{rng.randrange(20)}",
                               "run_id": f"run-{rng.randrange(500)}", "workflow_id": f"wf-{rng.randrange(5)}"}
        roll = rng.random()
        if roll < 0.90:
            usage = Usage(input_tokens=rng.randrange(10, 4000), output_tokens=rng.randrange(1, 800))
            out.append(LlmCall(**env, provider="openai", model="gpt-4o-mini", usage=usage,
                               cost_nanos=rng.randrange(1_000, 5_000_000), price_source="catalog"))
        elif roll < 0.92:
            out.append(LlmCall(**env, provider="custom", model="house-model", priced=False,
                               usage=Usage(input_tokens=100, output_tokens=20), price_source="unpriced"))
        elif roll < 0.96:
            out.append(ToolSpend(**env, spend_id=f"spend_{i}", amount_nanos=rng.randrange(1, 10**8), vendor="serpapi",
                                 tool="web_search"))
        elif roll < 0.97:
            out.append(PaymentOutbound(**env, payment_id=f"po_{i}", amount_nanos=rng.randrange(1, 10**8), rail="x402"))
        elif roll < 0.98:
            out.append(PaymentInbound(**env, payment_id=f"pi_{i}", amount_nanos=rng.randrange(1, 10**9), rail="x402",
                                      endpoint_id="ep-1"))
        else:
            out.append(CacheHit(**env, provider="openai", model="gpt-4o-mini", saved_nanos=rng.randrange(1, 10**6)))
    return out


async def _publish(nats_url: str, stream: str, prefix: str, events: list[Event]) -> int:
    """Publish into a fresh stream (core publishes, then one flush: the publisher's throughput
    is not what is measured); the stream's last sequence."""
    nc = await connect(nats_url, "alephant-bench")
    try:
        js = nc.jetstream()
        await ensure_stream(js, stream, prefix)
        for e in events:
            await nc.publish(subject_for(e, prefix), event_encoder.encode(e),
                             headers={"Nats-Msg-Id": str(e.event_id)})
        await nc.flush()
        for _ in range(600):
            info = await js.stream_info(stream)
            if info.state.messages >= len(events):
                return int(info.state.last_seq)
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the stream holds {info.state.messages} of {len(events)} events")
    finally:
        await nc.close()


async def _checkpoints(database_url: str, names: list[str]) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT projector, last_seq FROM projector_checkpoint WHERE projector = ANY(%s)",
                                 (names,))
        return {name: int(seq) for name, seq in await cur.fetchall()}


async def measure(nats_url: str, database_url: str, n: int, batch: int,
                  only: tuple[str, ...] = ()) -> dict[str, Any]:
    await migrate(database_url)
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"BENCH_PROJ_{tag}", f"benchproj{tag}"
    events = workload(n, f"bench-{tag}")
    t_pub = time.perf_counter()
    last_seq = await _publish(nats_url, stream, prefix, events)
    publish_s = time.perf_counter() - t_pub
    nc = await connect(nats_url, "alephant-bench-projector")
    js = nc.jetstream()
    # Fresh durable names and checkpoints: a bench run never touches a live projector's state.
    projections = [Projection(f"{p.name}-bench-{tag}", p.fold) for p in PROJECTIONS if not only or p.name in only]
    projectors = [Projector(js, database_url, stream=stream, subject_prefix=prefix, batch=batch, projection=p)
                  for p in projections]
    names = [p.name for p in projections]
    done_at: dict[str, float] = {}
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(p.run()) for p in projectors]
    try:
        while len(done_at) < len(names):
            if failed := [t for t in tasks if t.done()]:
                failed[0].result()  # raises what stopped it
                raise RuntimeError("a projector stopped")
            for name, seq in (await _checkpoints(database_url, names)).items():
                if seq >= last_seq and name not in done_at:
                    done_at[name] = time.perf_counter() - t0
            await asyncio.sleep(0.05)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in names:
            with contextlib.suppress(Exception):  # cleanup of a scratch stream, deleted next
                await js.delete_consumer(stream, name)
        await js.delete_stream(stream)
        await nc.close()
    total_s = max(done_at.values())
    return {
        "events": n,
        "batch": batch,
        "projections": len(names),
        "publish_s": round(publish_s, 3),
        "seconds": round(total_s, 3),
        "events_per_s": round(n / total_s, 1),
        "per_projection": {name.split("-bench-")[0]: {"seconds": round(s, 3), "events_per_s": round(n / s, 1)}
                           for name, s in done_at.items()},
        "bar_events_per_s": BAR_EVENTS_PER_S,
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    nats_url, database_url = os.environ.get("ALEPHANT_NATS_URL"), os.environ.get("ALEPHANT_DATABASE_URL")
    state = Path(tempfile.mkdtemp(prefix="alephant-bench-proj-"))
    state.chmod(0o755)  # the embedded Postgres may run as another user (see deploy/services.py)
    services = []
    try:
        from deploy.services import start_nats, start_postgres
        if not nats_url:
            services.append(start_nats(state))
            nats_url = services[-1].url
        if not database_url:
            services.append(start_postgres(state))
            database_url = services[-1].url
        runs = {"all": await measure(nats_url, database_url, args.events, args.batch)}
        if args.alone:
            for p in PROJECTIONS:
                runs[p.name] = await measure(nats_url, database_url, args.events, args.batch, (p.name,))
        return {**runs["all"], "alone": {name: r["events_per_s"] for name, r in runs.items() if name != "all"}}
    finally:
        for svc in services:
            svc.stop()
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    # The projectors' logs go to stderr, warnings and up: stdout is the result (JSON with --json).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    parser = argparse.ArgumentParser(prog="python -m tests.bench.projector", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="events published and folded (default 50000)")
    parser.add_argument("--batch", type=int, default=512, help="projector fetch batch (default 512, as deployed)")
    parser.add_argument("--no-alone", dest="alone", action="store_false",
                        help="skip the runs of each projection on its own (default: run them too)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    args = parser.parse_args(argv)
    result = asyncio.run(_main(args))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"published {result['events']:,} events in {result['publish_s']}s; folded by {result['projections']} "
          f"projections concurrently (batch {result['batch']}) in {result['seconds']}s")
    print(f"  {result['events_per_s']:,.0f} events/s through every projection (issue 9 bar: >= "
          f"{BAR_EVENTS_PER_S:,}/s; reference only)")
    for name, r in result["per_projection"].items():
        print(f"  {name:<8} {r['events_per_s']:>10,.0f} events/s ({r['seconds']}s) concurrently with the others")
    for name, rate in result["alone"].items():
        print(f"  {name:<8} {rate:>10,.0f} events/s on its own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
