"""Popular clients as a new user would point them at the gateway, on the whole stack with the fake
OpenAI upstream (issue 10, part 6): bare model names, Claude Code's `max_tokens` to OpenAI
reasoning models, an upstream 529 for Anthropic clients, and stream usage only when asked.

Each test gets a workspace of its own (its providers point at the session's fake upstream), so
bare-name resolution never sees another suite's providers.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.upstream import FakeUpstream

A = "/admin/v1"
HELLO: Any = [{"role": "user", "content": "hello there"}]


async def _workspace(gateway: Gateway, fake: FakeUpstream, http: aiohttp.ClientSession,
                     providers: tuple[str, ...] = ("oai",), default_provider: str | None = None) -> tuple[str, str]:
    """`(workspace id, virtual key)`: a fresh workspace whose `providers` (OpenAI type) all point
    at the fake, ready on the worker (its key answers `/v1/models`)."""
    ws = f"fid{secrets.token_hex(4)}"
    body: dict[str, Any] = {"id": ws, "name": "Fidelity"}
    if default_provider is not None:
        body["default_provider"] = default_provider
    created = gateway.admin.call("POST", f"{A}/workspaces", body)
    assert created.get("default_provider") == default_provider
    for name in providers:
        gateway.admin.call("POST", f"{A}/providers", {"workspace_id": ws, "name": name, "type": "openai",
                                                       "base_url": fake.base_url, "api_key": "sk-fake-fidelity-01"})
    key: str = gateway.admin.call("POST", f"{A}/virtual-keys", {"workspace_id": ws, "name": "fidelity"})["key"]

    async def ready() -> bool | None:
        async with http.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {key}"}) as resp:
            if resp.status != 200:
                return None
            ids = {m["id"] for m in (await resp.json())["data"]}
            return True if all(f"{p}/gpt-4o-mini" in ids for p in providers) else None

    await eventually(ready)
    return ws, key


def _openai(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


# --- bare model names ------------------------------------------------------------------------------


async def test_openai_sdk_with_a_bare_model_name(gateway: Gateway, fake_upstream: FakeUpstream,
                                                 http: aiohttp.ClientSession) -> None:
    _, key = await _workspace(gateway, fake_upstream, http)
    async with _openai(gateway, key) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["alephant-provider"] == "oai"
    assert fake_upstream.requests[-1].body["model"] == "gpt-4o-mini"  # the bare name, upstream as-is
    event = await eventually(lambda: journal_event(gateway.database_url, raw.headers["alephant-request-id"]))
    assert (event["provider"], event["model"], event["status"]) == ("oai", "gpt-4o-mini", 200)


async def test_ambiguous_bare_name_is_404_naming_candidates_until_a_default_is_set(
        gateway: Gateway, fake_upstream: FakeUpstream, http: aiohttp.ClientSession) -> None:
    ws, key = await _workspace(gateway, fake_upstream, http, providers=("east", "west"))
    async with _openai(gateway, key) as sdk:
        with pytest.raises(openai.NotFoundError) as info:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert info.value.code == "model_not_found" and info.value.param == "model"
        assert "'east/gpt-4o-mini'" in info.value.message and "'west/gpt-4o-mini'" in info.value.message
        with pytest.raises(openai.NotFoundError) as info:
            await sdk.chat.completions.create(model="no-such-model", messages=HELLO)
        assert "no configured provider" in info.value.message

        patched = gateway.admin.call("PATCH", f"{A}/workspaces/{ws}", {"default_provider": "west"})
        assert patched["default_provider"] == "west"

        async def served_by_west() -> bool | None:
            try:
                raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
            except openai.NotFoundError:
                return None  # the worker has not applied the change yet
            return True if raw.headers["alephant-provider"] == "west" else None

        await eventually(served_by_west)
        # provider/model is unchanged by the default.
        raw = await sdk.chat.completions.with_raw_response.create(model="east/gpt-4o-mini", messages=HELLO)
        assert raw.headers["alephant-provider"] == "east"


def test_cli_creates_a_workspace_with_a_default_provider(gateway: Gateway) -> None:
    ws = f"fidcli{secrets.token_hex(4)}"
    env = {**os.environ, "ALEPHANT_ADMIN_URL": gateway.stack.demo["ALEPHANT_ADMIN_URL"],
           "ALEPHANT_ADMIN_TOKEN": gateway.stack.demo["ALEPHANT_ADMIN_TOKEN"]}
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "workspaces", "create", "CLI default", "--id", ws,
                           "--default-provider", "oai"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["default_provider"] == "oai"
    assert gateway.admin.call("GET", f"{A}/workspaces/{ws}")["default_provider"] == "oai"


# --- Claude Code's max_tokens to OpenAI models --------------------------------------------------------


def _claude_code_body(model: str, max_tokens: int) -> dict[str, Any]:
    """The shape Claude Code sends: system blocks, metadata, thinking off, streaming."""
    return {"model": model, "max_tokens": max_tokens, "stream": True,
            "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "list the files"}]}],
            "metadata": {"user_id": "user_fidelity_session_1"}, "temperature": 1}


CLAUDE_HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219",
                  "content-type": "application/json"}


@pytest.mark.parametrize(("model", "max_tokens", "upstream", "anomalies"), [
    # A reasoning model: renamed, and clamped to o1-preview's 32768 output cap.
    ("o1-preview", 64000, {"max_completion_tokens": 32768}, ["max_tokens_renamed", "max_tokens_clamped"]),
    # Claude Code's 32000 to o3 (cap 100k): renamed only.
    ("o3", 32000, {"max_completion_tokens": 32000}, ["max_tokens_renamed"]),
    # A non-reasoning model keeps max_tokens, clamped to its 16384 cap.
    ("gpt-4o", 32000, {"max_tokens": 16384}, ["max_tokens_clamped"]),
])
async def test_claude_code_max_tokens_fit_the_openai_model(
        gateway: Gateway, fake_upstream: FakeUpstream, http: aiohttp.ClientSession, model: str, max_tokens: int,
        upstream: dict[str, int], anomalies: list[str]) -> None:
    _, key = await _workspace(gateway, fake_upstream, http)
    headers = {**CLAUDE_HEADERS, "Authorization": f"Bearer {key}"}
    async with http.post(f"{gateway.base_url}/messages", json=_claude_code_body(f"oai/{model}", max_tokens),
                         headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
        request_id = resp.headers["Alephant-Request-Id"]
    assert "event: message_stop" in text
    sent = fake_upstream.requests[-1].body
    assert sent["model"] == model
    bounds = {k: sent[k] for k in ("max_tokens", "max_completion_tokens") if k in sent}
    assert bounds == upstream
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert event["status"] == 200
    assert [a for a in event["anomalies"] if a.startswith("max_tokens_")] == anomalies


# --- 529 for Anthropic clients, 503 for OpenAI clients --------------------------------------------


async def test_upstream_529_reaches_anthropic_sdk_as_overloaded(
        gateway: Gateway, fake_upstream: FakeUpstream, http: aiohttp.ClientSession) -> None:
    _, key = await _workspace(gateway, fake_upstream, http)
    fake_upstream.fail_next(529)
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url.removesuffix("/v1"), api_key=key,
                                        max_retries=0) as sdk:
        with pytest.raises(anthropic.OverloadedError) as info:
            await sdk.messages.create(model="oai/gpt-4o-mini", max_tokens=64,
                                      messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 529
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "overloaded_error"
    assert "returned 529" in info.value.body["error"]["message"]

    # The same upstream answer to an OpenAI client is a 503 naming the upstream reason.
    fake_upstream.fail_next(529)
    async with _openai(gateway, key) as sdk_openai:
        with pytest.raises(openai.InternalServerError) as oinfo:
            await sdk_openai.chat.completions.create(model="oai/gpt-4o-mini", messages=HELLO)
    assert oinfo.value.status_code == 503
    assert oinfo.value.code == "upstream_overloaded" and "returned 529" in oinfo.value.message


async def test_messages_under_a_v1_base_url_vercel_shape(gateway: Gateway, fake_upstream: FakeUpstream,
                                                         http: aiohttp.ClientSession) -> None:
    """The Vercel AI SDK's Anthropic provider: baseURL `.../v1`, then `/messages` appended, the
    key in `x-api-key`."""
    _, key = await _workspace(gateway, fake_upstream, http)
    base_url = gateway.base_url  # ends in /v1, as the Vercel provider's baseURL does
    assert base_url.endswith("/v1")
    async with http.post(f"{base_url}/messages", headers={**CLAUDE_HEADERS, "x-api-key": key}, json={
            "model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status == 200, await resp.text()
        message = await resp.json()
    assert message["type"] == "message" and message["content"][0]["type"] == "text"
    assert message["usage"]["output_tokens"] > 0


# --- stream usage only when asked ------------------------------------------------------------------


def _chunks(raw: bytes) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for event in raw.decode().split("\n\n"):
        if event.startswith("data: ") and event != "data: [DONE]":
            out.append(json.loads(event[6:]))
    return out


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streamed_chat_carries_usage_only_when_asked(
        gateway: Gateway, fake_upstream: FakeUpstream, http: aiohttp.ClientSession, include_usage: bool) -> None:
    _, key = await _workspace(gateway, fake_upstream, http)
    body: dict[str, Any] = {"model": "oai/gpt-4o-mini", "messages": HELLO, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with http.post(f"{gateway.base_url}/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
        request_id = resp.headers["Alephant-Request-Id"]
    # The gateway always asks the upstream for usage (to bill the call) ...
    assert fake_upstream.requests[-1].body["stream_options"] == {"include_usage": True}
    chunks = _chunks(raw)
    assert raw.rstrip().endswith(b"data: [DONE]") and chunks
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == [] and chunks[-1] is usage_chunks[0]
        assert usage_chunks[0]["usage"]["completion_tokens"] > 0
    else:
        # ... but a client that did not ask sees no usage chunk and no `usage` key at all.
        assert usage_chunks == [] and all("usage" not in c for c in chunks)
        assert all(c["choices"] for c in chunks)
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert event["usage"]["output_tokens"] > 0 and event["usage_estimated"] is False  # billed either way

    # The OpenAI SDK sees the same: usage only with include_usage.
    async with _openai(gateway, key) as sdk:
        extra: Any = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = await sdk.chat.completions.create(model="oai/gpt-4o-mini", messages=HELLO, stream=True, **extra)
        usages = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert len(usages) == (1 if include_usage else 0)
