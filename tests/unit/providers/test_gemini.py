"""dataplane/providers/gemini.py: request translation, response/stream/error mapping through the
fake Gemini upstream, thought-signature round trips and the stream == non-stream property."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.providers.base import SSE_DONE, CallStats, UpstreamCall
from dataplane.providers.gemini import GeminiProvider, GeminiUsage, map_finish_reason, usage_from_gemini
from dataplane.providers.gemini_translate import gemini_schema, split_tool_call_id, to_gemini_request, tool_call_id
from schemas.entities import Provider
from schemas.errors import GatewayError, InvalidRequest, NotFound, RateLimited, UpstreamError
from schemas.events import Usage
from schemas.openai import CompletionTokensDetails, CompletionUsage, PromptTokensDetails
from schemas.settings import Secret
from tests.fakes.gemini_upstream import FakeGemini, GeminiAnswer
from tests.fixtures import AGENT_CLIENT_REQUESTS
from tests.unit.providers.chat_stream import complete_json, stream_chunks

KEY = "AIza-test-secret-9876"
GEMINI = GeminiProvider()
FIXTURES = AGENT_CLIENT_REQUESTS
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeGemini]:
    async with FakeGemini() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def reset(fake: FakeGemini) -> None:
    fake.answer = None
    fake.requests.clear()
    fake.sign_function_calls, fake.require_thought_signatures = True, False
    fake.truncate_after = fake.error_after = None
    fake.valid_keys = fake.models = None



def call_for(fake: FakeGemini, session: aiohttp.ClientSession, messages: list[dict[str, Any]], *,
             wants_usage: bool = False, key: str | None = KEY, model: str = "gemini-2.5-flash",
             **body: Any) -> UpstreamCall:
    provider = Provider(id="prov_g", workspace_id="ws_1", name="gem", type="gemini", base_url=fake.base_url)
    return UpstreamCall(provider=provider, model=model, body={"model": model, "messages": messages, **body},
                        api_key=Secret(key) if key else None, session=session, timeout_s=10,
                        client_wants_usage=wants_usage)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


async def complete(call: UpstreamCall) -> tuple[dict[str, Any], Usage | None]:
    return await complete_json(GEMINI, call)


async def stream(call: UpstreamCall) -> tuple[list[dict[str, Any]], CallStats]:
    return await stream_chunks(GEMINI, call)


def reassemble(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Chat chunks -> {choice index: message-ish dict}, the way OpenAI SDK helpers fold deltas."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            msg = out.setdefault(choice["index"], {"content": None, "tool_calls": {}})
            delta = choice["delta"]
            for key in ("content", "reasoning_content"):
                if delta.get(key) is not None:
                    msg[key] = (msg.get(key) or "") + delta[key]
            if "extra_content" in delta:
                msg["extra_content"] = delta["extra_content"]
            for tc in delta.get("tool_calls", []):
                slot = msg["tool_calls"].setdefault(tc["index"], {"function": {"arguments": ""}})
                for key in ("id", "type", "extra_content"):
                    if key in tc:
                        slot[key] = tc[key]
                fn = tc.get("function", {})
                if "name" in fn:
                    slot["function"]["name"] = fn["name"]
                slot["function"]["arguments"] += fn.get("arguments", "")
            if choice["finish_reason"] is not None:
                msg["finish_reason"] = choice["finish_reason"]
                msg["native_finish_reason"] = choice.get("native_finish_reason")
    return out


# --- request translation (pure) -------------------------------------------------------------------

PNG = "iVBORw0KGgo="


def test_golden_request_translation() -> None:
    sig = base64.b64encode(b"\xfb\xff\xfe sig").decode()
    body = {
        "model": "gemini-2.5-pro",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [{"type": "text", "text": "Weather here?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": tool_call_id("call_abc", sig), "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "fc-7", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": tool_call_id("call_abc", sig), "content": "sunny"},
            {"role": "tool", "tool_call_id": "fc-7", "content": '{"time": "noon"}'},
            {"role": "assistant", "content": "It is sunny at noon."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "get_time"}}],
        "tool_choice": "required",
        "max_tokens": 100, "max_completion_tokens": 50, "temperature": 0.2, "top_p": 0.9, "stop": "END",
        "n": 2, "seed": 7, "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
    }
    assert to_gemini_request(body) == {
        "systemInstruction": {"parts": [{"text": "You are terse."}, {"text": "Use tools."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Weather here?"},
                                       {"inlineData": {"mimeType": "image/png", "data": PNG}}]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": sig},
                {"functionCall": {"name": "get_time", "args": {}, "id": "fc-7"}}]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}},
                {"functionResponse": {"name": "get_time", "response": {"time": "noon"}, "id": "fc-7"}}]},
            {"role": "model", "parts": [{"text": "It is sunny at noon."}]},
            {"role": "user", "parts": [{"text": "Thanks"}]},
        ],
        "tools": [{"functionDeclarations": [
            {"name": "get_weather", "description": "Weather for a city",
             "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}},
            {"name": "get_time"}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
        "generationConfig": {"maxOutputTokens": 50, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"],
                             "candidateCount": 2, "seed": 7},
    }


def test_schema_is_narrowed_to_the_gemini_subset() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "title": "Args",
        "additionalProperties": False,
        "$defs": {"Item": {"type": "object", "properties": {"id": {"type": "integer", "format": "int64"}},
                           "required": ["id", "ghost"]}},
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1},
            "name": {"type": ["string", "null"], "format": "uri", "default": "x"},
            "mode": {"const": "fast"},
            "level": {"type": "integer", "enum": [1, 2], "description": "How hard", "exclusiveMinimum": 0},
            "either": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "both": {"oneOf": [{"type": "string"}, {"type": "number"}]},
            "empty": {"type": "object", "properties": {}},
        },
        "required": ["items", "missing"],
    }
    assert gemini_schema(schema) == {
        "type": "OBJECT",
        "properties": {
            "items": {"type": "ARRAY", "minItems": 1, "items": {
                "type": "OBJECT", "properties": {"id": {"type": "INTEGER", "format": "int64"}}, "required": ["id"]}},
            "name": {"type": "STRING", "nullable": True, "default": "x"},
            "mode": {"type": "STRING", "enum": ["fast"]},
            "level": {"type": "INTEGER", "description": "How hard (Allowed values: 1, 2)"},
            "either": {"type": "STRING", "nullable": True},
            "both": {"anyOf": [{"type": "STRING"}, {"type": "NUMBER"}]},
            "empty": {"type": "OBJECT"},
        },
        "required": ["items"],
    }
    recursive = {"$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
                 "$ref": "#/$defs/Node"}
    assert gemini_schema(recursive)["type"] == "OBJECT"  # cycles are cut, not followed forever
    assert gemini_schema("not a schema") == {}


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}),
    ("none", {"mode": "NONE"}),
    ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "get_weather"}},
     {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "a"}}]}}, {"mode": "ANY", "allowedFunctionNames": ["a"]}),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, {"mode": "AUTO"}),
])
def test_tool_choice(choice: Any, config: dict[str, Any]) -> None:
    out = to_gemini_request({"messages": user("x"), "tools": [WEATHER_TOOL], "tool_choice": choice})
    assert out["toolConfig"] == {"functionCallingConfig": config}


def test_response_format_and_reasoning_effort() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}
    out = to_gemini_request({"model": "gemini-2.5-flash", "messages": user("x"), "reasoning_effort": "low",
                             "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema,
                                                                                        "strict": True}}})
    assert out["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}},
        "thinkingConfig": {"includeThoughts": True, "thinkingBudget": 1024}}
    out = to_gemini_request({"model": "gemini-3-pro-preview", "messages": user("x"), "reasoning_effort": "high",
                             "response_format": {"type": "json_object"}})
    assert out["generationConfig"] == {"responseMimeType": "application/json",
                                       "thinkingConfig": {"includeThoughts": True, "thinkingLevel": "high"}}
    out = to_gemini_request({"messages": user("x"), "response_format": {"type": "text"}})
    assert "generationConfig" not in out


def test_media_and_malformed_tool_arguments() -> None:
    out = to_gemini_request({"messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png?x=1"}},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBER", "filename": "a.pdf"}}]},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                              "function": {"name": "f", "arguments": '{"broken'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "bad args"}]}]})
    assert out["contents"][0]["parts"] == [
        {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/cat.png?x=1"}},
        {"inlineData": {"mimeType": "audio/mp3", "data": "AAAA"}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBER"}}]
    assert out["contents"][1]["parts"] == [{"functionCall": {"name": "f", "args": {"raw_arguments": '{"broken'}}}]
    assert out["contents"][2]["parts"][0]["functionResponse"] == {"name": "f", "response": {"output": "bad args"}}


@pytest.mark.parametrize("messages", [
    [{"role": "tool", "tool_call_id": "call_unknown", "content": "x"}],
    [{"role": "critic", "content": "x"}],
    [{"role": "system", "content": "only a system prompt"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}],
    [{"role": "user", "content": [{"type": "video", "video": {}}]}],
])
def test_untranslatable_requests_are_invalid(messages: list[dict[str, Any]]) -> None:
    with pytest.raises(InvalidRequest):
        to_gemini_request({"messages": messages})


def test_non_function_tools_are_invalid() -> None:
    with pytest.raises(InvalidRequest):
        to_gemini_request({"messages": user("x"), "tools": [{"type": "web_search"}]})


# --- pure tables ----------------------------------------------------------------------------------

FILTERED = ["SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "LANGUAGE", "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "MODEL_ARMOR"]
OTHER = ["MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS", "MISSING_THOUGHT_SIGNATURE",
         "MALFORMED_RESPONSE", "OTHER", "FINISH_REASON_UNSPECIFIED", "SOMETHING_NEW"]


@pytest.mark.parametrize(("raw", "tools", "expected"), [
    ("STOP", False, "stop"), ("STOP", True, "tool_calls"), (None, True, "tool_calls"),
    ("MAX_TOKENS", False, "length"), ("MAX_TOKENS", True, "length"),
    *[(r, False, "content_filter") for r in FILTERED], *[(r, True, "content_filter") for r in FILTERED],
    *[(r, False, "stop") for r in OTHER], *[(r, True, "stop") for r in OTHER],
])
def test_finish_reason_table(raw: str | None, tools: bool, expected: str) -> None:
    assert map_finish_reason(raw, tools) == expected
    assert map_finish_reason(raw, tools, prompt_blocked=True) == "content_filter"


def test_usage_table() -> None:
    meta = GeminiUsage(prompt_token_count=100, candidates_token_count=20, cached_content_token_count=60,
                       thoughts_token_count=30, tool_use_prompt_token_count=5, total_token_count=155)
    assert usage_from_gemini(meta) == CompletionUsage(
        prompt_tokens=105, completion_tokens=50, total_tokens=155,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=60),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=30))
    assert usage_from_gemini(GeminiUsage()).total_tokens == 0


@given(st.binary(min_size=1, max_size=300), st.sampled_from(["call_0a1b", "fc-1", "abc_def"]))
def test_signature_survives_the_tool_call_id(sig_bytes: bytes, base: str) -> None:
    sig = base64.b64encode(sig_bytes).decode()
    call_id = tool_call_id(base, sig)
    assert all(c.isalnum() or c in "_-" for c in call_id)
    assert split_tool_call_id(call_id) == (base, sig)
    assert split_tool_call_id(base) == (base, None)
    assert tool_call_id(base, None) == base
    assert tool_call_id(base, "not base64 !") == base  # left to extra_content alone


# --- through the fake: responses ------------------------------------------------------------------


async def test_complete_text(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.answer = GeminiAnswer.text("Hello there friend", prompt_tokens=11, cached_tokens=4)
    body, usage = await complete(call_for(fake, session, user("hi"), temperature=0.5))
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "gemini-2.5-flash"
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop", "native_finish_reason": "STOP",
                                "message": {"role": "assistant", "content": "Hello there friend", "refusal": None}}]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
                             "prompt_tokens_details": {"cached_tokens": 4},
                             "completion_tokens_details": {"reasoning_tokens": 0}}
    assert usage == Usage(input_tokens=11, output_tokens=3, cache_read_tokens=4)
    recorded = fake.requests[-1]
    assert recorded.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert recorded.headers["x-goog-api-key"] == "<redacted>"
    assert recorded.api_key_hint == KEY[-4:]
    assert recorded.body == {"systemInstruction": {"parts": [{"text": "be brief"}]},
                             "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                             "generationConfig": {"temperature": 0.5}}


async def test_complete_thoughts_tool_calls_and_usage(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.answer = GeminiAnswer(parts=[
        {"text": "Let me think about it.", "thought": True},
        {"text": "Checking."},
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}, "id": "gem-2"}},
    ], prompt_tokens=40, tool_use_prompt_tokens=2)
    body, usage = await complete(call_for(fake, session, user("weather"), tools=[WEATHER_TOOL]))
    choice = body["choices"][0]
    msg = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert msg["content"] == "Checking."
    assert msg["reasoning_content"] == "Let me think about it."
    first, second = msg["tool_calls"]
    assert first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    base, sig = split_tool_call_id(first["id"])
    assert base.startswith("call_") and len(base) == 29
    assert sig in fake.issued_signatures
    assert first["extra_content"] == {"google": {"thought_signature": sig}}
    assert split_tool_call_id(second["id"])[0] == "gem-2"
    assert usage == Usage(input_tokens=42, output_tokens=1 + 2 + 5, reasoning_tokens=5)


async def test_n_candidates(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.answer = GeminiAnswer.text("same")
    body, usage = await complete(call_for(fake, session, user("x"), n=3))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    chunks, stats = await stream(call_for(fake, session, user("x"), n=3))
    assembled = reassemble(chunks)
    assert sorted(assembled) == [0, 1, 2]
    assert all(m["content"] == "same" and m["finish_reason"] == "stop" for m in assembled.values())
    assert stats.usage == usage


@pytest.mark.parametrize("raw", ["SAFETY", "MAX_TOKENS", "MALFORMED_FUNCTION_CALL"])
async def test_finish_reasons_through_the_fake(fake: FakeGemini, session: aiohttp.ClientSession, raw: str) -> None:
    fake.answer = GeminiAnswer.text("partial", finish_reason=raw)
    body, _ = await complete(call_for(fake, session, user("x")))
    assert body["choices"][0]["finish_reason"] == map_finish_reason(raw, False)
    assert body["choices"][0]["native_finish_reason"] == raw
    chunks, _ = await stream(call_for(fake, session, user("x")))
    assert reassemble(chunks)[0]["finish_reason"] == map_finish_reason(raw, False)


async def test_blocked_prompt(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.answer = GeminiAnswer(block_reason="OTHER", prompt_tokens=9)
    body, usage = await complete(call_for(fake, session, user("bad")))
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["choices"][0]["message"]["content"] is None
    assert usage == Usage(input_tokens=9)
    chunks, stats = await stream(call_for(fake, session, user("bad"), wants_usage=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["finish_reason"] == "content_filter"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 9
    assert stats.usage == usage


# --- through the fake: streams --------------------------------------------------------------------


async def test_stream_shape(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.answer = GeminiAnswer(parts=[{"text": "hmm ok", "thought": True}, {"text": "one two three"}],
                               prompt_tokens=7)
    chunks, stats = await stream(call_for(fake, session, user("x")))
    assert fake.requests[-1].path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == [None, None, "one ", "two ", "three"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop",
                                        "native_finish_reason": "STOP"}
    assert reassemble(chunks)[0]["reasoning_content"] == "hmm ok"
    assert stats.usage == Usage(input_tokens=7, output_tokens=5, reasoning_tokens=2)


async def test_stream_usage_chunk_only_when_asked(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.answer = GeminiAnswer.text("a b", prompt_tokens=3)
    chunks, stats = await stream(call_for(fake, session, user("x"), wants_usage=True))
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 3 and chunks[-1]["usage"]["completion_tokens"] == 2
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert stats.usage == Usage(input_tokens=3, output_tokens=2)


async def test_stream_tool_call_deltas(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.answer = GeminiAnswer(parts=[{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                                      {"functionCall": {"name": "get_time", "args": {}}}])
    chunks, _ = await stream(call_for(fake, session, user("x"), tools=[WEATHER_TOOL]))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    head, args = deltas[1]["tool_calls"][0], deltas[2]["tool_calls"][0]
    assert head["index"] == 0 and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert args == {"index": 0, "function": {"arguments": '{"city":"Paris"}'}}
    assert deltas[3]["tool_calls"][0]["index"] == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    calls = reassemble(chunks)[0]["tool_calls"]
    assert split_tool_call_id(calls[0]["id"])[1] == calls[0]["extra_content"]["google"]["thought_signature"]


async def test_stream_line_beyond_aiohttp_readline_cap(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    big = "x" * 400_000  # Gemini sends a whole function call as one SSE line
    fake.answer = GeminiAnswer(parts=[{"functionCall": {"name": "write", "args": {"text": big}}}])
    chunks, _ = await stream(call_for(fake, session, user("x")))
    assert json.loads(reassemble(chunks)[0]["tool_calls"][0]["function"]["arguments"]) == {"text": big}


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind", "our_status", "code"), [
    (400, InvalidRequest, 400, "upstream_invalid_request"),
    (404, NotFound, 404, "model_not_found"),
    (429, RateLimited, 429, "upstream_rate_limited"),
    (500, UpstreamError, 502, "upstream_error"),
    (503, UpstreamError, 503, "upstream_overloaded"),
    (504, UpstreamError, 504, "upstream_timeout"),
])
async def test_error_mapping(fake: FakeGemini, session: aiohttp.ClientSession, status: int,
                             kind: type[GatewayError], our_status: int, code: str) -> None:
    fake.fail_next(status, count=2, message=f"boom with {KEY} inside")
    with pytest.raises(kind) as info:
        await GEMINI.complete(call_for(fake, session, user("x")))
    assert (info.value.status, info.value.code) == (our_status, code)
    assert KEY not in info.value.message and "boom with ***" in info.value.message
    gen = GEMINI.stream(call_for(fake, session, user("x")), CallStats())
    with pytest.raises(kind):  # raised from the first __anext__, before anything was yielded
        await gen.__anext__()


async def test_rate_limit_retry_hints(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.fail_next(429, message="Resource has been exhausted (e.g. check quota).", retry_delay="37.2s")
    with pytest.raises(RateLimited) as info:
        await GEMINI.complete(call_for(fake, session, user("x")))
    assert info.value.headers == {"Retry-After": "38"}
    assert "RESOURCE_EXHAUSTED" not in info.value.message and "exhausted" in info.value.message
    fake.fail_next(429, retry_after="5", retry_delay="37s")
    with pytest.raises(RateLimited) as info:
        await GEMINI.complete(call_for(fake, session, user("x")))
    assert info.value.headers == {"Retry-After": "5"}


async def test_bad_or_missing_key_is_an_operator_problem(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.valid_keys = {"another"}
    for key in (KEY, None):
        with pytest.raises(UpstreamError) as info:
            await GEMINI.complete(call_for(fake, session, user("x"), key=key))
        assert (info.value.status, info.value.code) == (502, "upstream_auth_error")


async def test_unknown_model(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.models = {"gemini-2.5-flash"}
    with pytest.raises(NotFound):
        await GEMINI.complete(call_for(fake, session, user("x"), model="models/gemini-9"))
    assert fake.requests[-1].path == "/v1beta/models/gemini-9:generateContent"


@pytest.mark.parametrize("knob", ["truncate_after", "error_after"])
async def test_mid_stream_failures_raise_after_events(fake: FakeGemini, session: aiohttp.ClientSession,
                                                      knob: str) -> None:
    fake.answer = GeminiAnswer.text("one two three four")
    setattr(fake, knob, 2)
    stats = CallStats()
    seen: list[bytes] = []
    with pytest.raises(UpstreamError) as info:
        async for event in GEMINI.stream(call_for(fake, session, user("x")), stats):
            seen.append(event)
    assert len(seen) >= 2 and SSE_DONE not in seen
    assert info.value.status == (503 if knob == "error_after" else 502)
    assert stats.usage is not None  # the running usage seen so far is kept for the ledger


async def test_stream_without_finish_reason_is_a_truncation(fake: FakeGemini,
                                                            session: aiohttp.ClientSession) -> None:
    fake.answer = GeminiAnswer.text("never ends", finish_reason=None)
    with pytest.raises(UpstreamError, match="before a finish reason"):
        await stream(call_for(fake, session, user("x")))


# --- thought signatures across turns --------------------------------------------------------------


def strip_extensions(message: dict[str, Any]) -> dict[str, Any]:
    """What a plain OpenAI client sends back: unknown fields dropped, ids kept."""
    return {"role": "assistant", "content": message.get("content"), "tool_calls": [
        {"id": tc["id"], "type": "function", "function": tc["function"]} for tc in message.get("tool_calls", [])]}


@pytest.mark.parametrize(("streamed", "plain_client"), [(False, False), (False, True), (True, True)])
async def test_thought_signature_round_trip(fake: FakeGemini, session: aiohttp.ClientSession, streamed: bool,
                                            plain_client: bool) -> None:
    fake.require_thought_signatures = True
    fake.queue(GeminiAnswer(parts=[{"text": "plan", "thought": True},
                                   {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                                   {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]),
               GeminiAnswer.text("Sunny in both."))
    turn1 = [*user("weather in Paris and Rome?")]
    call = call_for(fake, session, turn1, tools=[WEATHER_TOOL])
    if streamed:
        chunks, _ = await stream(call)
        assembled = reassemble(chunks)[0]
        message = {"content": assembled["content"], "tool_calls": list(assembled["tool_calls"].values())}
    else:
        message = (await complete(call))[0]["choices"][0]["message"]
    assistant = strip_extensions(message) if plain_client else {"role": "assistant", **message}
    calls = message["tool_calls"]
    turn2 = [*turn1, assistant,
             {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
             {"role": "tool", "tool_call_id": calls[1]["id"], "content": '{"sky": "clear"}'}]
    body, _ = await complete(call_for(fake, session, turn2, tools=[WEATHER_TOOL]))
    assert body["choices"][0]["message"]["content"] == "Sunny in both."
    sent = fake.requests[-1].body["contents"]
    model_parts = sent[1]["parts"]
    assert [p["thoughtSignature"] in fake.issued_signatures for p in model_parts] == [True, True]
    assert sent[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}},
        {"functionResponse": {"name": "get_weather", "response": {"sky": "clear"}}}]}


async def test_missing_signature_is_refused_by_the_fake(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.require_thought_signatures = True
    messages = [*user("x"), {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    with pytest.raises(InvalidRequest, match="thought_signature"):
        await GEMINI.complete(call_for(fake, session, messages, tools=[WEATHER_TOOL]))


async def test_text_signature_round_trip(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.answer = GeminiAnswer(parts=[{"text": "Done.", "thoughtSignature": "c2lnbmVk"}])
    message = (await complete(call_for(fake, session, user("x"))))[0]["choices"][0]["message"]
    assert message["extra_content"] == {"google": {"thought_signature": "c2lnbmVk"}}
    chunks, _ = await stream(call_for(fake, session, user("x")))
    assert reassemble(chunks)[0]["extra_content"] == message["extra_content"]
    out = to_gemini_request({"messages": [*user("x"), {"role": "assistant", **message}, *user("more")[1:]]})
    assert out["contents"][1] == {"role": "model", "parts": [{"text": "Done.", "thoughtSignature": "c2lnbmVk"}]}


# --- captured agent-client requests ---------------------------------------------------------------


def chat_fixtures() -> list[dict[str, Any]]:
    data = json.loads(FIXTURES.read_text())
    return [r["body"] for reqs in data.values() for r in reqs
            if r["path"] == "/v1/chat/completions" and r["method"] == "POST"]


async def test_captured_chat_requests_translate_and_are_accepted(fake: FakeGemini,
                                                                 session: aiohttp.ClientSession) -> None:
    bodies = chat_fixtures()
    assert len(bodies) >= 8
    for body in bodies:
        translated = to_gemini_request(body)
        assert translated["contents"]
        if body.get("tools"):
            names = [d["name"] for d in translated["tools"][0]["functionDeclarations"]]
            assert names == [t["function"]["name"] for t in body["tools"]]
        call = call_for(fake, session, body["messages"],
                        **{k: v for k, v in body.items() if k not in ("messages", "model")})
        if body.get("stream"):
            chunks, _ = await stream(call)
            assert chunks[-1]["choices"] or chunks[-1]["usage"]
        else:
            assert (await complete(call))[0]["choices"]


# --- property: a stream reassembles to the non-streamed answer -------------------------------------

words = st.text(alphabet="abc xyz.", min_size=1, max_size=12)
sigs = st.none() | st.binary(min_size=1, max_size=24).map(lambda b: base64.b64encode(b).decode())
text_parts = st.builds(lambda t, thought, s: {"text": t, **({"thought": True} if thought else {}),
                                              **({"thoughtSignature": s} if s else {})},
                       words, st.booleans(), sigs)
call_parts = st.builds(lambda name, args, fc_id, s: {
    "functionCall": {"name": name, "args": args, **({"id": fc_id} if fc_id else {})},
    **({"thoughtSignature": s} if s else {})},
    st.sampled_from(["get_weather", "lookup"]),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers() | st.text(max_size=5), max_size=2),
    st.none() | st.sampled_from(["gem-1", "gem-2"]), sigs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(text_parts | call_parts, max_size=5),
       finish=st.sampled_from(["STOP", "MAX_TOKENS", "SAFETY", "OTHER"]),
       n=st.integers(min_value=1, max_value=2), wants_usage=st.booleans())
async def test_stream_reassembles_to_the_non_streamed_answer(
        fake: FakeGemini, session: aiohttp.ClientSession, parts: list[dict[str, Any]], finish: str, n: int,
        wants_usage: bool) -> None:
    fake.sign_function_calls = False
    fake.answer = GeminiAnswer(parts=parts, finish_reason=finish)
    call = call_for(fake, session, user("q"), wants_usage=wants_usage, n=n)
    body, usage = await complete(call)
    chunks, stats = await stream(call)
    assert stats.usage == usage
    assert [c for c in chunks if "usage" in c] == ([chunks[-1]] if wants_usage else [])
    assembled = reassemble(chunks)
    assert sorted(assembled) == [c["index"] for c in body["choices"]]
    for choice in body["choices"]:
        expected, got = choice["message"], assembled[choice["index"]]
        assert (got["content"] or None) == (expected["content"] or None)
        assert got.get("reasoning_content") == expected.get("reasoning_content")
        assert got.get("extra_content") == expected.get("extra_content")
        assert (got["finish_reason"], got["native_finish_reason"]) == (choice["finish_reason"],
                                                                       choice["native_finish_reason"])
        streamed_calls = [got["tool_calls"][i] for i in sorted(got["tool_calls"])]
        assert len(streamed_calls) == len(expected.get("tool_calls", []))
        for s, e in zip(streamed_calls, expected.get("tool_calls", []), strict=True):
            assert s["function"] == e["function"]
            assert s.get("extra_content") == e.get("extra_content")
            s_base, s_sig = split_tool_call_id(s["id"])
            e_base, e_sig = split_tool_call_id(e["id"])
            assert s_sig == e_sig
            assert s_base == e_base or (s_base.startswith("call_") and e_base.startswith("call_"))
    assert msgspec.json.decode(msgspec.json.encode(body))["object"] == "chat.completion"
