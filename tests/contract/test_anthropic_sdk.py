"""anthropic SDK (2.x) on /v1/messages: Anthropic's native path (relayed unchanged) and the
translated paths (OpenAI-compatible, Gemini, Bedrock, Ollama through Chat Completions)."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.contract.conftest import Contract, Upstream, gemini_requires_signatures
from tests.contract.fakes import TOOL_NAME, WEATHER_ARGS, tool_answer
from tests.fakes.anthropic_upstream import count_input_tokens

MESSAGES_KINDS = ("anthropic", "openai", "gemini", "bedrock", "ollama")
QUESTION: list[Any] = [{"role": "user", "content": "What is the weather like in Paris?"}]
WEATHER_TOOL: Any = {
    "name": TOOL_NAME, "description": "Weather forecast for a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"},
                                                      "days": {"type": "integer"}}, "required": ["city"]},
}
TOOL_RESULT = "foggy, 12 degrees"


def _check_usage(usage: Any) -> None:
    assert usage.input_tokens > 0 and usage.output_tokens > 0


def _text(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def _upstream_saw(up: Upstream, before: int) -> list[Any]:
    return list(up.fake.requests[before:])


@pytest.mark.parametrize("kind", MESSAGES_KINDS)
async def test_messages_create(contract: Contract, kind: str) -> None:
    up = contract[kind]
    before = up.seen()
    async with contract.anthropic() as client:  # SDK 2.x: the key goes as `Authorization: Bearer`
        message = await client.messages.create(model=up.ref, max_tokens=256, messages=QUESTION)
    assert message.type == "message" and message.role == "assistant"
    assert message.id
    assert _text(message) == up.text
    assert message.stop_reason == "end_turn"
    _check_usage(message.usage)
    sent = _upstream_saw(up, before)
    assert len(sent) == 1
    if kind == "anthropic":  # native: the client's body, the provider's key, the client's API version
        assert sent[0].body == {"model": up.model, "max_tokens": 256, "messages": QUESTION}
        assert sent[0].api_key_hint == up.api_key[-4:]
        assert sent[0].headers["anthropic-version"] == anthropic._constants.ANTHROPIC_API_VERSION


async def test_messages_auth_with_x_api_key_header(contract: Contract, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    up = contract["anthropic"]
    async with contract.anthropic(api_key=None, default_headers={"x-api-key": contract.key}) as client:
        message = await client.messages.create(model=up.ref, max_tokens=64, messages=QUESTION)
        assert _text(message) == up.text
        counted = await client.messages.count_tokens(model=up.ref, messages=QUESTION)
        assert counted.input_tokens > 0
    async with contract.anthropic(api_key=None, default_headers={"x-api-key": "sk-not-a-virtual-key"}) as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(model=up.ref, max_tokens=64, messages=QUESTION)


@pytest.mark.parametrize("kind", MESSAGES_KINDS)
async def test_messages_stream_final_message(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.anthropic() as client, \
            client.messages.stream(model=up.ref, max_tokens=256, messages=QUESTION) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) >= 2, "text arrives incrementally"
    assert "".join(pieces) == up.text == _text(final)
    assert final.stop_reason == "end_turn"
    _check_usage(final.usage)


@pytest.mark.parametrize("kind", MESSAGES_KINDS)
async def test_messages_tool_use_round_trip(contract: Contract, kind: str) -> None:
    up = contract[kind]
    with gemini_requires_signatures(up):
        async with contract.anthropic() as client:
            first = await client.messages.create(model=up.ref, max_tokens=256, messages=QUESTION, tools=[WEATHER_TOOL])
            assert first.stop_reason == "tool_use"
            uses = [b for b in first.content if b.type == "tool_use"]
            assert len(uses) == 1
            use = uses[0]
            assert use.id and use.name == TOOL_NAME and use.input == WEATHER_ARGS
            _check_usage(first.usage)

            second = await client.messages.create(model=up.ref, max_tokens=256, tools=[WEATHER_TOOL], messages=[
                *QUESTION,
                {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                   "input": use.input}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                              "content": TOOL_RESULT}]},
            ])
    assert second.stop_reason == "end_turn"
    assert _text(second) == tool_answer(TOOL_RESULT)


@pytest.mark.parametrize("kind", MESSAGES_KINDS)
async def test_messages_stream_tool_use(contract: Contract, kind: str) -> None:
    up = contract[kind]
    async with contract.anthropic() as client, \
            client.messages.stream(model=up.ref, max_tokens=256, messages=QUESTION, tools=[WEATHER_TOOL]) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].id and uses[0].name == TOOL_NAME
    assert uses[0].input == WEATHER_ARGS, "input_json_delta fragments reassemble into the tool input"
    assert any(e.type == "input_json" for e in events)
    _check_usage(final.usage)


@pytest.mark.parametrize("kind", MESSAGES_KINDS)
async def test_count_tokens(contract: Contract, kind: str) -> None:
    up = contract[kind]
    before = up.seen()
    async with contract.anthropic() as client:
        counted = await client.messages.count_tokens(model=up.ref, messages=QUESTION, tools=[WEATHER_TOOL],
                                                     system="Be brief.")
    assert isinstance(counted.input_tokens, int) and counted.input_tokens > 0
    sent = _upstream_saw(up, before)
    if kind == "anthropic":  # counted upstream, with the provider's model id
        assert [r.path for r in sent] == ["/v1/messages/count_tokens"]
        assert counted.input_tokens == count_input_tokens(sent[0].body)
        assert sent[0].body["model"] == up.model
    else:  # estimated by the gateway: free, no upstream call
        assert sent == []
