"""dataplane/ingress/messages.py: Anthropic Messages in, Chat Completions inside, Anthropic out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dataplane.ingress.messages import CountTokens, MessagesIngress, forward_headers
from dataplane.ingress.messages_translate import estimate_input_tokens
from dataplane.lifecycle import ModelCall
from dataplane.pipeline import run
from dataplane.providers import registry
from dataplane.providers.anthropic import AnthropicProvider
from dataplane.providers.base import CallStats, UpstreamCall
from dataplane.providers.mock import MockProvider
from dataplane.snapshot import SnapshotStore
from dataplane.state import WORKER, WorkerState
from schemas.anthropic import CountTokensRequest
from schemas.entities import Provider, VirtualKey
from schemas.errors import InvalidRequest, UpstreamError
from schemas.http import error_middleware
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot
from tests.fakes.anthropic_upstream import FakeAnswer, FakeAnthropic
from tests.fixtures import AGENT_CLIENT_REQUESTS

FIXTURES = AGENT_CLIENT_REQUESTS
INGRESS = MessagesIngress()
HEADERS = {"Anthropic-Version": "2023-06-01", "anthropic-beta": "claude-code-20250219", "x-api-key": "vk"}


def claude_code_requests() -> list[dict[str, Any]]:
    captures = json.loads(FIXTURES.read_text())["claude_code_2.1.330"]
    return [c for c in captures if c["path"] == "/v1/messages"]


def parse_events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in stream.split(b"\n\n"):
        if not event.strip() or event.startswith(b":"):
            continue
        name, data = event.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        payload = json.loads(data[6:])
        assert payload["type"] == name[7:].decode()
        out.append((payload["type"], payload))
    return out


def accumulate(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The final message from a stream, the way the Anthropic SDKs accumulate it."""
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for name, ev in events:
        if name == "message_start":
            message = ev["message"]
        elif name == "content_block_start":
            assert ev["index"] == len(message["content"])
            message["content"].append(dict(ev["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][ev["index"]], ev["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "input_json_delta":
                partial[ev["index"]] = partial.get(ev["index"], "") + delta["partial_json"]
        elif name == "content_block_stop" and ev["index"] in partial:
            message["content"][ev["index"]]["input"] = json.loads(partial[ev["index"]] or "{}")
        elif name == "message_delta":
            message.update(ev["delta"])
            message["usage"] = {**message["usage"], **ev["usage"]}
    return message


async def chunks_of(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


USAGE = {"prompt_tokens": 130, "completion_tokens": 30, "total_tokens": 160,
         "prompt_tokens_details": {"cached_tokens": 100}, "completion_tokens_details": {"reasoning_tokens": 5}}
TOOL_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "thinking..."}),
    chunk({"content": "Let me "}),
    chunk({"content": "check."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                           "function": {"name": "now", "arguments": "{}"}}]}),
    chunk({}, "tool_calls"),
    sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x", "choices": [],
         "usage": USAGE}),
    b"data: [DONE]\n\n",
]


def plan_for(raw: dict[str, Any]) -> Any:
    return INGRESS.plan(raw, HEADERS)


def request(**extra: Any) -> dict[str, Any]:
    return {"model": "openai/gpt-x", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **extra}


# -- plan: validation ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "param"), [
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0]"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}]}, "messages[0].content[0]"),
])
def test_plan_rejects_like_anthropic(raw: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        INGRESS.plan(raw, {})
    assert exc.value.param == param


def test_plan_fields() -> None:
    raw = request(stream=True)
    plan = plan_for(raw)
    assert plan.model == "openai/gpt-x" and plan.stream and plan.include_usage
    assert plan.forward_headers == {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219"}
    assert plan.native_api == "anthropic.messages" and plan.native_body is raw
    assert plan.body == {"model": "openai/gpt-x", "max_tokens": 100, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]}
    assert forward_headers({"x-api-key": "k"}) == {}


# -- plan: golden Anthropic -> Chat ----------------------------------------------------------


def test_anthropic_to_chat_golden() -> None:
    raw = request(
        system=[{"type": "text", "text": "You are Claude.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Be brief."}],
        messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
                 "title": "spec.pdf"},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xyz"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "/a"}},
                {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {"path": "/b"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "A"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True, "content": [
                    {"type": "text", "text": "not"}, {"type": "text", "text": "found"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j"}}]},
                {"type": "text", "text": "Continue."},
            ]},
            {"role": "system", "content": "Mid-conversation note."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        tools=[{"name": "Read", "description": "Read a file", "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"}, "defer_loading": False},
               {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"], temperature=0.2, top_p=0.9, top_k=5,
        thinking={"type": "enabled", "budget_tokens": 8000},
        output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
        metadata={"user_id": "u"},
    )
    assert plan_for(raw).body == {
        "model": "openai/gpt-x",
        "max_tokens": 100,
        "messages": [
            {"role": "system", "content": "You are Claude.\n\nBe brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "file", "file": {"filename": "spec.pdf", "file_data": "data:application/pdf;base64,JVBE"}},
            ]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "Read", "arguments": '{"path":"/a"}'}},
                {"id": "toolu_2", "type": "function", "function": {"name": "Read", "arguments": '{"path":"/b"}'}},
            ]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "A"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "not\nfound"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j"}},
                {"type": "text", "text": "Continue."},
            ]},
            {"role": "system", "content": "Mid-conversation note."},
            {"role": "user", "content": "a\nb"},
        ],
        "stop": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "tools": [{"type": "function", "function": {"name": "Read", "parameters": {"type": "object"},
                                                    "description": "Read a file"}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "reasoning_effort": "medium",
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": True}},
    }


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "Read"}, {"type": "function", "function": {"name": "Read"}}),
])
def test_tool_choice_mapping(choice: dict[str, Any], expected: Any) -> None:
    tools = [{"name": "Read", "input_schema": {"type": "object"}}]
    body = plan_for(request(tools=tools, tool_choice=choice)).body
    assert body["tool_choice"] == expected and "parallel_tool_calls" not in body


def test_only_server_tools_means_no_tools() -> None:
    body = plan_for(request(tools=[{"type": "web_search_20250305", "name": "web_search"}],
                            tool_choice={"type": "auto"})).body
    assert "tools" not in body and "tool_choice" not in body


@pytest.mark.parametrize("capture", claude_code_requests(), ids=lambda c: f"{len(c['body']['messages'])}msgs")
def test_claude_code_captures_plan_and_translate(capture: dict[str, Any]) -> None:
    raw = capture["body"]
    plan = INGRESS.plan(raw, capture["headers"])
    assert plan.stream and plan.native_body is raw
    assert plan.forward_headers["anthropic-version"] == "2023-06-01"
    assert plan.forward_headers["anthropic-beta"].startswith("claude-code-20250219")
    body = plan.body
    assert body["max_tokens"] == 32000 and "reasoning_effort" not in body  # adaptive thinking is not mapped
    roles = [m["role"] for m in body["messages"]]
    assert roles[0] == "system" and body["messages"][0]["content"].startswith("x-anthropic-billing-header")
    assert roles.count("system") == 2  # the mid-conversation system message stays in place
    assert len(body["tools"]) == len(raw["tools"])
    assert all(set(t["function"]) <= {"name", "description", "parameters"} for t in body["tools"])
    if "tool" in roles:
        call = next(m for m in body["messages"] if m.get("tool_calls"))
        result = body["messages"][roles.index("tool")]
        assert result["tool_call_id"] == call["tool_calls"][0]["id"] == "toolu_1"
        assert json.loads(call["tool_calls"][0]["function"]["arguments"])["command"] == "echo hi"
        assert roles.index("tool") == roles.index("assistant") + 1
    assert msgspec.json.encode(body)  # serializable as-is
    assert estimate_input_tokens(msgspec.convert(raw, CountTokensRequest)) > 1000


# -- render ----------------------------------------------------------------------------------


def test_render_message() -> None:
    chat_body = msgspec.json.encode({
        "id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-x",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Checking.", "reasoning_content": "hmm",
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "Read", "arguments": '{"path":"/a"}'}}]}}],
        "usage": USAGE,
    })
    plan = plan_for(request())
    assert msgspec.json.decode(INGRESS.render(chat_body, plan)) == {
        "id": "msg_chatcmpl-9", "type": "message", "role": "assistant", "model": "gpt-x",
        "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "Read", "input": {"path": "/a"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 30, "output_tokens": 30, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 100},
    }
    thinking_plan = plan_for(request(thinking={"type": "enabled", "budget_tokens": 2000}))
    content = msgspec.json.decode(INGRESS.render(chat_body, thinking_plan))["content"]
    assert content[0] == {"type": "thinking", "thinking": "hmm", "signature": ""}


@pytest.mark.parametrize(("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"),
                                              ("content_filter", "refusal"), (None, "end_turn")])
def test_render_stop_reasons(finish: str | None, stop: str) -> None:
    chat_body = msgspec.json.encode({"id": "c", "model": "m", "choices": [
        {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": "x"}}]})
    assert msgspec.json.decode(INGRESS.render(chat_body, plan_for(request())))["stop_reason"] == stop


async def render(items: list[bytes], raw: dict[str, Any] | None = None) -> bytes:
    plan = plan_for(raw or request(stream=True))
    return b"".join([e async for e in INGRESS.render_stream(chunks_of(items), plan)])


async def test_render_stream_event_order() -> None:
    events = parse_events(await render(TOOL_STREAM))
    assert [(n, e.get("index"), (e.get("content_block") or e.get("delta") or {}).get("type")) for n, e in events] == [
        ("message_start", None, None),
        ("ping", None, None),
        ("content_block_start", 0, "text"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]
    start = events[0][1]["message"]
    assert start["id"] == "msg_chatcmpl-1" and start["usage"] == {"input_tokens": 0, "output_tokens": 1}
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 30, "output_tokens": 30, "cache_creation_input_tokens": 0,
                                       "cache_read_input_tokens": 100}}
    final = accumulate(events)
    assert final["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "now", "input": {}},
    ]


async def test_render_stream_thinking_when_asked() -> None:
    raw = request(stream=True, thinking={"type": "enabled", "budget_tokens": 2000})
    final = accumulate(parse_events(await render(TOOL_STREAM, raw)))
    assert final["content"][0] == {"type": "thinking", "thinking": "thinking...", "signature": ""}
    omitted = request(stream=True, thinking={"type": "adaptive", "display": "omitted"})
    assert accumulate(parse_events(await render(TOOL_STREAM, omitted)))["content"][0]["type"] == "text"


async def test_render_stream_matches_render_for_mock() -> None:
    """The same mock answer, streamed and not, renders to the same Anthropic message."""
    raw = request(model="mock/echo", messages=[{"role": "user", "content": "one two three four"}])
    plan = plan_for({**raw, "stream": True})
    mock = Provider(id="p", workspace_id="w", name="mock", type="mock", options={"enabled": "true"})
    call = UpstreamCall(provider=mock, model="echo",
                        body={**plan.body, "model": "echo"}, api_key=None, session=None,  # type: ignore[arg-type]
                        timeout_s=5, client_wants_usage=True)
    mock = MockProvider()
    streamed = accumulate(parse_events(b"".join(
        [e async for e in INGRESS.render_stream(mock.stream(call, CallStats()), plan)])))
    whole = msgspec.json.decode(INGRESS.render((await mock.complete(call)).body, plan))
    assert streamed["content"] == whole["content"] == [{"type": "text", "text": "one two three four"}]
    assert streamed["stop_reason"] == whole["stop_reason"] == "end_turn"
    assert streamed["usage"] == whole["usage"]


async def test_render_stream_errors() -> None:
    async def failing() -> AsyncIterator[bytes]:
        raise UpstreamError("boom", status=503)
        yield b""  # pragma: no cover

    gen = INGRESS.render_stream(failing(), plan_for(request(stream=True)))
    with pytest.raises(UpstreamError):
        await anext(gen)  # before the first byte: a plain JSON error response
    mid = [chunk({"content": "partial"}), sse({"error": {"message": "provider exploded", "type": "server_error"}})]
    with pytest.raises(UpstreamError, match="provider exploded"):
        await render(mid)


def test_stream_end_and_error_shapes() -> None:
    assert INGRESS.stream_end("0.000123") == b": alephant-cost-usd 0.000123\n\n"
    err = INGRESS.stream_error(UpstreamError("Provider overloaded", status=503))
    name, payload = parse_events(err)[0]
    assert name == "error"
    assert payload == {"type": "error", "error": {"type": "overloaded_error", "message": "Provider overloaded"}}


# -- through the fake Anthropic: plan -> adapter (Chat) -> render -----------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as upstream:
        yield upstream



def anthropic_call(fake: FakeAnthropic, session: aiohttp.ClientSession, body: dict[str, Any],
                   headers: dict[str, str] | None = None, wants_usage: bool = True) -> UpstreamCall:
    provider = Provider(id="p", workspace_id="w", name="claude", type="anthropic", base_url=fake.base_url)
    return UpstreamCall(provider=provider, model="claude-x", body={**body, "model": "claude-x"},
                        api_key=Secret("sk-ant-x"), session=session, timeout_s=5, client_wants_usage=wants_usage,
                        extra_headers=headers or {})


async def test_round_trip_through_chat(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.answer = FakeAnswer(blocks=({"type": "text", "text": "Sure thing."},
                                     {"type": "tool_use", "id": "toolu_9", "name": "Bash", "input": {"command": "ls"}}),
                             stop_reason="tool_use", cache_read_input_tokens=40)
    raw = request(stream=True, tools=[{"name": "Bash", "input_schema": {"type": "object"}}])
    plan = plan_for(raw)
    adapter = AnthropicProvider()
    stream = adapter.stream(anthropic_call(fake, session, plan.body, plan.forward_headers), CallStats())
    final = accumulate(parse_events(b"".join([e async for e in INGRESS.render_stream(stream, plan)])))
    assert final["content"] == [{"type": "text", "text": "Sure thing."},
                                {"type": "tool_use", "id": "toolu_9", "name": "Bash", "input": {"command": "ls"}}]
    assert final["stop_reason"] == "tool_use"
    assert final["usage"] == {"input_tokens": 25, "output_tokens": 12, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 40}
    assert fake.requests[-1].headers["anthropic-beta"] == "claude-code-20250219"


# -- count_tokens ----------------------------------------------------------------------------


async def test_count_tokens_upstream_and_fallbacks(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    raw = {"model": "claude/claude-x", "messages": [{"role": "user", "content": "hello there"}]}
    fake.count_tokens = 77
    call = anthropic_call(fake, session, raw, {"anthropic-beta": "b1"})
    assert await INGRESS.count_tokens(raw, AnthropicProvider(), call) == {"input_tokens": 77}
    assert fake.requests[-1].path == "/v1/messages/count_tokens"
    assert fake.requests[-1].body["model"] == "claude-x"
    assert fake.requests[-1].headers["anthropic-beta"] == "b1"
    local = estimate_input_tokens(msgspec.convert(raw, CountTokensRequest))
    fake.fail_next(404)  # an Anthropic-compatible base without the endpoint
    assert await INGRESS.count_tokens(raw, AnthropicProvider(), call) == {"input_tokens": local}
    assert await INGRESS.count_tokens(raw, MockProvider(), call) == {"input_tokens": local}
    fake.fail_next(529)
    with pytest.raises(UpstreamError):
        await INGRESS.count_tokens(raw, AnthropicProvider(), call)
    with pytest.raises(InvalidRequest):
        await INGRESS.count_tokens({"model": "m"}, MockProvider(), call)


def test_estimate_heuristic() -> None:
    text = "x" * 35
    req = msgspec.convert({"model": "m", "system": "s" * 7, "messages": [
        {"role": "user", "content": [{"type": "text", "text": text},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "A" * 100_000}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]},
    ]}, CountTokensRequest)
    # 7 + 35 + (4 + 2) + 2 = 50 characters -> 15 tokens; 3 messages; one image (its base64 is not text).
    assert estimate_input_tokens(req) == 15 + 9 + 1600


# -- on a minimal app: the count_tokens handler and the shared lifecycle ---------------------


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)


@dataclass
class App:
    url: str
    publisher: RecordingPublisher


@pytest.fixture
async def app(fake: FakeAnthropic, session: aiohttp.ClientSession,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[App]:
    """The data-plane pieces this ingress needs, wired the way the lead wires them in app.py."""
    monkeypatch.setitem(registry.ADAPTERS, "anthropic", AnthropicProvider())
    keyring = KeyRing(Secret("test-master-secret-0123456789"))
    entities = {
        "p1": Provider(id="p1", workspace_id="ws", name="claude", type="anthropic", base_url=fake.base_url,
                       api_key_enc=keyring.encrypt("sk-ant-upstream-5678")),
        "p2": Provider(id="p2", workspace_id="ws", name="mock", type="mock", options={"enabled": "true"}),
        "k1": VirtualKey(id="k1", workspace_id="ws", key_hash=keyring.hash_key("sk-alph-client")),
    }
    store = SnapshotStore()
    store.swap(Snapshot.build(entities, 1))
    store.ready.set()
    publisher = RecordingPublisher()
    application = web.Application(middlewares=[error_middleware])
    application[WORKER] = WorkerState(settings=Settings(), keyring=keyring, store=store,
                                      events=publisher, session=session)
    ingress = MessagesIngress()

    async def messages(request: web.Request) -> web.StreamResponse:
        return await run(request, ModelCall(ingress))

    application.router.add_post("/v1/messages", messages)
    count_tokens = CountTokens()

    async def counted(request: web.Request) -> web.StreamResponse:
        return await run(request, count_tokens)

    application.router.add_post("/v1/messages/count_tokens", counted)
    async with TestServer(application, host="127.0.0.1") as server:
        yield App(str(server.make_url("")).rstrip("/"), publisher)


CLIENT = {"x-api-key": "sk-alph-client", "anthropic-version": "2023-06-01"}


async def test_serve_count_tokens_handler(app: App, fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.count_tokens = 42
    url = app.url + "/v1/messages/count_tokens"
    body = {"model": "claude/claude-x", "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(url, json=body, headers={**CLIENT, "anthropic-beta": "b2"}) as resp:
        assert resp.status == 200 and await resp.json() == {"input_tokens": 42}
        assert resp.headers["Alephant-Request-Id"]
    sent = fake.requests[-1]
    assert sent.body["model"] == "claude-x" and sent.api_key_hint == "5678"
    assert sent.headers["anthropic-beta"] == "b2"
    local = {**body, "model": "mock/echo"}
    async with session.post(url, json=local, headers={"Authorization": "Bearer sk-alph-client"}) as resp:
        assert await resp.json() == {"input_tokens": 4}
    async with session.post(url, json={"model": "claude/x"}, headers=CLIENT) as resp:
        assert resp.status == 400
        assert (await resp.json())["type"] == "error"  # Anthropic's error shape on /v1/messages paths
    async with session.post(url, json=body, headers={"x-api-key": "wrong"}) as resp:
        assert resp.status == 401
    # Counting is free: a count is not recorded, only a refusal is (the unknown key is counted apart).
    assert [(e.ingress, e.status) for e in app.publisher.events] == [("anthropic.count_tokens", 400)]


async def test_lifecycle_native_and_translated(app: App, fake: FakeAnthropic,
                                               session: aiohttp.ClientSession) -> None:
    url = app.url + "/v1/messages"
    native = request(model="claude/claude-x", stream=True, top_k=3)
    async with session.post(url, json=native, headers={**CLIENT, "anthropic-beta": "b3"}) as resp:
        assert resp.status == 200
        text = await resp.read()
    assert fake.requests[-1].body == {**native, "model": "claude-x"}  # the native body, unchanged
    assert fake.requests[-1].headers["anthropic-beta"] == "b3"
    assert accumulate(parse_events(text))["content"] == [{"type": "text",
                                                          "text": "Hello from the fake Anthropic upstream."}]
    tail = text.rsplit(b"event: message_stop\n", 1)[1]
    assert tail.startswith(b'data: {"type":"message_stop"}\n\n: alephant-cost-usd ')  # cost comment, nothing else
    call = app.publisher.events[-1]
    assert (call.ingress, call.provider, call.stream, call.status) == ("anthropic.messages", "claude", True, 200)
    assert call.usage.input_tokens == 25 and call.usage.output_tokens == 12

    translated = request(model="mock/echo", messages=[{"role": "user", "content": "ping pong"}])
    async with session.post(url, json=translated, headers=CLIENT) as resp:
        message = await resp.json()
    assert message["content"] == [{"type": "text", "text": "ping pong"}] and message["type"] == "message"
    assert app.publisher.events[-1].ingress == "anthropic.messages"

    fake.fail_next(529)
    async with session.post(url, json=native, headers=CLIENT) as resp:
        assert resp.status == 529  # Anthropic's overloaded, kept for Anthropic clients
        assert (await resp.json())["error"]["type"] == "overloaded_error"
    fake.stream_error_after = 4
    async with session.post(url, json=native, headers=CLIENT) as resp:
        events = parse_events(await resp.read())
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "overloaded_error"
    assert app.publisher.events[-1].partial
