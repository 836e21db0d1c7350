"""`RedisIdempotencyStore` against a real redis-server (the project's launcher): claim, replay,
mismatch, in flight, release, lease lapse and record expiry, key layout, and an unreachable Redis
answered without raising."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest_asyncio
from redis.asyncio import Redis

from dataplane.idempotency import DEFAULT_TTL_S, RedisIdempotencyStore, record_key
from deploy.services import Service, free_port

BODY = b'{"id": "spend_1", "object": "alephant.spend"}'


def ws() -> str:
    return f"ws-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture
async def client(redis_service: Service) -> AsyncIterator[Redis]:
    """A plain client, to read what the store wrote."""
    redis = Redis.from_url(redis_service.url)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest_asyncio.fixture
async def store(redis_service: Service) -> AsyncIterator[RedisIdempotencyStore]:
    s = RedisIdempotencyStore(redis_service.url, timeout_s=1.0)
    try:
        yield s
    finally:
        await s.close()


async def test_first_claim_owns_the_key_and_any_other_request_meanwhile_is_in_flight(
        store: RedisIdempotencyStore) -> None:
    w = ws()
    first = await store.claim(w, "vk_1", "key-1", "fp-a")
    assert first.outcome == "claimed" and len(first.token) == 32
    assert (await store.claim(w, "vk_1", "key-1", "fp-a")).outcome == "in_flight"
    # In flight wins over the fingerprint: the first request's fate is not known yet.
    assert (await store.claim(w, "vk_1", "key-1", "fp-b")).outcome == "in_flight"


async def test_a_completed_claim_replays_its_answer_for_the_same_request_only(
        store: RedisIdempotencyStore, client: Redis) -> None:
    w = ws()
    claim = await store.claim(w, "vk_1", "key-1", "fp-a")
    assert await store.complete(w, "vk_1", "key-1", claim.token, 201, BODY)

    replay = await store.claim(w, "vk_1", "key-1", "fp-a")
    assert (replay.outcome, replay.status, replay.body) == ("replay", 201, BODY)
    assert (await store.claim(w, "vk_1", "key-1", "fp-b")).outcome == "mismatch"
    # Replays do not touch the record: it is still the done answer, for the whole TTL.
    again = await store.claim(w, "vk_1", "key-1", "fp-a")
    assert (again.outcome, again.body) == ("replay", BODY)
    pttl = await client.pttl(record_key(w, "vk_1", "key-1"))
    assert (DEFAULT_TTL_S - 60) * 1000 < pttl <= DEFAULT_TTL_S * 1000


async def test_records_are_per_workspace_and_key(store: RedisIdempotencyStore) -> None:
    w = ws()
    claim = await store.claim(w, "vk_1", "same", "fp-a")
    assert await store.complete(w, "vk_1", "same", claim.token, 201, BODY)
    assert (await store.claim(w, "vk_2", "same", "fp-b")).outcome == "claimed"
    assert (await store.claim(ws(), "vk_1", "same", "fp-b")).outcome == "claimed"


async def test_release_frees_only_its_own_in_flight_claim(store: RedisIdempotencyStore, client: Redis) -> None:
    w = ws()
    claim = await store.claim(w, "vk_1", "key-1", "fp-a")
    store.release(w, "vk_1", "key-1", "not-the-token")
    await store.flush()  # waits for the queued releases
    assert (await store.claim(w, "vk_1", "key-1", "fp-a")).outcome == "in_flight"

    store.release(w, "vk_1", "key-1", claim.token)
    await store.flush()
    assert await client.exists(record_key(w, "vk_1", "key-1")) == 0
    retry = await store.claim(w, "vk_1", "key-1", "fp-b")
    assert retry.outcome == "claimed" and retry.token != claim.token

    # A completed record is never released: the answer stands.
    assert await store.complete(w, "vk_1", "key-1", retry.token, 201, BODY)
    store.release(w, "vk_1", "key-1", retry.token)
    await store.flush()
    assert (await store.claim(w, "vk_1", "key-1", "fp-b")).outcome == "replay"


async def test_an_in_flight_claim_lapses_after_its_lease_and_the_old_owner_cannot_complete(
        redis_service: Service) -> None:
    store = RedisIdempotencyStore(redis_service.url, lease_s=1, ttl_s=2)
    try:
        w = ws()
        dead = await store.claim(w, "vk_1", "key-1", "fp-a")  # its worker "dies" here
        assert (await store.claim(w, "vk_1", "key-1", "fp-a")).outcome == "in_flight"
        await asyncio.sleep(1.2)
        taker = await store.claim(w, "vk_1", "key-1", "fp-a")
        assert taker.outcome == "claimed"
        assert not await store.complete(w, "vk_1", "key-1", dead.token, 201, b"late")
        assert await store.complete(w, "vk_1", "key-1", taker.token, 201, BODY)
        assert (await store.claim(w, "vk_1", "key-1", "fp-a")).body == BODY
        # A done record lives ttl_s, then the key is new again.
        await asyncio.sleep(2.2)
        assert (await store.claim(w, "vk_1", "key-1", "fp-b")).outcome == "claimed"
    finally:
        await store.close()


async def test_records_sit_in_the_workspace_slot_and_never_store_the_raw_key(
        store: RedisIdempotencyStore, client: Redis) -> None:
    w = ws()
    secretish = "order-4711-customer-jane@example.com"
    claim = await store.claim(w, "vk_9", secretish, "fp-a")
    assert await store.complete(w, "vk_9", secretish, claim.token, 201, BODY)
    keys = [k.decode() async for k in client.scan_iter(match=f"gov:{{{w}}}:idem:*")]
    assert len(keys) == 1 and keys[0].startswith(f"gov:{{{w}}}:idem:vk_9:")
    assert secretish not in keys[0]
    stored = await client.hgetall(keys[0])
    assert stored[b"state"] == b"done" and stored[b"fp"] == b"fp-a" and stored[b"status"] == b"201"
    assert all(secretish.encode() not in v for v in stored.values())


async def test_an_unreachable_redis_is_answered_not_raised(redis_service: Service) -> None:
    # Nothing listens: connection refused.
    refused = RedisIdempotencyStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    try:
        assert (await refused.claim(ws(), "vk_1", "k", "fp")).outcome == "unavailable"
        assert not await refused.complete(ws(), "vk_1", "k", "t", 201, BODY)
        refused.release(ws(), "vk_1", "k", "t")
    finally:
        await refused.close()

    # A Redis that stops answering: each operation gives up within its deadline (3 x timeout).
    store = RedisIdempotencyStore(redis_service.url, timeout_s=0.2)
    w = ws()
    try:
        claim = await store.claim(w, "vk_1", "k", "fp")
        assert claim.outcome == "claimed"
        redis_service.pause()
        try:
            started = time.monotonic()
            assert (await store.claim(w, "vk_1", "k2", "fp")).outcome == "unavailable"
            assert not await store.complete(w, "vk_1", "k", claim.token, 201, BODY)
            assert time.monotonic() - started < 2 * 0.6 + 0.5
        finally:
            redis_service.resume()
        # Back: the store works again (the in-flight claim is still there, not completed).
        assert (await store.claim(w, "vk_1", "k", "fp")).outcome == "in_flight"
        assert await store.complete(w, "vk_1", "k", claim.token, 201, BODY)
    finally:
        await store.close()
