"""An upstream that fails after the stream started: each SDK must see an error (not a clean end),
after the content that did arrive, and the journal must record a partial call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.contract.conftest import KINDS, Contract, Upstream
from tests.contract.test_cost_journal import journal_row

# The stock fakes' knob that breaks a stream after a few events, per provider type.
KNOBS: dict[str, tuple[str, Any]] = {
    "openai": ("truncate_after", 2),  # connection dropped after 2 content chunks
    "azure": ("truncate_after", 2),
    "groq": ("truncate_after", 2),
    "anthropic": ("stream_error_after", 4),  # `event: error` (overloaded) after the first text delta
    "gemini": ("error_after", 2),  # `data: {"error": {503 UNAVAILABLE}}`
    "bedrock": ("stream_exception_after", 3),  # a throttlingException frame
    "ollama": ("error_after", 2),  # an `{"error": ...}` NDJSON line
}
QUESTION: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture
def broken(request: pytest.FixtureRequest, contract: Contract) -> Iterator[Upstream]:
    up = contract[request.param]
    name, value = KNOBS[up.kind]
    setattr(up.fake, name, value)
    try:
        yield up
    finally:
        setattr(up.fake, name, None)


@pytest.mark.parametrize("broken", KINDS, indirect=True)
async def test_chat_stream_failure_raises_api_error(contract: Contract, broken: Upstream) -> None:
    up = broken
    text = ""
    async with contract.openai() as client:
        stream = await client.chat.completions.create(model=up.ref, messages=QUESTION, stream=True,
                                                      stream_options={"include_usage": True})
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                assert chunk.choices, "no usage chunk from a failed stream"
                assert chunk.choices[0].finish_reason is None, "no finish from a failed stream"
                text += chunk.choices[0].delta.content or ""
        request_id = stream.response.headers["alephant-request-id"]
    assert text and up.text.startswith(text) and text != up.text
    assert info.value.message
    row = await journal_row(contract, request_id)
    assert row["partial"] is True and row["status"] >= 400 and row["error_code"]


@pytest.mark.parametrize("broken", ["anthropic", "openai", "gemini", "bedrock", "ollama"], indirect=True)
async def test_messages_stream_failure_raises(contract: Contract, broken: Upstream) -> None:
    up = broken
    pieces: list[str] = []
    async with contract.anthropic() as client:
        with pytest.raises(anthropic.APIError) as info:
            async with client.messages.stream(model=up.ref, max_tokens=64, messages=QUESTION) as stream:
                async for text in stream.text_stream:
                    pieces.append(text)
    text = "".join(pieces)
    assert text and up.text.startswith(text) and text != up.text
    body = info.value.body
    assert isinstance(body, dict) and body.get("type") == "error" and body["error"]["type"]


@pytest.mark.parametrize("broken", KINDS, indirect=True)
async def test_responses_stream_failure_ends_with_response_failed(contract: Contract, broken: Upstream) -> None:
    up = broken
    native = up.kind == "openai"
    if native:  # the native path: break the Responses fake instead
        setattr(up.fake, KNOBS["openai"][0], None)
        up.fake.responses.truncate = True
    try:
        async with contract.openai() as client:
            stream = await client.responses.create(model=up.ref, input="hello", stream=True)
            events = [event async for event in stream]
    finally:
        if native:
            up.fake.responses.truncate = False
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.failed" and "response.completed" not in types
    assert any(t == "response.output_text.delta" for t in types), "the content that arrived was relayed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.code and failed.error.message
    assert failed.id == events[0].response.id, "the failure belongs to the response the client saw created"
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)), "sequence numbers keep increasing through the failure"


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_responses_stream_helper_sees_the_failure(contract: Contract, kind: str) -> None:
    """The SDK helper checks that every lifecycle event names the response it saw created."""
    up = contract[kind]
    fake_knob = (up.fake.responses, "truncate", True) if kind == "openai" else (up.fake, "stream_error_after", 4)
    setattr(*fake_knob)
    try:
        async with contract.openai() as client, client.responses.stream(model=up.ref, input="hello") as stream:
            events = [event async for event in stream]
            with pytest.raises(RuntimeError, match=r"response\.completed"):
                await stream.get_final_response()
    finally:
        setattr(fake_knob[0], fake_knob[1], False if kind == "openai" else None)
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None
