"""Usage sniffing for the `/{provider}/*` passthrough: token counts read from a provider's *native*
response (a whole body, or a stream fed chunk by chunk as it is relayed), never modifying it.

Recognized by shape, so a provider's compatible endpoints are covered too (Ollama's and Gemini's
OpenAI-compatible APIs, Ollama's Anthropic-compatible one); `provider_type` only picks quirks:

    `usage.prompt_tokens`        OpenAI chat / embeddings and the compatible family (per-type
                                 quirks from `openai_compat.normalize_usage`; Groq `x_groq.usage`)
    `usage.input_tokens`         Anthropic (input excludes cache reads/writes; told apart by its
                                 `cache_*_input_tokens` fields or the provider type) or OpenAI
                                 Responses (input includes cache); `response.usage` in Responses
                                 stream events; `message.usage` in Anthropic `message_start`
    `usage.inputTokens`          Bedrock Converse body and ConverseStream `metadata` event
    `usageMetadata`              Gemini (the last one of a stream or JSON array wins)
    `prompt_eval_count`          Ollama native (the final `done: true` line)

Everything maps to our `Usage` (input includes cache read and write; output includes reasoning).

Cost on the relay path: a stream sniffer only looks for event/line boundaries and a cheap byte
marker per chunk; it keeps the raw bytes of the last usage-bearing event (plus Anthropic's
`message_start`) and decodes them once, when `usage` is read. Malformed input never raises:
usage is then unknown (None) and the call is recorded unpriced. Buffers are bounded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from dataplane.providers.anthropic import usage_from_anthropic
from dataplane.providers.anthropic_translate import merge_usage
from dataplane.providers.base import usage_from_openai
from dataplane.providers.eventstream import EventStreamDecoder, EventStreamError
from dataplane.providers.gemini import GeminiUsage, usage_from_gemini
from dataplane.providers.openai_compat import PROFILES, CompatProfile, normalize_usage
from dataplane.providers.sse import parse_event
from schemas.anthropic import AnthropicUsage
from schemas.events import Usage

MAX_PENDING = 16 * 1024 * 1024  # an event/line longer than this stops sniffing (the relay goes on)

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
EVENTSTREAM = "application/vnd.amazon.eventstream"
STREAM_TYPES = frozenset({SSE, NDJSON, EVENTSTREAM})

_PLAIN_OPENAI = CompatProfile(type="openai", base_url="")
_USAGE_RE = re.compile(rb'"(?:usage|usageMetadata)"\s*:\s*\{|"(?:prompt_eval_count|eval_count)"\s*:')
_MARKERS = (b'"usage', b'eval_count"')
_SSE_BOUNDARY = re.compile(rb"\r?\n\r?\n")


class UsageProbe(msgspec.Struct, kw_only=True):
    """The few top-level fields that can carry usage; everything else is skipped undecoded."""

    type: Any = None
    usage: Any = None
    usage_metadata: Any = msgspec.field(default=None, name="usageMetadata")
    prompt_eval_count: Any = None
    eval_count: Any = None
    response: Any = None
    message: Any = None
    x_groq: Any = None


_probe_decoder: msgspec.json.Decoder[UsageProbe | list[UsageProbe]] = msgspec.json.Decoder(
    UsageProbe | list[UsageProbe])


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _anthropic(u: Mapping[str, Any]) -> AnthropicUsage | None:
    try:
        return msgspec.convert(u, AnthropicUsage)
    except msgspec.ValidationError:
        return None


def usage_from_dict(u: Mapping[str, Any], provider_type: str) -> Usage | None:
    """A native `usage` object (any of the shapes in the module docstring) as our Usage; None
    when it is none of them."""
    if "prompt_tokens" in u or "completion_tokens" in u:
        return normalize_usage(PROFILES.get(provider_type, _PLAIN_OPENAI), dict(u))[0]
    if "inputTokens" in u or "outputTokens" in u:  # Bedrock: inputTokens excludes cache reads/writes
        read, write = _int(u.get("cacheReadInputTokens")), _int(u.get("cacheWriteInputTokens"))
        return Usage(input_tokens=_int(u.get("inputTokens")) + read + write, output_tokens=_int(u.get("outputTokens")),
                     cache_read_tokens=read, cache_write_tokens=write)
    if "input_tokens" in u or "output_tokens" in u:
        if provider_type == "anthropic" or "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:
            parsed = _anthropic(u)
            return usage_from_anthropic(parsed) if parsed is not None else None
        # OpenAI Responses: input includes cached tokens, output includes reasoning tokens.
        in_details, out_details = _dict(u.get("input_tokens_details")), _dict(u.get("output_tokens_details"))
        return Usage(input_tokens=_int(u.get("input_tokens")), output_tokens=_int(u.get("output_tokens")),
                     cache_read_tokens=_int(in_details.get("cached_tokens")),
                     cache_write_tokens=_int(in_details.get("cache_write_tokens")),
                     reasoning_tokens=_int(out_details.get("reasoning_tokens")))
    return None


def _gemini(meta: Mapping[str, Any]) -> Usage | None:
    try:
        parsed = msgspec.convert(meta, GeminiUsage)
    except msgspec.ValidationError:
        return None
    return usage_from_openai(usage_from_gemini(parsed))


def usage_from_probe(probe: UsageProbe, provider_type: str) -> Usage | None:
    """Usage from one decoded body, stream event or line; None when it carries none."""
    if isinstance(probe.usage_metadata, dict):
        return _gemini(probe.usage_metadata)
    if isinstance(probe.usage, dict):
        return usage_from_dict(probe.usage, provider_type)
    for inner in (probe.response, probe.message, probe.x_groq):  # Responses events, message_start, Groq
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            return usage_from_dict(inner["usage"], provider_type)
    if probe.prompt_eval_count is not None or probe.eval_count is not None:
        return Usage(input_tokens=_int(probe.prompt_eval_count), output_tokens=_int(probe.eval_count))
    return None


def _decode(raw: bytes | bytearray | memoryview) -> UsageProbe | list[UsageProbe] | None:
    try:
        return _probe_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None


def usage_from_body(raw: bytes, provider_type: str) -> Usage | None:
    """Usage of a whole JSON response body (a JSON array, as Gemini's non-SSE stream is, gives
    the last element that has usage). None when the body is not JSON or has no usage."""
    if not any(marker in raw for marker in _MARKERS):
        return None
    parsed = _decode(raw)
    probes = parsed if isinstance(parsed, list) else [parsed] if parsed is not None else []
    for probe in reversed(probes):
        usage = usage_from_probe(probe, provider_type)
        if usage is not None:
            return usage
    return None


def usage_from_headers(headers: Mapping[str, str]) -> Usage | None:
    """Bedrock InvokeModel reports counts in response headers rather than the model's body."""
    raw_in = headers.get("x-amzn-bedrock-input-token-count")
    raw_out = headers.get("x-amzn-bedrock-output-token-count")
    if raw_in is None and raw_out is None:
        return None
    try:
        return Usage(input_tokens=max(0, int(raw_in or 0)), output_tokens=max(0, int(raw_out or 0)))
    except ValueError:
        return None


# -- stream sniffers -------------------------------------------------------------------------------


class StreamSniffer(Protocol):
    """Fed every relayed chunk, in order, unchanged; `close` at the end of the stream (or when the
    relay stops early). `usage` is the usage seen so far (partial usage after a cut-off)."""

    def feed(self, chunk: bytes) -> None: ...

    def close(self) -> None: ...

    @property
    def usage(self) -> Usage | None: ...


def _has_usage(region: bytes | bytearray) -> bool:
    """Cheap first (plain substring search), exact second: a usage object or Ollama count present."""
    return (b'"usage' in region or b'eval_count"' in region) and _USAGE_RE.search(region) is not None


def _sse_data(block: bytes) -> tuple[str | None, bytes]:
    """`(event name, data)` of one SSE event block (comments skipped, `data:` lines joined)."""
    event = parse_event(block)
    return event.event, event.data


class _Framed:
    """Shared buffering: complete records (SSE events, NDJSON lines) are handed to `_records` only
    when the region that completes them holds usage (`_has_usage`); the partial tail is kept.
    Fast path: a chunk that starts on a record boundary and ends on one is never copied."""

    def __init__(self, provider_type: str) -> None:
        self.provider_type = provider_type
        self._buf = bytearray()
        self._dead = False
        self._last: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        if self._dead:
            return
        data: bytes | bytearray = chunk
        if self._buf:
            self._buf += chunk
            data = self._buf
        end = self._last_boundary(data)
        if end > 0:
            region = data[:end]  # the same object when the whole chunk is complete records
            if _has_usage(region):
                self._records(bytes(region))
            if data is self._buf:
                del self._buf[:end]
            elif end < len(data):
                self._buf += data[end:]
        elif data is not self._buf:
            self._buf += data
        if len(self._buf) > MAX_PENDING:
            self._buf.clear()
            self._dead = True

    def close(self) -> None:
        if not self._dead and self._buf:
            region = bytes(self._buf)
            self._buf.clear()
            if _has_usage(region):
                self._records(region)

    def _last_boundary(self, data: bytes | bytearray) -> int:
        """The end of the last complete record in `data`, or 0."""
        raise NotImplementedError

    def _records(self, region: bytes) -> None:
        raise NotImplementedError

    @property
    def usage(self) -> Usage | None:
        if self._last is None:
            return None
        parsed = _decode(self._last)
        return usage_from_probe(parsed, self.provider_type) if isinstance(parsed, UsageProbe) else None


class SseSniffer(_Framed):
    """SSE (`text/event-stream`): OpenAI chat and Responses, Anthropic, Gemini, compatible APIs.
    The last event with a usage object wins, except that Anthropic's `message_start` usage is
    kept apart and overlaid with the last `message_delta` usage (its counts are cumulative)."""

    def __init__(self, provider_type: str) -> None:
        super().__init__(provider_type)
        self._start: bytes | None = None

    def _last_boundary(self, data: bytes | bytearray) -> int:
        cut = max(data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n"))
        return 0 if cut < 0 else cut + (4 if data[cut:cut + 4] == b"\r\n\r\n" else 2)

    def _records(self, region: bytes) -> None:
        for block in _SSE_BOUNDARY.split(region):
            if not _USAGE_RE.search(block):
                continue
            name, data = _sse_data(block)
            if name == "message_start" or (name is None and b'"message_start"' in data[:48]):
                self._start = data
            else:
                self._last = data

    @property
    def usage(self) -> Usage | None:
        if self._start is None:
            return super().usage
        start = _decode(self._start)
        message = _dict(start.message) if isinstance(start, UsageProbe) else {}
        base = _anthropic(_dict(message.get("usage")))
        if base is None:
            return super().usage
        delta = _decode(self._last) if self._last is not None else None
        update = _anthropic(delta.usage) if isinstance(delta, UsageProbe) and isinstance(delta.usage, dict) else None
        return usage_from_anthropic(merge_usage(base, update))


class NdjsonSniffer(_Framed):
    """Newline-delimited JSON (Ollama native): the last line with counts (the `done: true` one)."""

    def _last_boundary(self, data: bytes | bytearray) -> int:
        return data.rfind(b"\n") + 1

    def _records(self, region: bytes) -> None:
        for line in region.splitlines():
            if _USAGE_RE.search(line):
                self._last = line


class EventStreamSniffer:
    """Bedrock `application/vnd.amazon.eventstream`: frames decoded incrementally (that is the only
    way to find them); only the `metadata` event's JSON payload is kept, decoded on demand."""

    def __init__(self, provider_type: str) -> None:
        self.provider_type = provider_type
        self._decoder = EventStreamDecoder()
        self._dead = False
        self._last: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        if self._dead:
            return
        try:
            messages = self._decoder.feed(chunk)
        except EventStreamError:
            self._dead = True
            return
        for message in messages:
            if message.event_type == "metadata" or (message.message_type == "event" and b'"usage"' in message.payload):
                self._last = message.payload

    def close(self) -> None:
        self._dead = True

    @property
    def usage(self) -> Usage | None:
        if self._last is None:
            return None
        parsed = _decode(self._last)
        return usage_from_probe(parsed, self.provider_type) if isinstance(parsed, UsageProbe) else None


def media_type(content_type: str | None) -> str:
    """`text/event-stream; charset=utf-8` -> `text/event-stream`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def sniffer_for(content_type: str | None, provider_type: str) -> StreamSniffer | None:
    """The sniffer for a streamed response's media type; None when usage cannot be read from it."""
    kind = media_type(content_type)
    if kind == SSE:
        return SseSniffer(provider_type)
    if kind == NDJSON:
        return NdjsonSniffer(provider_type)
    if kind == EVENTSTREAM:
        return EventStreamSniffer(provider_type)
    return None
