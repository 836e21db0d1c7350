"""Real agent-client requests (Codex CLI, Claude Code, opencode), replayed raw with aiohttp against
the gateway, with the model rewritten to each fake provider. Checks what those clients need from
the stream to accept it (see providers.md §1.2, §1.4, §2)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.contract.conftest import KINDS, Contract, Upstream
from tests.contract.fakes import tool_answer
from tests.fixtures import AGENT_CLIENT_REQUESTS

CAPTURES: dict[str, list[dict[str, Any]]] = json.loads(AGENT_CLIENT_REQUESTS.read_text())
CODEX = CAPTURES["codex_cli_0.169.0"]
CLAUDE_CODE = CAPTURES["claude_code_2.1.330"]
OPENCODE = CAPTURES["opencode_1.18.33"]
# Hop-by-hop or recomputed for the replay; the credential is ours.
_DROPPED = {"host", "content-length", "authorization", "connection", "accept-encoding"}


@dataclass
class SseEvent:
    event: str | None
    data: str


def parse_sse(raw: bytes) -> tuple[list[SseEvent], list[str]]:
    """(events, comments) of an SSE body; multi-line data joined with newlines."""
    events: list[SseEvent] = []
    comments: list[str] = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append(SseEvent(name, "\n".join(data)))
        else:
            assert name is None, f"an event without data: {block!r}"
    return events, comments


async def replay(contract: Contract, http: aiohttp.ClientSession, capture: dict[str, Any],
                 up: Upstream) -> tuple[aiohttp.ClientResponse, bytes]:
    headers = {k: v for k, v in capture["headers"].items() if k.lower() not in _DROPPED}
    headers["Authorization"] = f"Bearer {contract.key}"
    body = {**capture["body"], "model": up.ref}
    async with http.post(f"{contract.origin}{capture['path']}", params=capture["query"] or None, json=body,
                         headers=headers) as resp:
        raw = await resp.read()
    assert resp.status == 200, raw[:500]
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return resp, raw


def _capture_ids(captures: list[dict[str, Any]]) -> list[int]:
    return list(range(len(captures)))


def _last_is_tool_output(capture: dict[str, Any]) -> str | None:
    """The tool output the capture's last turn carries, if it is one."""
    body = capture["body"]
    if "input" in body:
        last = body["input"][-1]
        return last["output"] if last.get("type") == "function_call_output" else None
    last = body["messages"][-1]
    if last.get("role") == "tool":
        return str(last["content"])
    content = last.get("content")
    if isinstance(content, list):
        results = [b["content"] for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        return " ".join(results) if results else None
    return None


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("index", _capture_ids(CODEX))
async def test_codex_responses_stream(contract: Contract, http: aiohttp.ClientSession, kind: str, index: int) -> None:
    capture, up = CODEX[index], contract[kind]
    _, raw = await replay(contract, http, capture, up)
    events, _ = parse_sse(raw)
    assert b"[DONE]" not in raw
    payloads = [json.loads(e.data) for e in events]
    for event, payload in zip(events, payloads, strict=True):
        assert event.event == payload["type"], "named events repeat their type in the data"
    assert payloads[0]["type"] == "response.created"
    last = payloads[-1]
    assert last["type"] == "response.completed", [p["type"] for p in payloads][-3:]
    response = last["response"]
    assert isinstance(response["id"], str) and response["id"]
    usage = response["usage"]
    for name in ("input_tokens", "output_tokens", "total_tokens"):
        assert type(usage[name]) is int and usage[name] >= 0, name
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    numbers = [p["sequence_number"] for p in payloads]
    assert numbers == sorted(set(numbers)), "sequence numbers strictly increase"
    # Codex reads items from output_item.done; the text it shows is the done message's.
    done = [p["item"] for p in payloads if p["type"] == "response.output_item.done"]
    texts = [part["text"] for item in done if item["type"] == "message" for part in item["content"]
             if part["type"] == "output_text"]
    assert texts, "the answer is a message item"
    tool_output = _last_is_tool_output(capture)
    if tool_output is not None:  # the function_call_output reached the model
        assert "".join(texts) == tool_answer(tool_output)


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
@pytest.mark.parametrize("index", _capture_ids(CLAUDE_CODE))
async def test_claude_code_messages_stream(contract: Contract, http: aiohttp.ClientSession, kind: str,
                                           index: int) -> None:
    capture, up = CLAUDE_CODE[index], contract[kind]
    before = up.seen()
    _, raw = await replay(contract, http, capture, up)
    events, _ = parse_sse(raw)
    payloads = [json.loads(e.data) for e in events]
    for event, payload in zip(events, payloads, strict=True):
        assert event.event == payload["type"]
    names = [p["type"] for p in payloads]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "error" not in names
    starts = [p["index"] for p in payloads if p["type"] == "content_block_start"]
    stops = [p["index"] for p in payloads if p["type"] == "content_block_stop"]
    assert starts == stops == list(range(len(starts))) and starts, "blocks open and close in order"
    deltas = [p for p in payloads if p["type"] == "message_delta"]
    assert len(deltas) == 1 and deltas[0]["delta"]["stop_reason"] == "end_turn"
    assert deltas[0]["usage"]["output_tokens"] > 0
    # Input tokens: in message_start when known up front (native), else in message_delta (translated:
    # Chat usage only arrives at the end), where the SDKs merge it.
    start_usage = payloads[0]["message"]["usage"]
    assert max(start_usage["input_tokens"], deltas[0]["usage"].get("input_tokens", 0)) > 0
    text = "".join(p["delta"]["text"] for p in payloads
                   if p["type"] == "content_block_delta" and p["delta"]["type"] == "text_delta")
    tool_output = _last_is_tool_output(capture)
    assert text == (tool_answer(tool_output) if tool_output is not None else up.text)
    sent = up.fake.requests[before:]
    assert len(sent) == 1
    if kind == "anthropic":  # native: Claude Code's body and API headers reach Anthropic untouched
        assert sent[0].body == {**capture["body"], "model": up.model}
        assert sent[0].headers["anthropic-beta"] == capture["headers"]["anthropic-beta"]
        assert sent[0].headers["anthropic-version"] == capture["headers"]["anthropic-version"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("index", _capture_ids(OPENCODE))
async def test_opencode_chat_stream(contract: Contract, http: aiohttp.ClientSession, kind: str, index: int) -> None:
    capture, up = OPENCODE[index], contract[kind]
    _, raw = await replay(contract, http, capture, up)
    events, comments = parse_sse(raw)
    assert all(e.event is None for e in events), "Chat Completions streams are unnamed"
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    usage_chunk = chunks[-1]  # stream_options.include_usage was set
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert type(usage["prompt_tokens"]) is int and type(usage["completion_tokens"]) is int
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert all(c.get("usage") is None for c in chunks[:-1])
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    assert finishes == ["stop"], "opencode treats a stream without one finish chunk as an error"
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    tool_output = _last_is_tool_output(capture)
    assert text == (tool_answer(tool_output) if tool_output is not None else up.text)
    assert any(c.startswith("alephant-cost-usd ") for c in comments)
