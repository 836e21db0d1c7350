"""The built-in `mock` provider: offline, deterministic, OpenAI-compatible, with usage.

It answers in-process, so a demo works with no provider account and no network. Model ids:
`echo` repeats the last user message; any other id answers with a fixed sentence naming it.
Token counts are deterministic estimates (4 characters per token), and `max_tokens` /
`max_completion_tokens` truncate the answer with `finish_reason: "length"`.

Bounded work: an answer is at most `MAX_ANSWER_CHARS` characters (a longer echo is cut, with
`finish_reason: "length"`), and an embeddings call at most `MAX_EMBEDDING_VALUES` numbers (more
is a 400), so one call costs at most a few milliseconds of CPU and a few KB of output whatever
the prompt.

Off unless enabled: the mock answers only for providers with option `enabled=true`, which the
local stack's demo seed sets on the demo workspace's `mock` (elsewhere: `alephant providers set
mock --type mock --option enabled=true`); otherwise a call is a 403 `mock_disabled`, so a
production workspace never serves (and bills) fake answers by accident.

Embeddings (`embed`): any model id; each input gets a deterministic unit vector derived from a
hash of the input (`dimensions` long, default 64), in the `encoding_format` asked for (floats,
or base64 of little-endian float32, like OpenAI). Usage counts the same 4-character tokens, or
the token ids of token-array inputs.
"""

from __future__ import annotations

import array
import base64
import hashlib
import math
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from dataplane.providers.base import SSE_DONE, CallStats, ChatResponse, UpstreamCall, sse_event, usage_from_openai
from schemas.entities import Provider
from schemas.errors import InvalidRequest, PermissionDenied
from schemas.openai import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    ChunkDelta,
    CompletionTokensDetails,
    CompletionUsage,
    PromptTokensDetails,
)
from schemas.pricing import MOCK_INPUT_PER_MTOK_NANOS, MOCK_OUTPUT_PER_MTOK_NANOS

# The model ids GET /v1/models lists for the mock are catalog data: schemas.catalog.MOCK_MODELS.
EMBEDDING_DIMENSIONS = 64
MAX_EMBEDDING_DIMENSIONS = 4096
MAX_EMBEDDING_VALUES = 256 * 1024  # inputs x dimensions per call: ~0.1 s of CPU at most
MAX_ANSWER_CHARS = 2048  # about 500 tokens: a 195 KB prompt no longer echoes as 24 MB of stream

# The mock's prices (nano-USD per million tokens) are pricing data both planes read:
# schemas.pricing.MOCK_INPUT_PER_MTOK_NANOS and MOCK_OUTPUT_PER_MTOK_NANOS.
INPUT_PER_MTOK_NANOS = MOCK_INPUT_PER_MTOK_NANOS
OUTPUT_PER_MTOK_NANOS = MOCK_OUTPUT_PER_MTOK_NANOS
_encoder = msgspec.json.Encoder()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4) if text else 0


def enabled(provider: Provider) -> bool:
    """Whether this mock provider may answer: only with option `enabled=true`, which the demo seed
    (`alephant dev`) sets on the demo workspace's `mock`; a mock registered anywhere else is off
    until an admin enables it (a workspace id alone never turns it on)."""
    return provider.option_on("enabled")


def _check_enabled(provider: Provider) -> None:
    if not enabled(provider):
        raise PermissionDenied(f"The built-in mock provider '{provider.name}' is off in this workspace; an "
                               "admin can turn it on with provider option enabled=true.", code="mock_disabled")


def answer_for(model: str, messages: list[dict[str, Any]]) -> str:
    """The whole answer (before `MAX_ANSWER_CHARS` and `max_tokens` apply)."""
    if model == "echo":
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                text = _text_of(msg.get("content"))
                if text:
                    return text
        return "(nothing to echo)"
    return f"This is the mock provider answering as '{model}'."


def plan(call: UpstreamCall) -> tuple[list[str], str, CompletionUsage, str]:
    """Deterministic answer words, finish reason, usage and id for a request body."""
    messages = call.body.get("messages") or []
    if not isinstance(messages, list):
        messages = []
    answer = answer_for(call.model, messages)
    finish = "stop"
    if len(answer) > MAX_ANSWER_CHARS:
        answer, finish = answer[:MAX_ANSWER_CHARS], "length"
    words = answer.split(" ")
    limit = call.body.get("max_completion_tokens") or call.body.get("max_tokens")
    if isinstance(limit, int) and limit < sum(_tokens(w) for w in words):
        kept: list[str] = []
        used = 0
        for w in words:
            used += _tokens(w)
            if used > limit:
                break
            kept.append(w)
        words, finish = kept, "length"
    prompt = sum(_tokens(_text_of(m.get("content"))) + 3 for m in messages if isinstance(m, dict))
    completion = sum(_tokens(w) for w in words)
    usage = CompletionUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=0),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=0),
    )
    digest = hashlib.sha256(_encoder.encode(call.body)).hexdigest()[:24]
    return words, finish, usage, f"chatcmpl-mock{digest}"


class MockProvider:
    async def complete(self, call: UpstreamCall) -> ChatResponse:
        _check_enabled(call.provider)
        words, finish, usage, cid = plan(call)
        body = ChatCompletion(
            id=cid,
            created=int(time.time()),
            model=call.model,
            choices=[Choice(index=0, message=AssistantMessage(content=" ".join(words)), finish_reason=finish)],
            usage=usage,
        )
        return ChatResponse(_encoder.encode(body), usage_from_openai(usage))

    async def stream(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        _check_enabled(call.provider)  # raised by the first __anext__: a plain 403, before any byte
        words, finish, usage, cid = plan(call)
        created = int(time.time())

        def chunk(delta: ChunkDelta, finish_reason: str | None = None) -> bytes:
            return sse_event(_encoder.encode(ChatCompletionChunk(
                id=cid, created=created, model=call.model,
                choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
            )))

        yield chunk(ChunkDelta(role="assistant", content=""))
        for i, word in enumerate(words):
            yield chunk(ChunkDelta(content=word if i == 0 else " " + word))
        yield chunk(ChunkDelta(), finish)
        stats.usage = usage_from_openai(usage)
        if call.client_wants_usage:
            yield sse_event(_encoder.encode(ChatCompletionChunk(id=cid, created=created, model=call.model,
                                                                choices=[], usage=usage)))
        yield SSE_DONE

    async def embed(self, call: UpstreamCall) -> ChatResponse:
        """A deterministic `create embedding` answer for `call.body` (validated by the ingress).
        400 `embedding_too_large` beyond `MAX_EMBEDDING_VALUES` numbers."""
        _check_enabled(call.provider)
        raw_input = call.body.get("input")
        inputs: list[Any] = raw_input if isinstance(raw_input, list) and raw_input and \
            not isinstance(raw_input[0], int) else [raw_input]
        dims = call.body.get("dimensions")
        dims = min(dims, MAX_EMBEDDING_DIMENSIONS) if isinstance(dims, int) and dims > 0 else EMBEDDING_DIMENSIONS
        if len(inputs) * dims > MAX_EMBEDDING_VALUES:
            raise InvalidRequest(f"The mock provider embeds at most {MAX_EMBEDDING_VALUES} numbers per call "
                                 f"({len(inputs)} inputs x {dims} dimensions asked).", param="input",
                                 code="embedding_too_large")
        as_base64 = call.body.get("encoding_format") == "base64"
        data: list[dict[str, Any]] = []
        tokens = 0
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                tokens += _tokens(item)
                seed = item.encode()
            else:
                tokens += len(item) if isinstance(item, list) else 0
                seed = _encoder.encode(item)
            vector = embedding_vector(seed, dims)
            data.append({"object": "embedding", "index": i,
                         "embedding": _float32_base64(vector) if as_base64 else vector})
        body = {"object": "list", "data": data, "model": call.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        usage = CompletionUsage(prompt_tokens=tokens, total_tokens=tokens)
        return ChatResponse(_encoder.encode(body), usage_from_openai(usage))


def embedding_vector(seed: bytes, dims: int) -> list[float]:
    """A unit-length vector that depends only on `seed` and `dims`, rounded to float32 values."""
    raw = hashlib.shake_256(seed).digest(4 * dims)
    values = [int.from_bytes(raw[4 * i:4 * i + 4], "little") / 2**31 - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return array.array("f", [v / norm for v in values]).tolist()


def _float32_base64(vector: list[float]) -> str:
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()
