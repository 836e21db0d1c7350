"""`ANY /{provider}/{path}`: a workspace provider's own (native) API, relayed through the gateway.

Contract:

* **Route** (`ROUTE`, registered after every other route): `{provider}` is the NAME of a provider
  configured in the caller's workspace, e.g. `/openai/v1/chat/completions`,
  `/anthropic/v1/messages`, `/gemini/v1beta/models/gemini-2.5-flash:generateContent`,
  `/bedrock/model/{id}/converse`. Names in `RESERVED` never match, so `/v1/*`, `/healthz`,
  `/readyz`, `/metrics`, `/admin/*` and `/router/{id}/*` keep their own routes (and their
  404/405s). An unknown name is 404 `provider_not_found`; a `mock` provider (no native API) is a
  400 `passthrough_unsupported`; `options["passthrough"] == "off"` is a 403 `passthrough_disabled`.
* **Auth**: our virtual key, from `Authorization: Bearer`, `x-api-key` (Anthropic clients),
  `x-goog-api-key` (Gemini), `api-key` (Azure) or, last, the `key` query parameter (Gemini REST).
* **Forwarding**: method, the rest of the path (still percent-encoded, so Bedrock ARNs stay as
  the client encoded them) and the query go to the provider's base URL (or its type's default,
  the adapter modules' constants). Leading path segments that repeat the end of the base path are
  merged (`base .../v1` + `v1/chat/completions`), so SDKs work with `<gateway>/<name>` or
  `<gateway>/<name>/v1` alike. `.`/`..` segments are refused (400).
* **Allowlist** (`passthrough_rules`): only inference and read-only model endpoints of the
  provider's type, plus the groups its option `passthrough_allow` opts in (files, batches,
  fine_tuning, organization, ...); anything else, and any method other than GET/POST/PUT/PATCH/
  DELETE, is a 403 `passthrough_not_allowed` naming method and path, decided before the body is
  read: nothing is forwarded.
* **Headers**: the client's credentials (and a `key` query parameter it authenticated with;
  always for Gemini), hop-by-hop headers, cookies, `Accept-Encoding`, `Alephant-*` and, unless
  the provider sets `forward_account_headers=true`, account-selecting headers
  (`OpenAI-Organization`, `OpenAI-Project`, `x-goog-user-project`, ...) are removed; the
  provider's own auth is added per type (`upstream_headers`). The body (at most
  `settings.max_body_bytes`, else 413 before it is read) is forwarded as the raw bytes received.
* **Response**: status, body, content type and the provider's other end-to-end headers relayed
  unchanged (errors too: this is the native API), plus `Alephant-Request-Id`, `Alephant-Provider`
  and, on non-streamed answers, `Alephant-Cost-Usd`. The provider key (each `:`-part of Bedrock
  IAM credentials) is replaced by `***` wherever it appears: header values (a header named
  after it is dropped), bodies of any content type, and streams, where a key cut across two reads
  is still caught (`key_mask.StreamMasker`, which holds back at most a key's length less one).
  Streams (SSE, NDJSON, AWS event stream, or any other body without a length that is not JSON)
  are otherwise relayed chunk by chunk as they arrive, byte for byte.
* **Redirects** are never followed (the request carries the provider key) and never relayed (a
  client following it could carry its own key, or our URL, anywhere): a 3xx other than 304 is a
  502 `upstream_redirect`, without the `Location`. Connections go only to addresses the SSRF
  policy admits, checked at connect time (`dataplane.outbound`): else 502 `upstream_address_refused`.
* **Accounting**: exactly one `llm.call` (ingress `passthrough`, `stream` = relayed as a stream,
  status = the upstream status, 499 when the client went away) with usage sniffed from the native
  body or stream (`passthrough_usage`) and priced with `Call.price()`. The model is the JSON
  body's `model`, else taken from the path (`models/{m}:...`, `model/{id}/...`, `deployments/{id}`).
  A client disconnect stops the upstream read and records the usage seen so far (`partial`).

Errors the gateway itself raises render in Anthropic's shape for Anthropic-type providers and
Messages paths (`anthropic_client`), in OpenAI's otherwise.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

import aiohttp
import msgspec
from aiohttp import ClientResponse, web
from multidict import CIMultiDict
from yarl import URL

from dataplane.attempts import open_upstream
from dataplane.call import Call
from dataplane.decisions import Target, bearer_token
from dataplane.edge import check_model
from dataplane.ingress.passthrough_rules import ACCOUNT_HEADERS, forwards_account_headers, refusal
from dataplane.ingress.passthrough_usage import (
    STREAM_TYPES,
    StreamSniffer,
    media_type,
    sniffer_for,
    usage_from_body,
    usage_from_headers,
)
from dataplane.key_mask import StreamMasker, mask, mask_headers, secrets_of
from dataplane.lifecycle import client_gone, mark_disconnected, note_disconnect
from dataplane.limits import STREAM_SLOTS, body_within, wants_stream
from dataplane.pipeline import emit_once, run
from dataplane.providers import anthropic, gemini, ollama, openai
from dataplane.providers.aws_sigv4 import AwsCredentials, sign_request
from dataplane.providers.base import DEFAULT_CONNECT_TIMEOUT_S
from dataplane.providers.bedrock import DEFAULT_REGION, SIGNING_SERVICE
from dataplane.providers.openai_compat import PROFILES
from dataplane.providers.upstream import is_redirect, is_retryable, redirect_error, send
from dataplane.routing import direct_route
from dataplane.stages.governance import input_bound
from dataplane.usage_estimate import RelayTap
from schemas.entities import RESERVED_PROVIDER_NAMES, Provider, Timeouts
from schemas.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    UpstreamError,
    render_anthropic,
)
from schemas.http import REQUEST_ID, is_anthropic_path, read_limited, too_deep
from schemas.money import nanos_to_decimal_str

INGRESS = "passthrough"
RESERVED = RESERVED_PROVIDER_NAMES  # one list with the admin API, which refuses these names
# Provider names are `[A-Za-z0-9][A-Za-z0-9_-]*` (the admin API's Ident); reserved names never match.
ROUTE = "/{provider:(?!(?:" + "|".join(sorted(RESERVED)) + ")/)[A-Za-z0-9][A-Za-z0-9_-]*}/{path:.*}"

CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                        "proxy-connection", "host", "content-length", "expect"})
# Never forwarded: they belong to the client's hop (compression is negotiated by us, see below).
_CLIENT_ONLY = frozenset({"cookie", "accept-encoding"})
_AWS_SIGNING = frozenset({"x-amz-date", "x-amz-content-sha256", "x-amz-security-token"})
# content-encoding: the shared session decodes compressed answers, so what we relay is identity.
# location: redirects are answered with our 502 (never relayed); elsewhere it could point anywhere.
_RESPONSE_DROP = HOP_BY_HOP | {"server", "date", "set-cookie", "alt-svc", "proxy-authenticate", "content-encoding",
                               "location"}
_REGION_RE = re.compile(r"^[a-z0-9-]{2,32}$")
DISCONNECT_POLL_S = 0.5  # how soon a client gone mid-stream stops the upstream read

_KIND: web.RequestKey[str] = web.RequestKey("alephant_passthrough_provider_type", str)


class _ModelProbe(msgspec.Struct):
    model: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None


def max_tokens_of(body: bytes, content_type: str) -> int | None:
    """The output cap a JSON body names (any of the three APIs' fields), else None."""
    if not body or not is_json(media_type(content_type)):
        return None
    try:
        probe = _model_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None
    for value in (probe.max_completion_tokens, probe.max_tokens, probe.max_output_tokens):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


_model_decoder = msgspec.json.Decoder(_ModelProbe)


# -- pure pieces -----------------------------------------------------------------------------------


def query_param(query: str, name: str) -> str | None:
    """The first value of `name` in a raw (percent-encoded) query string."""
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        if unquote_plus(key) == name:
            return unquote_plus(value) if sep else ""
    return None


def drop_query_param(query: str, name: str) -> str:
    """The raw query without any `name` parameter; the other parameters keep their exact bytes."""
    return "&".join(p for p in query.split("&") if p and unquote_plus(p.partition("=")[0]) != name)


def client_credential(headers: Mapping[str, str], query: str) -> tuple[str, bool]:
    """`(virtual key, came from the query)`: `Authorization: Bearer`, else `x-api-key`,
    `x-goog-api-key` or `api-key`, else `?key=`. 401 when there is none or it is malformed."""
    authorization = headers.get("Authorization")
    alternative = headers.get("x-api-key") or headers.get("x-goog-api-key") or headers.get("api-key")
    if not authorization and not alternative:
        key = query_param(query, "key")
        if key and key.strip():
            return key.strip(), True
    return bearer_token(authorization, alternative), False


def split_target(raw_path: str) -> tuple[str, str]:
    """`(rest, query)` of a raw request target `/{provider}/{rest}?{query}`, both still encoded."""
    path, _, query = raw_path.partition("?")
    parts = path.split("/", 2)
    return (parts[2] if len(parts) == 3 else ""), query


def check_path(rest: str) -> None:
    """400 for dot segments (also percent-encoded ones): the path must stay under the base URL."""
    for segment in rest.split("/"):
        if any(piece in (".", "..") for piece in re.split(r"[/\\]", unquote(segment))):
            raise InvalidRequest("The path must not contain '.' or '..' segments.", code="invalid_path")


def model_from_path(rest: str) -> str:
    """The model named by a native path: Azure `deployments/{id}`, Bedrock `model/{id}/...`
    (ids may contain `:`), Gemini `models/{model}:{method}` or `tunedModels/{m}:...`; else ""."""
    segments = rest.split("/")
    for i, segment in enumerate(segments[:-1]):
        nxt = unquote(segments[i + 1])
        if not nxt:
            continue
        if segment in ("deployments", "model"):
            return nxt
        if segment in ("models", "tunedModels"):
            return nxt.partition(":")[0]
    return ""


def is_json(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def model_of(body: bytes, content_type: str, rest: str) -> str:
    """The JSON body's `model` (OpenAI, Anthropic, Ollama), else `model_from_path(rest)`. The
    caller checks it (`edge.check_model`) before recording it. 400 `json_too_deep` for a JSON body
    nested beyond what the decoder can skip."""
    if body and is_json(media_type(content_type)):
        try:
            model = _model_decoder.decode(body).model
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            model = None
        except RecursionError:  # msgspec recurses even to skip a field
            raise too_deep() from None
        if isinstance(model, str) and model:
            return model
    return model_from_path(rest)


def _region(provider: Provider) -> str:
    region = provider.options.get("region") or DEFAULT_REGION
    if not _REGION_RE.match(region):
        raise UpstreamError(f"Provider '{provider.name}' has an invalid region option.", code="provider_misconfigured")
    return region


def default_base_url(provider: Provider) -> str:
    """The base URL a provider of this type uses when it configures none (adapter constants)."""
    kind = provider.type
    if kind == "openai":
        return openai.DEFAULT_BASE_URL
    if kind in PROFILES:
        return PROFILES[kind].base_url
    if kind == "anthropic":
        return anthropic.DEFAULT_BASE_URL
    if kind == "gemini":
        return gemini.DEFAULT_BASE_URL
    if kind == "ollama":
        return ollama.DEFAULT_BASE_URL
    if kind == "bedrock":
        return f"https://bedrock-runtime.{_region(provider)}.amazonaws.com"
    if kind == "azure":
        raise UpstreamError(f"Provider '{provider.name}' needs a base_url (https://<resource>.openai.azure.com).",
                            code="provider_misconfigured")
    raise InvalidRequest(f"Provider '{provider.name}' (type '{kind}') has no native API to pass through.",
                         code="passthrough_unsupported")


def _relative_segments(base: str, rest: str) -> list[str]:
    base_segments = [s for s in urlsplit(base.strip().partition("?")[0]).path.split("/") if s]
    segments = rest.split("/") if rest else []
    for k in range(min(len(base_segments), len(segments)), 0, -1):
        if base_segments[-k:] == segments[:k]:
            return segments[k:]
    return segments


def relative_path(base: str, rest: str) -> str:
    """`rest` without its leading segments that repeat the end of the base path
    (`https://h/openai/v1` + `v1/chat/completions` -> `chat/completions`): the path the
    passthrough allowlist judges and `join_url` appends."""
    return "/".join(_relative_segments(base, rest))


def join_url(base: str, rest: str, query: str) -> str:
    """`base` + `/relative_path(base, rest)` + `?query`
    (`https://h/openai/v1` + `v1/chat/completions` -> `https://h/openai/v1/chat/completions`).
    A query on `base` is kept in front of the client's."""
    segments = _relative_segments(base, rest)
    base, _, base_query = base.strip().partition("?")
    base = base.rstrip("/")
    url = base + ("/" + "/".join(segments) if segments else "")
    query = "&".join(q for q in (base_query, query) if q)
    return f"{url}?{query}" if query else url


def base_url_of(provider: Provider) -> str:
    return provider.base_url.strip() or default_base_url(provider)


def upstream_url(provider: Provider, rest: str, query: str) -> str:
    return join_url(base_url_of(provider), rest, query)


def forward_headers(headers: Iterable[tuple[str, str]], *, account_headers: bool = False) -> dict[str, str]:
    """The client's headers that may travel upstream, names lower-cased, repeats joined with
    ", ". Removed: credentials, hop-by-hop headers (also those named by `Connection`), cookies,
    `Accept-Encoding`, `Alephant-*` and, unless `account_headers`, the headers that select an
    account on the operator's provider (`passthrough_rules.ACCOUNT_HEADERS`)."""
    items = list(headers)
    named = {t.strip().lower() for k, v in items if k.lower() == "connection" for t in v.split(",")}
    out: dict[str, str] = {}
    for name, value in items:
        low = name.lower()
        if (low in CREDENTIAL_HEADERS or low in HOP_BY_HOP or low in _CLIENT_ONLY or low in named
                or low.startswith("alephant-") or (low in ACCOUNT_HEADERS and not account_headers)):
            continue
        out[low] = f"{out[low]}, {value}" if low in out else value
    return out


def _bedrock_auth(provider: Provider, key: str | None, *, method: str, url: str, body: bytes,
                  content_type: str | None, now: datetime) -> dict[str, str]:
    if not key:
        raise UpstreamError(f"Provider '{provider.name}' has no credentials configured.", code="upstream_auth_error")
    mode = provider.options.get("auth")
    if mode == "bearer" or (mode != "sigv4" and ":" not in key):
        return {"authorization": f"Bearer {key}"}
    try:
        creds = AwsCredentials.parse(key)
    except ValueError as exc:
        raise UpstreamError(f"Provider '{provider.name}': {exc}", code="upstream_auth_error") from None
    base = {"content-type": content_type} if content_type else {}
    return sign_request(method=method, url=url, headers=base, body=body, credentials=creds,
                        region=_region(provider), service=SIGNING_SERVICE, now=now)


def upstream_headers(headers: Iterable[tuple[str, str]], provider: Provider, key: str | None, *, method: str,
                     url: str, body: bytes, now: datetime) -> dict[str, str]:
    """`forward_headers` plus the provider's own auth: Bearer (OpenAI and compatible types,
    Ollama when a key is set), `api-key` (Azure; Bearer with `options["auth"] == "bearer"`),
    `x-api-key` (Anthropic; `anthropic-version` defaulted, the client's version/beta kept),
    `x-goog-api-key` (Gemini), Bedrock SigV4 over exactly `method`/`url`/`body` (signing
    `host`, `x-amz-*` and `content-type`) or a Bedrock API key as Bearer. `Accept-Encoding:
    identity`, so usage can be read and bytes relayed unchanged. Account-selecting headers only
    with the provider option `forward_account_headers=true`. Pure (`now` is the signing time)."""
    out = forward_headers(headers, account_headers=forwards_account_headers(provider))
    out["accept-encoding"] = "identity"
    kind = provider.type
    if kind == "bedrock":
        for name in _AWS_SIGNING:
            out.pop(name, None)
        return {**out, **_bedrock_auth(provider, key, method=method, url=url, body=body,
                                       content_type=out.get("content-type"), now=now)}
    if kind == "anthropic":
        out.setdefault("anthropic-version", anthropic.DEFAULT_VERSION)
    if not key:
        return out
    if kind == "azure":
        out["authorization" if provider.options.get("auth") == "bearer" else "api-key"] = (
            f"Bearer {key}" if provider.options.get("auth") == "bearer" else key)
    elif kind == "anthropic":
        out["x-api-key"] = key
    elif kind == "gemini":
        out["x-goog-api-key"] = key
    else:
        out["authorization"] = f"Bearer {key}"
    return out


def relay_headers(headers: Mapping[str, str], secrets: tuple[bytes, ...] = ()) -> CIMultiDict[str]:
    """The upstream response headers the client gets: all but hop-by-hop, `Server`, `Date`,
    `Set-Cookie`, `Alt-Svc`, `Location` and `Alephant-*` (ours are added after), the provider
    key masked in every value (`key_mask.mask_headers`)."""
    kept = ((name, value) for name, value in headers.items()
            if (low := name.lower()) not in _RESPONSE_DROP and not low.startswith("alephant-"))
    return mask_headers(kept, secrets)


def anthropic_client(provider_type: str | None, raw_path: str) -> bool:
    """Whether the gateway's own errors should take Anthropic's shape: an Anthropic-type provider,
    or a Messages path (`v1/messages...`, also Ollama's Anthropic-compatible API) when the
    provider is not known yet (e.g. the key was refused)."""
    return provider_type == "anthropic" or split_target(raw_path)[0].startswith("v1/messages")


def is_streamed(content_type: str | None, content_length: int | None) -> bool:
    """Relay chunk by chunk: SSE, NDJSON, AWS event stream, or any non-JSON body without a length."""
    kind = media_type(content_type)
    return kind in STREAM_TYPES or (content_length is None and not is_json(kind))


# -- IO ----------------------------------------------------------------------------------------


async def _buffered(call: Call, provider: Provider, up: aiohttp.ClientResponse,
                    secrets: tuple[bytes, ...]) -> web.Response:
    try:
        raw = await up.read()
    except (TimeoutError, aiohttp.ClientError):
        raise UpstreamError(f"Provider '{provider.name}' closed the connection mid-response.") from None
    finally:
        up.release()
    kind = media_type(up.headers.get("Content-Type"))
    raw = mask(raw, secrets)  # every content type: a binary body can carry the key as well
    if 200 <= up.status < 300:
        call.usage = usage_from_body(raw, provider.type) if is_json(kind) else None
        if call.usage is None and provider.type == "bedrock":
            call.usage = usage_from_headers(up.headers)
    call.price()
    headers = relay_headers(up.headers, secrets)
    headers.update(call.headers())
    headers["Alephant-Cost-Usd"] = nanos_to_decimal_str(call.cost_nanos)
    return web.Response(status=up.status, body=raw, headers=headers)


async def _watch_client(request: web.Request, call: Call, up: aiohttp.ClientResponse) -> None:
    """Notice a client that went away while we wait on upstream (nothing to write, so no write
    error): mark the record and close the upstream response, which ends the pending read."""
    while True:
        await asyncio.sleep(DISCONNECT_POLL_S)
        if client_gone(request):
            mark_disconnected(call)
            up.close()
            return


async def _relay(request: web.Request, call: Call, provider: Provider, up: aiohttp.ClientResponse,
                 secrets: tuple[bytes, ...], sent_body: bytes = b"") -> web.StreamResponse:
    """Chunks as they arrive. Upstream cut mid-stream: the client's connection is cut too (so it
    sees a truncated stream, as it would have without us). Client gone (a failed write, the
    watcher, or the handler cancelled): the upstream response is closed at once. Either way the
    usage seen so far is recorded; a successful inference stream (one with a usage sniffer) whose
    usage never came is billed by estimate from `sent_body` and the bytes relayed."""
    tap = RelayTap()
    content_type = up.headers.get("Content-Type")
    sniffer = sniffer_for(content_type, provider.type)
    # Any content type; a key split across two reads is still caught (held back, never buffered).
    masker = StreamMasker(secrets) if secrets else None
    headers = relay_headers(up.headers, secrets)
    headers.update(call.headers())
    resp = web.StreamResponse(status=up.status, headers=headers)
    finished = False
    watcher = asyncio.create_task(_watch_client(request, call, up))
    try:
        await resp.prepare(request)
        while True:
            try:
                chunk = await up.content.readany()
            except (TimeoutError, aiohttp.ClientError):
                if call.error_code != "client_disconnected":
                    call.partial, call.error_code = True, "upstream_interrupted"
                    if request.transport is not None:
                        request.transport.close()
                return resp
            if not chunk:
                if masker is not None and (rest := masker.flush()):
                    await resp.write(rest)
                break
            if call.ttfb_ms is None:
                call.ttfb_ms = round((time.perf_counter() - call.started) * 1000, 3)
            if sniffer is not None:
                sniffer.feed(chunk)
            if masker is not None:
                chunk = masker.feed(chunk)
                if not chunk:
                    continue
            await resp.write(chunk)
            tap.feed(chunk)
        finished = True
        _settle_relayed(call, up, sniffer, sent_body, tap)
        emit_once(call)  # spooled before the client sees the stream complete
        await resp.write_eof()
    except OSError:  # ConnectionResetError included
        mark_disconnected(call)
    except asyncio.CancelledError:
        mark_disconnected(call)
        raise
    finally:
        watcher.cancel()
        if finished:
            up.release()
        else:
            up.close()  # stop reading upstream now; never return a half-read connection to the pool
        _settle_relayed(call, up, sniffer, sent_body, tap)
    return resp


def _settle_relayed(call: Call, up: aiohttp.ClientResponse, sniffer: StreamSniffer | None, sent_body: bytes,
                    tap: RelayTap) -> None:
    """Usage and cost of a relayed stream, from what the sniffer saw (an estimate for a successful
    inference stream whose usage never came). Idempotent: the first call settles."""
    if call.emitted:
        return
    if sniffer is not None:
        sniffer.close()
        call.usage = sniffer.usage
        if up.status < 400:
            call.settle_usage(sniffer.usage, sent_body, tap)
    call.price()


class Passthrough:
    """`/{provider}/*` as a pipeline endpoint: the client's request, forwarded to the provider's
    own API with the provider key swapped in (see the module docstring). Its body is forwarded
    byte for byte, so a policy clamp or tool strip cannot apply: such a request is refused."""

    name = INGRESS
    governed = True
    records_success = True

    def credential(self, request: web.Request) -> str:
        return client_credential(request.headers, split_target(request.raw_path)[1])[0]

    async def intake(self, call: Call) -> None:
        """The provider and endpoint checks, then the body: a refused call reads and forwards nothing."""
        request = call.request
        name = request.match_info["provider"]
        call.requested_model = f"{name}/"
        provider = call.snap.providers.get((call.vk.workspace_id, name))
        if provider is None:
            raise NotFound(f"Provider '{name}' is not configured for this workspace.", code="provider_not_found")
        request[_KIND] = provider.type
        if provider.options.get("passthrough") == "off":
            raise PermissionDenied(f"Provider '{name}' does not allow native passthrough.",
                                   code="passthrough_disabled")
        rest = split_target(request.raw_path)[0]
        check_path(rest)
        why = refusal(provider.type, provider.options, request.method, relative_path(base_url_of(provider), rest))
        if why is not None:
            raise PermissionDenied(f"Provider '{name}': {why}.", code="passthrough_not_allowed")
        call.target = Target(provider=provider, model="")
        settings = call.worker.settings
        call.body_bytes = await body_within(request, read_limited(request, settings.max_body_bytes),
                                            settings.body_read_timeout_s)

    def plan(self, call: Call) -> None:
        assert call.target is not None  # set by intake()
        provider, rest = call.target.provider, split_target(call.request.raw_path)[0]
        content_type = call.request.headers.get("Content-Type", "")
        model = check_model(model_of(call.body_bytes, content_type, rest))
        call.target, call.requested_model = Target(provider=provider, model=model), f"{provider.name}/{model}"
        call.route = direct_route(call.target)  # the provider's timeouts and retries; health is recorded
        call.max_tokens = max_tokens_of(call.body_bytes, content_type)
        call.input_bound = input_bound(len(call.body_bytes))

    def set_max_tokens(self, call: Call, value: int) -> bool:
        return value == call.max_tokens

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return not names

    async def dispatch(self, call: Call) -> web.StreamResponse:
        request, worker, target = call.request, call.worker, call.target
        assert target is not None  # set by intake() and plan()
        provider = target.provider
        rest, query = split_target(request.raw_path)
        if client_credential(request.headers, query)[1] or provider.type == "gemini":
            query = drop_query_param(query, "key")
        url = upstream_url(provider, rest, query)
        body = call.body_bytes
        api_key = worker.provider_key(call.provider_key.ciphertext)
        key = api_key.reveal() if api_key else None
        headers = upstream_headers(request.headers.items(), provider, key, method=request.method, url=url,
                                   body=body, now=datetime.now(UTC))
        slots = request.app.get(STREAM_SLOTS)  # absent only in unit-test apps
        if slots is not None and wants_stream(body, rest, provider.type):
            call.held.enter_context(slots.hold(call.vk.id))  # before sending: a refused call costs nothing upstream
        timeouts = call.route.timeouts if call.route is not None else Timeouts()

        async def open_() -> ClientResponse:
            up = await send(worker.session, provider.name, request.method, URL(url, encoded=True), body or None,
                            headers, timeouts.idle_s or worker.settings.upstream_timeout_s,
                            timeouts.connect_s or DEFAULT_CONNECT_TIMEOUT_S)
            if is_redirect(up.status):
                # Never followed, never relayed: a client following it could take our URL's secrets
                # (or its own key) to wherever the provider pointed.
                up.release()
                raise redirect_error(provider.name, up.status)
            return up

        # A retryable answer (429, 5xx) counts against the target's health and is retried when the
        # provider's `retries` option allows; the last one is relayed as the provider sent it.
        up = await open_upstream(call, open_, judge=_retryable_answer, discard=ClientResponse.release,
                                 status_of=_status)
        call.status = up.status
        if up.status >= 400:
            call.error_code = "upstream_error"
        secrets = secrets_of(provider.type, key)
        if is_streamed(up.headers.get("Content-Type"), up.content_length):
            call.stream = True
            return await _relay(request, call, provider, up, secrets, body)
        answer = await _buffered(call, provider, up, secrets)
        note_disconnect(request, call)
        return answer


def _status(up: ClientResponse) -> int:
    return up.status


def _retryable_answer(up: ClientResponse) -> GatewayError | None:
    """The failure a relayed upstream answer stands for, for health and retries: a retryable
    status (with its `Retry-After`), else None."""
    if not is_retryable(up.status):
        return None
    retry = up.headers.get("Retry-After")
    err = UpstreamError(f"The provider answered {up.status}.", status=up.status, code="upstream_error",
                        headers={"Retry-After": retry} if retry else None, upstream_status=up.status)
    return err


_ENDPOINT = Passthrough()


async def passthrough(request: web.Request) -> web.StreamResponse:
    """The route handler (see the module docstring)."""
    if request.match_info["provider"] in RESERVED:  # the route's pattern excludes them; kept for other routes
        raise web.HTTPNotFound()
    try:
        return await run(request, _ENDPOINT)
    except GatewayError as err:
        if is_anthropic_path(request.path) or not anthropic_client(request.get(_KIND), request.raw_path):
            raise  # the error middleware renders it (Anthropic's shape under /anthropic/, else OpenAI's)
        headers = dict(err.headers)
        if REQUEST_ID in request:
            headers["Alephant-Request-Id"] = request[REQUEST_ID]
        return web.Response(status=err.status, body=render_anthropic(err), content_type="application/json",
                            headers=headers)
