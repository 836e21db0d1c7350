"""dataplane/usage_estimate.py: what a call without reported usage is billed for."""

from __future__ import annotations

import msgspec

from dataplane.usage_estimate import (
    MESSAGE_OVERHEAD,
    TAP_KEEP_BYTES,
    RelayTap,
    count_tokens,
    estimate,
    input_tokens,
    relayed_text,
)
from schemas.events import Usage

_enc = msgspec.json.Encoder()


def sse(*payloads: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return b"".join(head + b"data: " + _enc.encode(p) + b"\n\n" for p in payloads)


def chat_chunk(text: str) -> dict[str, object]:
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def test_count_tokens_is_o200k_base() -> None:
    assert count_tokens("") == 0
    assert count_tokens("hello world") == 2  # tiktoken o200k_base: [24912, 2375]
    assert count_tokens("<|endoftext|>") > 1  # special tokens are plain text here, never control tokens


def test_long_texts_are_extrapolated_not_tokenized_whole() -> None:
    text = "the ledger balances " * 40_000  # 800 KB, past TOKENIZE_MAX_CHARS
    assert 0.9 * 120_000 <= count_tokens(text) <= 1.1 * 120_000


def test_input_tokens_of_chat_messages_and_tools() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "hello world"}]}]}
    assert input_tokens(body) == count_tokens("be brief\nhello world") + 2 * MESSAGE_OVERHEAD
    with_tools = {**body, "tools": [{"type": "function", "function": {"name": "f", "description": "adds"}}]}
    assert input_tokens(with_tools) > input_tokens(body)


def test_input_tokens_of_other_apis() -> None:
    anthropic = {"model": "m", "max_tokens": 5, "system": "be brief",
                 "messages": [{"role": "user", "content": "hello world"}]}
    responses = {"model": "m", "instructions": "be brief", "input": "hello world"}
    gemini = {"contents": [{"role": "user", "parts": [{"text": "hello world"}]}]}
    assert input_tokens(anthropic) == count_tokens("be brief\nhello world") + MESSAGE_OVERHEAD
    assert input_tokens(responses) == count_tokens("be brief\nhello world")
    assert input_tokens(gemini) == count_tokens("hello world") + MESSAGE_OVERHEAD
    assert input_tokens(_enc.encode(anthropic)) == input_tokens(anthropic)  # raw passthrough bodies
    assert input_tokens(b"not json") == input_tokens(None) == input_tokens([1]) == 0


def test_images_do_not_count_as_text() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]}
    assert input_tokens(body) == count_tokens("hi") + MESSAGE_OVERHEAD


def test_relayed_text_of_each_stream_format() -> None:
    chat = sse(chat_chunk("Hello"), chat_chunk(" world")) + b": alephant-cost-usd 0\n\ndata: [DONE]\n\n"
    assert relayed_text(chat) == "Hello world"
    anthropic = (sse({"type": "message_start", "message": {"content": [], "usage": {"input_tokens": 5}}},
                     event="message_start")
                 + sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
                       event="content_block_delta")
                 + sse({"type": "content_block_delta", "index": 1,
                        "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}, event="content_block_delta"))
    assert relayed_text(anthropic) == "Hi{\"a\":"
    # Responses: the text is in the deltas; `.done` and `response.completed` repeat it and are skipped.
    responses = sse({"type": "response.output_text.delta", "delta": "Hel"},
                    {"type": "response.output_text.delta", "delta": "lo"},
                    {"type": "response.output_text.done", "text": "Hello"},
                    {"type": "response.completed", "response": {"output": [{"content": [{"text": "Hello"}]}]}})
    assert relayed_text(responses) == "Hello"
    ndjson = b'{"message":{"content":"Hi"}}\n{"message":{"content":" there"},"done":false}\n'
    assert relayed_text(ndjson) == "Hi there"
    body = _enc.encode({"choices": [{"message": {"role": "assistant", "content": "done"}}]})
    assert relayed_text(body) == "done"
    assert relayed_text(b"plain words") == "plain words"


def test_a_record_cut_mid_event_is_skipped() -> None:
    cut = sse(chat_chunk("kept")) + b'data: {"choices":[{"delta":{"content":"lo'
    assert relayed_text(cut) == "kept"


def test_tap_keeps_a_head_and_extrapolates() -> None:
    tap = RelayTap()
    chunk = sse(chat_chunk(" word"))
    n = 4 * TAP_KEEP_BYTES // len(chunk)
    for _ in range(n):
        tap.feed(chunk)
    assert tap.total == n * len(chunk) and tap.kept < tap.total
    assert 0.9 * n <= tap.output_tokens() <= 1.1 * n
    assert RelayTap().output_tokens() == 0


def test_estimate_rules() -> None:
    body = {"messages": [{"role": "user", "content": "hello world"}]}
    tap = RelayTap()
    tap.feed(sse(chat_chunk("Hello"), chat_chunk(" there")))
    reported = Usage(input_tokens=10, output_tokens=4)
    assert estimate(reported, body, tap, partial=True) is None  # reported usage stands
    assert estimate(None, body, tap, partial=False) == Usage(input_tokens=count_tokens("hello world") + 3,
                                                             output_tokens=2)
    # A cut Anthropic stream: input from message_start, output never reported.
    half = Usage(input_tokens=10, cache_read_tokens=4)
    assert estimate(half, body, tap, partial=True) == Usage(input_tokens=10, cache_read_tokens=4, output_tokens=2)
    assert estimate(half, body, tap, partial=False) is None
    assert estimate(half, body, RelayTap(), partial=True) is None
