"""Estimated usage for calls whose provider never reported it, so every call is billed.

A client that disconnects mid-stream, an upstream that is cut or times out, or a provider that
never sends usage leave a call without usage, although the provider read the prompt and wrote
output. The estimate is:

* input tokens: the text the client sent (message contents, system prompt, instructions, tool
  definitions, ...) plus 3 tokens per message, as OpenAI counts chat overhead;
* output tokens: the text relayed to the client (SSE `data:` payloads, NDJSON lines or a JSON
  body; only content deltas, never the echoes some formats repeat at their end).

Both are counted with the `o200k_base` tokenizer from the `bpe-openai` wheel (its data ships in the
wheel; nothing is downloaded). It is an **estimate** for every provider: other tokenizers count
differently (typically within 10-20% on prose). Images and binary documents count nothing.

Cost stays off the hot path: `RelayTap.feed` only keeps references to the relayed chunks (up to
`TAP_KEEP_BYTES`, then only counts bytes); text is extracted and tokenized once, at the end, and
only when usage is missing. Longer texts are tokenized up to `TOKENIZE_MAX_CHARS` and
extrapolated by length.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import msgspec
import structlog

from schemas.events import Usage

log = structlog.get_logger(__name__)

TAP_KEEP_BYTES = 128 * 1024  # relayed bytes kept per call for the estimate; beyond: extrapolated
TOKENIZE_MAX_CHARS = 256 * 1024  # about 5 ms of tokenizing; beyond: extrapolated
MESSAGE_OVERHEAD = 3  # tokens per message (role and separators), OpenAI's chat accounting
CHARS_PER_TOKEN = 4  # the fallback when the tokenizer refuses a text
_MAX_DEPTH = 32

# Keys whose string values are text a model reads (request) or writes (answer).
_OUTPUT_KEYS = frozenset({"content", "text", "thinking", "reasoning_content", "reasoning", "partial_json",
                          "arguments", "refusal", "response"})
_INPUT_KEYS = _OUTPUT_KEYS | {"input", "system", "instructions", "prompt", "description", "name"}
_TOOL_KEYS = ("tools", "functions", "toolConfig", "tool_choice")
_MESSAGE_LISTS = ("messages", "input", "contents")

_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class _Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


@functools.cache
def _encoding() -> _Encoding:
    """The o200k_base tokenizer, loaded on first use (about 60 ms and 75 MB: only workers that
    ever estimate pay for it). Immutable, so one per process is shared by every call."""
    with warnings.catch_warnings():
        # The wheel reads its bundled data (on import, too) with importlib.resources' legacy `open_binary`.
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai

        encoding: _Encoding = bpe_openai.get_encoding("o200k_base")
    return encoding


def count_tokens(text: str) -> int:
    """o200k_base tokens in `text`; texts over `TOKENIZE_MAX_CHARS` are counted on their head and
    extrapolated by length. Never raises (falls back to 4 characters per token)."""
    if not text:
        return 0
    head = text[:TOKENIZE_MAX_CHARS]
    try:
        tokens = len(_encoding().encode_ordinary(head))
    except Exception as exc:  # a tokenizer failure must never lose the event; count by length
        log.warning("tokenizer_failed", error=type(exc).__name__)
        tokens = math.ceil(len(head) / CHARS_PER_TOKEN)
    if len(text) > len(head):
        tokens = math.ceil(tokens * len(text) / len(head))
    return tokens


def _strings(value: Any, keys: frozenset[str], depth: int = 0) -> Iterator[str]:
    """String values found under `keys`, anywhere in decoded JSON (nested up to `_MAX_DEPTH`)."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                if key in keys:
                    yield item
            elif isinstance(item, dict | list):
                yield from _strings(item, keys, depth + 1)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                yield item  # e.g. an `input` list of strings, or content parts given as strings
            elif isinstance(item, dict | list):
                yield from _strings(item, keys, depth + 1)


def input_tokens(body: Any) -> int:
    """Estimated input tokens of a decoded request body (Chat, Responses, Messages, Gemini, Ollama
    or Bedrock shapes): its text under `_INPUT_KEYS`, its tool definitions as JSON, and
    `MESSAGE_OVERHEAD` per message. Raw bytes (a passthrough body) are decoded first. 0 for
    anything but a JSON object."""
    if isinstance(body, bytes):
        body = _decode(body) if body.lstrip().startswith(b"{") else None
    if not isinstance(body, dict):
        return 0
    text = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
    parts = [text] if text else []
    messages = 0
    for name in ("system", "instructions", *_MESSAGE_LISTS):
        value = body.get(name)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict | list):
            parts.extend(_strings(value, _INPUT_KEYS))
            if name in _MESSAGE_LISTS and isinstance(value, list):
                messages += len(value)
    for name in _TOOL_KEYS:
        if body.get(name):
            parts.append(_encoder.encode(body[name]).decode())
    return count_tokens("\n".join(parts)) + MESSAGE_OVERHEAD * messages


def _record_text(record: Any) -> Iterator[str]:
    """The answer text in one streamed record. Responses events carry their text in `*.delta`
    events; their `*.done` / `response.completed` events repeat it and are skipped."""
    if isinstance(record, dict):
        kind = record.get("type")
        if isinstance(kind, str) and kind.startswith("response."):
            delta = record.get("delta")
            if kind.endswith(".delta") and isinstance(delta, str):
                yield delta
            return
        delta = record.get("delta")
        if isinstance(delta, str):
            yield delta
    yield from _strings(record, _OUTPUT_KEYS)


def _decode(raw: bytes) -> Any:
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


def relayed_text(data: bytes) -> str:
    """The answer text in relayed bytes: SSE (`data:` payloads), NDJSON, or one JSON body. Other
    text is taken as it is; undecodable records (e.g. a chunk cut mid-event) are skipped."""
    stripped = data.lstrip()
    if stripped.startswith((b"{", b"[")):
        whole = _decode(stripped)
        if whole is not None:
            return "".join(_record_text(whole))
    lines = data.splitlines()
    sse = any(line.startswith((b"data:", b"event:")) for line in lines[:8])
    parts: list[str] = []
    decoded_any = False
    for line in lines:
        if sse:
            if not line.startswith(b"data:"):
                continue
            line = line[5:]
        line = line.strip()
        if not line or line == b"[DONE]":
            continue
        record = _decode(line)
        if record is not None:
            decoded_any = True
            parts.extend(_record_text(record))
    if not decoded_any and not sse:
        return data.decode("utf-8", "replace")
    return "".join(parts)


class RelayTap:
    """The bytes relayed to a client, kept (by reference, up to `TAP_KEEP_BYTES`) for an output
    estimate at the end. `feed` is the only per-chunk cost: an append and two additions."""

    __slots__ = ("_chunks", "kept", "total")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.kept = 0
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.kept < TAP_KEEP_BYTES:
            self._chunks.append(chunk)
            self.kept += len(chunk)

    def text(self) -> str:
        """The kept head of what was relayed, as text (body archival)."""
        return b"".join(self._chunks).decode("utf-8", "replace")

    def output_tokens(self) -> int:
        """Estimated tokens of everything relayed (the kept head, extrapolated by bytes)."""
        if not self.kept:
            return 0
        tokens = count_tokens(relayed_text(b"".join(self._chunks)))
        if self.total > self.kept:
            tokens = math.ceil(tokens * self.total / self.kept)
        return tokens


def estimate(reported: Usage | None, request_body: Any, tap: RelayTap, *, partial: bool) -> Usage | None:
    """The usage to bill when the provider's is missing, or None when `reported` stands.

    * no usage reported: input estimated from `request_body` (decoded JSON), output from `tap`;
    * a `partial` call whose usage has input but no output although output was relayed (an
      Anthropic stream cut after `message_start`): the reported input, the estimated output.
    """
    if reported is None:
        return Usage(input_tokens=input_tokens(request_body), output_tokens=tap.output_tokens())
    if partial and reported.output_tokens == 0 and tap.kept:
        output = tap.output_tokens()
        return msgspec.structs.replace(reported, output_tokens=output) if output else None
    return None
