"""The HTTP edge every provider adapter shares: one request with our timeouts and no redirects
(`send`, also used by the passthrough), and the one table that maps a provider's error response to
a `GatewayError` (ARCHITECTURE §7).

Retryable versus terminal (used by routing and fallback):
    retryable: 408, 409 (conflict/lock), 429, 500, 502, 503, 504, 529 (Anthropic overloaded),
               connection errors and connect timeouts
    terminal:  400, 401, 403, 404, 413, 422 and any other 4xx
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import msgspec
import structlog
from aiohttp.typedefs import StrOrURL

from dataplane import tracing
from dataplane.key_mask import mask, secrets_of
from dataplane.outbound import refused
from dataplane.providers.base import UpstreamCall
from schemas.errors import Conflict, GatewayError, InvalidRequest, NotFound, RateLimited, UpstreamError

T = TypeVar("T")

log = structlog.get_logger(__name__)

MAX_ERROR_BODY = 64 * 1024
MAX_LINE = 16 * 1024 * 1024
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

_any_decoder = msgspec.json.Decoder()


def is_retryable(status: int) -> bool:
    return status in RETRYABLE_STATUSES


def provider_message(raw: bytes, secret: str | None = None) -> str:
    """The provider's error message from any of the shapes providers use, secrets masked:
    `{"error": {"message"}}` (OpenAI, Anthropic, Gemini), `{"error": "..."}` (Ollama),
    `{"message": "..."}` (Mistral, Bedrock), or a list of those (Gemini streams)."""
    message = ""
    try:
        parsed: Any = _any_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
        elif isinstance(err, str):
            message = err
        elif isinstance(parsed.get("message"), str):
            message = parsed["message"]
        elif isinstance(parsed.get("Message"), str):
            message = parsed["Message"]
    if not message:
        message = raw[:300].decode("utf-8", "replace")
    if secret:
        message = message.replace(secret, "***")
    return message[:500]


def map_upstream_error(provider: str, status: int, raw: bytes, headers: Mapping[str, str],
                       secret: str | None) -> GatewayError:
    """Map a provider's error response to ours, keeping its status (`upstream_status`) and whether
    it may be retried (`retryable`, the table above). Credential problems with the provider are
    the operator's, so they surface as 502, not as the client's 401. `headers` should be the
    case-insensitive response headers."""
    err = _mapped(provider, status, provider_message(raw, secret), headers)
    err.upstream_status, err.retryable = status, is_retryable(status)
    return err


def _mapped(provider: str, status: int, msg: str, headers: Mapping[str, str]) -> GatewayError:
    text = f"Provider '{provider}' returned {status}: {msg}"
    if status == 429:
        retry = headers.get("retry-after") or headers.get("Retry-After")
        return RateLimited(text, code="upstream_rate_limited", headers={"Retry-After": retry} if retry else None)
    if status == 404:
        return NotFound(text, param="model")
    if status == 409:  # a conflict (a lock held upstream): retryable, as the SDKs treat it
        return Conflict(text, code="upstream_conflict")
    if status in (400, 413, 422):
        return InvalidRequest(text, code="upstream_invalid_request")
    if status in (401, 403):
        return UpstreamError(f"Provider '{provider}' rejected the gateway's provider credentials.",
                             status=502, code="upstream_auth_error")
    if status in (408, 504):
        return UpstreamError(text, status=504, code="upstream_timeout")
    if status in (503, 529):
        retry = headers.get("retry-after") or headers.get("Retry-After")
        return UpstreamError(text, status=503, code="upstream_overloaded",
                             headers={"Retry-After": retry} if retry else None)
    return UpstreamError(text, status=502)


ErrorMapper = Callable[[str, int, bytes, Mapping[str, str], str | None], GatewayError]


def is_redirect(status: int) -> bool:
    """A 3xx that points elsewhere (304 Not Modified is an answer, not a redirect)."""
    return 300 <= status < 400 and status != 304


async def send(session: aiohttp.ClientSession, provider: str, method: str, url: StrOrURL, body: bytes | None,
               headers: Mapping[str, str], timeout_s: float, connect_timeout_s: float = 10.0) -> aiohttp.ClientResponse:
    """The one outbound request every path makes (adapters through `post`, the passthrough directly).

    Redirects are never followed: the provider key is in `headers`, and a 3xx must not carry it
    (or the body) to another host; the caller decides what a 3xx means. The session's connector
    refuses addresses the SSRF policy refuses (`dataplane.outbound`): that is a 502
    `upstream_address_refused` and no connection was made. Timeouts are 504 `upstream_timeout`,
    other connection failures 502 `upstream_unreachable`. Returns the open response, any status."""
    if tracing.TRACER is not None:  # the current span (the call's CLIENT span) as the request's traceparent
        headers = dict(headers)
        tracing.inject(headers)
    try:
        return await session.request(
            method, url, data=body, headers=headers, allow_redirects=False,
            # A read timeout, not a total: an agent's stream may legitimately run for many minutes.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s),
        )
    except TimeoutError:
        raise UpstreamError(f"Provider '{provider}' timed out.", status=504, code="upstream_timeout",
                            upstream_status=0) from None
    except aiohttp.ClientError as exc:
        if (why := refused(exc)) is not None:
            # The address is for the operator's log; the client learns only that it was refused.
            log.warning("upstream_address_refused", provider=provider, reason=why.reason)
            raise UpstreamError(f"Provider '{provider}' is at an address the gateway does not call "
                                "(internal or not allow-listed).", code="upstream_address_refused") from None
        raise UpstreamError(f"Could not reach provider '{provider}': {type(exc).__name__}.",
                            code="upstream_unreachable", upstream_status=0) from None


async def read_whole(up: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """An answer's body (at most `limit` bytes), the connection released; a body cut off or timed
    out is a 502 naming `what` ("'api.example.com'", "The backend of paid endpoint 'x'")."""
    try:
        return await up.content.read(limit)
    except (TimeoutError, aiohttp.ClientError):
        raise UpstreamError(f"{what} broke off its answer.") from None
    finally:
        up.release()


def stream_broken(call: UpstreamCall, exc: BaseException) -> UpstreamError:
    """The error for a stream that broke after it began: a stall past the idle timeout (no byte for
    `call.timeout_s`) is a 504 `upstream_idle_timeout`; a connection lost, a 502."""
    if isinstance(exc, TimeoutError):
        return UpstreamError(f"Provider '{call.provider.name}' stream stalled: nothing arrived for "
                             f"{call.timeout_s:g} s (the idle timeout), so it was cut off.", status=504,
                             code="upstream_idle_timeout", upstream_status=0)
    return UpstreamError(f"Provider '{call.provider.name}' stream was interrupted.", upstream_status=0)


def redirect_error(provider: str, status: int) -> UpstreamError:
    """The 502 for a provider answering with a redirect (its `Location` is never shown or followed)."""
    return UpstreamError(f"Provider '{provider}' answered with a redirect ({status}); the gateway does not "
                         "follow provider redirects. Check the provider's base_url.", code="upstream_redirect")


async def post(call: UpstreamCall, url: StrOrURL, body: bytes, headers: Mapping[str, str], *,
               map_error: ErrorMapper = map_upstream_error) -> aiohttp.ClientResponse:
    """POST to the provider (`send`). Returns the open response on 2xx (the caller must release
    it); a 3xx is a 502 `upstream_redirect`, other statuses the mapped GatewayError. Never lets a
    secret reach an error message."""
    resp = await send(call.session, call.provider.name, "POST", url, body, headers, call.timeout_s,
                      call.connect_timeout_s)
    if resp.status >= 300:
        if is_redirect(resp.status):
            resp.release()
            raise redirect_error(call.provider.name, resp.status)
        try:
            raw = await resp.content.read(MAX_ERROR_BODY)
        finally:
            resp.release()
        secret = call.api_key.reveal() if call.api_key else None
        raise map_error(call.provider.name, resp.status, raw, resp.headers, secret)
    return resp


async def read_all(call: UpstreamCall, resp: aiohttp.ClientResponse) -> bytes:
    """The whole (2xx) body, the provider key masked out of it (`key_mask`); releases the
    response. A connection lost mid-body is a 502."""
    try:
        return mask(await resp.read(), secrets_of(call.provider.type, call.api_key.reveal() if call.api_key else None))
    except TimeoutError:
        raise stream_broken(call, TimeoutError()) from None
    except aiohttp.ClientError:
        raise UpstreamError(f"Provider '{call.provider.name}' closed the connection mid-response.") from None
    finally:
        resp.release()


def decode_json_body(call: UpstreamCall, decoder: msgspec.json.Decoder[T], raw: bytes) -> T:
    """`raw` decoded with `decoder`, or a 502 that names the provider (never the parser's text)."""
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError(f"Provider '{call.provider.name}' returned a body that is not valid JSON.") from None


async def iter_lines(content: aiohttp.StreamReader, provider: str) -> AsyncIterator[bytes]:
    """Lines of a streamed body, each with its newline, as they arrive. A line may be far longer
    than aiohttp's own readline cap (a whole function call can arrive as one line); past
    `MAX_LINE` bytes the stream is refused."""
    buf = bytearray()
    async for data in content.iter_any():
        scan, start = len(buf), 0
        buf += data
        while (nl := buf.find(b"\n", scan)) != -1:
            yield bytes(buf[start:nl + 1])
            start = scan = nl + 1
        del buf[:start]
        if len(buf) > MAX_LINE:
            raise UpstreamError(f"Provider '{provider}' sent a stream line longer than {MAX_LINE} bytes.")
    if buf:
        yield bytes(buf)
