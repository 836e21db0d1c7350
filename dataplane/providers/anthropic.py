"""Anthropic Messages (`{base}/v1/messages`, named-event SSE), and any Anthropic-compatible base URL.

Two ways in:
    * Chat Completions (`complete` / `stream`): the Chat body is translated to a Messages body
      (`anthropic_translate.to_anthropic_request`) and the answer back to Chat, incrementally for
      streams.
    * Native (`complete_native` / `stream_native`, API "anthropic.messages"): the client's own
      Messages body is sent as it is and the answer relayed unchanged, event by event; only usage
      is read from it (the response body, or `message_start` merged with `message_delta`).

Headers: `x-api-key` (also for custom compatible base URLs), `anthropic-version` (the client's,
when forwarded in `call.extra_headers`, else 2023-06-01) and every forwarded header such as
`anthropic-beta`. Under API versions that reject sampling parameters the translated request
omits them.

Errors: non-2xx answers go through the shared table (`upstream.map_upstream_error`; Anthropic's
`{"type":"error","error":{...}}` body is read there, 529 overloaded -> 503, or 529 again for
Anthropic-API clients (`errors.anthropic_status`), retryable), with 413
kept as 413. An `event: error` in a stream raises UpstreamError: before the first yielded event
it fails the request as a whole, later it ends the client's stream with an error event.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgspec

from dataplane.providers.anthropic_translate import (
    FINISH_TO_STOP,
    STOP_TO_FINISH,
    ChatStreamTranslator,
    anthropic_usage,
    chat_usage,
    finish_reason,
    merge_usage,
    stop_reason,
    stream_error,
    to_anthropic_request,
    to_chat_completion,
    usage_from_anthropic,
)
from dataplane.providers.base import CallStats, ChatResponse, UpstreamCall
from dataplane.providers.sse import SseEvent, iter_sse
from dataplane.providers.upstream import map_upstream_error, post, provider_message, read_all, stream_broken
from schemas.anthropic import (
    STREAM_EVENT_TYPES,
    AnthropicUsage,
    Message,
    MessageDelta,
    MessageStart,
    MessageStop,
    StreamError,
    StreamEvent,
)
from schemas.errors import GatewayError, InvalidRequest, PayloadTooLarge, UpstreamError

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_VERSION",
    "FINISH_TO_STOP",
    "NATIVE_API",
    "STOP_TO_FINISH",
    "AnthropicProvider",
    "anthropic_usage",
    "chat_usage",
    "finish_reason",
    "map_anthropic_error",
    "stop_reason",
    "usage_from_anthropic",
]

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
NATIVE_API = "anthropic.messages"

# Never taken from forwarded headers: we set them, or they belong to the client's own hop.
_OWN_HEADERS = frozenset({"x-api-key", "authorization", "content-type", "content-length", "host",
                          "accept-encoding", "connection", "transfer-encoding"})

# Native streams: events decoded for usage, errors and the end (with no event name, always).
_NATIVE_WATCHED = frozenset({None, "message_start", "message_delta", "message_stop", "error"})

_json = msgspec.json.Encoder()
_message_decoder = msgspec.json.Decoder(Message)
_event_decoder: msgspec.json.Decoder[StreamEvent] = msgspec.json.Decoder(StreamEvent)


class _UsageOnly(msgspec.Struct, kw_only=True):
    usage: AnthropicUsage | None = None


class _EventType(msgspec.Struct, kw_only=True):
    type: str = ""


_usage_decoder = msgspec.json.Decoder(_UsageOnly)
_type_decoder = msgspec.json.Decoder(_EventType)


def map_anthropic_error(provider: str, status: int, raw: bytes, headers: Mapping[str, str],
                        secret: str | None) -> GatewayError:
    """The shared table, except Anthropic's 413 `request_too_large` stays a 413."""
    if status == 413:
        return PayloadTooLarge(f"Provider '{provider}' returned 413: {provider_message(raw, secret)}",
                               code="upstream_request_too_large")
    return map_upstream_error(provider, status, raw, headers, secret)


def decode_event(sse: SseEvent) -> StreamEvent | None:
    """One SSE event as a typed stream event; None for event types we do not know (Anthropic may
    add some and asks clients to ignore them). Raises msgspec errors for malformed known events."""
    name = sse.event or _type_decoder.decode(sse.data).type
    if name not in STREAM_EVENT_TYPES:
        return None
    return _event_decoder.decode(sse.data)


class AnthropicProvider:
    """Stateless; one instance serves every Anthropic provider entity."""

    native_apis = frozenset({NATIVE_API})

    # -- request building -------------------------------------------------------------------

    @staticmethod
    def _base(call: UpstreamCall) -> str:
        base = (call.provider.base_url or DEFAULT_BASE_URL).rstrip("/")
        return base.removesuffix("/v1")  # operators often paste the base with its /v1

    @staticmethod
    def _headers(call: UpstreamCall) -> dict[str, str]:
        headers = {"content-type": "application/json", "anthropic-version": DEFAULT_VERSION}
        for name, value in call.extra_headers.items():
            if name.lower() not in _OWN_HEADERS:
                headers[name.lower()] = value
        if call.api_key:
            headers["x-api-key"] = call.api_key.reveal()
        return headers

    async def _post(self, call: UpstreamCall, path: str, body: Mapping[str, Any]) -> aiohttp.ClientResponse:
        return await post(call, f"{self._base(call)}{path}", _json.encode(body), self._headers(call),
                          map_error=map_anthropic_error)

    async def _read(self, call: UpstreamCall, resp: aiohttp.ClientResponse) -> bytes:
        return await read_all(call, resp)

    def _translated(self, call: UpstreamCall, stream: bool) -> dict[str, Any]:
        version = next((v for k, v in call.extra_headers.items() if k.lower() == "anthropic-version"),
                       DEFAULT_VERSION)
        body = to_anthropic_request({**call.body, "model": call.model, "stream": stream}, api_version=version)
        if not stream:
            body.pop("stream", None)
        return body

    # -- Chat Completions -------------------------------------------------------------------

    async def complete(self, call: UpstreamCall) -> ChatResponse:
        """Non-streaming Chat completion via a Messages call. Raises GatewayError."""
        resp = await self._post(call, "/v1/messages", self._translated(call, stream=False))
        raw = await self._read(call, resp)
        try:
            message = _message_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise UpstreamError(f"Provider '{call.provider.name}' returned a body that is not a message.") from None
        body, usage = to_chat_completion(message, int(time.time()))
        return ChatResponse(_json.encode(body), usage)

    async def stream(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        """Chat SSE translated event by event; `stats.usage` stays current while it runs."""
        resp = await self._post(call, "/v1/messages", self._translated(call, stream=True))
        translator = ChatStreamTranslator(call.provider.name, int(time.time()), wants_usage=call.client_wants_usage)
        try:
            async with contextlib.aclosing(self._events(call, resp.content)) as events:
                async for event in events:
                    chunks = translator.feed(event)
                    stats.usage = translator.usage
                    for chunk in chunks:
                        yield chunk
                    if translator.done:
                        return
        finally:
            resp.release()
        raise UpstreamError(f"Provider '{call.provider.name}' ended the stream before message_stop.")

    # -- native passthrough -----------------------------------------------------------------

    async def complete_native(self, api: str, call: UpstreamCall) -> ChatResponse:
        """The client's Messages body sent unchanged; the upstream body returned unchanged."""
        self._check_api(api)
        resp = await self._post(call, "/v1/messages", call.body)
        raw = await self._read(call, resp)
        try:
            parsed = _usage_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise UpstreamError(f"Provider '{call.provider.name}' returned a body that is not valid JSON.") from None
        return ChatResponse(raw, usage_from_anthropic(parsed.usage) if parsed.usage else None)

    async def stream_native(self, api: str, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        """Upstream events relayed as they come (pings included), in Anthropic's named-SSE form;
        usage from `message_start` merged with each `message_delta`. Ends after `message_stop`."""
        self._check_api(api)
        resp = await self._post(call, "/v1/messages", call.body)
        usage = AnthropicUsage()
        try:
            async with contextlib.aclosing(self._sse(call, resp.content)) as events:
                async for sse in events:
                    # Only these carry usage, errors or the end; content deltas are relayed undecoded.
                    event = self._decode(call, sse) if sse.event in _NATIVE_WATCHED else None
                    if isinstance(event, StreamError):
                        raise stream_error(call.provider.name, event)
                    if isinstance(event, MessageStart):
                        usage = event.message.usage
                    elif isinstance(event, MessageDelta):
                        usage = merge_usage(usage, event.usage)
                    if isinstance(event, MessageStart | MessageDelta):
                        stats.usage = usage_from_anthropic(usage)
                    yield _frame(sse)
                    if isinstance(event, MessageStop):
                        return
        finally:
            resp.release()
        raise UpstreamError(f"Provider '{call.provider.name}' ended the stream before message_stop.")

    async def count_tokens_native(self, call: UpstreamCall) -> dict[str, Any]:
        """`POST {base}/v1/messages/count_tokens` with the client's body; the upstream's JSON object
        (`{"input_tokens": N}`). Raises GatewayError like any call; costs nothing upstream."""
        resp = await self._post(call, "/v1/messages/count_tokens", call.body)
        raw = await self._read(call, resp)
        try:
            parsed: Any = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            parsed = None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("input_tokens"), int):
            raise UpstreamError(f"Provider '{call.provider.name}' returned an invalid token count.")
        return parsed

    # -- stream reading ---------------------------------------------------------------------

    @staticmethod
    def _check_api(api: str) -> None:
        if api != NATIVE_API:
            raise InvalidRequest(f"The Anthropic adapter does not speak '{api}' natively.")

    @staticmethod
    async def _lines(call: UpstreamCall, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        try:
            async for line in content:
                yield line
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise stream_broken(call, exc) from None

    @staticmethod
    def _decode(call: UpstreamCall, sse: SseEvent) -> StreamEvent | None:
        try:
            return decode_event(sse)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise UpstreamError(f"Provider '{call.provider.name}' sent a malformed stream event.") from None

    async def _sse(self, call: UpstreamCall, content: aiohttp.StreamReader) -> AsyncGenerator[SseEvent, None]:
        async for sse in iter_sse(self._lines(call, content)):
            yield sse

    async def _events(self, call: UpstreamCall, content: aiohttp.StreamReader,
                      ) -> AsyncGenerator[StreamEvent, None]:
        """Typed events; event types we do not know are skipped."""
        async for sse in iter_sse(self._lines(call, content)):
            event = self._decode(call, sse)
            if event is not None:
                yield event


def _frame(sse: SseEvent) -> bytes:
    """An event back on the wire: `event:` line, one `data:` line per data line, blank line."""
    head = b"event: " + sse.event.encode() + b"\n" if sse.event is not None else b""
    return head + b"".join(b"data: " + line + b"\n" for line in sse.data.split(b"\n")) + b"\n"

