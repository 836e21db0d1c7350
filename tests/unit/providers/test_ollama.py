"""dataplane/providers/ollama.py: request translation, response/stream/error mapping through the
fake Ollama upstream, and the stream == non-stream property."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.providers.base import SSE_DONE, CallStats, UpstreamCall
from dataplane.providers.ollama import OllamaChatResponse, OllamaProvider, map_done_reason, to_ollama_request
from schemas.entities import Provider
from schemas.errors import GatewayError, InvalidRequest, NotFound, RateLimited, UpstreamError
from schemas.events import Usage
from schemas.settings import Secret
from tests.fakes.ollama_upstream import FakeOllama, OllamaAnswer
from tests.fixtures import AGENT_CLIENT_REQUESTS
from tests.unit.providers.chat_stream import complete_json, stream_chunks

OLLAMA = OllamaProvider()
FIXTURES = AGENT_CLIENT_REQUESTS
PNG = "iVBORw0KGgo="
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def reset(fake: FakeOllama) -> None:
    fake.answer = None
    fake.requests.clear()
    fake.truncate_after = fake.error_after = None
    fake.models = None



def call_for(fake: FakeOllama, session: aiohttp.ClientSession, messages: list[dict[str, Any]], *,
             wants_usage: bool = False, key: str | None = None, model: str = "llama3.2",
             options: dict[str, str] | None = None, **body: Any) -> UpstreamCall:
    provider = Provider(id="prov_o", workspace_id="ws_1", name="local", type="ollama", base_url=fake.base_url,
                        options=options or {})
    return UpstreamCall(provider=provider, model=model, body={"model": model, "messages": messages, **body},
                        api_key=Secret(key) if key else None, session=session, timeout_s=10,
                        client_wants_usage=wants_usage)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


async def complete(call: UpstreamCall) -> tuple[dict[str, Any], Usage | None]:
    return await complete_json(OLLAMA, call)


async def stream(call: UpstreamCall) -> tuple[list[dict[str, Any]], CallStats]:
    return await stream_chunks(OLLAMA, call)


def reassemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    msg: dict[str, Any] = {"content": "", "tool_calls": {}}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            msg["content"] += delta.get("content") or ""
            if "reasoning_content" in delta:
                msg["reasoning_content"] = msg.get("reasoning_content", "") + delta["reasoning_content"]
            for tc in delta.get("tool_calls", []):
                slot = msg["tool_calls"].setdefault(tc["index"], {"function": {"arguments": ""}})
                if "id" in tc:
                    slot["id"] = tc["id"]
                slot["function"]["name"] = tc.get("function", {}).get("name", slot["function"].get("name"))
                slot["function"]["arguments"] += tc.get("function", {}).get("arguments", "")
            if choice["finish_reason"]:
                msg["finish_reason"] = choice["finish_reason"]
    return msg


# --- request translation (pure) -------------------------------------------------------------------


def test_golden_request_translation() -> None:
    body = {
        "model": "ignored",
        "messages": [
            {"role": "developer", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "text", "text": "And?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
            {"role": "assistant", "content": None, "reasoning_content": "look up weather", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [WEATHER_TOOL], "tool_choice": "auto", "max_completion_tokens": 64, "temperature": 0.1,
        "top_p": 0.5, "stop": "END", "seed": 3, "response_format": {"type": "json_object"},
        "reasoning_effort": "high", "stream_options": {"include_usage": True},
    }
    assert to_ollama_request(body, "qwen3:8b", True, {"num_ctx": "8192", "keep_alive": "10m"}) == {
        "model": "qwen3:8b",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is this?\nAnd?", "images": [PNG]},
            {"role": "assistant", "content": "", "thinking": "look up weather",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather", "tool_call_id": "call_1"},
        ],
        "stream": True,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                    "parameters": WEATHER_TOOL["function"]["parameters"]}}],
        "format": "json",
        "think": True,
        "options": {"temperature": 0.1, "top_p": 0.5, "seed": 3, "num_predict": 64, "stop": ["END"],
                    "num_ctx": 8192},
        "keep_alive": "10m",
    }


def test_format_think_and_tool_choice_none() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    out = to_ollama_request({"messages": user("x"), "tools": [WEATHER_TOOL], "tool_choice": "none",
                             "reasoning_effort": "low", "response_format": fmt}, "gpt-oss:20b", False)
    assert "tools" not in out
    assert out["format"] == schema
    assert out["think"] == "low"
    assert to_ollama_request({"messages": user("x"), "reasoning_effort": "none"}, "qwen3", False)["think"] is False
    assert "options" not in to_ollama_request({"messages": user("x")}, "m", False)


@pytest.mark.parametrize("body", [
    {"messages": user("x"), "n": 2},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA"}}]}]},
    {"messages": [{"role": "critic", "content": "x"}]},
])
def test_untranslatable_requests_are_invalid(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        to_ollama_request(body, "m", False)


@pytest.mark.parametrize(("raw", "tools", "expected"), [
    ("stop", False, "stop"), ("stop", True, "tool_calls"), ("length", False, "length"), ("length", True, "length"),
    ("load", False, "stop"), ("unload", False, "stop"), (None, False, "stop"), (None, True, "tool_calls"),
])
def test_done_reason_table(raw: str | None, tools: bool, expected: str) -> None:
    assert map_done_reason(raw, tools) == expected


# --- through the fake -----------------------------------------------------------------------------


async def test_complete(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.answer = OllamaAnswer(content="Hello there", thinking="greet them", prompt_eval_count=12)
    body, usage = await complete(call_for(fake, session, user("hi"), max_tokens=50, key="olk-secret-1234"))
    assert body["object"] == "chat.completion" and body["model"] == "llama3.2"
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop", "native_finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Hello there", "refusal": None,
                                            "reasoning_content": "greet them"}}]
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16,
                             "prompt_tokens_details": None, "completion_tokens_details": None}
    assert usage == Usage(input_tokens=12, output_tokens=4)
    recorded = fake.requests[-1]
    assert (recorded.method, recorded.path) == ("POST", "/api/chat")
    assert recorded.headers["authorization"] == "Bearer <redacted>" and recorded.api_key_hint == "1234"
    assert recorded.body["stream"] is False and recorded.body["options"] == {"num_predict": 50}


async def test_complete_tool_calls(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.answer = OllamaAnswer(tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                                           {"id": "call_ollama7", "function": {"name": "get_weather",
                                                                               "arguments": {"city": "Rome"}}}])
    body, _ = await complete(call_for(fake, session, user("weather"), tools=[WEATHER_TOOL]))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    first, second = choice["message"]["tool_calls"]
    assert first["id"].startswith("call_") and len(first["id"]) == 29
    assert first["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert second["id"] == "call_ollama7"
    # The round trip: the client sends the calls and results back; Ollama gets objects and tool names.
    turn2 = [*user("weather"), {"role": "assistant", **choice["message"]},
             {"role": "tool", "tool_call_id": first["id"], "content": "sunny"}]
    await complete(call_for(fake, session, turn2, tools=[WEATHER_TOOL]))
    sent = fake.requests[-1].body["messages"]
    assert sent[2]["tool_calls"][0] == {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert sent[3] == {"role": "tool", "content": "sunny", "tool_name": "get_weather", "tool_call_id": first["id"]}


async def test_length_cut(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.answer = OllamaAnswer(content="one two three four five")
    body, usage = await complete(call_for(fake, session, user("x"), max_tokens=2))
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "one two "
    assert usage is not None and usage.output_tokens == 2
    chunks, _ = await stream(call_for(fake, session, user("x"), max_tokens=2))
    assert reassemble(chunks)["finish_reason"] == "length"


async def test_stream_shape_and_usage(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.answer = OllamaAnswer(content="a b c", thinking="hm", prompt_eval_count=9,
                               tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}])
    chunks, stats = await stream(call_for(fake, session, user("x"), wants_usage=True, tools=[WEATHER_TOOL]))
    assert fake.requests[-1].body["stream"] is True
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    head = next(d for d in deltas if "tool_calls" in d)["tool_calls"][0]
    assert head["index"] == 0 and head["function"] == {"name": "get_weather", "arguments": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 9
    msg = reassemble(chunks)
    assert (msg["content"], msg["reasoning_content"]) == ("a b c", "hm")
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"city":"Oslo"}'
    assert stats.usage == Usage(input_tokens=9, output_tokens=5)
    chunks, _ = await stream(call_for(fake, session, user("x")))
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize(("status", "kind", "our_status"), [
    (400, InvalidRequest, 400), (404, NotFound, 404), (429, RateLimited, 429), (500, UpstreamError, 502),
    (503, UpstreamError, 503),
])
async def test_error_mapping(fake: FakeOllama, session: aiohttp.ClientSession, status: int,
                             kind: type[GatewayError], our_status: int) -> None:
    fake.fail_next(status, count=2, message="failure mentioning olk-secret-1234")
    with pytest.raises(kind) as info:
        await OLLAMA.complete(call_for(fake, session, user("x"), key="olk-secret-1234"))
    assert info.value.status == our_status
    assert "olk-secret-1234" not in info.value.message and "failure mentioning ***" in info.value.message
    gen = OLLAMA.stream(call_for(fake, session, user("x"), key="olk-secret-1234"), CallStats())
    with pytest.raises(kind):
        await gen.__anext__()


async def test_unknown_model(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.models = {"llama3.2"}
    with pytest.raises(NotFound, match="not found, try pulling it first"):
        await OLLAMA.complete(call_for(fake, session, user("x"), model="nope"))


@pytest.mark.parametrize("knob", ["truncate_after", "error_after"])
async def test_mid_stream_failures(fake: FakeOllama, session: aiohttp.ClientSession, knob: str) -> None:
    fake.answer = OllamaAnswer(content="one two three four")
    setattr(fake, knob, 2)
    seen: list[bytes] = []
    with pytest.raises(UpstreamError) as info:
        async for event in OLLAMA.stream(call_for(fake, session, user("x")), CallStats()):
            seen.append(event)
    assert len(seen) >= 2 and SSE_DONE not in seen
    assert info.value.status == 502
    if knob == "error_after":
        assert "unexpected EOF" in info.value.message


async def test_long_stream_line(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    big = "x" * 400_000  # one NDJSON line far beyond aiohttp's 128 KiB readline cap
    fake.answer = OllamaAnswer(tool_calls=[{"function": {"name": "write", "arguments": {"text": big}}}])
    chunks, _ = await stream(call_for(fake, session, user("x")))
    assert json.loads(reassemble(chunks)["tool_calls"][0]["function"]["arguments"]) == {"text": big}


def test_response_struct_tolerates_unknown_fields() -> None:
    import msgspec

    parsed = msgspec.json.decode(b'{"model":"m","message":{"role":"assistant","content":"x","images":null},'
                                 b'"done":true,"new_field":1}', type=OllamaChatResponse)
    assert parsed.done and parsed.message is not None and parsed.message.content == "x"


# --- captured agent-client requests ---------------------------------------------------------------


async def test_captured_chat_requests_are_accepted(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    data = json.loads(FIXTURES.read_text())
    bodies = [r["body"] for reqs in data.values() for r in reqs if r["path"] == "/v1/chat/completions"]
    assert bodies
    for body in bodies:
        call = call_for(fake, session, body["messages"],
                        **{k: v for k, v in body.items() if k not in ("messages", "model")})
        if body.get("stream"):
            chunks, _ = await stream(call)
            assert chunks
        else:
            assert (await complete(call))[0]["choices"]


# --- property: a stream reassembles to the non-streamed answer -------------------------------------

texts = st.text(alphabet="ab xy.\n", max_size=30)
calls = st.lists(st.builds(lambda name, args: {"function": {"name": name, "arguments": args}},
                           st.sampled_from(["f", "g"]),
                           st.dictionaries(st.sampled_from(["a", "b"]), st.integers() | st.text(max_size=4),
                                           max_size=2)), max_size=2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=texts, thinking=texts, tool_calls=calls, cap=st.none() | st.integers(min_value=1, max_value=6),
       wants_usage=st.booleans())
async def test_stream_reassembles_to_the_non_streamed_answer(
        fake: FakeOllama, session: aiohttp.ClientSession, content: str, thinking: str,
        tool_calls: list[dict[str, Any]], cap: int | None, wants_usage: bool) -> None:
    fake.answer = OllamaAnswer(content=content, thinking=thinking, tool_calls=tool_calls)
    extra: dict[str, Any] = {} if cap is None else {"max_tokens": cap}
    call = call_for(fake, session, user("q"), wants_usage=wants_usage, **extra)
    body, usage = await complete(call)
    chunks, stats = await stream(call)
    expected, got = body["choices"][0], reassemble(chunks)
    assert got["content"] == expected["message"]["content"]
    assert got.get("reasoning_content") == expected["message"].get("reasoning_content")
    assert got["finish_reason"] == expected["finish_reason"]
    streamed = [got["tool_calls"][i]["function"] for i in sorted(got["tool_calls"])]
    assert streamed == [c["function"] for c in expected["message"].get("tool_calls", [])]
    assert stats.usage == usage
    assert [c for c in chunks if "usage" in c] == ([chunks[-1]] if wants_usage else [])
