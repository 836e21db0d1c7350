"""openai SDK, Responses API: OpenAI's native passthrough (the Responses fake) and the translated
paths (every other provider type, through Chat Completions)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.contract.conftest import KINDS, Contract, Upstream, gemini_requires_signatures
from tests.contract.fakes import ANSWERS, TOOL_NAME, WEATHER_ARGS, tool_answer
from tests.fakes.responses_upstream import USAGE as NATIVE_USAGE

pytestmark = pytest.mark.parametrize("kind", KINDS)

WEATHER_TOOL: dict[str, Any] = {
    "type": "function", "name": TOOL_NAME, "description": "Weather forecast for a city.", "strict": False,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"},
                                                    "days": {"type": "integer"}}, "required": ["city"]},
}
QUESTION = "What is the weather like in Paris?"
TOOL_RESULT = "rain all week"


def _expected_text(up: Upstream) -> str:
    return ANSWERS["responses"] if up.kind == "openai" else up.text


def _check_usage(usage: Any, native: bool) -> None:
    assert usage is not None
    for name in ("input_tokens", "output_tokens", "total_tokens"):
        value = getattr(usage, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value > 0, name
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details is not None and usage.output_tokens_details is not None
    if native:  # relayed unchanged, details included
        assert usage.model_dump(exclude_none=True) == NATIVE_USAGE


def _check_sequence(events: list[Any]) -> None:
    assert events[0].type == "response.created"
    assert events[1].type == "response.in_progress"
    assert events[-1].type == "response.completed"
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), "sequence numbers increase"
    completed = events[-1].response
    assert completed.id and completed.id == events[0].response.id
    assert completed.status == "completed"


async def test_responses_create_stream_text(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.openai() as client:
        stream = await client.responses.create(model=up.ref, input=QUESTION, stream=True)
        events = [event async for event in stream]
    _check_sequence(events)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == _expected_text(up)
    completed = events[-1].response
    assert completed.output_text == _expected_text(up)
    _check_usage(completed.usage, native=up.kind == "openai")


async def test_responses_stream_helper_function_call_round_trip(contract: Contract, kind: str) -> None:
    up = contract[kind]
    with gemini_requires_signatures(up):
        async with contract.openai() as client:
            async with client.responses.stream(model=up.ref, input=QUESTION, tools=[WEATHER_TOOL]) as stream:  # type: ignore[list-item]
                events = [event async for event in stream]
                final = await stream.get_final_response()
            _check_sequence(events)
            calls = [item for item in final.output if item.type == "function_call"]
            assert len(calls) == 1
            call = calls[0]
            assert call.call_id and call.name == TOOL_NAME
            assert json.loads(call.arguments) == WEATHER_ARGS
            done = [e for e in events if e.type == "response.function_call_arguments.done"]
            assert [json.loads(e.arguments) for e in done] == [WEATHER_ARGS]
            added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
            assert len(added) == 1 and added[0].item.call_id == call.call_id
            _check_usage(events[-1].response.usage, native=up.kind == "openai")

            # Second turn: the call and its output go back as input items.
            stream2 = await client.responses.create(model=up.ref, stream=True, tools=[WEATHER_TOOL], input=[  # type: ignore[list-item]
                {"role": "user", "content": QUESTION},
                {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                {"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT},
            ])
            events2 = [event async for event in stream2]
    _check_sequence(events2)
    assert events2[-1].response.output_text == tool_answer(TOOL_RESULT)


async def test_responses_create_non_streaming(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.openai() as client:
        response = await client.responses.create(model=up.ref, input=QUESTION)
    assert response.object == "response"
    assert response.id and response.status == "completed"
    assert response.output_text == _expected_text(up)
    _check_usage(response.usage, native=up.kind == "openai")
