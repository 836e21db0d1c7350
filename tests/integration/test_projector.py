"""Projector idempotency: a SIGKILLed projector and duplicate publishes never change the ledger."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import uuid
from decimal import Decimal

import aiohttp
import psycopg

from events.jetstream import connect
from events.publisher import EventPublisher
from schemas.events import LlmCall, Usage
from schemas.ids import uuid7
from schemas.money import decimal_to_nanos
from tests.conftest import Gateway, eventually, wait_until_true


async def _ledger_for_run(gw: Gateway, run_id: str) -> tuple[int, int, int, int]:
    """(journal rows, transfer rows, distinct transferred events, transferred amount) for a run."""
    async with await psycopg.AsyncConnection.connect(gw.database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM event_journal WHERE body->>'run_id' = %s", (run_id,))
        journal = (await cur.fetchone() or (0,))[0]
        cur = await conn.execute("SELECT count(*), count(DISTINCT event_id), coalesce(sum(amount), 0) "
                                 "FROM ledger_transfer WHERE run_id = %s", (run_id,))
        rows, distinct, total = await cur.fetchone()  # type: ignore[misc]
    return int(journal), int(rows), int(distinct), int(total)


async def _checkpoint(gw: Gateway) -> int:
    async with await psycopg.AsyncConnection.connect(gw.database_url) as conn:
        # The ledger projection's own checkpoint: the finance one may be ahead of it.
        cur = await conn.execute("SELECT coalesce(max(last_seq), 0) FROM projector_checkpoint "
                                 "WHERE projector = 'ledger'")
        return int((await cur.fetchone() or (0,))[0])


async def _stream_last_seq(gw: Gateway) -> int:
    nc = await connect(gw.nats_url, "alephant-tests")
    try:
        info = await nc.jetstream().stream_info(gw.stream)
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def test_projector_sigkill_mid_stream_loses_and_duplicates_nothing(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    run_id = f"run-kill-{uuid.uuid4().hex[:8]}"
    total_calls, concurrency = 240, 12
    headers = {"Authorization": f"Bearer {gateway.demo_key}", "Alephant-Run-Id": run_id,
               "Alephant-Agent-Id": "demo-agent"}
    costs: list[int] = []
    done = asyncio.Event()

    async def client(worker: int) -> None:
        for i in range(worker, total_calls, concurrency):
            body = {"model": "mock/echo", "messages": [{"role": "user", "content": f"call number {i} " * (1 + i % 5)}]}
            async with http.post(f"{gateway.base_url}/chat/completions", json=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                costs.append(decimal_to_nanos(Decimal(resp.headers["Alephant-Cost-Usd"])))
            if len(costs) >= total_calls // 3:
                done.set()

    load = asyncio.gather(*(client(w) for w in range(concurrency)))
    await done.wait()
    gateway.stack.kill("projector", signal.SIGKILL)
    await load
    gateway.stack.start_projector()

    async def settled() -> tuple[int, int, int, int] | None:
        state = await _ledger_for_run(gateway, run_id)
        return state if state[0] == total_calls and state[1] == total_calls else None

    journal, rows, distinct, total = await eventually(settled, timeout=60)
    assert (journal, rows, distinct) == (total_calls, total_calls, total_calls)
    assert total == sum(costs)
    async def run_view() -> tuple[int, int] | None:  # from the finance projection: its own consumer, may lag
        status, body = gateway.admin.request("GET", f"/admin/v1/runs/{run_id}")
        view = (body["requests"], body["cost_nanos"]) if status == 200 else None
        return view if view == (total_calls, sum(costs)) else None

    assert await eventually(run_view, timeout=60) == (total_calls, sum(costs))

    async def caught_up() -> bool:
        return await _checkpoint(gateway) == await _stream_last_seq(gateway)

    await wait_until_true(caught_up, timeout=30)
    assert await _ledger_for_run(gateway, run_id) == (journal, rows, distinct, total)


async def test_duplicate_publish_gives_one_journal_row(gateway: Gateway) -> None:
    run_id = f"run-dup-{uuid.uuid4().hex[:8]}"
    event = LlmCall(event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id="demo",
                    agent_id="demo-agent", run_id=run_id, provider="mock", model="echo",
                    usage=Usage(input_tokens=1000, output_tokens=500), cost_nanos=450_000)
    nc = await connect(gateway.nats_url, "alephant-tests")
    try:
        publisher = EventPublisher(nc.jetstream(), stream=gateway.stream, subject_prefix=gateway.subject_prefix)
        first = await publisher.publish(event)
        second = await publisher.publish(event)  # a retry after a lost PubAck, inside the dedup window
        assert not first.duplicate and second.duplicate
        assert second.seq == first.seq
        # A replay after the dedup window: same event, different Nats-Msg-Id, so the stream keeps both.
        replay = publisher.encode(event)
        third = await nc.jetstream().publish(replay.subject, replay.payload, stream=gateway.stream,
                                             headers={"Nats-Msg-Id": f"replay-{replay.msg_id}"})
        assert not third.duplicate and third.seq > first.seq
    finally:
        await nc.close()

    async def projected() -> bool:
        return await _checkpoint(gateway) >= third.seq

    await wait_until_true(projected, timeout=30)
    assert await _ledger_for_run(gateway, run_id) == (1, 1, 1, 450_000)
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM event_journal WHERE event_id = %s", (event.event_id,))
        assert (await cur.fetchone() or (0,))[0] == 1
