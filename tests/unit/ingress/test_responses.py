"""dataplane/ingress/responses.py (+ responses_request.py): Responses -> Chat translation, the
captured Codex / SDK requests, Chat -> Response rendering, the named event stream (order,
sequence numbers, usage, failure, incomplete), the stream == non-stream property, and the
official `openai` SDK parsing what we render."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import openai
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.ingress.base import ChatPlan
from dataplane.ingress.responses import ResponsesIngress
from dataplane.ingress.responses_request import (
    flat_tool_name,
    looks_like_responses_body,
    responses_body_to_chat,
    translate_request,
)
from schemas.errors import GatewayError, InvalidRequest, PermissionDenied, RateLimited, UpstreamError
from schemas.http import validate
from schemas.openai import ChatCompletionRequest
from tests.fixtures import AGENT_CLIENT_REQUESTS

FIXTURES = AGENT_CLIENT_REQUESTS
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
NAMESPACE = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents", "tools": [
    {"type": "function", "name": "spawn_agent", "strict": False, "parameters": {"type": "object", "properties": {}}},
    {"type": "function", "name": "wait_agent", "parameters": {"type": "object", "properties": {}}},
]}


def counter_ids() -> Callable[[str], str]:
    counter = itertools.count()
    return lambda prefix: f"{prefix}_{next(counter)}"


def plan_of(raw: dict[str, Any]) -> ChatPlan:
    return ResponsesIngress().plan(raw, {})


# --- request translation -------------------------------------------------------------------------


def test_string_input_and_parameters_golden() -> None:
    raw = {"model": "openai/gpt-x", "instructions": "Be terse.", "input": "hi", "max_output_tokens": 64,
           "temperature": 0.2, "top_p": 0.9, "store": False, "stream": True, "user": "u1",
           "reasoning": {"effort": "low", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
           "text": {"format": {"type": "json_schema", "name": "out", "strict": True, "schema": {"type": "object"}},
                    "verbosity": "low"},
           "prompt_cache_key": "pck", "truncation": "auto", "metadata": {"a": "b"}}
    plan = plan_of(raw)
    assert plan.body == {
        "model": "openai/gpt-x",
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 64, "temperature": 0.2, "top_p": 0.9, "user": "u1", "prompt_cache_key": "pck",
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True}},
        "verbosity": "low", "reasoning_effort": "low",
        "stream": True, "stream_options": {"include_usage": True},
    }
    assert (plan.model, plan.stream, plan.include_usage) == ("openai/gpt-x", True, True)
    assert plan.native_api == "openai.responses"
    assert plan.native_body is raw
    validate(plan.body, ChatCompletionRequest)


def test_json_object_format_and_text_format_are_mapped() -> None:
    assert plan_of({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}).body[
        "response_format"] == {"type": "json_object"}
    assert "response_format" not in plan_of({"model": "m", "input": "x", "text": {"format": {"type": "text"}}}).body


def test_items_golden() -> None:
    raw = {"model": "m", "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rule 1"},
                                                            {"type": "input_text", "text": "rule 2"}]},
        {"role": "user", "content": "plain easy message"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
            {"type": "input_file", "file_data": "data:application/pdf;base64,BBBB", "filename": "a.pdf"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city":"Paris"}', "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "spawn_agent", "namespace": "multi_agent_v1",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [
            {"type": "input_text", "text": "agent"}, {"type": "input_image", "image_url": "x"},
            {"type": "input_text", "text": "started"}]},
        {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search"}},
        {"type": "function_call", "call_id": "call_3", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_3", "output": "rain"},
    ]}
    translation = translate_request(raw)
    assert translation.body["messages"] == [
        {"role": "system", "content": "rule 1\n\nrule 2"},
        {"role": "user", "content": "plain easy message"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,BBBB", "filename": "a.pdf"}}]},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "multi_agent_v1__spawn_agent", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "agent\nstarted"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_3", "content": "rain"},
    ]
    assert translation.dropped == ["input[3]:reasoning", "input[8].output[1]:input_image", "input[9]:web_search_call"]
    validate(translation.body, ChatCompletionRequest)


def test_assistant_refusal_and_custom_tool_history() -> None:
    body = translate_request({"model": "m", "input": [
        {"role": "user", "content": "x"},
        {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "done"},
    ]}).body
    assert body["messages"][1:] == [
        {"role": "assistant", "content": None, "refusal": "no", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "apply_patch", "arguments": json.dumps({"input": "*** Begin Patch"})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]


def test_tools_flattened_hosted_dropped() -> None:
    hosted = [{"type": "web_search", "external_web_access": False}, {"type": "file_search", "vector_store_ids": []},
              {"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}},
              {"type": "mcp", "server_label": "x"}, {"type": "local_shell"}, {"type": "image_generation"}]
    translation = translate_request({"model": "m", "input": "x", "tools": [WEATHER, NAMESPACE, *hosted],
                                     "tool_choice": "required", "parallel_tool_calls": False})
    assert translation.body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                          "parameters": WEATHER["parameters"], "strict": True}},
        {"type": "function", "function": {"name": "multi_agent_v1__spawn_agent", "strict": False,
                                          "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "multi_agent_v1__wait_agent",
                                          "parameters": {"type": "object", "properties": {}}}},
    ]
    assert translation.body["tool_choice"] == "required"
    assert translation.body["parallel_tool_calls"] is False
    assert translation.dropped == ["tools[2]:web_search", "tools[3]:file_search", "tools[4]:custom",
                                   "tools[5]:mcp", "tools[6]:local_shell", "tools[7]:image_generation"]


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "function", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ({"type": "function", "name": "wait_agent", "namespace": "multi_agent_v1"},
     {"type": "function", "function": {"name": "multi_agent_v1__wait_agent"}}),
    ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"},
                                                             {"type": "web_search"}]},
     {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
         {"type": "function", "function": {"name": "get_weather"}}]}}),
    ({"type": "web_search"}, None),
])
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any] | None) -> None:
    body = translate_request({"model": "m", "input": "x", "tools": [WEATHER, NAMESPACE], "tool_choice": choice}).body
    assert body.get("tool_choice") == expected


def test_only_hosted_tools_leaves_no_tool_fields() -> None:
    translation = translate_request({"model": "m", "input": "x", "tools": [{"type": "web_search"}],
                                     "tool_choice": "required", "parallel_tool_calls": True})
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & translation.body.keys()
    assert translation.dropped == ["tools[0]:web_search", "tool_choice"]


def test_flat_tool_name_trims_like_codex() -> None:
    assert flat_tool_name("multi_agent_v1", "spawn_agent") == "multi_agent_v1__spawn_agent"
    assert flat_tool_name("mcp__sample__", "search") == "mcp__sample__search"
    assert flat_tool_name("ns_", "_x") == "ns__x"


@pytest.mark.parametrize(("raw", "param"), [
    ({"input": "x"}, "model"),
    ({"model": "m"}, "input"),
    ({"model": "m", "input": []}, "input"),
    ({"model": "m", "input": 3}, "input"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"content": "x"}]}, "input[0].type"),
    ({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].image_url"),
    ({"model": "m", "input": [{"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content[0].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "m", "input": "x", "tools": [{"type": "namespace", "name": "n", "tools": [{"type": "function"}]}]},
     "tools[0].tools[0].name"),
])
def test_invalid_requests_name_the_param(raw: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        plan_of(raw)
    assert info.value.status == 400
    assert info.value.param == param


def test_cursor_helper_translates_and_keeps_chat_semantics() -> None:
    raw = {"model": "gpt-5", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
           "stream": True, "stream_options": {"include_usage": True}, "previous_response_id": "resp_x",
           "store": False, "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "high"},
           "tools": [WEATHER, {"type": "custom", "name": "edit"}]}
    assert looks_like_responses_body(raw)
    assert not looks_like_responses_body({"model": "m", "messages": [], "input": "x"})
    body = responses_body_to_chat(raw)
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["stream_options"] == {"include_usage": True}
    assert body["reasoning_effort"] == "high"
    assert [t["function"]["name"] for t in body["tools"]] == ["get_weather"]
    validate(body, ChatCompletionRequest)
    no_usage = responses_body_to_chat({"model": "m", "input": "x", "stream": True})
    assert "stream_options" not in no_usage


# --- captured client requests --------------------------------------------------------------------


def captured() -> Iterator[tuple[str, dict[str, Any]]]:
    data = json.loads(FIXTURES.read_text())
    for client, entries in data.items():
        for i, entry in enumerate(entries):
            if entry.get("path") == "/v1/responses":
                yield f"{client}[{i}]", entry["body"]


CAPTURED = list(captured())


def test_fixtures_have_codex_and_sdk_responses_requests() -> None:
    names = [name for name, _ in CAPTURED]
    assert sum(name.startswith("codex") for name in names) == 2
    assert sum(name.startswith("python_sdks") for name in names) == 3


@pytest.mark.parametrize(("name", "raw"), CAPTURED, ids=[name for name, _ in CAPTURED])
def test_every_captured_responses_request_translates(name: str, raw: dict[str, Any]) -> None:
    translation = translate_request(copy.deepcopy(raw))
    body = translation.body
    validate(body, ChatCompletionRequest)
    assert body["model"] == raw["model"]
    assert body.get("stream", False) is bool(raw.get("stream"))
    chat_tools = [t["function"]["name"] for t in body.get("tools", [])]
    for tool in raw.get("tools", []):
        if tool["type"] == "function":
            assert tool["name"] in chat_tools
        elif tool["type"] == "namespace":
            assert all(flat_tool_name(tool["name"], inner["name"]) in chat_tools for inner in tool["tools"])
        else:
            assert f"tools[{raw['tools'].index(tool)}]:{tool['type']}" in translation.dropped
    roles = {m["role"] for m in body["messages"]}
    assert "developer" not in roles


def test_codex_turns_in_detail() -> None:
    codex = [raw for name, raw in CAPTURED if name.startswith("codex")]
    first, second = (translate_request(copy.deepcopy(raw)) for raw in codex)
    names = [t["function"]["name"] for t in first.body["tools"]]
    assert "multi_agent_v1__spawn_agent" in names and "exec_command" in names
    assert first.dropped == ["tools[8]:web_search"]
    assert [m["role"] for m in first.body["messages"]] == ["system", "system", "user", "user"]
    assert first.body["parallel_tool_calls"] is True and first.body["tool_choice"] == "auto"
    assert first.body["prompt_cache_key"] == codex[0]["prompt_cache_key"]
    call, output = second.body["messages"][-2:]
    assert call == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "exec_command", "arguments": '{"cmd": "echo hi"}'}}]}
    assert output["role"] == "tool" and output["tool_call_id"] == "call_1" and "hi" in output["content"]


# --- Chat answers, as bodies and as chunk streams ------------------------------------------------


@dataclass
class Answer:
    text: str = ""
    reasoning: str = ""
    refusal: str | None = None
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, chat name, arguments)
    finish: str = "stop"
    usage: dict[str, Any] | None = field(default_factory=lambda: usage(10, 5))
    cuts: dict[str, list[int]] = field(default_factory=dict)  # where streamed strings are split


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def chat_body(answer: Answer) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None, "refusal": answer.refusal}
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    if answer.calls:
        message["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                                 for cid, name, args in answer.calls]
    return msgspec.json.encode({"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
                                "model": "gpt-up", "usage": answer.usage,
                                "choices": [{"index": 0, "message": message, "finish_reason": answer.finish}]})


def pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c for c in cuts if 0 < c < len(text))})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def chat_chunks(answer: Answer) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + msgspec.json.encode({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-up",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"reasoning_content": p}) for p in pieces(answer.reasoning, answer.cuts.get("reasoning", []))]
    out += [chunk({"content": p}) for p in pieces(answer.text, answer.cuts.get("text", []))]
    out += [chunk({"refusal": p}) for p in pieces(answer.refusal or "", answer.cuts.get("refusal", []))]
    for i, (cid, name, args) in enumerate(answer.calls):
        out.append(chunk({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]}))
        out += [chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]})
                for p in pieces(args, answer.cuts.get(f"call{i}", []))]
    out.append(chunk({}, answer.finish))
    if answer.usage is not None:
        out.append(b"data: " + msgspec.json.encode({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                                    "created": 1700000000, "model": "gpt-up", "choices": [],
                                                    "usage": answer.usage}) + b"\n\n")
    return [*out, b"data: [DONE]\n\n"]


async def aiter_of(chunks: list[bytes], fail: GatewayError | None = None) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c
    if fail is not None:
        raise fail


def parse_events(raw: list[bytes]) -> list[dict[str, Any]]:
    events = []
    for block in raw:
        lines = block.decode().strip("\n").split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
        event = json.loads(lines[1][len("data: "):])
        assert event["type"] == lines[0][len("event: "):]
        events.append(event)
    return events


async def stream_events(answer: Answer, raw: dict[str, Any] | None = None,
                        ingress: ResponsesIngress | None = None) -> list[dict[str, Any]]:
    ingress = ingress or ResponsesIngress(new_id=counter_ids())
    plan = ingress.plan(raw or {"model": "m", "input": "x", "stream": True}, {})
    out = [event async for event in ingress.render_stream(aiter_of(chat_chunks(answer)), plan)]
    return parse_events(out)


def render(answer: Answer, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    ingress = ResponsesIngress(new_id=counter_ids())
    plan = ingress.plan(raw or {"model": "m", "input": "x", "stream": True}, {})
    result: dict[str, Any] = json.loads(ingress.render(chat_body(answer), plan))
    return result


# --- render (non-streamed) -----------------------------------------------------------------------


def test_render_text_golden() -> None:
    raw = {"model": "m", "input": "x", "instructions": "sys", "tools": [WEATHER], "max_output_tokens": 50,
           "temperature": 0.5, "metadata": {"k": "v"}}
    response = render(Answer(text="Hello!", usage=usage(12, 3, cached=4, reasoning=1)), raw)
    assert response == {
        "id": "resp_0", "object": "response", "created_at": 1700000000, "status": "completed", "model": "gpt-up",
        "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]}],
        "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                  "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 15},
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [WEATHER], "error": None,
        "incomplete_details": None, "instructions": "sys", "max_output_tokens": 50, "previous_response_id": None,
        "reasoning": None, "store": False, "temperature": 0.5, "text": {"format": {"type": "text"}}, "top_p": None,
        "truncation": "disabled", "user": None, "metadata": {"k": "v"},
    }
    openai.types.responses.Response.model_validate(response)


def test_render_tool_calls_split_namespaces_back() -> None:
    raw = {"model": "m", "input": "x", "tools": [WEATHER, NAMESPACE]}
    response = render(Answer(text="Checking.", calls=[("call_a", "get_weather", '{"city":"Oslo"}'),
                                                      ("call_b", "multi_agent_v1__wait_agent", "{}")],
                             finish="tool_calls"), raw)
    assert response["status"] == "completed"
    message, weather, wait = response["output"]
    assert message["content"][0]["text"] == "Checking."
    assert weather == {"type": "function_call", "id": "fc_2", "call_id": "call_a", "name": "get_weather",
                       "arguments": '{"city":"Oslo"}', "status": "completed"}
    assert wait == {"type": "function_call", "id": "fc_3", "call_id": "call_b", "name": "wait_agent",
                    "namespace": "multi_agent_v1", "arguments": "{}", "status": "completed"}


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_render_incomplete(finish: str, reason: str) -> None:
    response = render(Answer(text="cut sho", finish=finish))
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": reason}
    assert response["output"][0]["status"] == "incomplete"


def test_render_reasoning_refusal_empty_and_no_usage() -> None:
    response = render(Answer(reasoning="thinking", refusal="I can't.", usage=None))
    reasoning, message = response["output"]
    assert reasoning == {"type": "reasoning", "id": "rs_1", "status": "completed", "summary": [],
                         "content": [{"type": "reasoning_text", "text": "thinking"}]}
    assert message["content"] == [{"type": "refusal", "refusal": "I can't."}]
    assert response["usage"] is None
    empty = render(Answer())
    assert empty["output"][0]["content"] == [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]


def test_render_rejects_unreadable_and_error_bodies() -> None:
    plan = plan_of({"model": "m", "input": "x"})
    with pytest.raises(UpstreamError):
        ResponsesIngress().render(b"not json", plan)
    with pytest.raises(UpstreamError, match="overloaded"):
        ResponsesIngress().render(b'{"error": {"message": "overloaded"}}', plan)


# --- render_stream -------------------------------------------------------------------------------


async def test_stream_text_exact_event_order() -> None:
    events = await stream_events(Answer(text="Hello world", cuts={"text": [5]}, usage=usage(7, 2, cached=3)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hello", " world"]
    created, completed = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert completed["id"] == created["id"] == events[1]["response"]["id"] == "resp_0"
    assert completed["status"] == "completed"
    assert completed["usage"] == {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 3,
                                                                              "cache_write_tokens": 0},
                                  "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                                  "total_tokens": 9}
    assert completed["output"][0]["content"][0]["text"] == "Hello world"


async def test_stream_tool_calls_exact_event_order() -> None:
    raw = {"model": "m", "input": "x", "stream": True, "tools": [WEATHER, NAMESPACE]}
    answer = Answer(text="Ok.", calls=[("call_a", "get_weather", '{"city":"Rome"}'),
                                       ("call_b", "multi_agent_v1__spawn_agent", "{}")],
                    cuts={"call0": [3, 9]}, finish="tool_calls")
    events = await stream_events(answer, raw)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert added[1] == {"type": "function_call", "id": "fc_2", "call_id": "call_a", "name": "get_weather",
                        "arguments": "", "status": "in_progress"}
    assert added[2]["name"] == "spawn_agent" and added[2]["namespace"] == "multi_agent_v1"
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [d["arguments"] for d in done] == ['{"city":"Rome"}', "{}"]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    assert events[-1]["response"]["output"][1]["status"] == "completed"


async def test_stream_length_ends_incomplete() -> None:
    events = await stream_events(Answer(text="trunc", finish="length"))
    last = events[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["usage"]["total_tokens"] == 15
    assert not any(e["type"] == "response.completed" for e in events)


async def test_stream_empty_answer_is_one_empty_message() -> None:
    events = await stream_events(Answer())
    assert [e["type"] for e in events][2:] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]


async def test_stream_end_is_only_a_comment_and_there_is_no_done() -> None:
    ingress = ResponsesIngress()
    plan = ingress.plan({"model": "m", "input": "x", "stream": True}, {})
    out = [e async for e in ingress.render_stream(aiter_of(chat_chunks(Answer(text="hi"))), plan)]
    assert not any(b"[DONE]" in e for e in out)
    assert ingress.stream_end("0.000123") == b": alephant-cost-usd 0.000123\n\n"


def rate_limited() -> GatewayError:
    return RateLimited("Provider 'openai' returned 429: slow down", code="upstream_rate_limited",
                       headers={"Retry-After": "12"})


@pytest.mark.parametrize(("err", "code", "message_part"), [
    (rate_limited(), "rate_limit_exceeded", "try again in 12s"),
    (UpstreamError("Provider 'x' stream was interrupted."), "server_error", "interrupted"),
    (UpstreamError("This model's maximum context length is 8192 tokens", status=502), "context_length_exceeded",
     "maximum context"),
    (RateLimited("Budget exhausted.", code="budget_exceeded"), "insufficient_quota", "Budget"),
    (PermissionDenied("Denied."), "policy_denied", "Denied"),
])
async def test_mid_stream_error_ends_with_response_failed(err: GatewayError, code: str, message_part: str) -> None:
    ingress = ResponsesIngress(new_id=counter_ids())
    plan = ingress.plan({"model": "m", "input": "x", "stream": True}, {})
    chunks = chat_chunks(Answer(text="partial answer", cuts={"text": [7]}))[:3]  # role + two text deltas
    out: list[bytes] = []
    with pytest.raises(GatewayError) as info:
        async for event in ingress.render_stream(aiter_of(chunks, fail=err), plan):
            out.append(event)
    assert info.value is err
    events = parse_events([*out, ingress.stream_error(err)])
    failed = events[-1]
    assert failed["type"] == "response.failed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert failed["response"]["id"] == events[0]["response"]["id"]
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == code
    assert message_part in failed["response"]["error"]["message"]
    assert failed["response"]["output"][0]["status"] == "incomplete"
    assert failed["response"]["output"][0]["content"][0]["text"] == "partial answer"


async def test_one_shared_ingress_keeps_interleaved_failures_apart() -> None:
    ingress = ResponsesIngress()
    plan = ingress.plan({"model": "m", "input": "x", "stream": True}, {})
    first_err, second_err = UpstreamError("first broke"), UpstreamError("second broke")
    first = ingress.render_stream(aiter_of(chat_chunks(Answer(text="one"))[:2], fail=first_err), plan)
    second = ingress.render_stream(aiter_of(chat_chunks(Answer(text="two"))[:2], fail=second_err), plan)
    head_first, head_second = await anext(first), await anext(second)  # both streams open at once
    rest_first = [e async for e in _until_error(first)]
    rest_second = [e async for e in _until_error(second)]
    events_first = parse_events([head_first, *rest_first, ingress.stream_error(first_err)])
    events_second = parse_events([head_second, *rest_second, ingress.stream_error(second_err)])
    for events in (events_first, events_second):
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["id"] == events[0]["response"]["id"]
    assert events_first[0]["response"]["id"] != events_second[0]["response"]["id"]
    assert "first" in events_first[-1]["response"]["error"]["message"]
    assert "second" in events_second[-1]["response"]["error"]["message"]


async def _until_error(gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for event in gen:
            yield event
    except GatewayError:
        return


def test_stream_error_without_a_rendered_stream_is_a_fresh_failed_event() -> None:
    event = parse_events([ResponsesIngress(new_id=counter_ids()).stream_error(UpstreamError("cut"))])[0]
    assert event["type"] == "response.failed" and event["sequence_number"] == 0
    assert event["response"]["status"] == "failed" and event["response"]["output"] == []
    assert event["response"]["error"] == {"code": "server_error", "message": "cut", "type": "upstream_error",
                                          "param": None}


async def test_error_payload_in_the_chat_stream_fails_the_stream() -> None:
    ingress = ResponsesIngress()
    plan = ingress.plan({"model": "m", "input": "x", "stream": True}, {})
    chunks = [*chat_chunks(Answer(text="a"))[:2], b'data: {"error": {"message": "upstream exploded"}}\n\n']
    with pytest.raises(UpstreamError, match="upstream exploded"):
        async for _ in ingress.render_stream(aiter_of(chunks), plan):
            pass


# --- property: the streamed Response equals the non-streamed one -------------------------------


def assemble(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items rebuilt from added events and deltas only; every `output_item.done` must equal
    the rebuilt item (with its final status)."""
    items: dict[int, dict[str, Any]] = {}
    for e in events:
        kind = e["type"]
        if kind == "response.output_item.added":
            items[e["output_index"]] = copy.deepcopy(e["item"])
        elif kind == "response.content_part.added":
            items[e["output_index"]]["content"].append(copy.deepcopy(e["part"]))
        elif kind == "response.output_text.delta":
            items[e["output_index"]]["content"][e["content_index"]]["text"] += e["delta"]
        elif kind == "response.refusal.delta":
            items[e["output_index"]]["content"][e["content_index"]]["refusal"] += e["delta"]
        elif kind == "response.reasoning_text.delta":
            content = items[e["output_index"]]["content"]
            if not content:
                content.append({"type": "reasoning_text", "text": ""})
            content[e["content_index"]]["text"] += e["delta"]
        elif kind == "response.function_call_arguments.delta":
            items[e["output_index"]]["arguments"] += e["delta"]
        elif kind == "response.output_item.done":
            items[e["output_index"]]["status"] = e["item"]["status"]
            assert items[e["output_index"]] == e["item"]
    return [items[i] for i in sorted(items)]


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    text = draw(st.text(max_size=30))
    reasoning = draw(st.text(max_size=15))
    refusal = draw(st.none() | st.text(min_size=1, max_size=10))
    names = st.sampled_from(["get_weather", "multi_agent_v1__spawn_agent", "multi_agent_v1__wait_agent", "exec"])
    calls = [(f"call_{i}", draw(names), draw(st.text(max_size=25))) for i in range(draw(st.integers(0, 3)))]
    strings = {"text": text, "reasoning": reasoning, "refusal": refusal or ""}
    strings |= {f"call{i}": args for i, (_, _, args) in enumerate(calls)}
    cuts = {key: draw(st.lists(st.integers(0, max(len(value), 1)), max_size=4)) for key, value in strings.items()}
    finish = draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
    counts = draw(st.none() | st.tuples(st.integers(0, 10**6), st.integers(0, 10**5)))
    return Answer(text=text, reasoning=reasoning, refusal=refusal, calls=calls, finish=finish,
                  usage=usage(*counts, cached=counts[0] // 2, reasoning=counts[1] // 3) if counts else None, cuts=cuts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=answers())
async def test_streamed_response_equals_rendered_response(answer: Answer) -> None:
    raw = {"model": "m", "input": "x", "stream": True, "tools": [WEATHER, NAMESPACE]}
    events = await stream_events(answer, raw)
    expected = render(answer, raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert assemble(events) == expected["output"]
    terminal = events[-1]
    assert terminal["type"] == f"response.{expected['status']}"
    assert terminal["response"] == expected


# --- the official SDK reads what we render --------------------------------------------------------


SCRIPTS = {
    "m-text": Answer(text="Hello from the gateway", cuts={"text": [5, 10]}, usage=usage(9, 4, cached=2)),
    "m-tool": Answer(calls=[("call_w", "get_weather", '{"city":"Paris"}')], cuts={"call0": [4]}, finish="tool_calls"),
    "m-long": Answer(text="cut", finish="length"),
}


@pytest.fixture
async def sdk_server() -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.json()
        ingress = ResponsesIngress()
        plan = ingress.plan(raw, request.headers)
        answer = SCRIPTS[plan.model.removesuffix("-fail")]
        if not plan.stream:
            return web.Response(body=ingress.render(chat_body(answer), plan), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = chat_chunks(answer)
        failing = plan.model.endswith("-fail")
        try:
            async for event in ingress.render_stream(aiter_of(chunks[:3] if failing else chunks,
                                                              rate_limited() if failing else None), plan):
                await resp.write(event)
            await resp.write(ingress.stream_end("0.000001"))
        except GatewayError as err:
            await resp.write(ingress.stream_error(err))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/responses", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@pytest.fixture
async def client(sdk_server: str) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=sdk_server, api_key="x", max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


async def test_sdk_parses_non_streamed_response(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="m-text", input="hi")
    assert response.output_text == "Hello from the gateway"
    assert response.status == "completed"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (9, 4, 13)
    assert response.usage.input_tokens_details.cached_tokens == 2


async def test_sdk_create_stream_yields_typed_events(client: openai.AsyncOpenAI) -> None:
    stream = await client.responses.create(model="m-text", input="hi", stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello from the gateway"
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.id == events[0].response.id
    assert completed.response.output_text == "Hello from the gateway"


async def test_sdk_stream_helper_assembles_text_and_function_calls(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model="m-text", input="hi") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello from the gateway"

    tools: list[Any] = [WEATHER]
    async with client.responses.stream(model="m-tool", input="weather?", tools=tools) as stream:
        arg_snapshots = [e.snapshot async for e in stream if e.type == "response.function_call_arguments.delta"]
        final = await stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call"
    assert (call.name, call.call_id, call.arguments) == ("get_weather", "call_w", '{"city":"Paris"}')
    assert arg_snapshots[-1] == '{"city":"Paris"}'


async def test_sdk_sees_incomplete_and_failed_streams(client: openai.AsyncOpenAI) -> None:
    stream = await client.responses.create(model="m-long", input="hi", stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details is not None
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"

    async with client.responses.stream(model="m-text-fail", input="hi") as failing:
        kinds = [e.type async for e in failing]
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await failing.get_final_response()
    assert kinds[-1] == "response.failed"
    failed = await client.responses.create(model="m-text-fail", input="hi", stream=True)
    last = [event async for event in failed][-1]
    assert last.type == "response.failed"
    assert last.response.error is not None
    assert last.response.error.code == "rate_limit_exceeded"
    assert "try again in 12s" in last.response.error.message
