"""OpenAI (and any OpenAI-compatible base URL): Chat Completions and Embeddings over HTTPS + SSE.

Non-streaming bodies are relayed byte-for-byte; only usage is decoded. Streams are relayed event
by event. The gateway always asks for `stream_options.include_usage` so every streamed call can
be priced, and drops the usage-only chunk again when the client did not ask for it.

One instance serves one provider type. Plain `openai` stays on the raw-bytes fast path (no
per-chunk JSON decoding). The OpenAI-compatible family (`groq`, `mistral`, ... see
`openai_compat.PROFILES`) goes through that module's quirk handlers, which decode each chunk and
re-encode only what they change.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import msgspec

from dataplane.providers import openai_responses
from dataplane.providers.base import SSE_DONE, CallStats, ChatResponse, UpstreamCall, usage_from_openai
from dataplane.providers.openai_compat import (
    PROFILES,
    fix_completion,
    map_compat_error,
    prepare_chat,
    prepare_embeddings,
    relay_events,
)
from dataplane.providers.upstream import decode_json_body, map_upstream_error, post, read_all, stream_broken
from schemas.errors import UpstreamError
from schemas.openai import UsageOnly

DEFAULT_BASE_URL = "https://api.openai.com/v1"

_usage_decoder = msgspec.json.Decoder(UsageOnly)
_encoder = msgspec.json.Encoder()


def _sibling_endpoint(chat_url: str, endpoint: str) -> str:
    """The URL of another endpoint next to `.../chat/completions`, keeping any query string."""
    path, q, query = chat_url.partition("?")
    head, found, _ = path.rpartition("/chat/completions")
    if not found:
        raise UpstreamError(f"Cannot derive the {endpoint} URL from the provider's chat URL.")
    return f"{head}/{endpoint}{q}{query}"


class OpenAIProvider:
    """The adapter for `provider_type` ("openai" or a member of the compatible family)."""

    def __init__(self, provider_type: str = "openai") -> None:
        self.provider_type = provider_type
        self.profile = PROFILES.get(provider_type)
        self.default_base_url = self.profile.base_url if self.profile else DEFAULT_BASE_URL
        self._map_error = map_compat_error if self.profile else map_upstream_error
        # Native Responses passthrough (Codex, n8n) for OpenAI itself; the compatible family has no /responses.
        self.native_apis: frozenset[str] = openai_responses.NATIVE_APIS if self.profile is None else frozenset()

    def _request(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        base = (call.provider.base_url or self.default_base_url).rstrip("/")
        headers = {"Content-Type": "application/json", **call.extra_headers}
        if call.api_key:
            headers["Authorization"] = f"Bearer {call.api_key.reveal()}"
        return f"{base}/chat/completions", headers

    async def _post(self, call: UpstreamCall, body: dict[str, Any],
                    endpoint: str | None = None) -> aiohttp.ClientResponse:
        url, headers = self._request(call)
        if endpoint is not None:
            url = _sibling_endpoint(url, endpoint)
        return await post(call, url, _encoder.encode(body), headers, map_error=self._map_error)

    _read = staticmethod(read_all)

    @staticmethod
    def _usage_of(call: UpstreamCall, raw: bytes) -> ChatResponse:
        parsed = decode_json_body(call, _usage_decoder, raw)
        return ChatResponse(raw, usage_from_openai(parsed.usage) if parsed.usage else None)

    def _responses_endpoint(self, api: str, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        openai_responses.check_api(api)
        url, headers = self._request(call)
        return _sibling_endpoint(url, "responses"), headers

    async def complete_native(self, api: str, call: UpstreamCall) -> ChatResponse:
        url, headers = self._responses_endpoint(api, call)
        return await openai_responses.complete(call, url, headers, map_error=self._map_error)

    def stream_native(self, api: str, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        url, headers = self._responses_endpoint(api, call)
        return openai_responses.stream(call, url, headers, stats, map_error=self._map_error)

    async def complete(self, call: UpstreamCall) -> ChatResponse:
        if self.profile is None:
            return self._usage_of(call, await self._read(call, await self._post(call, call.body)))
        raw = await self._read(call, await self._post(call, prepare_chat(self.profile, call.body, stream=False)))
        body, usage = fix_completion(self.profile, call.provider.name, raw,
                                     call.api_key.reveal() if call.api_key else None)
        return ChatResponse(body, usage)

    async def embed(self, call: UpstreamCall) -> ChatResponse:
        """`POST {base}/embeddings`; `call.body` is the client's embeddings body. The answer is
        relayed as the provider sent it (the embeddings ingress converts float/base64); usage is
        `prompt_tokens` as input tokens."""
        body = call.body if self.profile is None else prepare_embeddings(self.profile, call.body)
        return self._usage_of(call, await self._read(call, await self._post(call, body, "embeddings")))

    def stream(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        return self._stream_raw(call, stats) if self.profile is None else self._stream_compat(call, stats)

    async def _stream_compat(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        assert self.profile is not None
        resp = await self._post(call, prepare_chat(self.profile, call.body, stream=True))
        try:
            async for event in relay_events(self.profile, call.provider.name, resp.content, stats,
                                            client_wants_usage=call.client_wants_usage,
                                            secret=call.api_key.reveal() if call.api_key else None):
                yield event
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise stream_broken(call, exc) from None
        finally:
            resp.release()

    async def _stream_raw(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        """Relays whole network reads: every complete event that arrived together goes out as one
        chunk (one write to the client instead of one per event); `data: [DONE]` is always its
        own final chunk. Only events that carry usage are decoded."""
        body = dict(call.body)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        resp = await self._post(call, body)
        pending = b""
        try:
            async for data in resp.content.iter_any():
                pending += data
                if b"\r" in pending:  # CRLF framing is legal SSE; normalize it once here
                    pending = pending.replace(b"\r\n", b"\n")
                end = pending.rfind(b"\n\n")
                if end < 0:
                    continue
                complete, pending = pending[:end + 2], pending[end + 2:]
                out, done = _relay_events(complete, call, stats)
                if out:
                    yield out
                if done:
                    yield SSE_DONE
                    return
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise stream_broken(call, exc) from None
        finally:
            resp.release()
        raise UpstreamError(f"Provider '{call.provider.name}' ended the stream without [DONE].")


_USAGE_MARKS = (b'"usage":{', b'"usage": {')
_NULL_USAGE = b',"usage":null'


def _relay_events(complete: bytes, call: UpstreamCall, stats: CallStats) -> tuple[bytes, bool]:
    """`(bytes to relay, saw [DONE])` for a run of complete SSE events. Usage is recorded in
    `stats`; when the client did not ask for usage, the usage-only chunk is dropped and the
    `"usage":null` OpenAI adds to every other chunk (we asked for usage, not the client) is cut.
    That key can only be structural: inside a JSON string its quotes would be escaped."""
    if not call.client_wants_usage and _NULL_USAGE in complete:
        complete = complete.replace(_NULL_USAGE, b"")
    if b"[DONE]" not in complete and b'"usage":' not in complete:  # (a superset of _USAGE_MARKS: cheap)
        return complete, False  # the common case: plain content deltas, relayed untouched
    kept: list[bytes] = []
    for event in complete.split(b"\n\n"):
        if not event:
            continue
        if event.startswith(b"data: [DONE]"):
            return b"".join(kept), True
        if any(m in event for m in _USAGE_MARKS):
            try:
                parsed = _usage_decoder.decode(event[event.find(b"{"):])
            except (msgspec.DecodeError, msgspec.ValidationError):
                parsed = UsageOnly()
            if parsed.usage is not None:
                stats.usage = usage_from_openai(parsed.usage)
                if not call.client_wants_usage and b'"choices":[]' in event.replace(b" ", b""):
                    continue
        kept.append(event + b"\n\n")
    return b"".join(kept), False
