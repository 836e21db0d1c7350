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
from schemas.errors import GatewayError, InvalidRequest, NotFound, RateLimited, UpstreamError
from schemas.openai import UsageOnly

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_ERROR_BODY = 64 * 1024

_usage_decoder = msgspec.json.Decoder(UsageOnly)
_encoder = msgspec.json.Encoder()
_any_decoder = msgspec.json.Decoder()


def _provider_message(raw: bytes, secret: str | None) -> str:
    """The provider's error message (nested `error.message` or flat `message`), secrets masked."""
    message = ""
    try:
        parsed = _any_decoder.decode(raw)
    except msgspec.DecodeError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
        elif isinstance(err, str):
            message = err
        elif isinstance(parsed.get("message"), str):
            message = parsed["message"]
    if not message:
        message = raw[:300].decode("utf-8", "replace")
    if secret:
        message = message.replace(secret, "***")
    return message[:500]


def map_upstream_error(provider: str, status: int, raw: bytes, headers: dict[str, str],
                       secret: str | None) -> GatewayError:
    """Map a provider's error response to ours (ARCHITECTURE §7). Credentials problems with the
    provider are the operator's, so they surface as 502, not as the client's 401."""
    msg = _provider_message(raw, secret)
    text = f"Provider '{provider}' returned {status}: {msg}"
    if status == 429:
        retry = headers.get("retry-after")
        return RateLimited(text, code="upstream_rate_limited", headers={"Retry-After": retry} if retry else None)
    if status == 404:
        return NotFound(text, param="model")
    if status in (400, 409, 413, 422):
        return InvalidRequest(text, code="upstream_invalid_request")
    if status in (401, 403):
        return UpstreamError(f"Provider '{provider}' rejected the gateway's provider credentials.",
                             status=502, code="upstream_auth_error")
    if status == 504:
        return UpstreamError(text, status=504, code="upstream_timeout")
    return UpstreamError(text, status=503 if status in (503, 529) else 502)


class OpenAIProvider:
    def _request(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        base = (call.provider.base_url or DEFAULT_BASE_URL).rstrip("/")
        headers = {"Content-Type": "application/json", **call.extra_headers}
        if call.api_key:
            headers["Authorization"] = f"Bearer {call.api_key.reveal()}"
        return f"{base}/chat/completions", headers

    async def _post(self, call: UpstreamCall, body: dict[str, Any]) -> aiohttp.ClientResponse:
        url, headers = self._request(call)
        try:
            resp = await call.session.post(
                url, data=_encoder.encode(body), headers=headers,
                timeout=aiohttp.ClientTimeout(total=call.timeout_s, sock_connect=10),
            )
        except TimeoutError:
            raise UpstreamError(f"Provider '{call.provider.name}' timed out.", status=504,
                                code="upstream_timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"Could not reach provider '{call.provider.name}': {type(exc).__name__}.",
                                code="upstream_unreachable") from None
        if resp.status >= 400:
            try:
                raw = await resp.content.read(MAX_ERROR_BODY)
            finally:
                resp.release()
            secret = call.api_key.reveal() if call.api_key else None
            raise map_upstream_error(call.provider.name, resp.status, raw, dict(resp.headers), secret)
        return resp

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
