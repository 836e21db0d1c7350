"""Model calls through an ingress API (chat, responses, messages): the `ModelCall` endpoint of the
pipeline, and the dispatch pieces every endpoint shares (upstream call, priced answer, stream
relay, disconnect handling).

`ModelCall.plan` validates and translates the body to Chat Completions (`Ingress.plan`) and
resolves the model; `dispatch` sends it to the provider adapter (natively when the adapter speaks
the client's API), then renders the answer in the client's format, prices it and relays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web

from dataplane.attempts import open_upstream
from dataplane.cache import ChunkAccumulator, Entry, replay_body, replay_chunks
from dataplane.call import Call
from dataplane.decisions import bearer_token
from dataplane.edge import check_model
from dataplane.ingress.base import ChatPlan, Ingress
from dataplane.key_mask import mask, secrets_of
from dataplane.limits import STREAM_SLOTS, body_within
from dataplane.output_fit import fit_call_output
from dataplane.pipeline import emit_once
from dataplane.providers.base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    CallStats,
    ChatProvider,
    ChatResponse,
    NativeProvider,
    UpstreamCall,
)
from dataplane.providers.registry import adapter_for
from dataplane.stages.cache import store_answer
from dataplane.stages.governance import input_bound
from dataplane.stages.route import plan_route
from dataplane.usage_estimate import RelayTap
from schemas.entities import Provider, Timeouts
from schemas.errors import BudgetExceeded, GatewayError, InvalidRequest, UpstreamError
from schemas.events import Usage
from schemas.http import decode_json, read_body
from schemas.money import nanos_to_decimal_str
from schemas.prompts import PROMPT_APIS, apply_prompt

log = structlog.get_logger(__name__)

# Events beyond `max_tokens` a stream may relay before it counts as past its hold: role, finish,
# usage and keep-alive events carry no output tokens.
STREAM_EVENT_SLACK = 16

NO_TIMEOUTS = Timeouts()

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def bearer(request: web.Request) -> str:
    """The credential of the `/v1` APIs: `Authorization: Bearer`, or `x-api-key` (Anthropic clients)."""
    return bearer_token(request.headers.get("Authorization"), request.headers.get("x-api-key"))


async def read_object(call: Call) -> None:
    """Intake for JSON APIs: the body within the size limit and read timeout, decoded; 400 unless
    it is a JSON object."""
    settings = call.worker.settings
    call.body_bytes = await body_within(call.request, read_body(call.request, settings.max_body_bytes),
                                        settings.body_read_timeout_s)
    raw = decode_json(call.body_bytes)
    if not isinstance(raw, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    call.raw = raw


def tool_names(*bodies: dict[str, Any] | None) -> tuple[str, ...]:
    """The names of the tools a request offers the model, in any of the three APIs' shapes (Chat
    `{"function": {"name"}}`, Responses and Messages `{"name"}`, built-ins by their `type`)."""
    names: list[str] = []
    for body in bodies:
        tools = body.get("tools") if body else None
        if not isinstance(tools, list):
            continue
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            fn = tool.get("function")
            name = tool.get("name") or (fn.get("name") if isinstance(fn, dict) else None) or tool.get("type")
            if isinstance(name, str) and name not in names:
                names.append(name)
    return tuple(names)


def _drop_tools(body: dict[str, Any] | None, names: tuple[str, ...]) -> None:
    if not body or not isinstance(body.get("tools"), list):
        return
    kept = [t for t in body["tools"] if not (isinstance(t, dict) and tool_names({"tools": [t]})[:1] and
                                              tool_names({"tools": [t]})[0] in names)]
    if kept:
        body["tools"] = kept
    else:
        body.pop("tools", None)
        body.pop("tool_choice", None)
        body.pop("parallel_tool_calls", None)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class ModelCall:
    """The pipeline endpoint of one ingress API (see the module docstring)."""

    governed = True
    records_success = True

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.name = ingress.name

    def credential(self, request: web.Request) -> str:
        return bearer(request)

    async def intake(self, call: Call) -> None:
        await read_object(call)

    def plan(self, call: Call) -> None:
        added = 0
        if self.name in PROMPT_APIS and isinstance(call.raw.get("prompt"), dict):
            # Rendered before validation, so policy, limits and budget holds see the whole request.
            applied = apply_prompt(call.snap, call.vk.workspace_id, call.raw, self.name)
            call.raw, added = applied.body, applied.added_bytes
            call.prompt_id, call.prompt_version = applied.template.name, applied.template.version
        plan = call.plan = self.ingress.plan(call.raw, call.request.headers)
        call.requested_model, call.stream = check_model(plan.model), plan.stream
        call.tools = tool_names(plan.body, plan.native_body)
        body, native = plan.body, plan.native_body or {}
        call.max_tokens = (_int_or_none(body.get("max_completion_tokens")) or _int_or_none(body.get("max_tokens"))
                           or _int_or_none(native.get("max_tokens")) or _int_or_none(native.get("max_output_tokens")))
        call.input_bound = input_bound(len(call.body_bytes) + added)
        plan_route(call, plan.model)

    def set_max_tokens(self, call: Call, value: int) -> bool:
        plan = call.plan
        if plan is None:
            return False
        body = plan.body
        body["max_tokens" if "max_tokens" in body and "max_completion_tokens" not in body
             else "max_completion_tokens"] = value
        if plan.native_body is not None:
            plan.native_body["max_tokens" if plan.native_api == "anthropic.messages" else "max_output_tokens"] = value
        return True

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        if call.plan is None:
            return False
        _drop_tools(call.plan.body, names)
        _drop_tools(call.plan.native_body, names)
        call.tools = tool_names(call.plan.body, call.plan.native_body)
        return True

    async def dispatch(self, call: Call) -> web.StreamResponse:
        plan = call.plan
        assert plan is not None  # set by plan()
        if call.stream:
            slots = call.request.app.get(STREAM_SLOTS)  # absent only in unit-test apps: uncapped there
            if slots is not None:
                call.held.enter_context(slots.hold(call.vk.id))
        opened = await open_upstream(call, lambda: self._open(call, plan))
        if opened.stream is not None:
            resp = await _relay_stream(call, self.ingress, opened.stream, opened.body, opened.secrets)
            if call.cache_fold is not None:
                store_answer(call, call.cache_fold.completion())
            return resp
        result = opened.result
        assert result is not None
        body_out = result.body if opened.native else self.ingress.render(result.body, plan)
        body_out = mask(body_out, opened.secrets)
        if result.usage is None:  # a provider that reports no usage is still billed, by estimate
            tap = RelayTap()
            tap.feed(body_out)
            call.settle_usage(None, opened.body, tap)
        else:
            call.usage = result.usage
        note_disconnect(call.request, call)
        resp = priced_json(call, body_out)
        if call.cache_plan is not None and not opened.native:
            store_answer(call, mask(result.body, opened.secrets))
        return resp

    async def replay(self, call: Call, entry: Entry) -> web.StreamResponse:
        """Answer from a cached entry in this ingress's format, streamed or not, with zero usage."""
        plan = call.plan
        assert plan is not None
        if not call.stream:
            call.usage = Usage()
            return priced_json(call, self.ingress.render(replay_body(entry), plan))
        chunks = replay_chunks(entry, with_usage=plan.include_usage or self.name != "chat.completions")
        events = self.ingress.render_stream(chunks, plan)
        first = await anext(events)
        call.ttfb_ms = round((time.perf_counter() - call.started) * 1000, 3)
        return await _relay_stream(call, self.ingress, OpenStream(first=first, events=events, chunks=chunks,
                                                                  stats=CallStats(usage=Usage())),
                                   plan.body, ())

    async def _open(self, call: Call, plan: ChatPlan) -> Opened:
        """One attempt: the call's current target (`call.target`), up to its first byte: the whole
        answer of a non-streamed call, the first event of a stream."""
        target = call.target
        assert target is not None  # set by the route stage
        adapter = adapter_for(target.provider.type)
        # A call the cache keeps is translated: its answer is stored once, in the Chat shape.
        native = _native_route(adapter, plan, target.provider) if call.cache_plan is None else None
        body = plan.native_body if native and plan.native_body is not None else plan.body
        if len(call.order) > 1:  # each target fits its own copy of the planned body
            body = dict(body)
        body["model"] = target.model
        if native is None:  # a translated (or plain Chat) body: fit its output bound to the model
            fit_call_output(call, body)
        # Client API headers (anthropic-version/-beta) only mean something to that API itself.
        upstream = upstream_call(call, body, include_usage=plan.include_usage,
                                 headers=plan.forward_headers if native else None)
        # Whatever a provider echoes, its key must not reach the client (native and translated alike).
        secrets = secrets_of(target.provider.type, upstream.api_key.reveal() if upstream.api_key else None)
        if not call.stream:
            result = await (native[0].complete_native(native[1], upstream) if native is not None
                            else adapter.complete(upstream))
            return Opened(body=body, secrets=secrets, native=native is not None, result=result)
        stats = CallStats()
        events: AsyncIterator[bytes]
        if native is not None:
            chunks = native[0].stream_native(native[1], upstream, stats)
            events = chunks
        else:
            chunks = adapter.stream(upstream, stats)
            if call.cache_plan is not None:
                call.cache_fold = ChunkAccumulator()
                chunks = _folded(chunks, call.cache_fold)
            events = self.ingress.render_stream(chunks, plan)
        # Upstream errors before the first byte become ordinary JSON errors (or the next target).
        first = mask(await anext(events), secrets)
        call.ttfb_ms = round((time.perf_counter() - call.started) * 1000, 3)
        return Opened(body=body, secrets=secrets, native=native is not None,
                      stream=OpenStream(first=first, events=events, chunks=chunks, stats=stats))


async def _folded(chunks: AsyncGenerator[bytes, None], fold: ChunkAccumulator) -> AsyncGenerator[bytes, None]:
    """The adapter's chunks, each also folded into `fold` (for the cache)."""
    try:
        async for chunk in chunks:
            fold.feed(chunk)
            yield chunk
    finally:
        await chunks.aclose()


@dataclass(slots=True)
class OpenStream:
    """A stream whose first event arrived: the rest is the relay's."""

    first: bytes
    events: AsyncIterator[bytes]  # the client's format
    chunks: AsyncGenerator[bytes, None]  # the adapter's generator (closed to cancel the upstream)
    stats: CallStats


@dataclass(slots=True)
class Opened:
    """What one successful attempt opened: the body sent, the secrets to mask, whether the answer
    is already in the client's API (native), and the answer or its stream."""

    body: dict[str, Any]
    secrets: tuple[bytes, ...]
    native: bool
    result: ChatResponse | None = None
    stream: OpenStream | None = None


def upstream_call(call: Call, body: dict[str, Any], *, include_usage: bool = False,
                  headers: dict[str, str] | None = None) -> UpstreamCall:
    """The dispatch for the call's target: the credential the route stage chose (decrypted), the
    shared session and the upstream timeout."""
    target, worker = call.target, call.worker
    assert target is not None  # set by plan()
    timeouts = call.route.timeouts if call.route is not None else NO_TIMEOUTS
    return UpstreamCall(
        provider=target.provider,
        model=target.model,
        body=body,
        api_key=worker.provider_key(call.provider_key.ciphertext),
        session=worker.session,
        timeout_s=timeouts.idle_s or worker.settings.upstream_timeout_s,
        connect_timeout_s=timeouts.connect_s or DEFAULT_CONNECT_TIMEOUT_S,
        client_wants_usage=include_usage,
        extra_headers=headers or {},
    )


def priced_json(call: Call, body: bytes) -> web.Response:
    """A non-streamed answer with the cost header; prices the call first."""
    call.price()
    headers = call.headers()
    headers["Alephant-Cost-Usd"] = nanos_to_decimal_str(call.cost_nanos)
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


def client_gone(request: web.Request) -> bool:
    """Whether the client's connection is closed or closing. aiohttp (without
    `handler_cancellation`, our setting) keeps running a handler whose client left; this is how
    the handler notices before it answers."""
    transport = request.transport
    return transport is None or transport.is_closing()


def mark_disconnected(call: Call) -> None:
    """The one way a call whose client left is recorded: 499 `client_disconnected`, partial."""
    call.status, call.error_code, call.partial = 499, "client_disconnected", True


def note_disconnect(request: web.Request, call: Call) -> None:
    """Before answering a non-streamed call: a client already gone makes it a 499 partial call
    (with the usage the upstream reported: it did the work), not a 200 nobody received."""
    if client_gone(request):
        mark_disconnected(call)


async def _relay_stream(call: Call, ingress: Ingress, opened: OpenStream, sent_body: dict[str, Any],
                        secrets: tuple[bytes, ...]) -> web.StreamResponse:
    """Relay `events` (the client's format, each one complete) as SSE, with `secrets` masked in
    each; `chunks` is the adapter's generator, closed on client disconnect so the upstream request
    is cancelled. Usage the provider did not report (cut, timed out, never sent) is estimated from
    `sent_body` and the bytes relayed."""
    request, first, events, chunks, stats = call.request, opened.first, opened.events, opened.chunks, opened.stats
    resp = web.StreamResponse(headers={**SSE_HEADERS, **call.headers()})
    tap = call.relay_tap = RelayTap()
    # A stream under a budget hold is cut once it has clearly passed `max_tokens` (a provider that
    # ignores it): counted in events, which carry at least one token each on token-per-chunk APIs.
    cutoff = call.max_tokens + STREAM_EVENT_SLACK if call.hold_nanos and call.max_tokens else None
    try:
        await resp.prepare(request)  # raises ConnectionResetError if the client already left
        await resp.write(first)
        tap.feed(first)
        await _relay_events(call, resp, events, tap, secrets, cutoff)
        call.settle_usage(stats.usage, sent_body, tap)
        end = ingress.stream_end(nanos_to_decimal_str(call.cost_nanos))
    except GatewayError as err:
        call.status, call.error_code, call.partial = err.status, err.code, True
        if isinstance(err, BudgetExceeded) or err.code == "upstream_timeout":
            await chunks.aclose()  # stop the upstream generating what nobody pays for
        call.settle_usage(stats.usage, sent_body, tap)
        end = ingress.stream_error(err)
    except OSError:  # ConnectionResetError included
        # The client went away: stop reading upstream and record what was consumed.
        mark_disconnected(call)
        call.settle_usage(stats.usage, sent_body, tap)
        await chunks.aclose()
        return resp
    except asyncio.CancelledError:  # worker shutdown: still bill what was relayed
        mark_disconnected(call)
        call.settle_usage(stats.usage, sent_body, tap)
        raise
    emit_once(call)
    # The stream's last event and its end in one write. Everything is settled: a client that left
    # now has received everything it paid for but the closing marker.
    with contextlib.suppress(OSError):
        await resp.write_eof(end)
    return resp


async def _relay_events(call: Call, resp: web.StreamResponse, events: AsyncIterator[bytes], tap: RelayTap,
                        secrets: tuple[bytes, ...], cutoff: int | None) -> None:
    """Relay the stream's events after the first, within the call's deadline (a 504
    `upstream_timeout` past it), cut off once past `cutoff` events (its budget hold)."""
    relayed = 1
    remaining = None if call.deadline is None else call.deadline - time.perf_counter()
    try:
        async with asyncio.timeout(remaining):
            async for event in events:
                event = mask(event, secrets)  # inline, not a generator around `events`: a hop per event
                await resp.write(event)
                tap.feed(event)
                relayed += 1
                if cutoff is not None and relayed > cutoff:
                    raise BudgetExceeded(f"The stream passed its budget hold ({call.max_tokens} output tokens) and "
                                         "was cut off; what was relayed is billed.")
    except TimeoutError:
        if remaining is None:
            raise
        total = call.deadline - call.started if call.deadline is not None else remaining
        raise UpstreamError(f"The call passed its total timeout ({total:.3g} s); the stream was cut off and "
                            "what was relayed is billed.", status=504,
                            code="upstream_timeout", upstream_status=0) from None
