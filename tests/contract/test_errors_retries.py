"""Errors as the SDKs see them, and the SDKs' retries through the gateway (counted at the fake)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.contract.conftest import Contract

HELLO: Any = [{"role": "user", "content": "hello"}]


def _chat_attempts(contract: Contract, before: int) -> int:
    return sum(1 for r in contract["openai"].fake.requests[before:] if r.path == "/v1/chat/completions")


# --- openai SDK --------------------------------------------------------------------------------------


async def test_openai_429_is_retried_after_retry_after(contract: Contract) -> None:
    up = contract["openai"]
    before = up.seen()
    up.fake.fail_next(429, retry_after="1")
    started = time.monotonic()
    async with contract.openai(max_retries=2) as client:  # the SDK default
        completion = await client.chat.completions.create(model=up.ref, messages=HELLO)
    assert completion.choices[0].message.content == up.text
    assert _chat_attempts(contract, before) == 2
    assert time.monotonic() - started >= 0.9, "the SDK waited for the gateway's Retry-After"


async def test_openai_429_surfaces_as_rate_limit_error_with_retry_after(contract: Contract) -> None:
    up = contract["openai"]
    before = up.seen()
    up.fake.fail_next(429, retry_after="1")
    async with contract.openai(max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.with_raw_response.create(model=up.ref, messages=HELLO)
    err = info.value
    assert err.status_code == 429
    assert err.response.headers["retry-after"] == "1"
    assert err.response.headers["alephant-request-id"].startswith("req_")
    assert err.code == "upstream_rate_limited"
    assert "Rate limit reached" in err.message  # the provider's reason is kept
    assert _chat_attempts(contract, before) == 1


async def test_openai_400_is_not_retried(contract: Contract) -> None:
    up = contract["openai"]
    before = up.seen()
    up.fake.fail_next(400)
    async with contract.openai(max_retries=2) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=up.ref, messages=HELLO)
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "invalid_request_error"
    assert _chat_attempts(contract, before) == 1


async def test_openai_stream_429_before_first_byte(contract: Contract) -> None:
    up = contract["openai"]
    before = up.seen()
    up.fake.fail_next(429, retry_after="1")
    async with contract.openai(max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model=up.ref, messages=HELLO, stream=True)
    assert info.value.response.headers["retry-after"] == "1"
    assert _chat_attempts(contract, before) == 1


async def test_openai_authentication_errors(contract: Contract) -> None:
    async with contract.openai(api_key="sk-not-a-virtual-key") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="mock/echo", messages=HELLO)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    async with contract.openai() as client:  # no Authorization header at all
        with pytest.raises(openai.AuthenticationError) as info:
            await client.models.list(extra_headers={"Authorization": openai.Omit()})
    assert info.value.status_code == 401


@pytest.mark.parametrize("model", ["nope/gpt-4o", "no-such-model", "f-openai"])
async def test_openai_unknown_model_is_not_found(contract: Contract, model: str) -> None:
    async with contract.openai() as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model=model, messages=HELLO)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found" and info.value.param == "model"


async def test_openai_upstream_404_model_is_not_found(contract: Contract) -> None:
    up = contract["openai"]
    up.fake.fail_next(404)
    async with contract.openai() as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="f-openai/gpt-nonexistent", messages=HELLO)


# --- anthropic SDK ----------------------------------------------------------------------------------


def _message_attempts(contract: Contract, before: int) -> int:
    return sum(1 for r in contract["anthropic"].fake.requests[before:] if r.path.startswith("/v1/messages"))


async def test_anthropic_429_is_retried(contract: Contract) -> None:
    up = contract["anthropic"]
    before = up.seen()
    up.fake.fail_next(429, retry_after="1")
    async with contract.anthropic(max_retries=2) as client:
        message = await client.messages.create(model=up.ref, max_tokens=64, messages=HELLO)
    assert message.content[0].type == "text" and message.content[0].text == up.text
    assert _message_attempts(contract, before) == 2


async def test_anthropic_429_surfaces_as_rate_limit_error(contract: Contract) -> None:
    up = contract["anthropic"]
    before = up.seen()
    up.fake.fail_next(429, retry_after="1")
    async with contract.anthropic(max_retries=0) as client:
        with pytest.raises(anthropic.RateLimitError) as info:
            await client.messages.with_raw_response.create(model=up.ref, max_tokens=64, messages=HELLO)
    err = info.value
    assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
    assert isinstance(err.body, dict) and err.body["type"] == "error"
    assert err.body["error"]["type"] == "rate_limit_error"
    assert _message_attempts(contract, before) == 1


async def test_anthropic_400_is_not_retried(contract: Contract) -> None:
    up = contract["anthropic"]
    before = up.seen()
    up.fake.fail_next(400)
    async with contract.anthropic(max_retries=2) as client:
        with pytest.raises(anthropic.BadRequestError) as info:
            await client.messages.create(model=up.ref, max_tokens=64, messages=HELLO)
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "invalid_request_error"
    assert _message_attempts(contract, before) == 1


async def test_anthropic_529_overloaded_is_retried(contract: Contract) -> None:
    """Upstream 529: the gateway answers 503 `overloaded_error` (retryable, documented in
    providers/anthropic.py), which the SDK retries like 529."""
    up = contract["anthropic"]
    before = up.seen()
    up.fake.fail_next(529)
    async with contract.anthropic(max_retries=2) as client:
        message = await client.messages.create(model=up.ref, max_tokens=64, messages=HELLO)
    assert message.stop_reason == "end_turn"
    assert _message_attempts(contract, before) == 2

    before = up.seen()
    up.fake.fail_next(529, count=2)
    async with contract.anthropic(max_retries=1) as client:
        with pytest.raises(anthropic.InternalServerError) as info:
            await client.messages.create(model=up.ref, max_tokens=64, messages=HELLO)
    assert _message_attempts(contract, before) == 2, "one try and one retry, then the error"
    assert info.value.status_code in (503, 529)
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "overloaded_error"


async def test_anthropic_429_on_translated_path(contract: Contract) -> None:
    """A 429 from an OpenAI upstream reaches an Anthropic client as Anthropic's rate_limit_error."""
    up = contract["openai"]
    before = up.seen()
    up.fake.fail_next(429, retry_after="1")
    async with contract.anthropic(max_retries=0) as client:
        with pytest.raises(anthropic.RateLimitError) as info:
            await client.messages.create(model=up.ref, max_tokens=64, messages=HELLO)
    assert info.value.response.headers["retry-after"] == "1"
    assert _chat_attempts(contract, before) == 1


async def test_anthropic_authentication_and_not_found(contract: Contract, http: aiohttp.ClientSession) -> None:
    async with contract.anthropic(api_key="sk-not-a-virtual-key") as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(model="mock/echo", max_tokens=64, messages=HELLO)
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "authentication_error"
    async with contract.anthropic() as client:
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(model="nope/claude", max_tokens=64, messages=HELLO)
    # No credential at all: 401 in Anthropic's error shape.
    async with http.post(f"{contract.origin}/v1/messages", json={"model": "mock/echo", "max_tokens": 8,
                                                                  "messages": HELLO}) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"


async def test_anthropic_sdk_without_credentials(contract: Contract, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    async with contract.anthropic(api_key=None) as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(model="mock/echo", max_tokens=8, messages=HELLO,
                                         extra_headers={"Authorization": anthropic.Omit()})
    assert info.value.status_code == 401


async def test_chat_without_credentials_is_401_in_openai_shape(contract: Contract, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{contract.gateway.base_url}/chat/completions",
                         json={"model": "mock/echo", "messages": HELLO}) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"
