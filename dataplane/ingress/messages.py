"""`POST /v1/messages` (Anthropic Messages) and `POST /v1/messages/count_tokens`.

A Messages request is planned twice over: as its own native body (sent unchanged, and its answer
relayed unchanged, when the target provider speaks `anthropic.messages`, i.e. Anthropic and
Anthropic-compatible bases), and as a Chat Completions body for every other provider, whose Chat
answer this ingress renders back as an Anthropic message or event stream
(`messages_translate`). `anthropic-version` and `anthropic-beta` are forwarded upstream.

Auth takes `x-api-key` or `Authorization: Bearer` (`decisions.bearer_token`); errors on these
paths render in Anthropic's shape (`http.error_response` switches by path). Streams end with an
SSE comment carrying the cost (Anthropic streams have no terminator of their own), or with
`event: error` when they fail mid-way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, runtime_checkable

import structlog
from aiohttp import web

from dataplane.call import Call
from dataplane.edge import check_model
from dataplane.ingress.base import ChatPlan
from dataplane.ingress.messages_translate import (
    ChatAnswer,
    MessagesStreamRenderer,
    decode_chat,
    estimate_input_tokens,
    to_chat_request,
    to_message,
)
from dataplane.lifecycle import bearer, read_object, tool_names, upstream_call
from dataplane.providers.anthropic import NATIVE_API
from dataplane.providers.base import UpstreamCall
from dataplane.providers.registry import adapter_for
from dataplane.providers.sse import format_sse, sse_comment
from dataplane.stages.route import plan_route
from schemas.anthropic import CountTokensRequest, MessagesRequest
from schemas.errors import GatewayError, NotFound, UpstreamError, render_anthropic
from schemas.http import validate

log = structlog.get_logger(__name__)

FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")


@runtime_checkable
class TokenCounter(Protocol):
    """Optional adapter capability: an upstream token count for a native Messages body."""

    async def count_tokens_native(self, call: UpstreamCall) -> dict[str, Any]: ...


def forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's `anthropic-version` / `anthropic-beta`, for the upstream (names lower-cased)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return {name: lowered[name] for name in FORWARDED_HEADERS if lowered.get(name)}


def wants_thinking(plan: ChatPlan) -> bool:
    """Render reasoning as thinking blocks only when the client enabled thinking and did not ask
    for it to be omitted (Claude Code sends `display: "omitted"`)."""
    thinking = (plan.native_body or {}).get("thinking")
    return (isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
            and thinking.get("display") != "omitted")


def _payloads(chunk: bytes) -> list[bytes]:
    """The `data:` payloads of one or more Chat SSE events; comments and other fields skipped."""
    out: list[bytes] = []
    for event in chunk.split(b"\n\n"):
        data = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
        if data:
            out.append(b"\n".join(data))
    return out


class MessagesIngress:
    name = NATIVE_API

    def plan(self, raw: dict[str, Any], headers: Mapping[str, str]) -> ChatPlan:
        """Validate like Anthropic (model, max_tokens, messages required) and translate to Chat.
        Raises InvalidRequest (400) with `param`. `raw` becomes the native body, untouched."""
        req = validate(raw, MessagesRequest)
        return ChatPlan(model=req.model, body=to_chat_request(req), stream=bool(req.stream), include_usage=True,
                        forward_headers=forward_headers(headers), native_api=NATIVE_API, native_body=raw)

    def render(self, chat_body: bytes, plan: ChatPlan) -> bytes:
        return to_message(chat_body, thinking=wants_thinking(plan))

    async def render_stream(self, chunks: AsyncIterator[bytes], plan: ChatPlan) -> AsyncIterator[bytes]:
        """Chat chunks -> Anthropic events, one write per upstream chunk. Nothing is yielded before
        the first upstream chunk, so pre-stream failures still become plain error responses. An
        OpenAI-style `{"error": ...}` chunk raises UpstreamError."""
        renderer = MessagesStreamRenderer(thinking=wants_thinking(plan))
        last: ChatAnswer | None = None
        async for chunk in chunks:
            out: list[bytes] = []
            for payload in _payloads(chunk):
                if payload == b"[DONE]":
                    yield b"".join(out + renderer.finish(last))
                    return
                last = decode_chat(payload)
                if last.error is not None:
                    message = str(last.error.get("message") or "unknown error")[:300]
                    raise UpstreamError(f"The provider's stream failed: {message}")
                out += renderer.feed(last)
            if out:
                yield b"".join(out)
        yield b"".join(renderer.finish(last))

    def stream_end(self, cost_usd: str) -> bytes:
        # Clients ignore SSE comments; Anthropic streams end after message_stop with nothing else.
        return sse_comment(f"alephant-cost-usd {cost_usd}")

    def stream_error(self, err: GatewayError) -> bytes:
        # The Anthropic SDKs raise on `event: error` with the usual error body.
        return format_sse(render_anthropic(err), event="error")

    async def count_tokens(self, raw: dict[str, Any], adapter: object, call: UpstreamCall) -> dict[str, Any]:
        """`{"input_tokens": N}` for a count_tokens body. Adapters that can count upstream
        (`TokenCounter`, i.e. Anthropic) do; an upstream without the endpoint (404, e.g. some
        Anthropic-compatible bases) and every other provider get `estimate_input_tokens`.
        `call.body` is the native body with the upstream model id. Raises InvalidRequest / GatewayError."""
        req = validate(raw, CountTokensRequest)
        if isinstance(adapter, TokenCounter):
            try:
                return await adapter.count_tokens_native(call)
            except NotFound:
                log.info("count_tokens_upstream_missing", provider=call.provider.name)
        return {"input_tokens": estimate_input_tokens(req)}


class CountTokens:
    """`POST /v1/messages/count_tokens` as a pipeline endpoint: authenticated, checked against
    policy and resolved like a model call, but free: no limits or budget hold, and only a refusal
    is recorded (Claude Code calls it constantly)."""

    name = "anthropic.count_tokens"
    governed = False
    records_success = False

    def credential(self, request: web.Request) -> str:
        return bearer(request)

    async def intake(self, call: Call) -> None:
        await read_object(call)

    def plan(self, call: Call) -> None:
        call.requested_model = check_model(validate(call.raw, CountTokensRequest).model)
        call.tools = tool_names(call.raw)
        plan_route(call, call.requested_model)  # a router's first target counts

    def set_max_tokens(self, call: Call, value: int) -> bool:
        return True  # counting produces no output

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return True  # the count is of what the client would send; nothing is forwarded to a model

    async def dispatch(self, call: Call) -> web.StreamResponse:
        target, raw = call.target, call.raw
        assert target is not None and isinstance(raw, dict)
        upstream = upstream_call(call, {**raw, "model": target.model},
                                 headers=forward_headers(call.request.headers))
        counted = await MessagesIngress().count_tokens(raw, adapter_for(target.provider.type), upstream)
        return web.json_response(counted, headers=call.headers())
