"""OpenAI (and any OpenAI-compatible base URL): Chat Completions over HTTPS + SSE.

Non-streaming bodies are relayed byte-for-byte; only usage is decoded. Streams are relayed event
by event. The gateway always asks for `stream_options.include_usage` so every streamed call can
be priced, and drops the usage-only chunk again when the client did not ask for it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import msgspec

from dataplane.providers.base import SSE_DONE, CallStats, ChatResponse, UpstreamCall, usage_from_openai
from dataplane.providers.upstream import post
from schemas.errors import UpstreamError
from schemas.openai import UsageOnly

DEFAULT_BASE_URL = "https://api.openai.com/v1"

_usage_decoder = msgspec.json.Decoder(UsageOnly)
_encoder = msgspec.json.Encoder()


class OpenAIProvider:
    def _request(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        base = (call.provider.base_url or DEFAULT_BASE_URL).rstrip("/")
        headers = {"Content-Type": "application/json", **call.extra_headers}
        if call.api_key:
            headers["Authorization"] = f"Bearer {call.api_key.reveal()}"
        return f"{base}/chat/completions", headers

    async def _post(self, call: UpstreamCall, body: dict[str, Any]) -> aiohttp.ClientResponse:
        url, headers = self._request(call)
        return await post(call, url, _encoder.encode(body), headers)

    async def complete(self, call: UpstreamCall) -> ChatResponse:
        resp = await self._post(call, call.body)
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamError(f"Provider '{call.provider.name}' closed the connection mid-response.") from None
        finally:
            resp.release()
        try:
            parsed = _usage_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise UpstreamError(f"Provider '{call.provider.name}' returned a body that is not valid JSON.") from None
        usage = usage_from_openai(parsed.usage) if parsed.usage else None
        return ChatResponse(raw, usage)

    async def stream(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        body = dict(call.body)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        resp = await self._post(call, body)
        try:
            event: list[bytes] = []
            async for line in resp.content:
                if line not in (b"\n", b"\r\n"):
                    event.append(line)
                    continue
                if not event:
                    continue
                data = b"".join(event)
                event.clear()
                if b'"usage":{' in data or b'"usage": {' in data:
                    payload = data[data.find(b"{"):]
                    try:
                        parsed = _usage_decoder.decode(payload)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        parsed = UsageOnly()
                    if parsed.usage is not None:
                        stats.usage = usage_from_openai(parsed.usage)
                        if not call.client_wants_usage and b'"choices":[]' in data.replace(b" ", b""):
                            continue
                yield data + b"\n"
                if data.startswith(SSE_DONE[:-2]):
                    return
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamError(f"Provider '{call.provider.name}' stream was interrupted.") from None
        finally:
            resp.release()
        raise UpstreamError(f"Provider '{call.provider.name}' ended the stream without [DONE].")
