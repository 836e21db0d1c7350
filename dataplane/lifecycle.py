"""The request lifecycle every model-call ingress shares.

Order: readiness -> authenticate -> agent context -> body intake (limit, then decode) -> the
ingress's plan (validate + translate to Chat Completions) -> resolve model -> adapter dispatch ->
price -> render in the ingress's format -> emit `llm.call` (off the request path, always, success
or failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web

from dataplane.decisions import AgentContext, Target, agent_context, authenticate, bearer_token, resolve_model
from dataplane.edge import check_model
from dataplane.ingress.base import ChatPlan, Ingress
from dataplane.key_mask import mask, secrets_of
from dataplane.limits import STREAM_SLOTS, body_within
from dataplane.pricing import MAX_CALL_COST_NANOS, bounded_usage, call_cost_nanos
from dataplane.providers.base import CallStats, ChatProvider, NativeProvider, UpstreamCall
from dataplane.providers.registry import adapter_for
from dataplane.state import WORKER, WorkerState
from dataplane.usage_estimate import RelayTap, estimate
from schemas.entities import Provider, VirtualKey
from schemas.errors import GatewayError, InvalidRequest, InvalidValue, UpstreamError
from schemas.events import LlmCall, Usage
from schemas.http import REQUEST_ID, client_fault, decode_json, read_body
from schemas.ids import uuid7
from schemas.money import nanos_to_decimal_str
from schemas.snapshot import Snapshot

log = structlog.get_logger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()


@dataclass(slots=True)
class CallRecord:
    """Facts gathered while serving one call, turned into the `llm.call` event at the end."""

    snap: Snapshot
    vk: VirtualKey
    ctx: AgentContext
    started: float
    target: Target | None = None
    requested_model: str = ""
    stream: bool = False
    status: int = 200
    error_code: str | None = None
    usage: Usage | None = None
    cost_nanos: int = 0
    priced: bool = True
    ttfb_ms: float | None = None
    partial: bool = False
    ingress: str = "chat.completions"
    anomalies: tuple[str, ...] = ()  # see LlmCall.anomalies
    usage_estimated: bool = False
    emitted: bool = False
    bounded_to: Usage | None = None  # the usage `_bound_usage` last checked (see there)

    def flag(self, anomaly: str) -> None:
        if anomaly not in self.anomalies:
            self.anomalies = (*self.anomalies, anomaly)

    def _bound_usage(self) -> None:
        # Every path that records usage (chat, native, passthrough sniffer, embeddings, estimates)
        # passes here, via price() and again in event(): impossible counts never reach the ledger.
        # `bounded_to` remembers the last usage checked, so the second pass is one identity test.
        usage = self.usage
        if usage is None or usage is self.bounded_to:
            return
        bounded = bounded_usage(usage)
        if bounded is not None:
            self.usage = usage = bounded
            self.flag("usage_clamped")
        self.bounded_to = usage

    def settle_usage(self, reported: Usage | None, request_body: Any, tap: RelayTap) -> None:
        """Record `reported` usage, or an estimate when it is missing (`usage_estimate.estimate`,
        which tokenizes only then), and price it."""
        estimated = estimate(reported, request_body, tap, partial=self.partial)
        self.usage, self.usage_estimated = (reported, False) if estimated is None else (estimated, True)
        self.price()

    def price(self) -> None:
        self._bound_usage()
        if self.usage is not None and self.target is not None:
            self.cost_nanos, self.priced = call_cost_nanos(self.snap.prices, self.target.provider,
                                                          self.target.model, self.usage)
            if self.cost_nanos >= MAX_CALL_COST_NANOS:
                self.flag("cost_clamped")

    def event(self) -> LlmCall:
        self._bound_usage()
        provider = self.target.provider.name if self.target else self.requested_model.partition("/")[0]
        model = self.target.model if self.target else self.requested_model
        return LlmCall(
            event_id=uuid7(),
            occurred_at=dt.datetime.now(dt.UTC),
            workspace_id=self.vk.workspace_id,
            agent_id=self.ctx.agent_id,
            run_id=self.ctx.run_id,
            session_id=self.ctx.session_id,
            workflow_id=self.ctx.workflow_id,
            request_id=self.ctx.request_id,
            snapshot_revision=self.snap.revision,
            provider=provider,
            model=model,
            ingress=self.ingress,
            stream=self.stream,
            status=self.status,
            error_code=self.error_code,
            usage=self.usage or Usage(),
            cost_nanos=self.cost_nanos,
            priced=self.priced,
            key_id=self.vk.id,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            ttfb_ms=self.ttfb_ms,
            partial=self.partial,
            anomalies=self.anomalies,
            usage_estimated=self.usage_estimated,
        )

    def headers(self) -> dict[str, str]:
        h = {"Alephant-Request-Id": self.ctx.request_id, "Alephant-Cache": "miss"}
        if self.target is not None:
            h["Alephant-Provider"] = self.target.provider.name
        return h


def begin(request: web.Request, worker: WorkerState) -> CallRecord:
    """Readiness, authentication and agent context: what every ingress does first."""
    store = worker.store
    if not store.ready.is_set():
        raise UpstreamError("The gateway is starting and has not loaded its configuration yet.",
                            status=503, code="not_ready")
    snap = store.pin(time.time())  # 503 config_stale while stale under ALEPHANT_STALE_POLICY=refuse
    key = bearer_token(request.headers.get("Authorization"), request.headers.get("x-api-key"))
    vk = authenticate(snap, key, worker.keyring.hash_key)
    ctx = agent_context(request.headers, vk, new_request_id)
    request[REQUEST_ID] = ctx.request_id
    return CallRecord(snap=snap, vk=vk, ctx=ctx, started=time.perf_counter())


def upstream_call(worker: WorkerState, target: Target, body: dict[str, Any], *, include_usage: bool = False,
                  headers: dict[str, str] | None = None) -> UpstreamCall:
    """The dispatch for `target`: its decrypted key, the shared session and the upstream timeout."""
    return UpstreamCall(
        provider=target.provider,
        model=target.model,
        body=body,
        api_key=worker.provider_key(target.provider.api_key_enc),
        session=worker.session,
        timeout_s=worker.settings.upstream_timeout_s,
        client_wants_usage=include_usage,
        extra_headers=headers or {},
    )


@contextlib.contextmanager
def recorded(worker: WorkerState, rec: CallRecord) -> Iterator[None]:
    """Around a handler's work: a GatewayError is noted on the record and re-raised (the error
    middleware renders it), and exactly one `llm.call` event is emitted whatever happens, except
    for InvalidValue: a client string refused at the edge is never recorded."""
    emit = True
    try:
        yield
    except InvalidValue:
        emit = False
        raise
    except GatewayError as err:
        rec.status, rec.error_code = err.status, err.code
        raise
    except Exception as exc:
        # Rendered by the error middleware as this 4xx (a client fault) or a 500: record the same.
        fault = client_fault(exc)
        rec.status, rec.error_code = (fault.status, fault.code) if fault else (500, "internal_error")
        raise
    finally:
        if emit:
            emit_once(worker, rec)


def emit_once(worker: WorkerState, rec: CallRecord) -> None:
    """Emit the call's `llm.call` unless it already was. Streams call it before their last write
    (`write_eof`), so the event is spooled before the client can see the answer complete: a
    worker killed right after a client got its answer never loses the call."""
    if not rec.emitted:
        rec.emitted = True
        worker.publisher.emit(rec.event())


def priced_json(rec: CallRecord, body: bytes) -> web.Response:
    """A non-streamed answer with the cost header; prices the record first."""
    rec.price()
    headers = rec.headers()
    headers["Alephant-Cost-Usd"] = nanos_to_decimal_str(rec.cost_nanos)
    return web.Response(body=body, content_type="application/json", headers=headers)


def _native_route(adapter: ChatProvider, plan: ChatPlan, provider: Provider) -> tuple[NativeProvider, str] | None:
    """The adapter and API to pass the client's own body to, when the adapter speaks the client's
    API natively and the operator has not turned passthrough off for this provider."""
    # A plain attribute read: isinstance() on a runtime-checkable Protocol costs ~4% of a request.
    if plan.native_api is None or plan.native_api not in getattr(adapter, "native_apis", ()):
        return None
    if provider.options.get("passthrough") == "off":
        return None
    return cast(NativeProvider, adapter), plan.native_api


async def serve(request: web.Request, ingress: Ingress) -> web.StreamResponse:
    """The whole lifecycle for one model call through `ingress`. Always emits one `llm.call`."""
    worker = request.app[WORKER]
    rec = begin(request, worker)
    rec.ingress = ingress.name
    with recorded(worker, rec):
        raw = decode_json(await body_within(request, read_body(request, worker.settings.max_body_bytes),
                                            worker.settings.body_read_timeout_s))
        if not isinstance(raw, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        plan = ingress.plan(raw, request.headers)
        rec.requested_model, rec.stream = check_model(plan.model), plan.stream
        rec.target = resolve_model(rec.snap, rec.vk.workspace_id, plan.model)
        adapter = adapter_for(rec.target.provider.type)
        native = _native_route(adapter, plan, rec.target.provider)
        body = plan.native_body if native and plan.native_body is not None else plan.body
        body["model"] = rec.target.model
        # Client API headers (anthropic-version/-beta) only mean something to that API itself.
        call = upstream_call(worker, rec.target, body, include_usage=plan.include_usage,
                             headers=plan.forward_headers if native else None)
        # Whatever a provider echoes, its key must not reach the client (native and translated alike).
        secrets = secrets_of(rec.target.provider.type, call.api_key.reveal() if call.api_key else None)
        if rec.stream:
            slots = request.app.get(STREAM_SLOTS)  # absent only in unit-test apps: uncapped there
            with slots.hold(rec.vk.id) if slots is not None else contextlib.nullcontext():
                stats = CallStats()
                if native is not None:
                    events = native[0].stream_native(native[1], call, stats)
                    return await _relay_stream(request, rec, ingress, events, events, stats, body, secrets)
                chunks = adapter.stream(call, stats)
                return await _relay_stream(request, rec, ingress, ingress.render_stream(chunks, plan), chunks,
                                           stats, body, secrets)
        if native is not None:
            result = await native[0].complete_native(native[1], call)
            body_out = result.body
        else:
            result = await adapter.complete(call)
            body_out = ingress.render(result.body, plan)
        body_out = mask(body_out, secrets)
        if result.usage is None:  # a provider that reports no usage is still billed, by estimate
            tap = RelayTap()
            tap.feed(body_out)
            rec.settle_usage(None, body, tap)
        else:
            rec.usage = result.usage
        note_disconnect(request, rec)
        return priced_json(rec, body_out)


def client_gone(request: web.Request) -> bool:
    """Whether the client's connection is closed or closing. aiohttp (without
    `handler_cancellation`, our setting) keeps running a handler whose client left; this is how
    the handler notices before it answers."""
    transport = request.transport
    return transport is None or transport.is_closing()


def mark_disconnected(rec: CallRecord) -> None:
    """The one way a call whose client left is recorded: 499 `client_disconnected`, partial."""
    rec.status, rec.error_code, rec.partial = 499, "client_disconnected", True


def note_disconnect(request: web.Request, rec: CallRecord) -> None:
    """Before answering a non-streamed call: a client already gone makes it a 499 partial call
    (with the usage the upstream reported: it did the work), not a 200 nobody received."""
    if client_gone(request):
        mark_disconnected(rec)


async def _relay_stream(request: web.Request, rec: CallRecord, ingress: Ingress, events: AsyncIterator[bytes],
                        chunks: AsyncGenerator[bytes, None], stats: CallStats,
                        sent_body: dict[str, Any], secrets: tuple[bytes, ...]) -> web.StreamResponse:
    """Relay `events` (the client's format, each one complete) as SSE, with `secrets` masked in
    each; `chunks` is the adapter's generator, closed on client disconnect so the upstream request
    is cancelled. Usage the provider did not report (cut, timed out, never sent) is estimated from
    `sent_body` and the bytes relayed."""
    # Upstream errors before the first byte become ordinary JSON errors.
    first = mask(await anext(events), secrets)
    rec.ttfb_ms = round((time.perf_counter() - rec.started) * 1000, 3)
    resp = web.StreamResponse(headers={**SSE_HEADERS, **rec.headers()})
    tap = RelayTap()
    try:
        await resp.prepare(request)  # raises ConnectionResetError if the client already left
        await resp.write(first)
        tap.feed(first)
        async for event in events:
            event = mask(event, secrets)  # inline, not a generator around `events`: a hop per event
            await resp.write(event)
            tap.feed(event)
        rec.settle_usage(stats.usage, sent_body, tap)
        await resp.write(ingress.stream_end(nanos_to_decimal_str(rec.cost_nanos)))
    except GatewayError as err:
        rec.status, rec.error_code, rec.partial = err.status, err.code, True
        rec.settle_usage(stats.usage, sent_body, tap)
        with contextlib.suppress(OSError):  # the client may be gone too: nothing left to tell it
            await resp.write(ingress.stream_error(err))
    except OSError:  # ConnectionResetError included
        # The client went away: stop reading upstream and record what was consumed.
        mark_disconnected(rec)
        rec.settle_usage(stats.usage, sent_body, tap)
        await chunks.aclose()
        return resp
    except asyncio.CancelledError:  # worker shutdown: still bill what was relayed
        mark_disconnected(rec)
        rec.settle_usage(stats.usage, sent_body, tap)
        raise
    emit_once(request.app[WORKER], rec)
    with contextlib.suppress(OSError):
        await resp.write_eof()
    return resp
