"""Bad input gets its documented 4xx in the OpenAI error shape, never a 500 (ARCHITECTURE §7)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import Gateway

GOOD = b'{"model":"mock/echo","messages":[{"role":"user","content":"hi"}]}'

CASES: list[tuple[str, bytes, str | None, bool, int, str, str | None]] = [
    # (case, body, content type, send key, status, error.type, error.code)
    ("malformed json", b'{"model": "mock/echo", "messages": [', "application/json", True, 400,
     "invalid_request_error", None),
    ("invalid utf-8", b'{"model": "mock/echo\xff\xfe", "messages": []}', "application/json", True, 400,
     "invalid_request_error", None),
    ("not an object", b"[1, 2, 3]", "application/json", True, 400, "invalid_request_error", None),
    ("missing model", b'{"messages":[{"role":"user","content":"hi"}]}', "application/json", True, 400,
     "invalid_request_error", None),
    ("missing messages", b'{"model":"mock/echo"}', "application/json", True, 400, "invalid_request_error", None),
    ("wrong type", b'{"model":"mock/echo","messages":"hi"}', "application/json", True, 400,
     "invalid_request_error", None),
    ("n out of range", b'{"model":"mock/echo","n":0,"messages":[{"role":"user","content":"hi"}]}',
     "application/json", True, 400, "invalid_request_error", None),
    ("max_tokens out of range", b'{"model":"mock/echo","max_tokens":-1,"messages":[{"role":"user","content":"x"}]}',
     "application/json", True, 400, "invalid_request_error", None),
    ("unknown model", b'{"model":"nosuch/model","messages":[{"role":"user","content":"hi"}]}', "application/json",
     True, 404, "not_found_error", "model_not_found"),
    ("bare model no provider offers", b'{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}',
     "application/json", True, 404, "not_found_error", "model_not_found"),
    ("wrong content type", GOOD, "text/plain", True, 415, "invalid_request_error", "unsupported_media_type"),
    ("missing key", GOOD, "application/json", False, 401, "authentication_error", "invalid_api_key"),
]


def assert_openai_error(body: Any, err_type: str, code: str | None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == err_type
    if code is not None:
        assert body["error"]["code"] == code
    message = body["error"]["message"]
    assert message and "Traceback" not in message and "msgspec" not in message


@pytest.mark.parametrize(("case", "body", "ctype", "with_key", "status", "err_type", "code"), CASES,
                         ids=[c[0] for c in CASES])
async def test_bad_input_is_a_clear_4xx(gateway: Gateway, http: aiohttp.ClientSession, case: str, body: bytes,
                                        ctype: str | None, with_key: bool, status: int, err_type: str,
                                        code: str | None) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    if with_key:
        headers["Authorization"] = f"Bearer {gateway.demo_key}"
    async with http.post(f"{gateway.base_url}/chat/completions", data=body, headers=headers) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        assert_openai_error(await resp.json(), err_type, code)


async def test_missing_model_names_the_param(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{gateway.base_url}/chat/completions", data=b'{"messages":[]}',
                         headers={"Authorization": f"Bearer {gateway.demo_key}",
                                  "Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] in ("model", "messages")


async def test_oversized_body_is_413_before_decoding(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    limit = 4 * 1024 * 1024
    padding = b"x" * (limit + 1)
    body = b'{"model":"mock/echo","messages":[{"role":"user","content":"' + padding + b'"}]}'
    async with http.post(f"{gateway.base_url}/chat/completions", data=io.BytesIO(body),
                         headers={"Authorization": f"Bearer {gateway.demo_key}",
                                  "Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert_openai_error(await resp.json(), "invalid_request_error", "request_too_large")


async def test_bad_key_and_unknown_path(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{gateway.base_url}/chat/completions", data=GOOD,
                         headers={"Authorization": "Bearer sk-alph-not-a-real-key",
                                  "Content-Type": "application/json"}) as resp:
        assert resp.status == 401
        body = await resp.json()
        assert_openai_error(body, "authentication_error", "invalid_api_key")
        assert "sk-alph-not-a-real-key" not in body["error"]["message"]
    async with http.get(f"{gateway.base_url}/nope", headers={"Authorization": f"Bearer {gateway.demo_key}"}) as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json(), "not_found_error", None)


async def test_body_arriving_in_pieces_is_read_whole(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    text = "piece " * 40_000  # ~240 KB, sent chunked in 16 KB writes with pauses between them
    body = json.dumps({"model": "mock/echo", "messages": [{"role": "user", "content": text}]}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16_384):
            yield body[start:start + 16_384]
            await asyncio.sleep(0.001)

    async with http.post(f"{gateway.base_url}/chat/completions", data=pieces(),
                         headers={"Authorization": f"Bearer {gateway.demo_key}",
                                  "Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    # The mock echoes only the start of a long prompt (its output is capped), but counts all of it.
    assert text.startswith(answer["choices"][0]["message"]["content"])
    assert answer["usage"]["prompt_tokens"] == len(text) // 4 + 3
