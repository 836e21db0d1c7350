"""HTTP edge shared by the data plane and the admin API: body intake and error rendering.

`read_json` enforces the content type and the body limit *before* decoding, then decodes with
msgspec into a typed Struct. `error_middleware` is the one place errors become responses.

JSON nesting is capped at `MAX_JSON_DEPTH` before a decoded body is processed further: the
translators, the validator and the upstream encoders all recurse, and a body a few hundred
levels deep would otherwise end in `RecursionError` somewhere past the point of a clean 400.

A leaf module: it imports neither plane (both serve HTTP through it).
"""

from __future__ import annotations

import gc
import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestPayloadError

from schemas.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    anthropic_status,
    render_anthropic,
    render_openai,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Set once the request is authenticated, so error responses carry it too.
REQUEST_ID: web.RequestKey[str] = web.RequestKey("alephant_request_id", str)

_any_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_PATH_RE = re.compile(r"`\$\.?([^`]*)`")
_FIELD_RE = re.compile(r"required field `([^`]+)`")

# Deeper than any real tool schema or message structure; far below Python's recursion limit, so
# every later recursive step (validation, translation, encoding upstream) has room to spare.
MAX_JSON_DEPTH = 128
_CONTAINERS = frozenset((list, dict))  # what msgspec decodes JSON arrays and objects to


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The whole raw body, any content type; 413 when larger than `limit` (checked on the declared
    length before reading, and while reading). Never holds more than `limit` + one chunk."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body is larger than the {limit}-byte limit.")
    if not request.body_exists:
        return b""
    # One read(n) returns only what has arrived so far; loop to the end of the body.
    body = bytearray()
    try:
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"Request body is larger than the {limit}-byte limit.")
    except RequestPayloadError:
        # aiohttp decompresses gzip/deflate bodies as they are read; bytes that are not what
        # Content-Encoding says (or a body cut short) surface here.
        raise bad_body_encoding() from None
    return bytes(body)


BAD_BODY_ENCODING = "invalid_body_encoding"


def bad_body_encoding() -> InvalidRequest:
    return InvalidRequest("The request body could not be read: it does not match its Content-Encoding, "
                          "or it ended early.", code=BAD_BODY_ENCODING)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole JSON body, or 415 (not JSON) / 413 (over `limit`)."""
    if not _is_json(request.content_type):
        raise UnsupportedMediaType(
            f"Unsupported Content-Type '{request.content_type or 'none'}'; send 'application/json'."
        )
    return await read_limited(request, limit)


def _validation_error(exc: msgspec.ValidationError) -> InvalidRequest:
    text = str(exc)
    field = _FIELD_RE.search(text)
    path = _PATH_RE.search(text)
    param = field.group(1) if field else (path.group(1) if path else None)
    if field and path and path.group(1):
        param = f"{path.group(1)}.{field.group(1)}"
    message = _PATH_RE.sub("", text).replace(" - at", "").strip().rstrip("-").strip()
    where = f" (at '{param}')" if param else ""
    return InvalidRequest(f"Invalid request body: {message}{where}.", param=param)


def decode_json(body: bytes) -> Any:
    """Decode bytes to plain JSON values, or a 400 that does not echo parser internals. Bodies
    nested deeper than `MAX_JSON_DEPTH` are refused (`json_too_deep`) here, before anything
    else walks them."""
    try:
        value = _any_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec raises the latter for invalid UTF-8
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid UTF-8 JSON."
        ) from None
    except RecursionError:  # nested deeper than the interpreter's stack allows
        raise too_deep() from None
    check_json_depth(body, value)
    return value


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether decoded JSON `value` nests arrays/objects more than `limit` deep. Breadth-first,
    one level at a time: `gc.get_referents` lists a level's items (dict values, list elements)
    and the container filter runs in C, so the cost is a few tens of ns per value, with no
    recursion and no per-value Python code."""
    level = [value] if type(value) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        items = gc.get_referents(*level)
        level = list(itertools.compress(items, map(_CONTAINERS.__contains__, map(type, items))))
    return False


def check_json_depth(body: bytes, value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """InvalidRequest (code `json_too_deep`) when `value`, decoded from `body`, nests deeper than
    `limit`. A body with at most `limit` opening brackets in all (nearly every request) cannot,
    and costs two `bytes.count` calls; others are walked (`json_depth_exceeds`)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return
    if json_depth_exceeds(value, limit):
        raise too_deep(limit)


def too_deep(limit: int = MAX_JSON_DEPTH) -> InvalidRequest:
    return InvalidRequest(f"The JSON body is nested deeper than the {limit}-level limit.", code="json_too_deep")


def validate(raw: Any, schema: type[T]) -> T:
    """Convert decoded JSON into `schema`, or a 400 naming the offending field in `param`."""
    if not isinstance(raw, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return msgspec.convert(raw, schema)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None


async def read_json(request: web.Request, schema: type[T], limit: int) -> tuple[T, dict[str, Any]]:
    """`(typed, raw)`: the validated Struct and the decoded dict (forwarded as-is upstream)."""
    raw = decode_json(await read_body(request, limit))
    return validate(raw, schema), raw


def is_anthropic_path(path: str) -> bool:
    """Whether errors on `path` take Anthropic's shape: the Messages API under `/v1`, `/ai` or a
    router (`/router/{id}/v1/messages`), and the Anthropic passthrough."""
    if path.startswith("/router/"):
        path = path[path.find("/", len("/router/")):]
    return path.startswith(("/v1/messages", "/ai/messages", "/anthropic/"))


def error_response(request: web.Request, err: GatewayError) -> web.Response:
    anthropic = is_anthropic_path(request.path)
    body = render_anthropic(err) if anthropic else render_openai(err)
    headers = dict(err.headers)
    if REQUEST_ID in request:
        headers["Alephant-Request-Id"] = request[REQUEST_ID]
    status = anthropic_status(err) if anthropic else err.status
    resp = web.Response(status=status, body=body, content_type="application/json", headers=headers)
    if err.code == BAD_BODY_ENCODING:
        # The rest of a body we could not decode cannot be skipped reliably: end the connection,
        # and say so, so the client does not send its next request down it.
        resp.force_close()
    return resp


def client_fault(exc: BaseException) -> GatewayError | None:
    """The 4xx for an exception a client can cause outside our own error tree (aiohttp's body
    and protocol errors, a body too deep or not UTF-8), or None for a genuine bug. Messages are
    ours: aiohttp's own quote the request bytes, headers included."""
    if isinstance(exc, RequestPayloadError):
        return bad_body_encoding()
    if isinstance(exc, ContentEncodingError):
        return UnsupportedMediaType("Unsupported Content-Encoding; send the body uncompressed, or as gzip "
                                    "or deflate.", code="unsupported_content_encoding")
    if isinstance(exc, LineTooLong):
        return InvalidRequest("The request line or a header is too long.", code="header_too_large")
    if isinstance(exc, HttpProcessingError):
        return InvalidRequest("The HTTP request is malformed.", code="malformed_request")
    if isinstance(exc, RecursionError):
        return too_deep()
    if isinstance(exc, UnicodeDecodeError):
        return InvalidRequest("The request must be valid UTF-8.", code="invalid_encoding")
    return None


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound(f"Unknown path. No route matches '{exc.reason}'.", code="unknown_url")
    if exc.status == 405:
        return InvalidRequest("Method not allowed for this path.", code="method_not_allowed", status=405)
    if exc.status == 413:
        return PayloadTooLarge("Request body is too large.")
    return InvalidRequest(exc.reason or "Bad request.", status=exc.status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure in the ingress API's error shape; never leak a stack trace."""
    try:
        return await handler(request)
    except GatewayError as err:
        return error_response(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        mapped = _from_http_exception(exc)
        if exc.status == 404:
            mapped.message = f"Unknown request URL: {request.method} {request.path}."
        return error_response(request, mapped)
    except Exception as exc:
        fault = client_fault(exc)
        if fault is not None:
            log.info("client_fault", path=request.path, error=type(exc).__name__)
            return error_response(request, fault)
        log.exception("unhandled_error", path=request.path)
        return error_response(request, InternalError("The gateway hit an internal error. It has been logged."))
