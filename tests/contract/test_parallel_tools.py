"""Two tool calls in one answer: every SDK stream helper must reassemble both, each with its own
id and arguments, whatever the upstream (OpenAI interleaves by `index`, Anthropic by block,
Gemini and Ollama send whole calls, Bedrock fragments per content block)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.contract.conftest import KINDS, Contract, gemini_requires_signatures
from tests.contract.fakes import TIME_TOOL, TOOL_ARGS, TOOL_NAME, tool_answer
from tests.contract.test_anthropic_sdk import MESSAGES_KINDS

PARAMS: dict[str, Any] = {"type": "object", "properties": {"city": {"type": "string"}}}
CHAT_TOOLS: Any = [{"type": "function", "function": {"name": name, "parameters": PARAMS}} for name in TOOL_ARGS]
RESPONSES_TOOLS: Any = [{"type": "function", "name": name, "parameters": PARAMS, "strict": False}
                        for name in TOOL_ARGS]
MESSAGES_TOOLS: Any = [{"name": name, "input_schema": PARAMS} for name in TOOL_ARGS]
QUESTION: Any = [{"role": "user", "content": "Weather and time in Paris?"}]


@pytest.mark.parametrize("kind", KINDS)
async def test_chat_two_tool_calls(contract: Contract, kind: str) -> None:
    up = contract[kind]
    with gemini_requires_signatures(up):
        async with contract.openai() as client:
            async with client.chat.completions.stream(model=up.ref, messages=QUESTION, tools=CHAT_TOOLS) as stream:
                final = await stream.get_final_completion()
            calls = final.choices[0].message.tool_calls or []
            assert [c.function.name for c in calls] == [TOOL_NAME, TIME_TOOL]
            assert [json.loads(c.function.arguments) for c in calls] == list(TOOL_ARGS.values())
            assert len({c.id for c in calls}) == 2 and all(c.id for c in calls)
            assert final.choices[0].finish_reason == "tool_calls"

            answered = await client.chat.completions.create(model=up.ref, tools=CHAT_TOOLS, messages=[
                *QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function.name, "arguments": c.function.arguments}} for c in calls]},
                {"role": "tool", "tool_call_id": calls[0].id, "content": "mild"},
                {"role": "tool", "tool_call_id": calls[1].id, "content": "noon"},
            ])
    assert answered.choices[0].message.content == tool_answer("mild noon")


@pytest.mark.parametrize("kind", KINDS)
async def test_responses_two_function_calls(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.openai() as client, \
            client.responses.stream(model=up.ref, input="Weather and time in Paris?", tools=RESPONSES_TOOLS) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [c.name for c in calls] == [TOOL_NAME, TIME_TOOL]
    assert [json.loads(c.arguments) for c in calls] == list(TOOL_ARGS.values())
    assert len({c.call_id for c in calls}) == 2
    done = {e.output_index: json.loads(e.arguments) for e in events
            if e.type == "response.function_call_arguments.done"}
    assert sorted(done.values(), key=str) == sorted(TOOL_ARGS.values(), key=str)
    indexes = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert len(indexes) == len(set(indexes)) == 2, "each call is its own output item"


@pytest.mark.parametrize("kind", MESSAGES_KINDS)
async def test_messages_two_tool_uses(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.anthropic() as client, \
            client.messages.stream(model=up.ref, max_tokens=256, messages=QUESTION, tools=MESSAGES_TOOLS) as stream:
        final = await stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == list(TOOL_ARGS.items())
    assert len({u.id for u in uses}) == 2
    assert final.stop_reason == "tool_use"
