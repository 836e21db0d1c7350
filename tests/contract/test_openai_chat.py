"""openai SDK, Chat Completions, against every provider type the gateway adapts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.contract.conftest import KINDS, Contract, Upstream, gemini_requires_signatures
from tests.contract.fakes import TOOL_NAME, WEATHER_ARGS, tool_answer

pytestmark = pytest.mark.parametrize("kind", KINDS)

QUESTION = [{"role": "user", "content": "What is the weather like in Paris?"}]
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                           "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TOOL_RESULT = "sunny and 21 degrees"


def _check_usage(usage: Any) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_chat_plain(contract: Contract, kind: str) -> None:
    up = contract[kind]
    before = up.seen()
    async with contract.openai() as client:
        raw = await client.chat.completions.with_raw_response.create(model=up.ref, messages=QUESTION)  # type: ignore[arg-type]
    completion = raw.parse()
    assert raw.headers["alephant-provider"] == up.name
    assert completion.object == "chat.completion"
    assert completion.id
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == up.text
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    _check_usage(completion.usage)
    assert up.seen() == before + 1  # exactly one upstream call, no hidden retries


async def test_chat_stream_include_usage(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.openai() as client:
        stream = await client.chat.completions.create(
            model=up.ref, messages=QUESTION, stream=True, stream_options={"include_usage": True})  # type: ignore[arg-type]
        chunks = [chunk async for chunk in stream]
    assert len(chunks) >= 3
    last = chunks[-1]
    assert last.choices == [], "the usage chunk must have an empty choices list"
    _check_usage(last.usage)
    assert all(c.usage is None for c in chunks[:-1]), "only the final chunk carries usage"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1, "every chunk of one stream shares its id"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == up.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[0].choices[0].delta.role == "assistant"


async def test_chat_stream_without_usage_option_has_no_usage_chunk(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.openai() as client:
        stream = await client.chat.completions.create(model=up.ref, messages=QUESTION, stream=True)  # type: ignore[arg-type]
        chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks), "no usage-only chunk when the client did not ask for it"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == up.text


async def _second_turn(client: Any, up: Upstream, call: Any) -> Any:
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT},
    ]
    return await client.chat.completions.create(model=up.ref, messages=messages, tools=[WEATHER_TOOL])


async def test_chat_tools_round_trip(contract: Contract, kind: str) -> None:
    up = contract[kind]
    with gemini_requires_signatures(up):
        async with contract.openai() as client:
            first = await client.chat.completions.create(model=up.ref, messages=QUESTION, tools=[WEATHER_TOOL])  # type: ignore[arg-type, list-item]
            choice = first.choices[0]
            assert choice.finish_reason == "tool_calls"
            calls = choice.message.tool_calls
            assert calls is not None and len(calls) == 1
            call = calls[0]
            assert call.type == "function"
            assert call.id, "tool calls need an id to answer them"
            assert call.function.name == TOOL_NAME
            assert json.loads(call.function.arguments) == WEATHER_ARGS
            _check_usage(first.usage)

            second = await _second_turn(client, up, call)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == tool_answer(TOOL_RESULT)
    assert not second.choices[0].message.tool_calls


async def test_chat_stream_helper_reassembles_tool_call(contract: Contract, kind: str) -> None:
    up = contract[kind]
    with gemini_requires_signatures(up):
        async with contract.openai() as client:
            async with client.chat.completions.stream(model=up.ref, messages=QUESTION, tools=[WEATHER_TOOL],  # type: ignore[arg-type, list-item]
                                                      stream_options={"include_usage": True}) as stream:
                done_events = [e async for e in stream if e.type == "tool_calls.function.arguments.done"]
                final = await stream.get_final_completion()
            choice = final.choices[0]
            assert choice.finish_reason == "tool_calls"
            calls = choice.message.tool_calls
            assert calls is not None and len(calls) == 1
            call = calls[0]
            assert call.id and call.function.name == TOOL_NAME
            assert json.loads(call.function.arguments) == WEATHER_ARGS
            assert [(e.name, e.arguments) for e in done_events] == [(TOOL_NAME, call.function.arguments)]
            _check_usage(final.usage)

            # The streamed call's id answers it in the next turn.
            second = await _second_turn(client, up, call)
    assert second.choices[0].message.content == tool_answer(TOOL_RESULT)
