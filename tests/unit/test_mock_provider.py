"""dataplane/providers/mock.py: the offline, deterministic demo provider."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.providers.base import SSE_DONE, CallStats, UpstreamCall
from dataplane.providers.mock import MAX_ANSWER_CHARS, MockProvider, answer_for, enabled
from schemas.entities import Provider
from schemas.errors import InvalidRequest, PermissionDenied
from schemas.events import Usage
from schemas.openai import ChatCompletion, ChatCompletionChunk

PROVIDER = Provider(id="prov_1", workspace_id="ws_1", name="mock", type="mock", options={"enabled": "true"})
MOCK = MockProvider()


def upstream(model: str, messages: list[dict[str, Any]], *, wants_usage: bool = False,
             **body: Any) -> UpstreamCall:
    return UpstreamCall(
        provider=PROVIDER,
        model=model,
        body={"model": model, "messages": messages, **body},
        api_key=None,
        session=None,  # type: ignore[arg-type]  # the mock answers in-process and never uses it
        timeout_s=5.0,
        client_wants_usage=wants_usage,
    )


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


async def complete(call: UpstreamCall) -> tuple[ChatCompletion, Usage | None]:
    resp = await MOCK.complete(call)
    assert resp.content_type == "application/json"
    return msgspec.json.decode(resp.body, type=ChatCompletion), resp.usage


async def stream(call: UpstreamCall) -> tuple[list[bytes], CallStats]:
    stats = CallStats()
    events = [event async for event in MOCK.stream(call, stats)]
    return events, stats


def chunks_of(events: list[bytes]) -> list[ChatCompletionChunk]:
    assert events[-1] == SSE_DONE
    out = []
    for event in events[:-1]:
        assert event.startswith(b"data: ")
        assert event.endswith(b"\n\n")
        out.append(msgspec.json.decode(event[len(b"data: "):-2], type=ChatCompletionChunk))
    return out


def content_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- answers -----------------------------------------------------------------------------------


def test_answer_for_echo_and_fixed() -> None:
    assert answer_for("echo", user("hello there")) == "hello there"
    assert answer_for("echo", [{"role": "system", "content": "x"}]) == "(nothing to echo)"
    assert answer_for("echo", [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}]) == "a b"
    assert answer_for("echo", [*user("first"), {"role": "assistant", "content": "mid"},
                               {"role": "user", "content": "last"}]) == "last"
    assert answer_for("fixed", user("anything")) == "This is the mock provider answering as 'fixed'."


async def test_complete_echoes_with_usage() -> None:
    body, usage = await complete(upstream("echo", user("hello mock world")))
    assert body.object == "chat.completion"
    assert body.model == "echo"
    assert body.choices[0].message.content == "hello mock world"
    assert body.choices[0].finish_reason == "stop"
    assert body.usage is not None
    assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
    assert usage == Usage(input_tokens=body.usage.prompt_tokens, output_tokens=body.usage.completion_tokens)
    assert usage.input_tokens > 0
    assert usage.output_tokens > 0


async def test_complete_is_deterministic() -> None:
    a, ua = await complete(upstream("fixed", user("same question")))
    b, ub = await complete(upstream("fixed", user("same question")))
    c, _ = await complete(upstream("fixed", user("other question")))
    assert a.id == b.id
    assert a.id.startswith("chatcmpl-mock")
    assert a.choices == b.choices
    assert ua == ub
    assert c.id != a.id


async def test_max_tokens_truncates_with_finish_reason_length() -> None:
    full, full_usage = await complete(upstream("fixed", user("q")))
    cut, cut_usage = await complete(upstream("fixed", user("q"), max_tokens=3))
    assert cut.choices[0].finish_reason == "length"
    assert full.choices[0].message.content is not None
    assert cut.choices[0].message.content is not None
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)
    assert len(cut.choices[0].message.content) < len(full.choices[0].message.content)
    assert cut_usage is not None
    assert full_usage is not None
    assert 0 < cut_usage.output_tokens <= 3 < full_usage.output_tokens


async def test_max_completion_tokens_wins_over_max_tokens() -> None:
    cut, usage = await complete(upstream("fixed", user("q"), max_tokens=1000, max_completion_tokens=2))
    assert cut.choices[0].finish_reason == "length"
    assert usage is not None
    assert usage.output_tokens <= 2


async def test_generous_limit_does_not_truncate() -> None:
    body, _ = await complete(upstream("echo", user("short"), max_tokens=100))
    assert body.choices[0].finish_reason == "stop"
    assert body.choices[0].message.content == "short"


# --- streaming ---------------------------------------------------------------------------------


async def test_stream_shape_without_usage() -> None:
    events, stats = await stream(upstream("echo", user("one two three")))
    chunks = chunks_of(events)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert content_of(chunks) == "one two three"
    assert stats.usage is not None
    assert stats.usage.output_tokens > 0


async def test_stream_usage_chunk_only_when_asked() -> None:
    events, stats = await stream(upstream("echo", user("one two three"), wants_usage=True))
    chunks = chunks_of(events)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert stats.usage == Usage(input_tokens=last.usage.prompt_tokens, output_tokens=last.usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_stream_with_length_finish() -> None:
    events, _ = await stream(upstream("fixed", user("q"), max_tokens=3))
    assert chunks_of(events)[-1].choices[0].finish_reason == "length"


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=120)


@settings(max_examples=60)
@given(
    model=st.sampled_from(["echo", "fixed", "gpt-x"]),
    text=texts,
    limit=st.none() | st.integers(min_value=1, max_value=40),
    wants_usage=st.booleans(),
)
async def test_stream_reassembles_to_the_non_streamed_answer(
    model: str, text: str, limit: int | None, wants_usage: bool
) -> None:
    extra = {} if limit is None else {"max_tokens": limit}
    call = upstream(model, user(text), wants_usage=wants_usage, **extra)
    body, usage = await complete(call)
    events, stats = await stream(call)
    chunks = chunks_of(events)
    assert content_of(chunks) == body.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [body.choices[0].finish_reason]
    assert stats.usage == usage
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == (1 if wants_usage else 0)
    assert {c.id for c in chunks} == {body.id}
    if limit is not None and usage is not None:
        assert usage.output_tokens <= limit


# -- bounded work and the demo-only switch ---------------------------------------------------------


async def test_a_huge_prompt_echoes_at_most_max_answer_chars() -> None:
    prompt = "lorem ipsum dolor " * 11_000  # about 195 KB, the reproduction's size
    body, usage = await complete(upstream("echo", user(prompt)))
    answer = body.choices[0].message.content or ""
    assert len(answer) <= MAX_ANSWER_CHARS
    assert body.choices[0].finish_reason == "length"
    assert usage is not None and usage.output_tokens <= MAX_ANSWER_CHARS // 2
    assert usage.input_tokens > 40_000  # the prompt is still counted in full
    events, stats = await stream(upstream("echo", user(prompt)))
    wire = sum(len(e) for e in events)
    print(f"\n[mock] 195 KB prompt -> {len(answer)} chars answered, {wire} bytes streamed in {len(events)} events")
    assert wire < 200_000  # was 24 MB
    assert content_of(chunks_of(events)) == answer
    assert stats.usage == usage


async def test_mock_answers_only_where_enabled() -> None:
    off = Provider(id="p9", workspace_id="acme", name="mock", type="mock")
    # A workspace id alone never enables it: the demo seed sets `enabled=true` on its own mock.
    named_demo = Provider(id="p8", workspace_id="demo", name="mock", type="mock")
    on = Provider(id="p7", workspace_id="acme", name="mock", type="mock", options={"enabled": "true"})
    assert (enabled(off), enabled(named_demo), enabled(on)) == (False, False, True)
    call = upstream("echo", user("hi"))
    call.provider = off
    with pytest.raises(PermissionDenied) as refused:
        await MOCK.complete(call)
    assert (refused.value.status, refused.value.code) == (403, "mock_disabled")
    with pytest.raises(PermissionDenied):
        await anext(MOCK.stream(call, CallStats()))
    with pytest.raises(PermissionDenied):
        await MOCK.embed(call)
    call.provider = on
    body, _ = await complete(call)
    assert body.choices[0].message.content == "hi"


async def test_embeddings_refuse_more_than_max_embedding_values() -> None:
    call = upstream("embed", [])
    call.body = {"model": "embed", "input": ["x"] * 300, "dimensions": 1024}
    with pytest.raises(InvalidRequest) as refused:
        await MOCK.embed(call)
    assert refused.value.code == "embedding_too_large"
    call.body = {"model": "embed", "input": ["x"] * 256, "dimensions": 1024}
    assert (await MOCK.embed(call)).usage is not None
