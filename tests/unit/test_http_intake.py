"""schemas/http.py: body intake (415 / 413 / 400) and validation into typed Structs."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import msgspec
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import InvalidRequest, NotFound, PayloadTooLarge, RateLimited, UnsupportedMediaType
from schemas.http import REQUEST_ID, decode_json, error_response, read_body, read_json, validate
from schemas.openai import ChatCompletionRequest

GOOD = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}


# --- decode_json -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"model": }',
        b"{'model': 'x'}",
        b'{"a": 1} trailing',
        b"\xff\xfe{}",
        b"nul",
        # Invalid UTF-8 inside a string: msgspec raises UnicodeDecodeError there, not DecodeError.
        b'{"a": "\xc3"}',
        b'{"model\xff": "x"}',
    ],
)
def test_decode_json_rejects_malformed_body_without_parser_text(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_json(body)
    err = info.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert "JSON" in err.message
    # No msgspec internals (positions, "malformed", "truncated", exception class names).
    for leak in ("char", "position", "DecodeError", "malformed", "truncated", "msgspec"):
        assert leak not in err.message
    assert err.__cause__ is None
    assert err.__suppress_context__


def test_decode_json_returns_plain_values() -> None:
    assert decode_json(b'{"a": [1, 2.5, null, "x"]}') == {"a": [1, 2.5, None, "x"]}


# --- validate ----------------------------------------------------------------------------------


def test_validate_accepts_a_good_body() -> None:
    req = validate(GOOD, ChatCompletionRequest)
    assert req.model == "mock/echo"
    assert req.messages[0].role == "user"


def test_missing_model_names_model() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate({"messages": GOOD["messages"]}, ChatCompletionRequest)
    assert info.value.param == "model"
    assert "model" in info.value.message


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"model": 5}, "model"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}, {"role": 3}]}, "messages[1].role"),
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
    ],
)
def test_wrong_types_give_400_with_param(patch: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate({**GOOD, **patch}, ChatCompletionRequest)
    assert info.value.status == 400
    assert info.value.param == param
    assert "$" not in info.value.message


def test_empty_messages_rejected() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate({**GOOD, "messages": []}, ChatCompletionRequest)
    assert info.value.param == "messages"


@pytest.mark.parametrize("raw", [[], [GOOD], "x", 1, None])
def test_non_object_body_rejected(raw: Any) -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        validate(raw, ChatCompletionRequest)


def test_unknown_fields_are_allowed() -> None:
    req = validate({**GOOD, "tools": [], "seed": 1}, ChatCompletionRequest)
    assert req.model == "mock/echo"


@given(raw=st.dictionaries(st.sampled_from(["model", "messages", "stream", "n", "max_tokens", "x"]),
                           st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2)))
def test_validate_only_raises_invalid_request(raw: dict[str, Any]) -> None:
    try:
        validate(raw, ChatCompletionRequest)
    except InvalidRequest as err:
        assert err.status == 400
        assert err.param is None or err.param != ""


# --- read_body / read_json (with aiohttp's mocked request) -------------------------------------


def mocked(body: bytes, content_type: str | None = "application/json", *, length: bool = True,
           path: str = "/v1/chat/completions") -> web.Request:
    stream = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if length:
        headers["Content-Length"] = str(len(body))
    return make_mocked_request("POST", path, headers=headers, payload=stream)


async def test_read_json_returns_typed_and_raw() -> None:
    body = msgspec.json.encode({**GOOD, "extra": {"kept": True}})
    typed, raw = await read_json(mocked(body), ChatCompletionRequest, 10_000)
    assert typed.model == "mock/echo"
    assert raw["extra"] == {"kept": True}


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "application/vnd.api+json"])
async def test_json_content_types_accepted(ctype: str) -> None:
    assert await read_body(mocked(b"{}", ctype), 100) == b"{}"


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(ctype: str | None) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        await read_body(mocked(b"{}", ctype), 100)
    assert info.value.status == 415


async def test_declared_length_over_limit_is_413() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        await read_body(mocked(b"x" * 101), 100)
    assert info.value.status == 413


async def test_undeclared_length_over_limit_is_413() -> None:
    with pytest.raises(PayloadTooLarge):
        await read_body(mocked(b"x" * 5000, length=False), 100)


async def test_body_at_the_limit_is_accepted() -> None:
    assert await read_body(mocked(b"x" * 100, length=False), 100) == b"x" * 100


async def test_read_json_malformed_is_400() -> None:
    with pytest.raises(InvalidRequest):
        await read_json(mocked(b"{nope"), ChatCompletionRequest, 100)


# --- error_response picks the body shape by path -------------------------------------------------


async def test_error_response_openai_shape_with_headers() -> None:
    resp = error_response(mocked(b"{}"), RateLimited("slow", headers={"Retry-After": "2"}))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "2"
    assert "Alephant-Request-Id" not in resp.headers
    assert resp.content_type == "application/json"
    assert isinstance(resp.body, bytes)
    assert msgspec.json.decode(resp.body)["error"]["code"] == "rate_limit_exceeded"


async def test_error_response_echoes_the_request_id() -> None:
    request = mocked(b"{}")
    request[REQUEST_ID] = "req_1"
    resp = error_response(request, InvalidRequest("bad"))
    assert resp.status == 400
    assert resp.headers["Alephant-Request-Id"] == "req_1"


async def test_error_response_anthropic_shape_on_messages_path() -> None:
    resp = error_response(mocked(b"{}", path="/v1/messages"), NotFound("no model"))
    assert resp.status == 404
    assert isinstance(resp.body, bytes)
    assert msgspec.json.decode(resp.body) == {"type": "error",
                                               "error": {"type": "not_found_error", "message": "no model"}}
