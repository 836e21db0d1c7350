"""The event publisher against the stack's real NATS: size cap, permanent and transient failures.

One bad message must never slow the others: each message has its own retry schedule, and a
message JetStream refuses for good is dead-lettered locally instead of retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from events.jetstream import connect
from events.publisher import TRUNCATED_ANOMALY, EventPublisher
from events.spool import DEAD_LETTER_FILE, Record, Spool, decode_records
from schemas.events import ConfigChanged, LlmCall, Usage, event_decoder
from schemas.ids import uuid7
from tests.conftest import Gateway, wait_until_true


def _call(**kw: object) -> LlmCall:
    base: dict[str, object] = {"event_id": uuid7(), "occurred_at": dt.datetime.now(dt.UTC),
                               "workspace_id": "pubtest", "provider": "mock", "model": "echo"}
    return LlmCall(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture
async def nc(gateway: Gateway) -> AsyncIterator[NATS]:
    conn = await connect(gateway.nats_url, "alephant-tests-publisher")
    yield conn
    await conn.close()


@contextlib.asynccontextmanager
async def running(publisher: EventPublisher) -> AsyncIterator[None]:
    task = asyncio.create_task(publisher.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_oversized_events_never_reach_nats(gateway: Gateway, nc: NATS, tmp_path: Path) -> None:
    arrived: dict[str, bytes] = {}

    async def on_msg(msg: Msg) -> None:
        arrived[msg.headers["Nats-Msg-Id"] if msg.headers else ""] = msg.data

    sub = await nc.subscribe(f"{gateway.subject_prefix}.pubtest.>", cb=on_msg)
    spool = Spool.open(tmp_path)
    publisher = EventPublisher(nc.jetstream(), stream=gateway.stream, subject_prefix=gateway.subject_prefix,
                               spool=spool)
    big_call = _call(model="m" * 1_200_000, usage=Usage(input_tokens=7, output_tokens=3), cost_nanos=1234)
    big_config = ConfigChanged(event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id="pubtest",
                               entity="provider", entity_id="p", op="put", data={"blob": "x" * 400_000})
    good = _call()
    async with running(publisher):
        for event in (big_call, big_config, good):
            publisher.emit(event)

        async def delivered() -> bool:
            return str(good.event_id) in arrived and str(big_call.event_id) in arrived and publisher.pending == 0

        await wait_until_true(delivered)
    await sub.unsubscribe()
    assert spool.close() == 0  # everything acked or dead-lettered: the spool is empty
    cut = event_decoder.decode(arrived[str(big_call.event_id)])
    assert isinstance(cut, LlmCall)
    assert len(arrived[str(big_call.event_id)]) <= 256 * 1024
    assert TRUNCATED_ANOMALY in cut.anomalies
    assert (cut.cost_nanos, cut.usage, cut.workspace_id) == (1234, big_call.usage, "pubtest")
    assert str(big_config.event_id) not in arrived
    assert publisher.dead_lettered == 1 and publisher.truncated == 1
    records, _ = decode_records((tmp_path / DEAD_LETTER_FILE).read_bytes())
    assert [r.msg_id for r in records] == [str(big_config.event_id)]


async def test_bad_messages_do_not_slow_the_others(gateway: Gateway, nc: NATS, tmp_path: Path) -> None:
    """A permanently refused message and a forever-transient one, ahead of 1,000 good events
    emitted in waves: every good event is acked, none waits for the bad ones' backoff (bounded
    by the 5 s retry cap; the old publisher made the whole loop sleep it), the refused one is
    dead-lettered once, the transient one keeps its own retry schedule."""
    sent: dict[str, float] = {}
    acked: dict[str, float] = {}

    async def on_msg(msg: Msg) -> None:
        if msg.headers:
            acked.setdefault(msg.headers["Nats-Msg-Id"], time.monotonic())

    sub = await nc.subscribe(f"{gateway.subject_prefix}.pubtest.>", cb=on_msg)
    spool = Spool.open(tmp_path)
    # A cap above NATS's 1 MiB max_payload, so a too-large message reaches the client and fails for good.
    publisher = EventPublisher(nc.jetstream(), stream=gateway.stream, subject_prefix=gateway.subject_prefix,
                               spool=spool, max_event_bytes=4 * 1024 * 1024)
    # A spooled record for a subject no stream captures: JetStream has no responder, forever (transient).
    stray = Record(str(uuid7()), "nowhere.pubtest.llm.call", msgspec.json.encode(_call()))
    publisher.replay([(stray, spool.append(stray.msg_id, stray.subject, stray.payload))])
    too_big = _call(model="m" * 1_500_000)
    waves, per_wave = 20, 50
    async with running(publisher):
        publisher.emit(too_big)
        for _ in range(waves):
            for _ in range(per_wave):
                event = _call()
                sent[str(event.event_id)] = time.monotonic()
                publisher.emit(event)
            await asyncio.sleep(0.05)

        async def all_good_acked() -> bool:
            return set(sent) <= set(acked) and publisher.pending == 1

        await wait_until_true(all_good_acked, timeout=30)
        retries_seen = publisher.retried
    await sub.unsubscribe()
    delays = sorted(acked[i] - sent[i] for i in sent)
    print(f"\npublisher: {len(sent)} good events acked, emit->stream delay "
          f"p50 {delays[len(delays) // 2] * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms; "
          f"dead-lettered {publisher.dead_lettered}; stray retried {retries_seen}x")
    assert delays[-1] < 5.0
    assert publisher.published == len(sent)
    assert publisher.dead_lettered == 1 and str(too_big.event_id) not in acked
    assert retries_seen >= 2  # the stray one keeps retrying on its own schedule
    assert spool.close() == 1  # only the stray record is left on disk, for the next start
