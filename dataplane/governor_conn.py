"""`RespConnection`: one pipelined RESP2 connection to Redis, shared by every call of a
`RedisGovernor` (admissions, settlement batches, lease refreshes, probes).

Why not redis-py's asyncio client on this path: it spends about 90 us of CPU per command here
(a pool checkout and release, a retry wrapper, observability hooks, a timeout per write and per
read) against about 25 us for one write and one parsed reply, and the governor sends one command
per request. Framing and parsing are hiredis's (C: `pack_command`, `Reader`), the library
redis-py itself uses; connection settings are redis-py's (`Endpoint.of` reads them from a client
or a URL), so `redis://`, `rediss://` and `unix://` URLs mean what they mean there.

Contract:
* `call` / `pipeline` send pre-packed commands (`pack`) whatever else is in flight (everything
  sent in one event-loop pass goes out in one write at the end of the pass), and return their
  replies in order: hiredis values (bytes, int, list, None), with an error reply as
  a `hiredis.ReplyError` value, never raised.
* A transport fault raises `ConnectionError` (or the `OSError` of a failed connect) to every
  caller waiting on the connection; the next call reconnects (connect, AUTH, SELECT: bounded by
  `connect_timeout_s`).
* Timeouts cost one timer per connection, not one per call: each command carries a deadline, and
  when one passes unanswered the connection is closed and every caller on it gets `TimeoutError`.
  Replies come in order, so nothing sent after an overdue command has been answered either: the
  store has been silent at least that long (what redis-py also does: it drops a connection whose
  read timed out).
* A caller that is cancelled or gives up leaves its reply to be read and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

ReplyError = hiredis.ReplyError
_MAX_BUFFERED = 16 * 2**20  # bytes written but not yet sent: past this, the store is not reading


def pack(*args: str | int | bytes) -> bytes:
    """One RESP command (hiredis's C packer)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub types a 1-tuple
    return packed


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: TCP `host:port` (TLS when `tls` is set) or a unix socket `path`."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    @classmethod
    def of(cls, redis: Redis | str) -> Endpoint:
        """The settings of a redis-py client, or of the client `Redis.from_url(url)` would make.
        Raises ValueError for settings this connection does not implement (a credential
        provider)."""
        pool = ConnectionPool.from_url(redis) if isinstance(redis, str) else redis.connection_pool
        conn = pool.make_connection()  # type: ignore[no-untyped-call]  # not connected: only its settings are read
        if getattr(conn, "credential_provider", None) is not None:
            raise ValueError("RedisGovernor needs a Redis username/password, not a credential_provider")
        common = {"db": int(conn.db), "username": conn.username, "password": conn.password}
        if isinstance(conn, UnixDomainSocketConnection):
            return cls(path=conn.path, **common)
        tls = conn.ssl_context.get() if isinstance(conn, SSLConnection) else None
        return cls(host=conn.host, port=int(conn.port), tls=tls, **common)


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[list[Any]]
    expected: int
    deadline: float  # loop time
    replies: list[Any]


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: RespConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[_Waiter] = deque()
        self.unsent: list[bytes] = []

    def write_unsent(self) -> None:
        unsent, self.unsent = self.unsent, []
        if self.transport is not None and not self.transport.is_closing() and unsent:
            self.transport.writelines(unsent)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports have the interface without subclassing asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self.waiting
        try:
            while (reply := self._reader.gets()) is not False:
                head = waiting[0]  # IndexError: a reply nobody asked for, the stream is out of step
                head.replies.append(reply)
                if len(head.replies) == head.expected:
                    waiting.popleft()
                    if not head.future.done():
                        head.future.set_result(head.replies)
        except (hiredis.ProtocolError, IndexError) as exc:
            self._owner.drop(self, ConnectionError(f"unreadable reply from Redis: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.drop(self, ConnectionError(f"Redis closed the connection: {exc!r}" if exc else
                                               "Redis closed the connection"))


class RespConnection:
    """See the module docstring. One event loop; `close()` when done."""

    def __init__(self, endpoint: Endpoint, *, connect_timeout_s: float) -> None:
        self._endpoint = endpoint
        self._connect_timeout_s = connect_timeout_s
        self._proto: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    @property
    def connected(self) -> bool:
        """A connection is open (the next call does not connect first)."""
        return self._proto is not None

    async def call(self, command: bytes, timeout_s: float) -> Any:
        """Send one packed command; its reply."""
        proto = self._proto if self._proto is not None else await self._connect()
        return (await self._send(proto, [command], timeout_s))[0]

    async def pipeline(self, commands: list[bytes], timeout_s: float) -> list[Any]:
        """Send packed commands in one write; their replies, in order. `timeout_s` bounds the
        wait for the last reply (the connect, when one is needed, has its own bound)."""
        if not commands:
            return []
        proto = self._proto if self._proto is not None else await self._connect()
        return await self._send(proto, commands, timeout_s)

    def _send(self, proto: _Protocol, commands: list[bytes], timeout_s: float) -> asyncio.Future[list[Any]]:
        transport = proto.transport
        assert transport is not None
        if transport.get_write_buffer_size() > _MAX_BUFFERED:
            self.drop(proto, ConnectionError("Redis is not reading its connection"))
            raise ConnectionError("Redis is not reading its connection")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        deadline = loop.time() + timeout_s
        proto.waiting.append(_Waiter(future, len(commands), deadline, []))
        # Coalesced: what is sent during one event-loop pass goes out in one write (one syscall
        # here, one read for Redis) at the end of the pass; the order is the waiters' order.
        if not proto.unsent:
            loop.call_soon(proto.write_unsent)
        proto.unsent.extend(commands)
        if self._timer is None or deadline < self._timer_at:
            self._arm(loop, deadline)
        return future

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(at, self._check_deadlines), at

    def _check_deadlines(self) -> None:
        self._timer = None
        proto = self._proto
        if proto is None or not proto.waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = min(w.deadline for w in proto.waiting)
        if earliest <= now:
            self.drop(proto, TimeoutError("Redis did not answer in time"))
        else:
            self._arm(loop, earliest)

    async def _connect(self) -> _Protocol:
        async with self._connecting:
            if self._proto is not None:  # another caller connected meanwhile
                return self._proto
            ep = self._endpoint
            loop = asyncio.get_running_loop()
            proto = _Protocol(self)
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    if ep.path is not None:
                        await loop.create_unix_connection(lambda: proto, ep.path)
                    else:
                        await loop.create_connection(lambda: proto, ep.host, ep.port, ssl=ep.tls)
                    hello: list[bytes] = []
                    if ep.password is not None:
                        hello.append(pack("AUTH", ep.username, ep.password) if ep.username else
                                     pack("AUTH", ep.password))
                    if ep.db:
                        hello.append(pack("SELECT", ep.db))
                    if hello:
                        errors = [r for r in await self._send(proto, hello, self._connect_timeout_s)
                                  if isinstance(r, ReplyError)]
                        if errors:
                            raise ConnectionError(f"Redis refused the connection: {errors[0]}")
            except BaseException:
                if proto.transport is not None:
                    proto.transport.abort()
                raise
            self._proto = proto
            return proto

    def drop(self, proto: _Protocol, exc: Exception) -> None:
        """Close `proto`'s connection and fail every caller waiting on it with `exc`."""
        if self._proto is proto:
            self._proto = None
        waiting, proto.waiting = proto.waiting, deque()
        for waiter in waiting:
            if not waiter.future.done():
                waiter.future.set_exception(exc)
                waiter.future.exception()  # retrieved: a caller that gave up must not warn at GC
        if proto.transport is not None and not proto.transport.is_closing():
            proto.transport.abort()

    async def close(self) -> None:
        """Close the connection (callers waiting get ConnectionError). Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._proto is not None:
            proto = self._proto
            self.drop(proto, ConnectionError("connection closed"))
            with contextlib.suppress(Exception):
                await asyncio.sleep(0)  # let the transport finish closing
