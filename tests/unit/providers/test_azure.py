"""dataplane/providers/azure.py: deployment and v1 URLs, api-version, `api-key` auth, content
filter and other errors, through the fake Azure resource (which reuses the OpenAI fake)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dataplane.providers.azure import DEFAULT_API_VERSION, AzureOpenAIProvider, azure_chat_url, map_azure_error
from dataplane.providers.base import SSE_DONE, CallStats, UpstreamCall
from schemas.entities import Provider
from schemas.errors import InvalidRequest, NotFound, RateLimited, UpstreamError
from schemas.settings import Secret
from tests.fakes.azure_upstream import CONTENT_FILTER_BODY, FakeAzure

KEY = "azure-test-key-0000000000001234"
AZURE = AzureOpenAIProvider()


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeAzure]:
    async with FakeAzure(words=4, deployments=frozenset({"gpt4o-prod", "gpt-4o-mini"})) as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def reset(fake: FakeAzure) -> None:
    fake.clear()
    fake.content_filter_next = False



def call_for(fake: FakeAzure | None, session: aiohttp.ClientSession | None, *, model: str = "gpt-4o-mini",
             key: str | None = KEY, options: dict[str, str] | None = None, base_url: str | None = None,
             wants_usage: bool = False, **body: Any) -> UpstreamCall:
    base = base_url if base_url is not None else (fake.base_url if fake else "")
    provider = Provider(id="prov_az", workspace_id="ws_1", name="az", type="azure", base_url=base,
                        options=options or {})
    return UpstreamCall(provider=provider, model=model,
                        body={"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
                        api_key=Secret(key) if key else None, session=session,  # type: ignore[arg-type]
                        timeout_s=10, client_wants_usage=wants_usage)


@pytest.mark.parametrize(("base", "options", "model", "url"), [
    ("https://res.openai.azure.com", {}, "gpt-4o-mini",
     f"https://res.openai.azure.com/openai/deployments/gpt-4o-mini/chat/completions?api-version={DEFAULT_API_VERSION}"),
    ("https://res.openai.azure.com/openai/", {"deployment": "prod 1", "api_version": "2025-01-01-preview"}, "gpt-4o",
     "https://res.openai.azure.com/openai/deployments/prod%201/chat/completions?api-version=2025-01-01-preview"),
    ("https://res.openai.azure.com", {"api": "v1", "api_version": "ignored"}, "gpt-4o",
     "https://res.openai.azure.com/openai/v1/chat/completions"),
    ("https://res.openai.azure.com/openai/v1/", {}, "gpt-4o", "https://res.openai.azure.com/openai/v1/chat/completions"),
])
def test_urls(base: str, options: dict[str, str], model: str, url: str) -> None:
    assert azure_chat_url(call_for(None, None, base_url=base, options=options, model=model)) == url


def test_base_url_is_required() -> None:
    with pytest.raises(UpstreamError, match="needs a base_url") as info:
        azure_chat_url(call_for(None, None, base_url=""))
    assert info.value.code == "provider_misconfigured"


async def test_deployment_request_uses_api_key_and_api_version(fake: FakeAzure,
                                                               session: aiohttp.ClientSession) -> None:
    resp = await AZURE.complete(call_for(fake, session, model="gpt-4o", options={"deployment": "gpt4o-prod"}))
    body = json.loads(resp.body)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert resp.usage is not None and resp.usage.output_tokens == 4
    [req] = fake.requests
    assert req.path == f"/openai/deployments/gpt4o-prod/chat/completions?api-version={DEFAULT_API_VERSION}"
    assert req.headers["api-key"] == "<redacted>" and req.api_key_hint == KEY[-4:]
    assert "authorization" not in req.headers


async def test_v1_api_has_no_api_version(fake: FakeAzure, session: aiohttp.ClientSession) -> None:
    await AZURE.complete(call_for(fake, session, options={"api": "v1"}))
    assert fake.requests[-1].path == "/openai/v1/chat/completions"
    assert fake.requests[-1].body["model"] == "gpt-4o-mini"


async def test_entra_bearer_token(fake: FakeAzure, session: aiohttp.ClientSession) -> None:
    await AZURE.complete(call_for(fake, session, options={"auth": "bearer"}))
    assert fake.requests[-1].headers["authorization"] == "<redacted>"
    assert "api-key" not in fake.requests[-1].headers


async def test_streaming_reuses_the_openai_relay(fake: FakeAzure, session: aiohttp.ClientSession) -> None:
    for wants in (False, True):
        stats = CallStats()
        events = [e async for e in AZURE.stream(call_for(fake, session, wants_usage=wants, stream=True), stats)]
        assert events[-1].rstrip(b"\n") == SSE_DONE.rstrip(b"\n")
        assert stats.usage is not None and stats.usage.output_tokens == 4
        assert any(b'"choices":[]' in e for e in events) is wants
        assert fake.requests[-1].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(("options", "path"), [
    ({"deployment": "gpt4o-prod"}, f"/openai/deployments/gpt4o-prod/embeddings?api-version={DEFAULT_API_VERSION}"),
    ({"api": "v1"}, "/openai/v1/embeddings"),
])
async def test_embeddings_use_the_sibling_azure_path(fake: FakeAzure, session: aiohttp.ClientSession,
                                                     options: dict[str, str], path: str) -> None:
    call = call_for(fake, session, options=options)
    call.body = {"model": "gpt-4o-mini", "input": ["a", "b"]}
    resp = await AZURE.embed(call)
    assert len(json.loads(resp.body)["data"]) == 2
    assert resp.usage is not None and resp.usage.input_tokens == 2
    assert fake.requests[-1].path == path and fake.requests[-1].headers["api-key"] == "<redacted>"


async def test_content_filter_is_a_clear_400(fake: FakeAzure, session: aiohttp.ClientSession) -> None:
    fake.content_filter_next = True
    with pytest.raises(InvalidRequest) as info:
        await AZURE.complete(call_for(fake, session))
    assert (info.value.status, info.value.code) == (400, "content_filter")
    assert "content filter (jailbreak, violence)" in info.value.message
    assert "content management policy" in info.value.message


async def test_content_filter_in_a_stream_request_fails_before_the_first_event(
        fake: FakeAzure, session: aiohttp.ClientSession) -> None:
    fake.content_filter_next = True
    with pytest.raises(InvalidRequest, match="content filter"):
        await anext(AZURE.stream(call_for(fake, session, stream=True), CallStats()))


async def test_missing_key_and_unknown_deployment(fake: FakeAzure, session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamError) as info:
        await AZURE.complete(call_for(fake, session, key=None))
    assert (info.value.status, info.value.code) == (502, "upstream_auth_error")
    with pytest.raises(NotFound, match="deployment"):
        await AZURE.complete(call_for(fake, session, options={"deployment": "nope"}))


async def test_rate_limits_keep_retry_after(fake: FakeAzure, session: aiohttp.ClientSession) -> None:
    fake.fail_next(429, retry_after="7")
    with pytest.raises(RateLimited) as info:
        await AZURE.complete(call_for(fake, session))
    assert info.value.headers == {"Retry-After": "7"}


def test_error_mapper_masks_the_key_and_falls_back() -> None:
    raw = json.dumps({"error": {"code": "content_filter", "message": f"blocked {KEY}"}}).encode()
    err = map_azure_error("az", 400, raw, {}, KEY)
    assert isinstance(err, InvalidRequest) and err.code == "content_filter" and KEY not in err.message
    inner_only = json.dumps({"error": {"code": "BadRequest", "message": "x",
                                       "innererror": {"code": "ResponsibleAIPolicyViolation"}}}).encode()
    assert map_azure_error("az", 400, inner_only, {}, None).code == "content_filter"
    plain = map_azure_error("az", 400, b'{"error": {"code": "invalid", "message": "bad"}}', {}, None)
    assert plain.code == "upstream_invalid_request"
    assert map_azure_error("az", 400, CONTENT_FILTER_BODY, {}, None).message.count("jailbreak") == 1
    assert map_azure_error("az", 500, b"oops", {}, None).status == 502
