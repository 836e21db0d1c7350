"""schemas/errors.py: the one error tree and its OpenAI / Anthropic body shapes."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import (
    AuthenticationFailed,
    Conflict,
    GatewayError,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    UnsupportedMediaType,
    UpstreamError,
    render_anthropic,
    render_openai,
)

CASES = [
    # error, status, openai type, openai code, anthropic type
    (InvalidRequest("bad", param="model"), 400, "invalid_request_error", None, "invalid_request_error"),
    (AuthenticationFailed("no key"), 401, "authentication_error", "invalid_api_key", "authentication_error"),
    (PermissionDenied("no"), 403, "permission_error", "policy_denied", "permission_error"),
    (PermissionDenied("wait", code="approval_required"), 403, "permission_error", "approval_required",
     "permission_error"),
    (NotFound("no model", param="model"), 404, "not_found_error", "model_not_found", "not_found_error"),
    (Conflict("dup"), 409, "invalid_request_error", "conflict", "invalid_request_error"),
    (PayloadTooLarge("big"), 413, "invalid_request_error", "request_too_large", "request_too_large"),
    (UnsupportedMediaType("xml"), 415, "invalid_request_error", "unsupported_media_type",
     "invalid_request_error"),
    (RateLimited("slow down", headers={"Retry-After": "3"}), 429, "rate_limit_error", "rate_limit_exceeded",
     "rate_limit_error"),
    (UpstreamError("provider down"), 502, "upstream_error", "upstream_error", "api_error"),
    (UpstreamError("overloaded", status=503), 503, "upstream_error", "upstream_error", "overloaded_error"),
    (UpstreamError("timeout", status=504, code="upstream_timeout"), 504, "upstream_error", "upstream_timeout",
     "api_error"),
    (InternalError("oops"), 500, "api_error", "internal_error", "api_error"),
]


@pytest.mark.parametrize(("err", "status", "kind", "code", "_anthropic"), CASES)
def test_render_openai(err: GatewayError, status: int, kind: str, code: str | None, _anthropic: str) -> None:
    body = msgspec.json.decode(render_openai(err))
    assert err.status == status
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] == err.message
    assert body["error"]["type"] == kind
    assert body["error"]["code"] == code
    assert body["error"]["param"] == err.param


@pytest.mark.parametrize(("err", "status", "_kind", "_code", "anthropic"), CASES)
def test_render_anthropic(err: GatewayError, status: int, _kind: str, _code: str | None, anthropic: str) -> None:
    body = msgspec.json.decode(render_anthropic(err))
    assert body == {"type": "error", "error": {"type": anthropic, "message": err.message}}


def test_openai_param_is_rendered() -> None:
    body = msgspec.json.decode(render_openai(InvalidRequest("bad", param="messages[0].role")))
    assert body["error"]["param"] == "messages[0].role"


def test_explicit_code_overrides_default() -> None:
    err = NotFound("no provider", code="provider_not_found")
    assert msgspec.json.decode(render_openai(err))["error"]["code"] == "provider_not_found"


def test_headers_are_carried_not_rendered() -> None:
    err = RateLimited("slow down", headers={"Retry-After": "3"})
    assert err.headers == {"Retry-After": "3"}
    assert b"Retry-After" not in render_openai(err)
    assert InvalidRequest("x").headers == {}


def test_upstream_status_is_per_instance() -> None:
    UpstreamError("a", status=504)
    assert UpstreamError("b").status == 502
    assert UpstreamError.status == 502


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (InvalidRequest, ValueError),
        (AuthenticationFailed, PermissionError),
        (PermissionDenied, PermissionError),
        (NotFound, LookupError),
        (PayloadTooLarge, ValueError),
        (UnsupportedMediaType, ValueError),
        (UpstreamError, ConnectionError),
    ],
)
def test_errors_subclass_the_builtins_callers_catch(cls: type[GatewayError], builtin: type[Exception]) -> None:
    assert issubclass(cls, GatewayError)
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("x")


def test_every_error_is_a_gateway_error() -> None:
    for cls in (Conflict, RateLimited, InternalError):
        assert issubclass(cls, GatewayError)
    assert str(InvalidRequest("the message")) == "the message"


@given(message=st.text(max_size=200))
def test_any_message_renders_as_valid_json(message: str) -> None:
    err = InvalidRequest(message)
    assert msgspec.json.decode(render_openai(err))["error"]["message"] == message
    assert msgspec.json.decode(render_anthropic(err))["error"]["message"] == message
