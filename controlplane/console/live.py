"""The console's Live page: a tail of a workspace's model calls as they happen, filterable by
agent and run.

* `GET /console/live?ws=&agent=&run=` renders the RECENT most recent `llm.call` events of the
  workspace from the event journal (newest first), so the page is useful without JavaScript;
  static/live.js then opens an `EventSource` on the stream below and prepends each new call (at
  most MAX_ROWS rows stay in the table). With an agent filter the rows are found through
  `finance_fact_agent` (the journal has no agent index), with a run filter through
  `event_journal_run`: a filtered page stays fast on a large workspace.
* `GET /console/live/stream?ws=&agent=&run=` is a `text/event-stream`. It holds a core NATS
  subscription to the workspace's `llm.call` subject (`schemas.events.subject_for`: JetStream
  publications reach plain subscribers too) for as long as the client stays, and sends each
  matching call as one `data:` line of JSON with the display fields of `call_row` only (a
  whitelist: never keys, bodies, properties or credentials). Every KEEPALIVE_S without a call it
  sends a comment line. Each client has a bounded queue (QUEUE_SIZE): when the browser falls
  behind, the oldest calls are dropped and an `event: dropped` with `{"dropped": n}` says how many.
  At most MAX_STREAMS streams are open per control plane (then 503); an unknown workspace is a
  404. When the control plane may not subscribe (its bus permissions), an `event: unavailable`
  with `{"message": ...}` says so and the stream ends. A stream ends, and its subscription with
  it, when the client goes (seen within TICK_S) or the app shuts down (`setup` registers that).
  The console middleware already demands a session for both paths.
Read-only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Mapping
from typing import Any

import msgspec
import nats.errors
import structlog
from aiohttp import web
from nats.aio.msg import Msg

from controlplane.console.render import HEADERS, Page, render, when, workspaces
from events.ledger import bounded
from schemas.events import LlmCall, event_decoder
from schemas.money import nanos_to_decimal_str

log = structlog.get_logger(__name__)

RECENT = 50  # calls rendered by the server
MAX_ROWS = 200  # rows live.js keeps (it reads data-max-rows)
MAX_STREAMS = 50  # open streams per control plane
QUEUE_SIZE = 500  # calls held for one slow client before the oldest go
KEEPALIVE_S = 15.0
TICK_S = 1.0  # how often a stream looks whether its client is gone
RETRY_MS = 3000  # how long EventSource waits before it reconnects
FILTER_MAX = 256  # characters of an agent or run filter (ids are shorter; the journal keys 256)
# A NATS subject token: a workspace id used in a subject must not be a wildcard or span tokens.
_NOT_IN_TOKEN = frozenset(".*> \t\r\n")
_CALL_TYPE = str(LlmCall.__struct_config__.tag)  # "llm.call"


# -- what a row shows -------------------------------------------------------------------------------

def call_row(event: LlmCall) -> dict[str, Any]:
    """The display fields of one call: what the page's table shows and all that a stream sends.
    Money is the exact decimal string of `cost_nanos` (`cost`, in `currency`; `cost_usd` the same
    when the currency is USD, else None)."""
    cost = nanos_to_decimal_str(event.cost_nanos)
    return {
        "event_id": str(event.event_id),
        "request_id": event.request_id,
        "time": when(event.occurred_at),
        "agent_id": event.agent_id,
        "run_id": event.run_id,
        "provider": event.provider,
        "model": event.model,
        "status": event.status,
        "error_code": event.error_code,
        "latency_ms": round(event.latency_ms),
        "input_tokens": event.usage.input_tokens,
        "output_tokens": event.usage.output_tokens,
        "cost": cost,
        "currency": event.currency,
        "cost_usd": cost if event.currency == "USD" else None,
        "priced": event.priced,
        "cache": event.cache,
    }


def matches(event: LlmCall, workspace_id: str, agent: str, run: str) -> bool:
    """The event is a call of the workspace and passes the filters ("" : no filter)."""
    return (event.workspace_id == workspace_id and (not agent or event.agent_id == agent)
            and (not run or event.run_id == run))


def subject(prefix: str, workspace_id: str) -> str:
    """The subject the workspace's `llm.call` events go to (as `subject_for` makes it)."""
    return f"{prefix}.{workspace_id}.{_CALL_TYPE}"


def subject_token_ok(value: str) -> bool:
    return bool(value) and not (_NOT_IN_TOKEN & set(value))


def sse(data: Mapping[str, Any], event: str | None = None) -> bytes:
    """One server-sent event: an optional `event:` line and one `data:` line of JSON (JSON never
    holds a raw newline, so one line is the whole value)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def filters(query: Mapping[str, str]) -> tuple[str, str]:
    """(agent, run) from a query string: stripped, "" when absent, at most FILTER_MAX characters."""
    return (query.get("agent", "").strip()[:FILTER_MAX], query.get("run", "").strip()[:FILTER_MAX])


# -- per-client queues and the streams of one control plane -----------------------------------------

class CallQueue:
    """The rows waiting for one client, oldest first, at most `size`: a full queue drops its oldest
    row and counts it. `ready` is set while there is something to send or the queue is closed."""

    def __init__(self, size: int) -> None:
        self._rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.dropped = 0
        self.closed = False
        self.ready = asyncio.Event()

    def put(self, row: dict[str, Any]) -> None:
        if len(self._rows) == self._rows.maxlen:
            self.dropped += 1
        self._rows.append(row)
        self.ready.set()

    def take(self) -> tuple[list[dict[str, Any]], int]:
        """Every waiting row and how many were dropped since the last take; both reset."""
        rows, dropped = list(self._rows), self.dropped
        self._rows.clear()
        self.dropped = 0
        if not self.closed:
            self.ready.clear()
        return rows, dropped

    def close(self) -> None:
        self.closed = True
        self.ready.set()


class LiveStreams:
    """The streams one control plane serves: at most `limit` at once. `close` ends every one and
    refuses new ones (the app is shutting down)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.closing = False
        self._open: set[CallQueue] = set()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, size: int) -> CallQueue | None:
        """A queue for a new stream, or None when `limit` are open or the app is closing."""
        if self.closing or len(self._open) >= self.limit:
            return None
        queue = CallQueue(size)
        self._open.add(queue)
        return queue

    def release(self, queue: CallQueue) -> None:
        self._open.discard(queue)

    def close(self) -> None:
        self.closing = True
        for queue in list(self._open):
            queue.close()


STREAMS: web.AppKey[LiveStreams] = web.AppKey("console_live_streams", LiveStreams)


async def _close_streams(app: web.Application) -> None:
    app[STREAMS].close()


def setup(app: web.Application) -> None:
    """Give `app` its stream registry and end the streams when it shuts down (on_shutdown runs
    before aiohttp waits for the requests in flight, which a stream would otherwise hold open)."""
    app[STREAMS] = LiveStreams(MAX_STREAMS)
    app.on_shutdown.append(_close_streams)


# -- the page ---------------------------------------------------------------------------------------

def recent_sql(agent: str, run: str) -> tuple[str, dict[str, Any]]:
    """The statement for the RECENT newest calls of `%(ws)s` under the filters, and its extra
    parameters. The index each filter uses is in the module docstring; the full id is compared
    on the rows found (the indexes key a bounded prefix)."""
    params: dict[str, Any] = {"n": RECENT}
    where = ["j.workspace_id = %(ws)s", "j.type = 'llm.call'"]
    source = "event_journal j"
    order = "j.occurred_at DESC, j.event_id DESC"
    if run:
        where += ["left(j.body->>'run_id', 256) = left(%(run)s, 256)", "j.body->>'run_id' = %(run)s"]
        params["run"] = run
    if agent:
        where.append("j.body->>'agent_id' = %(agent)s")
        params["agent"] = agent
        if not run:
            source = "finance_fact f JOIN event_journal j ON j.event_id = f.event_id"
            where += ["f.agent_id = %(agent_b)s", "f.workspace_id = %(ws)s", "f.kind = 'llm'"]
            params["agent_b"] = bounded(agent)
            order = "f.occurred_at DESC, f.event_id DESC"
    return (f"SELECT j.body::text FROM {source} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT %(n)s",  # noqa: S608 (fixed fragments; values are parameters)
            params)


async def recent_calls(request: web.Request, workspace_id: str, agent: str, run: str) -> list[dict[str, Any]]:
    from controlplane.app import ADMIN  # the admin app module imports this package

    query, params = recent_sql(agent, run)
    async with request.app[ADMIN].pool.connection() as conn:
        cur = await conn.execute(query, {"ws": workspace_id, **params})
        bodies = [r[0] for r in await cur.fetchall()]
    rows = []
    for body in bodies:
        try:
            event = event_decoder.decode(body)
        except msgspec.ValidationError:  # journalled by a newer build: not shown
            continue
        if isinstance(event, LlmCall):
            rows.append(call_row(event))
    return rows


async def live_page(request: web.Request) -> web.StreamResponse:
    choice = await workspaces(request)
    ws = choice[1]
    agent, run = filters(request.query)
    rows = await recent_calls(request, ws, agent, run)
    return await render(request, "live.html", page="live", title="Live", workspace_choice=choice,
                        agent=agent, run=run, rows=rows, recent=RECENT, max_rows=MAX_ROWS)


# -- the stream -------------------------------------------------------------------------------------

def _refused(before: BaseException | None, after: BaseException | None, subj: str) -> bool:
    """The server refused our subscription: a new permissions error naming the subject."""
    return after is not None and after is not before and "ermissions violation" in str(after) and subj in str(after)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pump(request: web.Request, response: web.StreamResponse, queue: CallQueue) -> None:
    """Send the queue's rows as they come, a keep-alive comment when idle, until the queue is
    closed or the client goes."""
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.ready.wait(), TICK_S)
        if _client_gone(request):
            return
        rows, dropped = queue.take()
        chunks = [sse({"dropped": dropped}, "dropped")] if dropped else []
        chunks += [sse(row) for row in rows]
        if queue.closed:
            chunks.append(sse({"message": "The control plane is shutting down."}, "closing"))
        elif not chunks and loop.time() - last_write >= KEEPALIVE_S:
            chunks.append(b": keep-alive\n\n")
        if chunks:
            await response.write(b"".join(chunks))
            last_write = loop.time()
        if queue.closed:
            return


async def live_stream(request: web.Request) -> web.StreamResponse:
    from controlplane.app import ADMIN

    st = request.app[ADMIN]
    ids, ws = await workspaces(request)
    if request.query.get("ws", ws) not in ids or not subject_token_ok(ws):
        raise web.HTTPNotFound(text="No such workspace.")
    agent, run = filters(request.query)
    streams = request.app.get(STREAMS)
    nc = st.nats
    if streams is None or nc is None or nc.is_closed:
        raise web.HTTPServiceUnavailable(text="The live tail is not available on this control plane.")
    queue = streams.open(QUEUE_SIZE)
    if queue is None:
        log.warning("console_live_refused", open=len(streams), limit=streams.limit)
        raise web.HTTPServiceUnavailable(text="Too many live streams are open; try again later.")
    subj = subject(st.settings.subject_prefix, ws)

    async def on_message(msg: Msg) -> None:
        try:
            event = event_decoder.decode(msg.data)
        except msgspec.DecodeError:  # a newer build's event type, or not an event: not ours to show
            return
        if isinstance(event, LlmCall) and matches(event, ws, agent, run):
            queue.put(call_row(event))

    try:
        before = nc.last_error
        try:
            sub = await nc.subscribe(subj, cb=on_message, pending_msgs_limit=QUEUE_SIZE * 4)
        except nats.errors.Error as exc:  # the connection closed under us
            log.warning("console_live_subscribe_failed", error=type(exc).__name__)
            raise web.HTTPServiceUnavailable(text="The control plane's event bus is not connected.") from exc
        try:
            # After the server's PONG our SUB is in place (calls from now on reach us) and an
            # -ERR refusing it has been read.
            try:
                await nc.flush(timeout=2)
            except nats.errors.TimeoutError:  # reconnecting: the SUB is sent when the connection is back
                pass
            except nats.errors.Error as exc:
                raise web.HTTPServiceUnavailable(text="The control plane's event bus is not connected.") from exc
            refused = _refused(before, nc.last_error, subj)
            response = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream; charset=utf-8",
                                                   "X-Accel-Buffering": "no"})
            await response.prepare(request)
            log.info("console_live_opened", workspace=ws, agent=agent or None, run=run or None, open=len(streams))
            if refused:
                log.warning("console_live_not_permitted", subject=subj)
                await response.write(sse({"message": "The control plane may not subscribe to call events "
                                                     "(its NATS permissions); the live tail is off."},
                                         "unavailable"))
                return response
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            await _pump(request, response, queue)
        except ConnectionError:  # the client went while we wrote
            pass
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            log.info("console_live_closed", workspace=ws)
        return response
    finally:
        streams.release(queue)


PAGES: list[tuple[str, Page]] = [("/console/live", live_page), ("/console/live/stream", live_stream)]
ACTIONS: list[tuple[str, Page]] = []
