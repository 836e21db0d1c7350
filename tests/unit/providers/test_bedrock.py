"""dataplane/providers/bedrock.py: Chat <-> Converse translation (golden), stop/usage tables,
auth (SigV4 verified by the fake, bearer), response/stream/error mapping through the fake
Bedrock upstream, and the stream == non-stream property."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.providers.aws_sigv4 import AwsCredentials
from dataplane.providers.base import SSE_DONE, CallStats, UpstreamCall
from dataplane.providers.bedrock import (
    STOP_REASONS,
    BedrockProvider,
    ConverseStreamTranslator,
    from_converse,
    map_bedrock_error,
    to_converse,
)
from dataplane.providers.eventstream import EventMessage, EventStreamDecoder, encode_message
from schemas.entities import Provider
from schemas.errors import GatewayError, InvalidRequest, NotFound, RateLimited, UpstreamError
from schemas.events import Usage
from schemas.settings import Secret
from tests.fakes.bedrock_upstream import (
    FakeBedrock,
    Reasoning,
    Script,
    Text,
    ToolUse,
    converse_body,
    exception_frame,
    stream_frames,
    validation_problem,
)
from tests.fixtures import AGENT_CLIENT_REQUESTS
from tests.unit.providers.chat_stream import chat_chunks, complete_json, stream_chunks

AKID, SECRET, TOKEN = "AKIAFAKE00000000TEST", "fakeSecret/Key+000000000000000000000000", "FQoGZXIvYXdzFAKETOKEN=="
IAM_KEY = f"{AKID}:{SECRET}"
BEARER_KEY = "ABSKQmVkcm9ja0FQSUtleS1mYWtl"
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-sonnet-4"
FIXTURES = AGENT_CLIENT_REQUESTS
BEDROCK = BedrockProvider()
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeBedrock]:
    async with FakeBedrock() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def reset(fake: FakeBedrock) -> None:
    fake.requests.clear()
    fake._failures.clear()
    fake.script = None
    fake.region = "us-east-1"
    fake.credentials = AwsCredentials(AKID, SECRET)
    fake.bearer_token = BEARER_KEY
    fake.stream_exception_after = fake.truncate_after = fake.corrupt_after = None



def call_for(fake: FakeBedrock, session: aiohttp.ClientSession, messages: list[dict[str, Any]] | None = None, *,
             model: str = "anthropic.claude-3-haiku-20240307-v1:0", key: str | None = IAM_KEY,
             options: dict[str, str] | None = None, wants_usage: bool = False, **body: Any) -> UpstreamCall:
    provider = Provider(id="prov_b", workspace_id="ws_1", name="aws", type="bedrock", base_url=fake.base_url,
                        options=options or {})
    return UpstreamCall(provider=provider, model=model,
                        body={"model": model, "messages": messages or user("hello"), **body},
                        api_key=Secret(key) if key else None, session=session, timeout_s=10,
                        client_wants_usage=wants_usage)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


async def complete(call: UpstreamCall) -> tuple[dict[str, Any], Usage | None]:
    return await complete_json(BEDROCK, call)


parse_events = chat_chunks


async def stream(call: UpstreamCall) -> tuple[list[dict[str, Any]], CallStats]:
    return await stream_chunks(BEDROCK, call)


def reassemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Chat chunks -> the message, finish reason and usage they add up to."""
    msg: dict[str, Any] = {"content": None, "tool_calls": {}, "finish_reason": None, "usage": None}
    for chunk in chunks:
        if not chunk["choices"]:
            msg["usage"] = chunk["usage"]
            continue
        [choice] = chunk["choices"]
        delta = choice["delta"]
        for key in ("content", "reasoning_content"):
            if delta.get(key):
                msg[key] = (msg.get(key) or "") + delta[key]
        for tc in delta.get("tool_calls", []):
            slot = msg["tool_calls"].setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            slot["id"] = tc.get("id", slot["id"])
            slot["name"] = tc.get("function", {}).get("name", slot["name"])
            slot["arguments"] += tc.get("function", {}).get("arguments", "")
        if choice["finish_reason"] is not None:
            msg["finish_reason"] = choice["finish_reason"]
    return msg


# --- Chat -> Converse (pure) ------------------------------------------------------------------------

PNG = "iVBORw0KGgoAAAANSUhEUg=="


def test_golden_request_translation() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [{"type": "text", "text": "What is in this image, and the weather?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "tu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
                {"id": "tu_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "tu_1", "content": "rain"},
            {"role": "tool", "tool_call_id": "tu_2", "content": [{"type": "text", "text": "sun"}]},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": ""},
        ],
        "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "noop"}}],
        "tool_choice": "required",
        "max_tokens": 10, "max_completion_tokens": 64, "temperature": 0.2, "top_p": 0.9, "stop": "END",
        "seed": 7, "stream": True, "user": "u-1",
    }
    assert to_converse(body) == {
        "messages": [
            {"role": "user", "content": [
                {"text": "What is in this image, and the weather?"},
                {"image": {"format": "png", "source": {"bytes": PNG}}},
            ]},
            {"role": "assistant", "content": [
                {"text": "Checking."},
                {"toolUse": {"toolUseId": "tu_1", "name": "get_weather", "input": {"city": "Oslo"}}},
                {"toolUse": {"toolUseId": "tu_2", "name": "get_weather", "input": {}}},
            ]},
            {"role": "user", "content": [
                {"toolResult": {"toolUseId": "tu_1", "content": [{"text": "rain"}]}},
                {"toolResult": {"toolUseId": "tu_2", "content": [{"text": "sun"}]}},
                {"text": "thanks"},
            ]},
        ],
        "system": [{"text": "You are terse."}, {"text": "Use tools."}],
        "inferenceConfig": {"maxTokens": 64, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"]},
        "toolConfig": {
            "tools": [
                {"toolSpec": {"name": "get_weather", "description": "Weather for a city",
                              "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]}}},  # type: ignore[index]
                {"toolSpec": {"name": "noop", "inputSchema": {"json": {"type": "object", "properties": {}}}}},
            ],
            "toolChoice": {"any": {}},
        },
    }
    assert validation_problem(to_converse(body)) is None


TOOL_HISTORY = [{"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "get_weather",
                                                                              "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "a", "content": "ok"}]


@pytest.mark.parametrize(("choice", "history", "expected"), [
    ("auto", False, {"toolChoice": {"auto": {}}}),
    ("required", False, {"toolChoice": {"any": {}}}),
    ({"type": "function", "function": {"name": "get_weather"}}, False,
     {"toolChoice": {"tool": {"name": "get_weather"}}}),
    (None, False, {}),
    ("none", False, None),
    ("none", True, {}),
])
def test_tool_choice(choice: Any, history: bool, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"messages": TOOL_HISTORY if history else [{"role": "user", "content": "q"}],
                            "tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    config = to_converse(body).get("toolConfig")
    if expected is None:
        assert config is None
    else:
        assert config is not None and {k: v for k, v in config.items() if k != "tools"} == expected


def test_malformed_replayed_arguments_are_wrapped_not_rejected() -> None:
    out = to_converse({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": '{"a": tru'}}]},
    ]})
    assert out["messages"][1]["content"] == [{"toolUse": {"toolUseId": "x", "name": "f",
                                                          "input": {"raw_arguments": '{"a": tru'}}}]


def test_stop_list_json_tool_result_and_jpg() -> None:
    out = to_converse({"stop": ["a", "b"], "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpg;base64,AAAA"}}]},
        {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "[1]"}}]},
        {"role": "tool", "tool_call_id": "x", "content": {"answer": 42}},
    ]})
    assert out["inferenceConfig"] == {"stopSequences": ["a", "b"]}
    assert out["messages"][0]["content"] == [{"image": {"format": "jpeg", "source": {"bytes": "AAAA"}}}]
    assert out["messages"][1]["content"] == [{"toolUse": {"toolUseId": "x", "name": "f",
                                                          "input": {"raw_arguments": "[1]"}}}]
    assert out["messages"][2]["content"] == [{"toolResult": {"toolUseId": "x", "content": [{"json": {"answer": 42}}]}}]


@pytest.mark.parametrize("body", [
    {"n": 2, "messages": [{"role": "user", "content": "q"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
    {"messages": [{"role": "assistant", "tool_calls": ["nope"]}]},
    {"messages": [{"role": "wizard", "content": "q"}]},
    {"messages": "hello"},
    {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
])
def test_untranslatable_requests_are_400(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        to_converse(body)


# --- Converse -> Chat (pure) ------------------------------------------------------------------------


def test_golden_response_translation() -> None:
    script = Script(blocks=(Reasoning("think"), Text("Hi "), Text("there."),
                            ToolUse("tu_9", "get_weather", {"city": "Oslo"})),
                    stop_reason="tool_use", input_tokens=100, output_tokens=20, cache_read=30, cache_write=5)
    body, usage = from_converse(converse_body(script), provider="aws", completion_id="chatcmpl-x", created=7,
                                model="m")
    assert json.loads(body) == {
        "id": "chatcmpl-x", "object": "chat.completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Hi there.", "reasoning_content": "think",
            "tool_calls": [{"id": "tu_9", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}}],
        "usage": {"prompt_tokens": 135, "completion_tokens": 20, "total_tokens": 155,
                  "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 5}},
    }
    assert usage == Usage(input_tokens=135, output_tokens=20, cache_read_tokens=30, cache_write_tokens=5)


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("tool_use", "tool_calls"), ("max_tokens", "length"),
    ("model_context_window_exceeded", "length"), ("guardrail_intervened", "content_filter"),
    ("content_filtered", "content_filter"), ("malformed_model_output", "stop"), ("something_new", "stop"),
])
def test_stop_reason_table(stop_reason: str, finish: str) -> None:
    body, _ = from_converse(converse_body(Script(stop_reason=stop_reason)), provider="aws", completion_id="c",
                            created=0, model="m")
    assert json.loads(body)["choices"][0]["finish_reason"] == finish
    events = translate_stream(stream_frames(Script(stop_reason=stop_reason)))
    assert reassemble(parse_events(events))["finish_reason"] == finish


@pytest.mark.parametrize(("usage", "expected"), [
    ({"inputTokens": 10, "outputTokens": 5}, Usage(input_tokens=10, output_tokens=5)),
    ({"inputTokens": 10, "outputTokens": 5, "cacheReadInputTokens": 90, "cacheWriteInputTokens": 0},
     Usage(input_tokens=100, output_tokens=5, cache_read_tokens=90)),
    ({"inputTokens": 3, "outputTokens": 0, "cacheReadInputTokens": 0, "cacheWriteInputTokens": 1000},
     Usage(input_tokens=1003, output_tokens=0, cache_write_tokens=1000)),
])
def test_usage_table(usage: dict[str, int], expected: Usage) -> None:
    raw = json.dumps({"output": {"message": {"role": "assistant", "content": [{"text": "x"}]}},
                      "stopReason": "end_turn", "usage": usage}).encode()
    body, ours = from_converse(raw, provider="aws", completion_id="c", created=0, model="m")
    assert ours == expected
    assert json.loads(body)["usage"]["prompt_tokens"] == expected.input_tokens


def test_bodies_that_are_not_converse_responses() -> None:
    for raw in (b"not json", b'{"output": 5}'):
        with pytest.raises(UpstreamError):
            from_converse(raw, provider="aws", completion_id="c", created=0, model="m")
    body, usage = from_converse(b"{}", provider="aws", completion_id="c", created=0, model="m")
    assert json.loads(body)["choices"][0]["message"]["content"] is None and usage is None


# --- the stream translator (pure) -------------------------------------------------------------------


def translate_stream(frames: list[bytes], *, include_usage: bool = True,
                     chunking: list[int] | None = None) -> list[bytes]:
    translator = ConverseStreamTranslator(provider="aws", completion_id="chatcmpl-s", created=1, model="m",
                                          include_usage=include_usage)
    data = b"".join(frames)
    decoder = EventStreamDecoder()
    out: list[bytes] = []
    cuts = sorted(chunking or [])
    prev = 0
    for cut in [*cuts, len(data)]:
        for message in decoder.feed(data[prev:cut]):
            out += translator.on_message(message)
        prev = cut
    decoder.close()
    return out + translator.finish()


def test_stream_chunk_shapes() -> None:
    chunks = parse_events(translate_stream(stream_frames(Script(blocks=(Text("Hi"), ToolUse("t", "f", {}))))))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["id"] == "chatcmpl-s" and c["object"] == "chat.completion.chunk" and c["model"] == "m"
               for c in chunks)
    tool_deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
                   if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert tool_deltas[0] == {"index": 0, "id": "t", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 18


def _event(event_type: str, payload: dict[str, Any]) -> bytes:
    return encode_message({":event-type": event_type, ":message-type": "event"}, json.dumps(payload).encode())


def test_tool_without_input_deltas_gets_empty_object_arguments() -> None:
    frames = [_event("messageStart", {"role": "assistant"}),
              _event("contentBlockStart", {"contentBlockIndex": 0,
                                           "start": {"toolUse": {"toolUseId": "t", "name": "f"}}}),
              _event("contentBlockStop", {"contentBlockIndex": 0}),
              _event("messageStop", {"stopReason": "tool_use"})]
    msg = reassemble(parse_events(translate_stream(frames)))
    assert msg["tool_calls"] == {0: {"id": "t", "name": "f", "arguments": "{}"}}
    assert msg["finish_reason"] == "tool_calls" and msg["usage"] is None


def test_stream_without_message_stop_is_an_error() -> None:
    with pytest.raises(UpstreamError, match="before messageStop"):
        translate_stream(stream_frames(Script())[:-2])


@pytest.mark.parametrize(("exception_type", "error", "status"), [
    ("throttlingException", RateLimited, 429), ("validationException", InvalidRequest, 400),
    ("serviceUnavailableException", UpstreamError, 503), ("modelStreamErrorException", UpstreamError, 502),
    ("internalServerException", UpstreamError, 502), ("brandNewException", UpstreamError, 502),
])
def test_exception_frames(exception_type: str, error: type[GatewayError], status: int) -> None:
    translator = ConverseStreamTranslator(provider="aws", completion_id="c", created=0, model="m",
                                          include_usage=False)
    [message] = EventStreamDecoder().feed(exception_frame(exception_type, "slow down"))
    with pytest.raises(error) as info:
        translator.on_message(message)
    assert info.value.status == status
    assert "slow down" in info.value.message


def test_error_message_type_frames() -> None:
    translator = ConverseStreamTranslator(provider="aws", completion_id="c", created=0, model="m",
                                          include_usage=False)
    with pytest.raises(UpstreamError, match="InternalFailure"):
        translator.on_message(EventMessage({":message-type": "error", ":error-code": "InternalFailure"}, b""))
    assert translator.on_message(EventMessage({":message-type": "event", ":event-type": "futureEvent"}, b"{}")) == []
    for event_type, payload in (("contentBlockStart", b'{"start": []}'), ("contentBlockDelta", b'{"delta": "x"}'),
                                ("metadata", b'{"usage": {"inputTokens": "many"}}'), ("messageStop", b"[1]")):
        assert translator.on_message(EventMessage({":message-type": "event", ":event-type": event_type},
                                                  payload)) == []
    with pytest.raises(UpstreamError, match="undecodable"):
        translator.on_message(EventMessage({":message-type": "event", ":event-type": "metadata"}, b"{"))


# --- property: stream reassembled == non-stream -----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
blocks = st.one_of(
    st.builds(Text, st.text(min_size=1, max_size=30)),
    st.builds(ToolUse, st.text(alphabet="abc123", min_size=1, max_size=8), st.sampled_from(["f", "get_weather"]),
              st.dictionaries(st.text(max_size=6), json_values, max_size=4)),
    st.builds(Reasoning, st.text(min_size=1, max_size=20)),
)
scripts = st.builds(Script, blocks=st.lists(blocks, max_size=5).map(tuple),
                    stop_reason=st.sampled_from([*STOP_REASONS, "malformed_tool_use"]),
                    input_tokens=st.integers(0, 10**6), output_tokens=st.integers(0, 10**5),
                    cache_read=st.integers(0, 10**5), cache_write=st.integers(0, 10**5),
                    text_piece=st.integers(1, 7), args_piece=st.integers(1, 9))


def non_stream_message(script: Script) -> dict[str, Any]:
    body, usage = from_converse(converse_body(script), provider="aws", completion_id="c", created=0, model="m")
    choice = json.loads(body)["choices"][0]
    message = choice["message"]
    return {"content": message["content"], "reasoning_content": message.get("reasoning_content"),
            "tool_calls": [(t["id"], t["function"]["name"], json.loads(t["function"]["arguments"]))
                           for t in message.get("tool_calls", [])],
            "finish_reason": choice["finish_reason"], "usage": json.loads(body).get("usage"), "ours": usage}


@settings(max_examples=150, deadline=None)
@given(script=scripts, data=st.data())
def test_stream_reassembles_to_the_non_streamed_answer(script: Script, data: st.DataObject) -> None:
    frames = stream_frames(script)
    total = sum(len(f) for f in frames)
    cuts = data.draw(st.lists(st.integers(0, total), max_size=10))
    events = translate_stream(frames, chunking=cuts)
    streamed = reassemble(parse_events(events))
    expected = non_stream_message(script)
    assert streamed["content"] == expected["content"]
    assert streamed.get("reasoning_content") == expected["reasoning_content"]
    assert [(t["id"], t["name"], json.loads(t["arguments"])) for _, t in sorted(streamed["tool_calls"].items())] \
        == expected["tool_calls"]
    assert streamed["finish_reason"] == expected["finish_reason"]
    assert streamed["usage"] == expected["usage"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=scripts, wants_usage=st.booleans())
async def test_stream_equals_non_stream_over_http(fake: FakeBedrock, session: aiohttp.ClientSession,
                                                  script: Script, wants_usage: bool) -> None:
    fake.script = script
    call = call_for(fake, session, wants_usage=wants_usage)
    body, usage = await complete(call)
    chunks, stats = await stream(call)
    assert stats.usage == usage
    assert [c for c in chunks if not c["choices"]] == ([chunks[-1]] if wants_usage else [])
    streamed, message = reassemble(chunks), body["choices"][0]["message"]
    assert streamed["content"] == message["content"]
    assert streamed["finish_reason"] == body["choices"][0]["finish_reason"]
    assert len(streamed["tool_calls"]) == len(message.get("tool_calls", []))


# --- through the fake: auth -------------------------------------------------------------------------


async def test_sigv4_with_an_inference_profile_arn(fake: FakeBedrock, session: aiohttp.ClientSession) -> None:
    body, usage = await complete(call_for(fake, session, model=ARN, temperature=0.5))
    assert body["choices"][0]["message"]["content"] == "Hello from the fake Bedrock."
    assert body["model"] == ARN and body["id"].startswith("chatcmpl-")
    assert usage == Usage(input_tokens=11, output_tokens=7)
    [req] = fake.requests
    assert req.raw_path == ("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile"
                            "%2Fus.anthropic.claude-sonnet-4/converse")
    assert req.model_id == ARN and req.action == "converse" and req.auth_scheme == "AWS4-HMAC-SHA256"
    assert req.headers["x-amz-date"].endswith("Z") and len(req.headers["x-amz-content-sha256"]) == 64
    assert "x-amz-security-token" not in req.headers
    assert req.body == {"messages": [{"role": "user", "content": [{"text": "hello"}]}],
                        "system": [{"text": "be brief"}], "inferenceConfig": {"temperature": 0.5}}


async def test_sigv4_with_a_session_token_and_region(fake: FakeBedrock, session: aiohttp.ClientSession) -> None:
    fake.credentials, fake.region = AwsCredentials(AKID, SECRET, TOKEN), "eu-central-1"
    chunks, stats = await stream(call_for(fake, session, key=f"{IAM_KEY}:{TOKEN}", options={"region": "eu-central-1"}))
    assert reassemble(chunks)["content"] == "Hello from the fake Bedrock."
    assert stats.usage == Usage(input_tokens=11, output_tokens=7)
    assert fake.requests[0].headers["x-amz-security-token"] == "<redacted>"
    assert fake.requests[0].action == "converse-stream"


async def test_signature_is_over_the_exact_time(fake: FakeBedrock, session: aiohttp.ClientSession) -> None:
    fixed = BedrockProvider(clock=lambda: datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))
    await fixed.complete(call_for(fake, session))
    assert fake.requests[0].headers["x-amz-date"] == "20300102T030405Z"


@pytest.mark.parametrize(("key", "options"), [
    (f"{AKID}:wrong-secret-000000000000000000", {}),  # bad signature
    (f"AKIAOTHER0000000TEST:{SECRET}", {}),  # unknown access key
    (IAM_KEY, {"region": "us-west-2"}),  # signed for the wrong region
    ("ABSKwrongbearer", {}),  # bad API key
])
async def test_rejected_credentials_are_a_502_without_secrets(fake: FakeBedrock, session: aiohttp.ClientSession,
                                                              key: str, options: dict[str, str]) -> None:
    with pytest.raises(UpstreamError) as info:
        await complete(call_for(fake, session, key=key, options=options))
    assert (info.value.status, info.value.code) == (502, "upstream_auth_error")
    for part in key.split(":"):
        assert part not in info.value.message


async def test_bearer_api_key(fake: FakeBedrock, session: aiohttp.ClientSession) -> None:
    await complete(call_for(fake, session, key=BEARER_KEY))
    assert fake.requests[-1].auth_scheme == "Bearer"
    assert "x-amz-date" not in fake.requests[-1].headers
    fake.bearer_token = "has:colons"
    await complete(call_for(fake, session, key="has:colons", options={"auth": "bearer"}))
    assert fake.requests[-1].auth_scheme == "Bearer"


async def test_missing_or_malformed_credentials(fake: FakeBedrock, session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamError, match="no credentials"):
        await complete(call_for(fake, session, key=None))
    with pytest.raises(UpstreamError) as info:
        await complete(call_for(fake, session, key="justonesecretvalue", options={"auth": "sigv4"}))
    assert "justonesecretvalue" not in info.value.message
    assert fake.requests == []


def test_default_endpoint_and_region_validation() -> None:
    provider = Provider(id="p", workspace_id="w", name="aws", type="bedrock", options={"region": "eu-west-3"})
    call = UpstreamCall(provider=provider, model="a/b:c", body={}, api_key=None, session=None,  # type: ignore[arg-type]
                        timeout_s=1)
    assert BEDROCK._url(call, "converse") == "https://bedrock-runtime.eu-west-3.amazonaws.com/model/a%2Fb%3Ac/converse"
    bad = Provider(id="p", workspace_id="w", name="aws", type="bedrock", options={"region": "evil.com/x"})
    with pytest.raises(UpstreamError, match="invalid region"):
        BEDROCK._url(UpstreamCall(provider=bad, model="m", body={}, api_key=None,
                                  session=None, timeout_s=1), "converse")  # type: ignore[arg-type]


# --- through the fake: errors -----------------------------------------------------------------------

ERROR_CASES = [
    (429, "ThrottlingException", RateLimited, 429, "upstream_rate_limited"),
    (400, "ValidationException", InvalidRequest, 400, "upstream_invalid_request"),
    (403, "AccessDeniedException", UpstreamError, 502, "upstream_auth_error"),
    (403, "UnrecognizedClientException", UpstreamError, 502, "upstream_auth_error"),
    (404, "ResourceNotFoundException", NotFound, 404, "model_not_found"),
    (429, "ModelNotReadyException", UpstreamError, 503, "upstream_overloaded"),
    (503, "ServiceUnavailableException", UpstreamError, 503, "upstream_overloaded"),
    (408, "ModelTimeoutException", UpstreamError, 504, "upstream_timeout"),
    (500, "InternalServerException", UpstreamError, 502, "upstream_error"),
    (424, "ModelErrorException", UpstreamError, 502, "upstream_error"),
    (400, "ServiceQuotaExceededException", RateLimited, 429, "upstream_rate_limited"),
    (503, "SomethingBrandNew", UpstreamError, 503, "upstream_overloaded"),  # unknown: the status table
]


@pytest.mark.parametrize(("status", "error_type", "error", "our_status", "code"), ERROR_CASES,
                         ids=[c[1] for c in ERROR_CASES])
@pytest.mark.parametrize("streaming", [False, True])
async def test_http_errors(fake: FakeBedrock, session: aiohttp.ClientSession, status: int, error_type: str,
                           error: type[GatewayError], our_status: int, code: str, streaming: bool) -> None:
    fake.fail_next(status, error_type, f"{error_type} happened")
    call = call_for(fake, session)
    with pytest.raises(error) as info:
        if streaming:
            await anext(BEDROCK.stream(call, CallStats()))
        else:
            await complete(call)
    assert (info.value.status, info.value.code) == (our_status, code)
    if code != "upstream_auth_error":
        assert f"{error_type} happened" in info.value.message


def test_error_mapper_reads_capitalised_message_and_json_type_and_masks_secrets() -> None:
    raw = json.dumps({"__type": "com.amazon.coral#ThrottlingException",
                      "Message": f"key {AKID} secret {SECRET} token {TOKEN}"}).encode()
    err = map_bedrock_error("aws", 429, raw, {}, f"{AKID}:{SECRET}:{TOKEN}")
    assert isinstance(err, RateLimited)
    assert AKID not in err.message and SECRET not in err.message and TOKEN not in err.message
    assert "key *** secret *** token ***" in err.message


async def test_converse_validation_errors_surface_as_400(fake: FakeBedrock, session: aiohttp.ClientSession) -> None:
    with pytest.raises(InvalidRequest, match="alternate"):
        await complete(call_for(fake, session, [{"role": "assistant", "content": "first"}]))


# --- through the fake: stream failures --------------------------------------------------------------


async def test_exception_right_after_message_start_is_a_pre_stream_failure(
        fake: FakeBedrock, session: aiohttp.ClientSession) -> None:
    fake.stream_exception_after = 1  # messageStart, then throttlingException
    events = BEDROCK.stream(call_for(fake, session), CallStats())
    with pytest.raises(RateLimited):
        await anext(events)


async def test_mid_stream_exception_raises_after_content(fake: FakeBedrock, session: aiohttp.ClientSession) -> None:
    fake.stream_exception_after = 3
    seen: list[bytes] = []
    with pytest.raises(RateLimited, match="Too many tokens"):
        async for event in BEDROCK.stream(call_for(fake, session), CallStats()):
            seen.append(event)
    assert len(seen) >= 2 and SSE_DONE not in seen
    assert b'"content":"Hell' in b"".join(seen)


@pytest.mark.parametrize("knob", ["truncate_after", "corrupt_after"])
async def test_truncated_or_corrupt_frames(fake: FakeBedrock, session: aiohttp.ClientSession, knob: str) -> None:
    setattr(fake, knob, 4)
    seen: list[bytes] = []
    with pytest.raises(UpstreamError, match="truncated or corrupt"):
        async for event in BEDROCK.stream(call_for(fake, session), CallStats()):
            seen.append(event)
    assert seen and SSE_DONE not in seen


async def test_usage_chunk_only_when_the_client_asked(fake: FakeBedrock, session: aiohttp.ClientSession) -> None:
    for wants in (False, True):
        chunks, stats = await stream(call_for(fake, session, wants_usage=wants))
        assert stats.usage == Usage(input_tokens=11, output_tokens=7)
        assert any(not c["choices"] for c in chunks) is wants


# --- captured agent-client requests -----------------------------------------------------------------


def chat_fixtures() -> list[dict[str, Any]]:
    data = json.loads(FIXTURES.read_text())
    return [r["body"] for reqs in data.values() for r in reqs
            if r["path"] == "/v1/chat/completions" and r["method"] == "POST"]


async def test_captured_chat_requests_translate_and_are_accepted(fake: FakeBedrock,
                                                                 session: aiohttp.ClientSession) -> None:
    bodies = chat_fixtures()
    assert bodies
    for body in bodies:
        translated = to_converse(body)
        assert validation_problem(translated) is None, body
        call = call_for(fake, session, body["messages"],
                        **{k: v for k, v in body.items() if k not in ("messages", "model")})
        if body.get("stream"):
            chunks, _ = await stream(call)
            assert reassemble(chunks)["finish_reason"] == "stop"
        else:
            assert (await complete(call))[0]["choices"]
