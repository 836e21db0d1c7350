"""dataplane/governor_conn.py against a real Redis (the project's launcher): pipelined replies in
order, AUTH and SELECT from the URL, reconnecting after the server drops the connection, one
deadline failing every caller of a silent connection, and the governor reloading its scripts
after Redis lost them."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from dataplane.governor import RedisGovernor
from dataplane.governor_conn import Endpoint, ReplyError, RespConnection, pack
from dataplane.ports import AdmitRequest
from deploy.services import Service
from schemas.budget_keys import budget_keys, period_window
from schemas.entities import Budget
from tests.conftest import wait_until_true

USER, PASSWORD = "gov_test", "s3cret"


@pytest_asyncio.fixture
async def store(redis_service: Service) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_service.url)
    await client.acl_setuser(USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], categories=["+@all"])
    try:
        yield client
    finally:
        await client.acl_deluser(USER)
        await client.aclose()


def address(svc: Service) -> str:
    return svc.url.removeprefix("redis://").partition("/")[0]


def test_endpoint_of_a_url_or_a_client() -> None:
    ep = Endpoint.of("redis://user:pw@10.0.0.1:6380/3")
    assert (ep.host, ep.port, ep.db, ep.username, ep.password, ep.path, ep.tls) == (
        "10.0.0.1", 6380, 3, "user", "pw", None, None)
    assert Endpoint.of("unix:///run/redis.sock?db=2").path == "/run/redis.sock"
    assert Endpoint.of("rediss://cache.example:6390/0").tls is not None
    assert Endpoint.of(Redis(host="h", port=7000, db=5, password="pw")) == Endpoint(host="h", port=7000, db=5,
                                                                                 password="pw")


async def test_pipelined_replies_come_back_in_order_from_the_selected_db(redis_service: Service,
                                                                         store: Redis) -> None:
    conn = RespConnection(Endpoint.of(f"redis://{USER}:{PASSWORD}@{address(redis_service)}/2"), connect_timeout_s=1.0)
    try:
        replies = await asyncio.gather(*(conn.call(pack("INCR", "conn:n"), 1.0) for _ in range(50)),
                                       conn.pipeline([pack("SET", "conn:k", "v"), pack("GET", "conn:k"),
                                                      pack("HGET", "conn:k", "f")], 1.0))
        assert replies[:50] == list(range(1, 51))
        ok, value, error = replies[50]
        assert (ok, value) == (b"OK", b"v") and isinstance(error, ReplyError) and "WRONGTYPE" in str(error)
        assert await store.get("conn:k") is None  # db 0: the connection selected db 2
        db2 = Redis.from_url(f"redis://{address(redis_service)}/2")
        try:
            assert await db2.get("conn:k") == b"v"
        finally:
            await db2.aclose()
    finally:
        await conn.close()


def test_works_on_uvloop(redis_service: Service) -> None:
    """The workers run on uvloop, whose transports are not `asyncio.Transport` subclasses."""
    uvloop = pytest.importorskip("uvloop")
    b = Budget(id="bud_uv", workspace_id="ws_uvloop", scope="workspace", scope_id="ws_uvloop", period="total",
               limit_nanos=10**9)

    async def admit_and_settle() -> tuple[bool, str, bool]:
        gov = RedisGovernor(redis_service.url, lambda: 1, worker_id="w_uv")
        try:
            admission = await gov.admit(AdmitRequest(workspace_id="ws_uvloop", request_id="r1", limits=(), budgets=(b,),
                                                     tokens=1, hold_nanos=10**7, now_ms=int(time.time() * 1000)))
            gov.settle(admission, 10**7, 1)
            return admission.ok, admission.mode, await gov.flush() and await gov.use_escalation("ws_uvloop", "e", 60)
        finally:
            await gov.close()
    assert uvloop.run(admit_and_settle()) == (True, "redis", True)


async def test_a_wrong_password_is_a_connection_error(redis_service: Service, store: Redis) -> None:
    conn = RespConnection(Endpoint.of(f"redis://{USER}:wrong@{address(redis_service)}/0"), connect_timeout_s=1.0)
    try:
        with pytest.raises(ConnectionError, match="refused"):
            await conn.call(pack("PING"), 1.0)
        assert not conn.connected
    finally:
        await conn.close()


async def test_reconnects_after_the_server_drops_the_connection(redis_service: Service, store: Redis) -> None:
    conn = RespConnection(Endpoint.of(f"redis://{USER}:{PASSWORD}@{address(redis_service)}/0"), connect_timeout_s=1.0)
    try:
        assert await conn.call(pack("PING"), 1.0) == b"PONG"
        assert await store.client_kill_filter(user=USER) == 1

        async def dropped() -> bool:
            return not conn.connected
        await wait_until_true(dropped, timeout=5)
        assert await conn.call(pack("PING"), 1.0) == b"PONG"
    finally:
        await conn.close()


async def test_a_silent_server_fails_every_caller_at_the_first_deadline(redis_service: Service,
                                                                        store: Redis) -> None:
    conn = RespConnection(Endpoint.of(redis_service.url), connect_timeout_s=1.0)
    try:
        assert await conn.call(pack("PING"), 1.0) == b"PONG"
        redis_service.pause()
        try:
            # (the second deadline is past the test's own timeout: only the first one can end it)
            results = await asyncio.gather(conn.call(pack("PING"), 0.3), conn.call(pack("PING"), 600.0),
                                           return_exceptions=True)
        finally:
            redis_service.resume()
        assert [type(r) for r in results] == [TimeoutError, TimeoutError]
        assert not conn.connected
        assert await conn.call(pack("PING"), 1.0) == b"PONG"  # a new connection
    finally:
        await conn.close()


async def test_the_governor_loads_its_scripts_again_after_redis_lost_them(redis_service: Service,
                                                                          store: Redis) -> None:
    b = Budget(id="bud_s", workspace_id="ws_scripts", scope="workspace", scope_id="ws_scripts", period="month",
               limit_nanos=10**9)
    gov = RedisGovernor(redis_service.url, lambda: 1, worker_id="w0")

    def request(rid: str) -> AdmitRequest:
        return AdmitRequest(workspace_id="ws_scripts", request_id=rid, limits=(), budgets=(b,), tokens=1,
                            hold_nanos=10**7, now_ms=int(time.time() * 1000))
    try:
        first = await gov.admit(request("r1"))
        assert first.ok and first.mode == "redis"
        await store.script_flush()
        second = await gov.admit(request("r2"))
        assert second.ok and second.mode == "redis"
        await store.script_flush()
        gov.settle(first, 10**7, 1)
        gov.settle(second, 10**7, 1)
        assert await gov.flush()
        keys = budget_keys("ws_scripts", b.id, period_window(b, dt.datetime.now(dt.UTC))[0])
        assert int(await store.get(keys.spent) or 0) == 2 * 10**7
    finally:
        await gov.close()
