"""Token usage with cache and reasoning counts, normalized per providers.md §1.0 on every surface:
Chat (`prompt_tokens` includes cached and cache-write tokens, `completion_tokens` includes
reasoning), Responses (same, as input/output tokens), Anthropic Messages (`input_tokens` excludes
the cache), and the journal."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.contract.conftest import Contract
from tests.contract.test_cost_journal import check_cost, journal_row


@dataclass(frozen=True)
class Expected:
    prompt: int  # OpenAI semantics: includes cache reads and writes
    completion: int  # includes reasoning
    cache_read: int
    cache_write: int
    reasoning: int


CASES: dict[str, tuple[dict[str, int], Expected]] = {
    # FakeAnswer: input 25 (exclusive of the cache), output 12.
    "anthropic": ({"cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
                  Expected(prompt=145, completion=12, cache_read=100, cache_write=20, reasoning=0)),
    # Script: inputTokens 11 (exclusive of the cache), outputTokens 7.
    "bedrock": ({"cache_read": 100, "cache_write": 20},
                Expected(prompt=131, completion=7, cache_read=100, cache_write=20, reasoning=0)),
    # promptTokenCount includes cached tokens; candidatesTokenCount excludes thoughts.
    "gemini": ({"prompt_tokens": 140, "candidates_tokens": 6, "thoughts_tokens": 4, "cached_tokens": 100},
               Expected(prompt=140, completion=10, cache_read=100, cache_write=0, reasoning=4)),
}
QUESTION: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, contract: Contract) -> Iterator[tuple[str, Expected]]:
    kind: str = request.param
    knobs, expected = CASES[kind]
    fake = contract[kind].fake
    fake.usage_knobs = knobs
    try:
        yield kind, expected
    finally:
        fake.usage_knobs = {}


def _check_chat_usage(usage: Any, e: Expected) -> None:
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        e.prompt, e.completion, e.prompt + e.completion)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == e.cache_read
    # Bedrock reports no reasoning tokens and its adapter omits the details object (pinned by its unit test).
    details = usage.completion_tokens_details
    assert (details.reasoning_tokens if details is not None else 0) == e.reasoning


async def test_chat_usage(contract: Contract, case: tuple[str, Expected]) -> None:
    kind, e = case
    up = contract[kind]
    async with contract.openai() as client:
        raw = await client.chat.completions.with_raw_response.create(model=up.ref, messages=QUESTION)
        stream = await client.chat.completions.create(model=up.ref, messages=QUESTION, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    _check_chat_usage(raw.parse().usage, e)
    _check_chat_usage(chunks[-1].usage, e)
    row = await journal_row(contract, raw.headers["alephant-request-id"])
    assert row["usage"] == {"input_tokens": e.prompt, "output_tokens": e.completion,
                            "cache_read_tokens": e.cache_read, "cache_write_tokens": e.cache_write,
                            "reasoning_tokens": e.reasoning}
    check_cost(kind, up.model, row)


async def test_responses_usage(contract: Contract, case: tuple[str, Expected]) -> None:
    kind, e = case
    up = contract[kind]
    async with contract.openai() as client:
        stream = await client.responses.create(model=up.ref, input="hello", stream=True)
        events = [event async for event in stream]
    usage = events[-1].response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        e.prompt, e.completion, e.prompt + e.completion)
    assert usage.input_tokens_details.cached_tokens == e.cache_read
    assert usage.output_tokens_details.reasoning_tokens == e.reasoning


async def test_messages_usage(contract: Contract, case: tuple[str, Expected]) -> None:
    kind, e = case
    up = contract[kind]
    async with contract.anthropic() as client:
        message = await client.messages.create(model=up.ref, max_tokens=64, messages=QUESTION)
        async with client.messages.stream(model=up.ref, max_tokens=64, messages=QUESTION) as stream:
            streamed = await stream.get_final_message()
    for usage in (message.usage, streamed.usage):
        assert usage.input_tokens == e.prompt - e.cache_read - e.cache_write, "Anthropic's input excludes the cache"
        assert usage.cache_read_input_tokens == e.cache_read
        assert usage.cache_creation_input_tokens == e.cache_write
        assert usage.output_tokens == e.completion
