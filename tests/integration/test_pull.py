"""events/pull.py `BatchPuller` against the stack's real JetStream: batches in stream order, no
message lost or repeated across fetches, prefetch, an idle long-poll woken by a publish, and
TimeoutError on an empty consumer."""

from __future__ import annotations

import asyncio
import time
import uuid

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events.jetstream import connect
from events.pull import BatchPuller
from tests.conftest import Gateway


async def test_batches_arrive_in_order_once_each_with_prefetch_and_long_poll(gateway: Gateway) -> None:
    tag = uuid.uuid4().hex[:8]
    stream, subject = f"PULL_TEST_{tag}", f"pulltest{tag}"
    nc = await connect(gateway.nats_url, "alephant-tests-pull")
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{subject}.>"])
    try:
        for i in range(1000):
            await nc.publish(f"{subject}.x", str(i).encode())
        await nc.flush()
        puller = BatchPuller(nc, js, stream, ConsumerConfig(
            durable_name="reader", filter_subject=f"{subject}.>", ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=30, max_ack_pending=1000))
        await puller.start()
        seen: list[int] = []
        sizes: list[int] = []
        while len(seen) < 1000:
            batch = await puller.fetch(128, timeout=2.0)
            await puller.prefetch(128)
            sizes.append(len(batch))
            seen += [int(m.data) for m in batch]
            for m in batch:
                await m.ack()
        assert seen == list(range(1000))
        assert max(sizes) == 128 and all(0 < s <= 128 for s in sizes)

        # Idle: a fetch long-polls in the server and returns as soon as a message is published.
        async def publish_later() -> None:
            await asyncio.sleep(0.3)
            await nc.publish(f"{subject}.x", b"1000")

        t0 = time.monotonic()
        later = asyncio.create_task(publish_later())
        batch = await puller.fetch(128, timeout=5.0)
        await later
        assert [int(m.data) for m in batch] == [1000]
        assert 0.25 < time.monotonic() - t0 < 4.0
        await batch[0].ack()

        t0 = time.monotonic()
        try:
            await puller.fetch(128, timeout=0.5)
        except TimeoutError:
            pass
        else:
            raise AssertionError("an empty consumer must time out")
        assert time.monotonic() - t0 < 3.0
        await puller.close()
    finally:
        await js.delete_stream(stream)
        await nc.close()
