"""OpenAI's Responses API as a native upstream (`POST {base}/responses`), for the OpenAI adapter.

When the client spoke Responses (`openai.responses`) and the provider is OpenAI itself, the
client's body goes upstream as-is and the answer comes back unchanged: the non-streamed Response
body byte-for-byte, and the named SSE events re-framed one by one (`event:` + `data:`; SSE
comments dropped). Only usage is decoded, from the body or from the terminal stream event
(`response.completed`, `response.incomplete` or `response.failed`).

One default is added: `store: false` when the client did not say. The Responses API stores
responses by default (in the operator's OpenAI account), and the gateway refuses the fields that
would use them (`previous_response_id`, ...), so storing would only keep data for nothing. A
client that sends `store` explicitly is obeyed.

Usage semantics (providers.md §1.0): `input_tokens` includes cached tokens and cache writes,
`output_tokens` includes reasoning tokens; both are already our `Usage` convention.

These are functions over the call, the URL and the headers, so the adapter wires them in with a
few lines and keeps its own URL, auth and error table. Failures raise `GatewayError` (mapped by
`map_error` for HTTP errors): before the first event from the first `__anext__`, later ones
mid-iteration. A stream that closes without a terminal event raises `UpstreamError`, unless the
upstream already sent its own `error` event.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from dataplane.providers.base import CallStats, ChatResponse, UpstreamCall
from dataplane.providers.sse import format_sse, iter_sse
from dataplane.providers.upstream import (
    ErrorMapper,
    decode_json_body,
    map_upstream_error,
    post,
    read_all,
    stream_broken,
)
from schemas.errors import InternalError, UpstreamError
from schemas.events import Usage
from schemas.responses import ResponseStreamEventHead, ResponseUsage, ResponseUsageOnly

RESPONSES_API = "openai.responses"
NATIVE_APIS = frozenset({RESPONSES_API})
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_OPENING_EVENTS = frozenset({"response.created", "response.queued", "response.in_progress"})
# Set on the UpstreamError a relayed stream fails with; see `StreamPosition`.
STREAM_POSITION = "_responses_stream_position"
_SEQUENCE_RE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')

_encoder = msgspec.json.Encoder()
_body_decoder = msgspec.json.Decoder(ResponseUsageOnly)
_event_decoder = msgspec.json.Decoder(ResponseStreamEventHead)


class _Identity(msgspec.Struct, kw_only=True):
    id: str = ""
    created_at: int = 0
    model: str = ""


class _Opening(msgspec.Struct, kw_only=True):
    response: _Identity | None = None


_opening_decoder = msgspec.json.Decoder(_Opening)


@dataclass(slots=True)
class StreamPosition:
    """Where a relayed stream stood when it failed, so the `response.failed` the gateway appends
    names the response the client saw created and continues its sequence numbers (the openai
    SDK's stream helper raises on a lifecycle event for another response id)."""

    response_id: str = ""
    created_at: int = 0
    model: str = ""
    next_sequence_number: int = 0

    def see(self, data: bytes, event_type: str) -> None:
        """Track one relayed event: its sequence number, and the response identity of the first
        opening event (decoded once per stream; deltas are only searched, not parsed)."""
        match = _SEQUENCE_RE.search(data)
        if match is not None:
            self.next_sequence_number = max(self.next_sequence_number, int(match.group(1)) + 1)
        if not self.response_id and event_type in _OPENING_EVENTS:
            try:
                identity = _opening_decoder.decode(data).response
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
            if identity is not None:
                self.response_id, self.created_at, self.model = identity.id, identity.created_at, identity.model


def _native_body(call: UpstreamCall, **extra: Any) -> bytes:
    body = call.body if "store" in call.body else {**call.body, "store": False}
    return _encoder.encode({**body, **extra} if extra else body)


def check_api(api: str) -> None:
    """Adapters call this first: the lifecycle only asks for APIs in `native_apis`."""
    if api != RESPONSES_API:
        raise InternalError(f"The OpenAI adapter does not speak '{api}' natively.")


def usage_from_responses(u: ResponseUsage) -> Usage:
    return Usage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_tokens=u.input_tokens_details.cached_tokens,
        cache_write_tokens=u.input_tokens_details.cache_write_tokens,
        reasoning_tokens=u.output_tokens_details.reasoning_tokens,
    )


async def complete(call: UpstreamCall, url: str, headers: Mapping[str, str], *,
                   map_error: ErrorMapper = map_upstream_error) -> ChatResponse:
    """POST the native body (`model` already the upstream id; `store` defaults to false); relay
    the Response body byte-for-byte."""
    resp = await post(call, url, _native_body(call), headers, map_error=map_error)
    raw = await read_all(call, resp)
    parsed = decode_json_body(call, _body_decoder, raw)
    return ChatResponse(raw, usage_from_responses(parsed.usage) if parsed.usage else None)


def _frame(data: bytes, event: str | None) -> bytes:
    if b"\n" not in data:
        return format_sse(data, event)
    head = b"event: " + event.encode() + b"\n" if event is not None else b""
    return head + b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"


def _head(data: bytes, event: str | None) -> ResponseStreamEventHead:
    """The event's type (and a terminal event's usage), decoding JSON only when the SSE name is
    missing, terminal or `error`: deltas are relayed without being parsed."""
    if event is not None and event not in TERMINAL_EVENTS and event != "error":
        return ResponseStreamEventHead(type=event)
    try:
        head = _event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ResponseStreamEventHead(type=event or "")
    return head if head.type else ResponseStreamEventHead(type=event or "", response=head.response)


async def stream(call: UpstreamCall, url: str, headers: Mapping[str, str], stats: CallStats, *,
                 map_error: ErrorMapper = map_upstream_error) -> AsyncGenerator[bytes, None]:
    """POST the native body with `stream: true`; yield the named SSE events as they arrive and
    set `stats.usage` from the terminal event, after which the generator ends."""
    resp = await post(call, url, _native_body(call, stream=True), headers, map_error=map_error)
    saw_error = False
    position = StreamPosition()
    try:
        async for event in iter_sse(resp.content):
            head = _head(event.data, event.event)
            position.see(event.data, head.type)
            yield _frame(event.data, event.event)
            if head.type == "error":
                saw_error = True
            elif head.type in TERMINAL_EVENTS:
                if head.response is not None and head.response.usage is not None:
                    stats.usage = usage_from_responses(head.response.usage)
                return
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _positioned(stream_broken(call, exc), position) from None
    finally:
        resp.release()
    if not saw_error:
        raise _positioned(UpstreamError(f"Provider '{call.provider.name}' ended the stream before "
                                        "response.completed."), position)


def _positioned(err: UpstreamError, position: StreamPosition) -> UpstreamError:
    setattr(err, STREAM_POSITION, position)
    return err
