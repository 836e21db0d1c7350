"""The one error tree of the gateway, and its rendering to each ingress API's body shape.

    GatewayError(Exception)
    ├── InvalidRequest        400 invalid_request_error        (malformed JSON, wrong types, missing fields;
    │                             also 405 method_not_allowed, 408 request_timeout, 422
    │                             idempotency_key_mismatch via `status=`)
    │   └── InvalidValue      400 invalid_request_error / invalid_value (a client string refused at the edge;
    │                             never recorded in an event)
    ├── AuthenticationFailed  401 authentication_error / invalid_api_key
    ├── PermissionDenied      403 permission_error / policy_denied
    ├── NotFound              404 not_found_error / model_not_found (or another *_not_found code)
    ├── Conflict              409 invalid_request_error / conflict
    ├── PayloadTooLarge       413 invalid_request_error / request_too_large
    ├── UnsupportedMediaType  415 invalid_request_error / unsupported_media_type
    ├── RateLimited           429 rate_limit_error / rate_limit_exceeded (carries Retry-After)
    ├── BudgetExceeded        429 insufficient_quota / budget_exceeded (OpenAI's own quota error)
    └── UpstreamError         502/503/504 upstream_error (the provider's reason, never its secrets;
                              an upstream 529 is 529 overloaded_error to Anthropic clients)

Handlers raise; one middleware renders. Messages are written for the caller and never contain
parser exception text, stack traces or secrets.
"""

from __future__ import annotations

import msgspec


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    error: ErrorDetail


class AnthropicErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    message: str


class AnthropicErrorBody(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="error"):
    error: AnthropicErrorDetail


class GatewayError(Exception):
    """Base of every error a client may see. Subclasses fix `status` and `type`; `status=` picks
    another status of the same kind (e.g. a 408 or 422 that is still an invalid request)."""

    status: int = 500
    type: str = "api_error"
    default_code: str | None = None
    # Set on errors that came from a provider (`dataplane.providers.upstream.map_upstream_error`):
    # its own HTTP status (0: no answer at all, e.g. unreachable or timed out), and whether another
    # attempt may succeed (408, 409, 429, 5xx, 529, connection errors). Routing decides on these.
    upstream_status: int | None = None
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)


class InvalidRequest(GatewayError, ValueError):
    status = 400
    type = "invalid_request_error"


class InvalidValue(InvalidRequest):
    """A client string (model, context id, property) that fails the edge checks (`dataplane.edge`).

    The lifecycle emits no event for it: the value is what the event log could not store."""

    default_code = "invalid_value"


class AuthenticationFailed(GatewayError, PermissionError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError, PermissionError):
    status = 403
    type = "permission_error"
    default_code = "policy_denied"


class NotFound(GatewayError, LookupError):
    status = 404
    type = "not_found_error"
    default_code = "model_not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(GatewayError, ValueError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(GatewayError, ValueError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class BudgetExceeded(GatewayError):
    """A budget on the request's path cannot cover the call's hold. 429 (not 402) because that is
    what OpenAI answers for an exhausted quota and what its SDKs map to RateLimitError."""

    status = 429
    type = "insufficient_quota"
    default_code = "budget_exceeded"


class UpstreamError(GatewayError, ConnectionError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"

    def __init__(self, message: str, *, status: int = 502, code: str | None = None,
                 headers: dict[str, str] | None = None, upstream_status: int | None = None) -> None:
        super().__init__(message, code=code, headers=headers, status=status)
        # The provider's own status (529 overloaded keeps its meaning for Anthropic's clients only;
        # everyone else gets `status`); 0 when no answer came. Every upstream error may be retried
        # unless `map_upstream_error` says otherwise (it answered, with a terminal status).
        self.upstream_status = upstream_status
        self.retryable = True


class InternalError(GatewayError):
    """A bug on our side. The message is generic; the details go to the log, not the client."""

    status = 500
    type = "api_error"
    default_code = "internal_error"


# Anthropic's error `type` for each HTTP status, as its SDK maps them.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}

_openai_encoder = msgspec.json.Encoder()


def render_openai(err: GatewayError) -> bytes:
    """The `{"error": {message, type, param, code}}` body the OpenAI SDKs parse."""
    return _openai_encoder.encode(OpenAIErrorBody(error=err.detail()))


def anthropic_status(err: GatewayError) -> int:
    """The HTTP status for an Anthropic-API client: an upstream 529 stays 529 (Anthropic's SDKs
    read it as overloaded and back off); every other error keeps its status."""
    if isinstance(err, UpstreamError) and err.upstream_status == 529:
        return 529
    return err.status


def render_anthropic(err: GatewayError) -> bytes:
    """The `{"type": "error", "error": {type, message}}` body the Anthropic SDKs parse."""
    kind = _ANTHROPIC_TYPES.get(err.status, "api_error")
    return _openai_encoder.encode(AnthropicErrorBody(error=AnthropicErrorDetail(type=kind, message=err.message)))
