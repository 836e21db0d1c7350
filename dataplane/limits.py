"""What one client may hold on a worker: in-flight streams, open connections, a slow request body.

* **Streams in flight** (`StreamSlots`): at most `max_streams` per worker and
  `max_streams_per_key` per virtual key. A call over either cap is refused with 429
  `concurrency_limit_exceeded` and `Retry-After` (rendered in the ingress API's shape by the
  error middleware). `admit` is the pure decision; `StreamSlots.hold` takes a slot for the
  duration of a `with` block and always gives it back, whatever ends the block.
* **Connections** (`ConnectionCap`, `CappedTCPSite`): at most `max_connections` open client
  connections per worker. One more is answered at once with a 503 `connection_limit_exceeded`
  JSON body (OpenAI's shape: the request path is not read yet) and closed, so idle connections
  cannot pile up behind the cap. Idle connections under the cap are closed by aiohttp's
  keep-alive timeout, which (aiohttp >= 3.10) also runs before a connection's first request.
* **Request bodies** (`body_within`): a body that stops arriving is answered 408
  `request_timeout` after `body_read_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import msgspec
from aiohttp import web

from schemas.errors import InvalidRequest, RateLimited, UpstreamError, render_openai

T = TypeVar("T")

RETRY_AFTER_S = 1  # a stream slot frees as soon as any stream ends; retry soon
REFUSED_LINGER_S = 1.0  # how long a refused connection may take to read its 503 before we close it


# -- streams in flight -----------------------------------------------------------------------------


def admit(worker_in_flight: int, key_in_flight: int, *, max_streams: int, max_streams_per_key: int) -> str | None:
    """None when one more stream may start, else which cap it hits (`"worker"` or `"key"`). A cap
    of 0 or less means unlimited. Pure."""
    if 0 < max_streams <= worker_in_flight:
        return "worker"
    if 0 < max_streams_per_key <= key_in_flight:
        return "key"
    return None


@dataclass(slots=True)
class StreamSlots:
    """The in-flight stream counters of one worker (one event loop: no locking needed)."""

    max_streams: int
    max_streams_per_key: int
    total: int = 0
    by_key: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def hold(self, key_id: str) -> Iterator[None]:
        """Hold one slot for `key_id` during the block. Raises RateLimited (429
        `concurrency_limit_exceeded`, `Retry-After`) before the block when a cap is reached;
        the slot is released however the block ends (return, error, cancellation)."""
        held = self.by_key.get(key_id, 0)
        refused = admit(self.total, held, max_streams=self.max_streams, max_streams_per_key=self.max_streams_per_key)
        if refused is not None:
            scope = "this worker" if refused == "worker" else "this API key"
            cap = self.max_streams if refused == "worker" else self.max_streams_per_key
            raise RateLimited(f"Too many streams in flight for {scope} (limit {cap}). Retry when one has finished.",
                              code="concurrency_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.total += 1
        self.by_key[key_id] = held + 1
        try:
            yield
        finally:
            self.total -= 1
            left = self.by_key[key_id] - 1
            if left:
                self.by_key[key_id] = left
            else:
                del self.by_key[key_id]  # keys come and go; keep the dict as small as the traffic


STREAM_SLOTS: web.AppKey[StreamSlots] = web.AppKey("alephant_stream_slots", StreamSlots)


# -- request bodies --------------------------------------------------------------------------------


def request_timeout(timeout_s: float) -> InvalidRequest:
    return InvalidRequest(f"The request body did not arrive within {timeout_s:g} seconds.", code="request_timeout",
                          status=408)


async def body_within(request: web.Request, read: Awaitable[T], timeout_s: float) -> T:
    """`await read` (a body read of `request`), or 408 `request_timeout` when the body has not
    fully arrived after `timeout_s`. A body already received whole skips the timer (the common
    case costs nothing)."""
    if request.content.is_eof() or timeout_s <= 0:
        return await read
    try:
        async with asyncio.timeout(timeout_s):
            return await read
    except TimeoutError:
        raise request_timeout(timeout_s) from None


# -- connections -----------------------------------------------------------------------------------


def _refusal_bytes() -> bytes:
    body = render_openai(UpstreamError("This gateway worker is at its connection limit. Retry shortly.",
                                       status=503, code="connection_limit_exceeded"))
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


_REFUSAL = _refusal_bytes()


class _Refused(asyncio.Protocol):
    """A connection over the cap: answer 503 at once, stop sending, close soon. Whatever the client
    sends is discarded (closing with unread data would reset the connection before it reads the 503)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only the same interface.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.write(_REFUSAL)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done too: close now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


@dataclass(slots=True)
class ConnectionCap:
    """A protocol factory in front of an aiohttp `web.Server`: its connections while fewer than
    `limit` are open (a `limit` of 0 or less: no cap), a `_Refused` 503 beyond."""

    server: web.Server
    limit: int
    refused: int = 0  # connections refused since start (for logs and tests)

    def __call__(self) -> asyncio.BaseProtocol:
        # `connections` copies a list: O(open connections) per accept, never per request.
        if self.limit > 0 and len(self.server.connections) >= self.limit:
            self.refused += 1
            return _Refused()
        return self.server()


class CappedTCPSite(web.TCPSite):
    """`web.TCPSite` whose listening socket serves the runner's server through `ConnectionCap`."""

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None, *,
                 max_connections: int, reuse_port: bool | None = None) -> None:
        super().__init__(runner, host, port, reuse_port=reuse_port)
        self._max_connections = max_connections
        self.cap: ConnectionCap | None = None

    async def start(self) -> None:
        """Listen (as `TCPSite.start`), with the connection cap in front of the runner's server."""
        # BaseSite.start registers the site with its runner; TCPSite.start adds only the listener.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None, "the runner must be set up before its sites start"
        self.cap = ConnectionCap(server, self._max_connections)
        self._server = await asyncio.get_running_loop().create_server(
            self.cap, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


class _StreamProbe(msgspec.Struct):
    stream: Any = None


_stream_decoder = msgspec.json.Decoder(_StreamProbe)
_OLLAMA_STREAMING = ("api/chat", "api/generate")  # Ollama streams unless told `"stream": false`


def wants_stream(body: bytes, rest: str, provider_type: str) -> bool:
    """Whether a passthrough request asks for a stream, so it takes a stream slot before it is
    sent: a streaming path (Gemini `:streamGenerateContent`, Bedrock `converse-stream` /
    `invoke-with-response-stream`), a JSON body with `"stream": true`, or Ollama's chat and
    generate endpoints without `"stream": false`. Pure; decodes the body only if it names `stream`."""
    if "stream" in rest.lower():
        return True
    flag: Any = None
    if b'"stream"' in body:
        try:
            flag = _stream_decoder.decode(body).stream
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
            flag = None
    if provider_type == "ollama" and rest.rstrip("/").endswith(_OLLAMA_STREAMING):
        return flag is not False
    return flag is True
