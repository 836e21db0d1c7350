"""dataplane/providers/openai_compat.py through the OpenAI adapter, replayed against a scripted fake.

The bodies and streams below are shaped like what each provider documents or was seen sending
(providers.md §1.0, §1.9): Mistral's flat errors and finish reasons, DeepSeek's cache counters
and `reasoning_content`, xAI's reasoning outside `completion_tokens`, Together's `eos`, Groq's
`x_groq.usage`, OpenRouter's SSE comments and mid-stream errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from dataplane.providers.base import SSE_DONE, CallStats, UpstreamCall
from dataplane.providers.openai import DEFAULT_BASE_URL, OpenAIProvider
from dataplane.providers.openai_compat import (
    PROFILES,
    map_compat_error,
    normalize_usage,
    prepare_chat,
    strict_tool_id,
)
from schemas.entities import Provider
from schemas.errors import GatewayError, InvalidRequest, RateLimited, UpstreamError
from schemas.events import Usage
from schemas.settings import Secret
from tests.fakes.compat_upstream import ScriptedUpstream
from tests.unit.providers.chat_stream import chat_chunks

KEY = "sk-provider-secret-0001"


@pytest.fixture
async def up() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream() as upstream:
        yield upstream



def call_for(kind: str, up: ScriptedUpstream, session: aiohttp.ClientSession, *, stream: bool = False,
             wants_usage: bool = False, **body: Any) -> UpstreamCall:
    provider = Provider(id=f"ws.{kind}", workspace_id="ws", name=kind, type=kind,  # type: ignore[arg-type]
                        base_url=up.base_url)
    return UpstreamCall(provider=provider, model="m", session=session, timeout_s=5.0, api_key=Secret(KEY),
                        client_wants_usage=wants_usage,
                        body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **body})


def chunk(choices: list[dict[str, Any]] | None = None, **extra: Any) -> bytes:
    payload = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": choices if choices is not None else [], **extra}
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def delta(content: str | None = None, finish: str | None = None, **d: Any) -> list[dict[str, Any]]:
    body = {**({"content": content} if content is not None else {}), **d}
    return [{"index": 0, "delta": body, "finish_reason": finish}]


def completion(finish: str = "stop", usage: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}, **extra}


async def collect(kind: str, up: ScriptedUpstream, session: aiohttp.ClientSession,
                  **kw: Any) -> tuple[list[bytes], CallStats]:
    stats = CallStats()
    out = [e async for e in OpenAIProvider(kind).stream(call_for(kind, up, session, stream=True, **kw), stats)]
    return out, stats


payloads = chat_chunks


# --- the table ----------------------------------------------------------------------------------


def test_every_family_type_has_a_profile_with_an_https_default() -> None:
    family = {"groq", "mistral", "deepseek", "xai", "together", "fireworks", "openrouter", "perplexity", "cohere"}
    assert set(PROFILES) == family
    assert all(p.base_url.startswith("https://") and not p.base_url.endswith("/") for p in PROFILES.values())
    assert PROFILES["cohere"].base_url == "https://api.cohere.ai/compatibility/v1"
    assert OpenAIProvider("openai").default_base_url == DEFAULT_BASE_URL
    assert OpenAIProvider("openai").profile is None
    assert OpenAIProvider("groq").default_base_url == "https://api.groq.com/openai/v1"


def test_default_base_url_is_used_when_the_provider_has_none() -> None:
    provider = Provider(id="ws.d", workspace_id="ws", name="d", type="deepseek")
    call = UpstreamCall(provider=provider, model="m", body={}, api_key=None, session=None,  # type: ignore[arg-type]
                        timeout_s=1)
    assert OpenAIProvider("deepseek")._request(call)[0] == "https://api.deepseek.com/chat/completions"


@pytest.mark.parametrize(("kind", "raw", "mapped"), [
    ("mistral", "model_length", "length"),
    ("together", "eos", "stop"),
    ("together", "eos_token", "stop"),
    ("cohere", "MAX_TOKENS", "length"),
    ("groq", "stop", None),
    ("fireworks", "tool_calls", None),
])
def test_finish_reason_table(kind: str, raw: str, mapped: str | None) -> None:
    assert PROFILES[kind].finish_reasons.get(raw) == mapped


@pytest.mark.parametrize(("kind", "reason", "status"), [
    ("mistral", "error", 502), ("openrouter", "error", 502), ("deepseek", "insufficient_system_resource", 503),
    ("groq", "error", 502), ("cohere", "TIMEOUT", 504),
])
def test_error_finish_reasons(kind: str, reason: str, status: int) -> None:
    failure = PROFILES[kind].finish_error(reason)
    assert failure is not None and failure[0] == status
    assert PROFILES[kind].finish_error("stop") is None


# --- requests -----------------------------------------------------------------------------------


def test_strict_tool_ids_are_stable_and_valid() -> None:
    assert strict_tool_id("abcDEF123") == "abcDEF123"
    rewritten = strict_tool_id("call_9f8e7d6c5b4a")
    assert len(rewritten) == 9 and rewritten.isalnum() and rewritten.isascii()
    assert strict_tool_id("call_9f8e7d6c5b4a") == rewritten
    assert strict_tool_id("call_9f8e7d6c5b4b") != rewritten
    assert strict_tool_id("toolu_01A") != strict_tool_id("toolu_01B")


def test_mistral_request_rewrites_ids_consistently_and_strips_rejected_fields() -> None:
    body = {
        "model": "mistral-small", "stream": True, "stream_options": {"include_usage": True},
        "max_completion_tokens": 50,
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_abc123xyz", "type": "function", "function": {"name": "w", "arguments": "{}"}},
                {"id": "Ab3dE6gH9", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_abc123xyz", "content": "sunny"},
            {"role": "tool", "tool_call_id": "Ab3dE6gH9", "content": "rainy"},
        ],
    }
    snapshot = msgspec.json.encode(body)
    out = prepare_chat(PROFILES["mistral"], body, stream=True)
    assert msgspec.json.encode(body) == snapshot  # the client's body is untouched
    assert "stream_options" not in out and "max_completion_tokens" not in out and out["max_tokens"] == 50
    calls = out["messages"][1]["tool_calls"]
    assert calls[0]["id"] == out["messages"][2]["tool_call_id"] == strict_tool_id("call_abc123xyz")
    assert calls[1]["id"] == out["messages"][3]["tool_call_id"] == "Ab3dE6gH9"


def test_stream_options_added_or_stripped_per_type() -> None:
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": False}}
    assert prepare_chat(PROFILES["groq"], body, stream=True)["stream_options"] == {"include_usage": True}
    for kind in ("mistral", "cohere", "perplexity"):
        assert "stream_options" not in prepare_chat(PROFILES[kind], body, stream=True)
    assert prepare_chat(PROFILES["xai"], {"model": "m"}, stream=False) == {"model": "m"}


# --- usage --------------------------------------------------------------------------------------


def test_xai_reasoning_is_added_to_completion_for_us_and_the_client() -> None:
    raw = {"prompt_tokens": 10120, "completion_tokens": 1499, "total_tokens": 14428,
           "prompt_tokens_details": {"cached_tokens": 128}, "completion_tokens_details": {"reasoning_tokens": 2809}}
    usage, fixed = normalize_usage(PROFILES["xai"], raw)
    assert usage == Usage(input_tokens=10120, output_tokens=4308, cache_read_tokens=128, reasoning_tokens=2809)
    assert fixed is not None and fixed["completion_tokens"] == 4308 and fixed["total_tokens"] == 14428
    assert raw["completion_tokens"] == 1499  # a copy is rewritten
    assert normalize_usage(PROFILES["xai"], {"prompt_tokens": 3, "completion_tokens": 2})[1] is None
    # Other types never add reasoning: OpenAI semantics already include it.
    assert normalize_usage(PROFILES["groq"], raw) == (
        Usage(input_tokens=10120, output_tokens=1499, cache_read_tokens=128, reasoning_tokens=2809), None)


def test_deepseek_cache_hits_become_cached_tokens() -> None:
    raw = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, "prompt_cache_hit_tokens": 64,
           "prompt_cache_miss_tokens": 36, "completion_tokens_details": {"reasoning_tokens": 5}}
    usage, fixed = normalize_usage(PROFILES["deepseek"], raw)
    assert usage == Usage(input_tokens=100, output_tokens=20, cache_read_tokens=64, reasoning_tokens=5)
    assert fixed is not None and fixed["prompt_tokens_details"] == {"cached_tokens": 64}
    already = {**raw, "prompt_tokens_details": {"cached_tokens": 64}}
    assert normalize_usage(PROFILES["deepseek"], already)[1] is None


def test_cache_writes_and_junk_values() -> None:
    usage, _ = normalize_usage(PROFILES["openrouter"], {
        "prompt_tokens": 50, "completion_tokens": "7", "prompt_tokens_details": {"cached_tokens": 10,
                                                                                 "cache_write_tokens": 30}})
    assert usage == Usage(input_tokens=50, output_tokens=0, cache_read_tokens=10, cache_write_tokens=30)


# --- errors -------------------------------------------------------------------------------------


def test_mistral_flat_error_bodies() -> None:
    detail = (b'{"object":"error","message":{"detail":[{"type":"extra_forbidden","loc":["body","stream_options",'
              b'"include_usage"],"msg":"Extra inputs are not permitted","input":true}]},'
              b'"type":"invalid_request_error","param":null,"code":null}')
    err = map_compat_error("mistral", 422, detail, {}, None)
    assert isinstance(err, InvalidRequest) and err.code == "upstream_invalid_request"
    assert "stream_options.include_usage: Extra inputs are not permitted" in err.message
    flat = b'{"object":"error","message":"Tool call id was call_1 but must be a-z, A-Z, 0-9, with a length of 9",' \
           b'"type":"invalid_request_message_error","param":null,"code":"3280"}'
    assert "must be a-z" in map_compat_error("mistral", 400, flat, {}, None).message


def test_openrouter_numeric_error_code_and_raw_metadata() -> None:
    raw = msgspec.json.encode({"error": {"code": 429, "message": "Provider returned error",
                                         "metadata": {"raw": "upstream is busy", "provider_name": "X"}}})
    err = map_compat_error("openrouter", 429, raw, {"Retry-After": "3"}, None)
    assert isinstance(err, RateLimited) and err.headers == {"Retry-After": "3"}
    assert "Provider returned error (upstream is busy)" in err.message


def test_secrets_are_masked_in_mapped_errors() -> None:
    err = map_compat_error("mistral", 400, msgspec.json.encode({"message": f"bad key {KEY}"}), {}, KEY)
    assert KEY not in err.message and "***" in err.message


# --- non-streamed, through the adapter -----------------------------------------------------------


async def test_unchanged_bodies_are_relayed_byte_exact(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    raw = msgspec.json.encode(completion())
    up.reply(body=raw)
    resp = await OpenAIProvider("fireworks").complete(call_for("fireworks", up, session))
    assert resp.body == raw
    assert resp.usage == Usage(input_tokens=5, output_tokens=2)
    assert up.requests[-1].path == "/v1/chat/completions"
    assert up.requests[-1].headers["authorization"] == f"Bearer {KEY}"


async def test_non_streamed_finish_and_usage_fixed(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(body=completion("eos"))
    body = msgspec.json.decode((await OpenAIProvider("together").complete(call_for("together", up, session))).body)
    assert body["choices"][0]["finish_reason"] == "stop"
    up.reply(body=completion(usage={"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 30,
                                    "completion_tokens_details": {"reasoning_tokens": 20}}))
    resp = await OpenAIProvider("xai").complete(call_for("xai", up, session))
    assert msgspec.json.decode(resp.body)["usage"]["completion_tokens"] == 21
    assert resp.usage is not None and resp.usage.output_tokens == 21


async def test_non_streamed_error_answers_raise(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(body={"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-day"}})
    with pytest.raises(RateLimited, match="free-models-per-day"):
        await OpenAIProvider("openrouter").complete(call_for("openrouter", up, session))
    up.reply(body=completion("insufficient_system_resource"))
    with pytest.raises(UpstreamError) as info:
        await OpenAIProvider("deepseek").complete(call_for("deepseek", up, session))
    assert info.value.status == 503
    up.reply(status=422, body={"object": "error", "message": "Invalid model: x", "type": "invalid_model"})
    with pytest.raises(InvalidRequest, match="Invalid model: x"):
        await OpenAIProvider("mistral").complete(call_for("mistral", up, session))


# --- streamed, through the adapter ---------------------------------------------------------------


async def test_openrouter_comments_dropped_and_mid_stream_error_raised(
        up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(sse=[
        b": OPENROUTER PROCESSING\n\n",
        chunk(delta("Hel", role="assistant")),
        b": OPENROUTER PROCESSING\n\n",
        chunk(delta("lo")),
        chunk([{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
              error={"code": "server_error", "message": "Provider disconnected unexpectedly"},
              usage={"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}),
        b"data: [DONE]\n\n",
    ])
    stats = CallStats()
    got: list[bytes] = []
    with pytest.raises(GatewayError) as info:
        async for event in OpenAIProvider("openrouter").stream(call_for("openrouter", up, session, stream=True),
                                                               stats):
            got.append(event)
    assert info.value.status == 502 and "Provider disconnected unexpectedly" in info.value.message
    assert all(e.startswith(b"data: {") for e in got) and len(got) == 2  # comments never reach the client
    assert stats.usage == Usage(input_tokens=4, output_tokens=2)  # recorded before the error


async def test_openrouter_numeric_mid_stream_code(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(sse=[chunk(delta("a")), chunk(error={"code": 429, "message": "slow down"})])
    with pytest.raises(RateLimited, match="slow down"):
        await collect("openrouter", up, session)


async def test_together_eos_rewritten_in_stream(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(sse=[chunk(delta("hi", role="assistant")), chunk(delta(None, "eos"),
             usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}), b"data: [DONE]\n\n"])
    events, stats = await collect("together", up, session)
    assert [p["choices"][0]["finish_reason"] for p in payloads(events)] == [None, "stop"]
    assert up.requests[-1].body["stream_options"] == {"include_usage": True}
    assert stats.usage == Usage(input_tokens=3, output_tokens=1)


async def test_mistral_stream_finish_and_error(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(sse=[chunk(delta("x", role="assistant")),
                  chunk(delta(None, "model_length"), usage={"prompt_tokens": 2, "completion_tokens": 9,
                                                            "total_tokens": 11}),
                  b"data: [DONE]\n\n"])
    events, stats = await collect("mistral", up, session, stream_options={"include_usage": True})
    assert payloads(events)[-1]["choices"][0]["finish_reason"] == "length"
    assert "stream_options" not in up.requests[-1].body
    assert stats.usage == Usage(input_tokens=2, output_tokens=9)
    up.reply(sse=[chunk(delta("x")), chunk(delta(None, "error"))])
    with pytest.raises(UpstreamError, match="finish_reason 'error'"):
        await collect("mistral", up, session)


async def test_deepseek_reasoning_content_passes_byte_exact(
        up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    reasoning = chunk(delta(None, reasoning_content="Let me think", role="assistant"))
    up.reply(sse=[reasoning, chunk(delta("42", "stop")),
                  chunk(usage={"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11,
                               "prompt_cache_hit_tokens": 8, "prompt_cache_miss_tokens": 0}),
                  b"data: [DONE]\n\n"])
    events, stats = await collect("deepseek", up, session, wants_usage=True)
    assert events[0] == reasoning
    assert payloads(events)[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
    assert stats.usage == Usage(input_tokens=8, output_tokens=3, cache_read_tokens=8)


async def test_usage_only_chunk_dropped_unless_asked(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    script = [chunk(delta("a", "stop")), chunk(usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}),
              b"data: [DONE]\n\n"]
    up.reply(sse=script)
    events, stats = await collect("fireworks", up, session)
    assert len(events) == 2 and stats.usage == Usage(input_tokens=1, output_tokens=1)
    up.reply(sse=script)
    events, _ = await collect("fireworks", up, session, wants_usage=True)
    assert payloads(events)[-1]["choices"] == []


async def test_xai_stream_usage_rewritten(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(sse=[chunk(delta("a", "stop")),
                  chunk(usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 16,
                               "completion_tokens_details": {"reasoning_tokens": 10}}), b"data: [DONE]\n\n"])
    events, stats = await collect("xai", up, session, wants_usage=True)
    assert payloads(events)[-1]["usage"]["completion_tokens"] == 11
    assert stats.usage == Usage(input_tokens=5, output_tokens=11, reasoning_tokens=10)


async def test_groq_x_groq_usage(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    last = chunk(delta(None, "stop"), x_groq={"id": "req_1", "usage": {"prompt_tokens": 23, "completion_tokens": 19,
                                                                        "total_tokens": 42, "queue_time": 0.07}})
    up.reply(sse=[chunk(delta("hi", role="assistant")), b"data: \n\n", last, b"data: [DONE]\n\n"])
    events, stats = await collect("groq", up, session)  # the empty keep-alive event is skipped
    assert events[1] == last  # relayed unchanged
    assert stats.usage == Usage(input_tokens=23, output_tokens=19)


async def test_perplexity_cumulative_usage_and_missing_done(
        up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(sse=[chunk(delta("a"), usage={"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}),
                  chunk(delta("b", "stop"), usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})])
    events, stats = await collect("perplexity", up, session)
    assert events[-1] == SSE_DONE and len(events) == 3  # the terminator is supplied after a finish reason
    assert stats.usage == Usage(input_tokens=10, output_tokens=2)
    assert "stream_options" not in up.requests[-1].body


async def test_stream_cut_before_finish_raises(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(sse=[chunk(delta("a"))], drop=True)
    with pytest.raises(UpstreamError):
        await collect("groq", up, session)


async def test_errors_before_the_first_event_raise_from_the_first_anext(
        up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    up.reply(status=503, body={"error": {"code": 503, "message": "No endpoints found"}})
    gen = OpenAIProvider("openrouter").stream(call_for("openrouter", up, session, stream=True), CallStats())
    with pytest.raises(UpstreamError) as info:
        await anext(gen)
    assert info.value.status == 503 and "No endpoints found" in info.value.message


async def test_plain_openai_stays_on_the_raw_fast_path(up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    # Bytes a quirk handler would rewrite pass through untouched for type `openai`.
    odd = chunk(delta(None, "eos"))
    up.reply(sse=[odd, chunk(usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}),
                  b"data: [DONE]\n\n"])
    events, stats = await collect("openai", up, session)
    assert events == [odd, SSE_DONE]
    assert stats.usage == Usage(input_tokens=1, output_tokens=1)


# --- embeddings ---------------------------------------------------------------------------------


async def test_embed_posts_next_to_chat_and_asks_compat_types_for_floats(
        up: ScriptedUpstream, session: aiohttp.ClientSession) -> None:
    answer = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
              "model": "mistral-embed", "usage": {"prompt_tokens": 3, "total_tokens": 3}}
    up.reply(body=answer)
    call = call_for("mistral", up, session)
    call.body = {"model": "mistral-embed", "input": "hi", "encoding_format": "base64"}
    resp = await OpenAIProvider("mistral").embed(call)
    assert up.requests[-1].path == "/v1/embeddings"
    assert up.requests[-1].body == {"model": "mistral-embed", "input": "hi"}
    assert resp.usage == Usage(input_tokens=3)
    up.reply(body=answer)
    call.body = {"model": "text-embedding-3-small", "input": "hi", "encoding_format": "base64"}
    await OpenAIProvider("openai").embed(call)
    assert up.requests[-1].body["encoding_format"] == "base64"  # plain OpenAI gets the body as sent
