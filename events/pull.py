"""`BatchPuller`: fetch batches from a durable JetStream pull consumer, for the projectors.

nats-py's `PullSubscription.fetch` waits for each message of a batch with its own
`asyncio.wait_for` (a timer and a task switch per message), which cost the projector about as much
CPU per event as folding it into Postgres. Here every message of a pull request lands in one
subscription callback that appends it to the batch, and the caller is woken once, when the batch
is full or the server ends the request with a status message (404 no messages, 408 request
timeout). Messages are nats-py `Msg`s as `fetch` returns them (`ack`, `nak`, `metadata`).

`prefetch` sends the next request before the caller folds the batch it has, so the messages
travel and are parsed while Postgres works. A fetch first asks for what is there now
(`no_wait`); when nothing is, it long-polls for one
message (`expires`), then takes what else is there: an idle projector waits in the server, a busy
one gets full batches at once. A message that arrives after its request was given up (a late
delivery) joins the next batch; its ack still works, and folding is idempotent anyway.
"""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, Header, StatusCode
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

# Statuses that end a pull request: no messages (no_wait), request expired, or the request was
# cut short (e.g. the consumer was deleted or its max bytes/waiting reached).
_END = {StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT, "409"}


class BatchPuller:
    """One durable pull consumer, one inbox subscription. `start()` creates the consumer if it
    does not exist (`config` is used only then) and subscribes; `fetch()` returns a batch or
    raises TimeoutError when nothing came within `timeout`; `close()` unsubscribes."""

    def __init__(self, nc: NATS, js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
        assert config.durable_name, "a durable consumer"
        self._nc, self._js, self._stream, self._config = nc, js, stream, config
        self._name = config.durable_name
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{self._name}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._batch: list[Msg] = []
        self._wanted = 0
        self._done: asyncio.Future[None] | None = None  # the request in flight, if any

    async def start(self) -> None:
        try:
            await self._js.consumer_info(self._stream, self._name)
        except NotFoundError:
            await self._js.add_consumer(self._stream, config=self._config)
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(Header.STATUS) if msg.headers else None
        if status is None:
            self._batch.append(msg)
            if len(self._batch) >= self._wanted:
                self._wake()
        elif status in _END:
            self._wake()
        # (100: an idle heartbeat or flow control; not requested here, ignored)

    def _wake(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _send(self, batch: int, timeout: float, *, no_wait: bool) -> asyncio.Future[None]:
        """Ask for up to `batch` more messages; the future resolves when the buffer holds them
        or the server ended the request."""
        self._wanted = len(self._batch) + batch
        self._done = done = asyncio.get_running_loop().create_future()
        body: dict[str, object] = {"batch": batch}
        if no_wait:
            body["no_wait"] = True
        else:
            body["expires"] = int(timeout * 1e9)
        await self._nc.publish(self._next_subject, json.dumps(body).encode(), reply=self._inbox)
        return done

    async def _request(self, batch: int, timeout: float, *, no_wait: bool) -> None:
        await self._wait(await self._send(batch, timeout, no_wait=no_wait), timeout)

    async def _wait(self, done: asyncio.Future[None], timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout + 1.0):  # the server's own expiry comes first
                await done
        except TimeoutError:
            pass
        finally:
            if self._done is done:
                self._done = None

    async def prefetch(self, batch: int) -> None:
        """Ask for the next batch now (no wait), so it arrives while the caller folds this one;
        the next `fetch` collects it."""
        if self._done is None and len(self._batch) < batch:
            await self._send(batch - len(self._batch), 1.0, no_wait=True)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        if self._sub is None:
            raise RuntimeError("BatchPuller.start() first")
        if self._done is not None:  # a prefetch in flight
            await self._wait(self._done, timeout)
        if len(self._batch) < batch:
            await self._request(batch - len(self._batch), timeout, no_wait=True)
        if not self._batch:
            await self._request(1, timeout, no_wait=False)
            if self._batch and len(self._batch) < batch:
                await self._request(batch - len(self._batch), timeout, no_wait=True)
        if not self._batch:
            raise TimeoutError
        out, self._batch = self._batch[:batch], self._batch[batch:]
        return out
