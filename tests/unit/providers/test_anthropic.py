"""dataplane/providers/anthropic.py: Chat <-> Anthropic translation, streaming, errors, native passthrough."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.providers.anthropic import AnthropicProvider, map_anthropic_error
from dataplane.providers.anthropic_translate import (
    DEFAULT_MAX_TOKENS,
    ChatStreamTranslator,
    anthropic_usage,
    chat_usage,
    finish_reason,
    stop_reason,
    to_anthropic_request,
    to_chat_completion,
    usage_from_anthropic,
)
from dataplane.providers.base import CallStats, UpstreamCall
from dataplane.providers.sse import SseEvent
from schemas.anthropic import AnthropicUsage, Message, StreamEvent
from schemas.entities import Provider
from schemas.errors import InvalidRequest, PayloadTooLarge, RateLimited, UpstreamError
from schemas.events import Usage
from schemas.settings import Secret
from tests.fakes.anthropic_upstream import FakeAnswer, FakeAnthropic, message_body, sse_bytes, stream_events
from tests.unit.providers.chat_stream import chat_chunks

KEY = "sk-ant-secret-key-9876"
ANTHROPIC = AnthropicProvider()
_event_decoder = msgspec.json.Decoder(StreamEvent)

TOOL_ANSWER = FakeAnswer(
    blocks=(
        {"type": "thinking", "thinking": "The user wants the weather; call the tool.", "signature": "sig-abc"},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris", "days": 2}},
    ),
    stop_reason="tool_use",
    input_tokens=10,
    cache_read_input_tokens=100,
    cache_creation_input_tokens=20,
    output_tokens=30,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as upstream:
        yield upstream



def make_call(fake: FakeAnthropic, session: aiohttp.ClientSession, body: dict[str, Any], *,
              wants_usage: bool = False, headers: dict[str, str] | None = None, base_url: str | None = None,
              ) -> UpstreamCall:
    provider = Provider(id="prov_a", workspace_id="ws_1", name="claude", type="anthropic",
                        base_url=fake.base_url if base_url is None else base_url)
    return UpstreamCall(provider=provider, model=body.get("model", "claude-x"), body=body, api_key=Secret(KEY),
                        session=session, timeout_s=5.0, client_wants_usage=wants_usage,
                        extra_headers=headers or {})


def chat(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "claude-x", "messages": [{"role": "user", "content": text}], **extra}


data_of = chat_chunks


def reassemble(chunks: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None, dict[str, Any] | None]:
    """(message, finish_reason, usage) from Chat chunks, the way the OpenAI SDK accumulates them."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    usage = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
            for tc in delta.get("tool_calls") or []:
                slot = calls.setdefault(tc["index"], {"id": None, "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.get("id") or slot["id"]
                slot["function"]["name"] += tc["function"].get("name") or ""
                slot["function"]["arguments"] += tc["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None, "refusal": None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    if "".join(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    return message, finish, usage


# -- tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("anthropic", "openai"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"), ("tool_use", "tool_calls"),
    ("max_tokens", "length"), ("model_context_window_exceeded", "length"), ("refusal", "content_filter"),
    (None, "stop"), ("something_new", "stop"),
])
def test_stop_reason_to_finish_reason(anthropic: str | None, openai: str) -> None:
    assert finish_reason(anthropic) == openai


@pytest.mark.parametrize(("openai", "anthropic"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("function_call", "tool_use"),
    ("content_filter", "refusal"), (None, "end_turn"), ("eos", "end_turn"),
])
def test_finish_reason_to_stop_reason(openai: str | None, anthropic: str) -> None:
    assert stop_reason(openai) == anthropic


def test_usage_mapping_includes_cache_in_input() -> None:
    raw = AnthropicUsage(input_tokens=10, output_tokens=30, cache_read_input_tokens=100,
                         cache_creation_input_tokens=20)
    usage = usage_from_anthropic(raw)
    assert usage == Usage(input_tokens=130, output_tokens=30, cache_read_tokens=100, cache_write_tokens=20)
    assert chat_usage(usage) == {
        "prompt_tokens": 130, "completion_tokens": 30, "total_tokens": 160,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 20},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert anthropic_usage(usage) == {"input_tokens": 10, "output_tokens": 30, "cache_creation_input_tokens": 20,
                                      "cache_read_input_tokens": 100}
    assert usage_from_anthropic(AnthropicUsage()) == Usage()


# -- Chat request -> Anthropic request (golden) ----------------------------------------------


def test_chat_to_anthropic_golden() -> None:
    body = {
        "model": "claude-x",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and Rome?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rainy"}]},
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                                    "parameters": {"type": "object",
                                                                   "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": "END",
        "temperature": 1.5,
        "top_p": 0.9,
        "user": "u-42",
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 7,
    }
    assert to_anthropic_request(body, api_version="2023-06-01") == {
        "model": "claude-x",
        "max_tokens": DEFAULT_MAX_TOKENS,
        "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Use tools."},
                   {"type": "text", "text": "Answer in one line."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and Rome?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "rainy"}]},
                {"type": "text", "text": "Thanks"},
            ]},
        ],
        "stream": True,
        "stop_sequences": ["END"],
        "tools": [{"name": "get_weather", "description": "Weather by city",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "temperature": 1.0,
        "top_p": 0.9,
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        "metadata": {"user_id": "u-42"},
    }


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("auto", None, None),
    ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
    ({"type": "function", "function": {"name": "f"}}, False,
     {"type": "tool", "name": "f", "disable_parallel_tool_use": True}),
])
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    out = to_anthropic_request(chat(tools=tools, tool_choice=choice, parallel_tool_calls=parallel),
                               api_version="2023-06-01")
    assert out.get("tool_choice") == expected


def test_max_tokens_sampling_and_thinking() -> None:
    assert to_anthropic_request(chat(max_completion_tokens=50, max_tokens=9), api_version="x")["max_tokens"] == 50
    # API version 2026-10-21 rejects sampling parameters: they are omitted.
    out = to_anthropic_request(chat(temperature=0.2, top_p=0.5), api_version="2026-10-21")
    assert "temperature" not in out and "top_p" not in out
    thinking = to_anthropic_request(chat(reasoning_effort="medium", temperature=0.3), api_version="2023-06-01")
    assert thinking["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert thinking["max_tokens"] == DEFAULT_MAX_TOKENS + 4096 and "temperature" not in thinking
    capped = to_anthropic_request(chat(reasoning_effort="high", max_tokens=10000), api_version="2023-06-01")
    assert capped["thinking"]["budget_tokens"] == 5000 and capped["max_tokens"] == 10000
    assert "thinking" not in to_anthropic_request(chat(reasoning_effort="low", max_tokens=100), api_version="x")


def test_lenient_and_refused_inputs() -> None:
    bad_args = {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"trunc'}}]}
    out = to_anthropic_request({"model": "m", "messages": [bad_args]}, api_version="x")
    assert out["messages"][0]["content"][0]["input"] == {"_raw_arguments": '{"trunc'}
    # Empty turns are dropped (Anthropic rejects them); empty text never becomes a block.
    empty = to_anthropic_request({"model": "m", "messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": ""}]}, api_version="x")
    assert empty["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(InvalidRequest) as n:
        to_anthropic_request(chat(n=2), api_version="x")
    assert n.value.param == "n"
    audio = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}
    with pytest.raises(InvalidRequest) as a:
        to_anthropic_request({"model": "m", "messages": [audio]}, api_version="x")
    assert a.value.param == "messages[0].content[0]"
    with pytest.raises(InvalidRequest) as t:
        to_anthropic_request({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, api_version="x")
    assert t.value.param == "messages[0].tool_call_id"


def test_pdf_file_part_becomes_document() -> None:
    part = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}
    out = to_anthropic_request({"model": "m", "messages": [{"role": "user", "content": [part]}]}, api_version="x")
    assert out["messages"][0]["content"] == [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
         "title": "a.pdf"}]


# -- through the fake: complete / stream -----------------------------------------------------


async def test_complete_text(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.answer = FakeAnswer(cache_read_input_tokens=7, cache_creation_input_tokens=3)
    resp = await ANTHROPIC.complete(make_call(fake, session, chat(temperature=0.5)))
    body = msgspec.json.decode(resp.body)
    assert body["object"] == "chat.completion" and body["model"] == "claude-x"
    assert body["choices"][0]["message"]["content"] == "Hello from the fake Anthropic upstream."
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 25 + 7 + 3
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 7
    assert resp.usage == Usage(input_tokens=35, output_tokens=12, cache_read_tokens=7, cache_write_tokens=3)
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "<redacted>" and sent.api_key_hint == KEY[-4:]
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body == {"model": "claude-x", "max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0.5,
                         "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


async def test_complete_tool_use_and_thinking(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.answer = TOOL_ANSWER
    resp = await ANTHROPIC.complete(make_call(fake, session, chat()))
    choice = msgspec.json.decode(resp.body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["reasoning_content"] == "The user wants the weather; call the tool."
    assert choice["message"]["tool_calls"] == [{"id": "toolu_01", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Paris","days":2}'}}]
    assert resp.usage == Usage(input_tokens=130, output_tokens=30, cache_read_tokens=100, cache_write_tokens=20)


async def test_client_version_forwarded_and_sampling_dropped(fake: FakeAnthropic,
                                                             session: aiohttp.ClientSession) -> None:
    headers = {"anthropic-version": "2026-10-21", "anthropic-beta": "tools-2099", "Authorization": "Bearer leak"}
    await ANTHROPIC.complete(make_call(fake, session, chat(temperature=0.5, top_p=0.3), headers=headers))
    sent = fake.requests[-1]
    assert sent.headers["anthropic-version"] == "2026-10-21"
    assert sent.headers["anthropic-beta"] == "tools-2099"
    assert "authorization" not in sent.headers  # never forwarded: the provider key travels in x-api-key
    assert "temperature" not in sent.body and "top_p" not in sent.body


async def test_custom_base_url_with_v1_suffix(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    await ANTHROPIC.complete(make_call(fake, session, chat(), base_url=fake.base_url + "/v1/"))
    assert fake.requests[-1].path == "/v1/messages"
    assert fake.requests[-1].headers["x-api-key"] == "<redacted>"


async def collect(call: UpstreamCall) -> tuple[list[bytes], CallStats]:
    stats = CallStats()
    return [e async for e in ANTHROPIC.stream(call, stats)], stats


async def test_stream_text_usage_chunk_only_when_asked(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    events, stats = await collect(make_call(fake, session, chat()))
    chunks = data_of(events)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"] for c in chunks)  # no usage-only chunk
    message, finish, _ = reassemble(chunks)
    assert message["content"] == "Hello from the fake Anthropic upstream." and finish == "stop"
    assert stats.usage == Usage(input_tokens=25, output_tokens=12)
    assert fake.requests[-1].body["stream"] is True

    events, stats = await collect(make_call(fake, session, chat(), wants_usage=True))
    chunks = data_of(events)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_stream_tools_thinking(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.answer = TOOL_ANSWER
    fake.full_delta_usage = True
    events, stats = await collect(make_call(fake, session, chat(), wants_usage=True))
    chunks = data_of(events)
    first_tool = next(c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls"))
    assert first_tool["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]
    message, finish, usage = reassemble(chunks)
    assert finish == "tool_calls"
    assert message["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris","days":2}'
    assert message["reasoning_content"] == "The user wants the weather; call the tool."
    assert usage is not None and usage["prompt_tokens"] == 130
    assert stats.usage == Usage(input_tokens=130, output_tokens=30, cache_read_tokens=100, cache_write_tokens=20)


async def test_tool_without_input_gets_empty_object(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.answer = FakeAnswer(blocks=({"type": "tool_use", "id": "t", "name": "now", "input": {}},),
                             stop_reason="tool_use")
    message, _, _ = reassemble(data_of((await collect(make_call(fake, session, chat())))[0]))
    assert message["tool_calls"][0]["function"]["arguments"] == "{}"


# -- errors ----------------------------------------------------------------------------------


async def test_rate_limit_keeps_retry_after(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.fail_next(429, retry_after="7")
    with pytest.raises(RateLimited) as exc:
        await ANTHROPIC.complete(make_call(fake, session, chat()))
    assert exc.value.headers == {"Retry-After": "7"}
    assert "rate_limit_error" in exc.value.message or "Fake" in exc.value.message


@pytest.mark.parametrize(("status", "kind", "ours"), [
    (529, UpstreamError, 503), (500, UpstreamError, 502), (400, InvalidRequest, 400),
    (401, UpstreamError, 502), (413, PayloadTooLarge, 413),
])
async def test_error_statuses(fake: FakeAnthropic, session: aiohttp.ClientSession, status: int,
                              kind: type[Exception], ours: int) -> None:
    fake.fail_next(status)
    with pytest.raises(kind) as exc:
        await ANTHROPIC.complete(make_call(fake, session, chat()))
    assert getattr(exc.value, "status", None) == ours
    assert KEY not in str(exc.value)


def test_error_mapper_masks_secret() -> None:
    raw = b'{"type":"error","error":{"type":"invalid_request_error","message":"bad key sk-ant-secret-key-9876"}}'
    err = map_anthropic_error("claude", 400, raw, {}, KEY)
    assert KEY not in err.message and "***" in err.message


async def test_stream_error_before_first_event(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.fail_next(529)
    gen = ANTHROPIC.stream(make_call(fake, session, chat()), CallStats())
    with pytest.raises(UpstreamError) as exc:
        await anext(gen)
    assert exc.value.status == 503
    fake.stream_error_after = 0  # 200, then `event: error` as the very first event
    gen = ANTHROPIC.stream(make_call(fake, session, chat()), CallStats())
    with pytest.raises(UpstreamError) as exc:
        await anext(gen)
    assert exc.value.status == 503 and exc.value.code == "upstream_overloaded"


async def test_stream_error_mid_way(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.stream_error_after = 5
    stats = CallStats()
    got: list[bytes] = []
    with pytest.raises(UpstreamError) as exc:
        async for event in ANTHROPIC.stream(make_call(fake, session, chat()), stats):
            got.append(event)
    assert got and b"Hello" in b"".join(got)
    assert "overloaded_error" in exc.value.message
    assert stats.usage == Usage(input_tokens=25, output_tokens=1)  # what message_start reported


# -- native passthrough ----------------------------------------------------------------------


NATIVE_BODY: dict[str, Any] = {
    "model": "claude-x", "max_tokens": 64,
    "system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "adaptive"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015"}]}, "top_k": 3,
}


async def test_complete_native_unchanged(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.answer = TOOL_ANSWER
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,effort-2025-11-24"}
    resp = await ANTHROPIC.complete_native("anthropic.messages", make_call(fake, session, NATIVE_BODY,
                                                                           headers=headers))
    sent = fake.requests[-1]
    assert sent.body == NATIVE_BODY
    assert sent.headers["anthropic-beta"] == "claude-code-20250219,effort-2025-11-24"
    assert msgspec.json.decode(resp.body) == message_body(TOOL_ANSWER, msg_id="msg_fake00000001", model="claude-x")
    assert resp.usage == Usage(input_tokens=130, output_tokens=30, cache_read_tokens=100, cache_write_tokens=20)


@pytest.mark.parametrize("full_delta_usage", [False, True])
async def test_stream_native_relays_events(fake: FakeAnthropic, session: aiohttp.ClientSession,
                                           full_delta_usage: bool) -> None:
    fake.answer = TOOL_ANSWER
    fake.full_delta_usage = full_delta_usage
    body = {**NATIVE_BODY, "stream": True}
    stats = CallStats()
    got = [e async for e in ANTHROPIC.stream_native("anthropic.messages", make_call(fake, session, body), stats)]
    expected = [sse_bytes(name, payload) for name, payload in stream_events(
        TOOL_ANSWER, msg_id="msg_fake00000001", model="claude-x", full_delta_usage=full_delta_usage)]
    assert got == expected
    assert fake.requests[-1].body == body
    assert stats.usage == Usage(input_tokens=130, output_tokens=30, cache_read_tokens=100, cache_write_tokens=20)


async def test_stream_native_error_event_raises(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.stream_error_after = 3
    got: list[bytes] = []
    with pytest.raises(UpstreamError):
        async for event in ANTHROPIC.stream_native("anthropic.messages",
                                                   make_call(fake, session, {**NATIVE_BODY, "stream": True}),
                                                   CallStats()):
            got.append(event)
    assert [e.split(b"\n")[0] for e in got] == [b"event: message_start", b"event: ping",
                                                b"event: content_block_start"]


async def test_count_tokens_native(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.count_tokens = 321
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}
    assert await ANTHROPIC.count_tokens_native(make_call(fake, session, body)) == {"input_tokens": 321}
    assert fake.requests[-1].path == "/v1/messages/count_tokens" and fake.requests[-1].body == body


# -- property: a reassembled stream equals the non-streamed answer ---------------------------


_scalars = st.one_of(st.integers(-5, 5), st.booleans(), st.text(max_size=8), st.none())
_block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(min_size=1, max_size=40)),
    st.builds(lambda t: {"type": "thinking", "thinking": t, "signature": "sig"}, st.text(min_size=1, max_size=40)),
    st.builds(lambda i, n, inp: {"type": "tool_use", "id": f"toolu_{i}", "name": n, "input": inp},
              st.integers(0, 999), st.sampled_from(["get_weather", "Bash", "Read"]),
              st.dictionaries(st.text(min_size=1, max_size=6), _scalars, max_size=4)),
)
_answers = st.builds(
    FakeAnswer,
    blocks=st.lists(_block, max_size=5).map(tuple),
    stop_reason=st.sampled_from(["end_turn", "tool_use", "max_tokens", "stop_sequence", "refusal", "pause_turn"]),
    input_tokens=st.integers(0, 10_000), output_tokens=st.integers(0, 10_000),
    cache_read_input_tokens=st.integers(0, 10_000), cache_creation_input_tokens=st.integers(0, 10_000),
    piece_chars=st.integers(1, 9),
)


@settings(max_examples=150, deadline=None)
@given(answer=_answers, full_delta_usage=st.booleans())
def test_stream_reassembles_to_completion(answer: FakeAnswer, full_delta_usage: bool) -> None:
    message = msgspec.convert(message_body(answer, msg_id="msg_1", model="claude-x"), Message)
    body, usage = to_chat_completion(message, created=1)
    translator = ChatStreamTranslator("claude", created=1, wants_usage=True)
    out: list[bytes] = []
    for name, payload in stream_events(answer, msg_id="msg_1", model="claude-x", full_delta_usage=full_delta_usage):
        event = _event_decoder.decode(sse_bytes(name, payload).split(b"data: ", 1)[1])
        out += translator.feed(event)
    assert translator.done
    chunks = data_of(out)
    streamed, finish, stream_usage = reassemble(chunks)
    expected = body["choices"][0]["message"]
    for call in [*streamed.get("tool_calls", []), *expected.get("tool_calls", [])]:
        call["function"]["arguments"] = msgspec.json.decode(call["function"]["arguments"])
    assert streamed == expected
    assert finish == body["choices"][0]["finish_reason"]
    assert stream_usage == body["usage"]
    assert translator.usage == usage
    assert {c["id"] for c in chunks} == {"msg_1"}


def test_unknown_stream_event_types_are_skipped() -> None:
    from dataplane.providers.anthropic import decode_event
    assert decode_event(SseEvent(b'{"type":"future_event","x":1}', "future_event")) is None
    assert decode_event(SseEvent(b'{"type":"future_event"}')) is None
    assert decode_event(SseEvent(b'{"type":"ping"}', "ping")) is not None
