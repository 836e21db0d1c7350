"""The provider adapter seam: one module per provider, all behind `ChatProvider`.

Adapters speak OpenAI Chat Completions on the gateway side (the canonical internal shape) and
the provider's native format upstream. They report usage through `CallStats` and raise only
`GatewayError`s; mapping the provider's errors is their job.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import aiohttp
import msgspec

from schemas.entities import Provider
from schemas.events import Usage
from schemas.openai import CompletionUsage
from schemas.settings import Secret

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class UpstreamCall:
    """One dispatch: the body is the client's decoded body with `model` set to the upstream id."""

    provider: Provider
    model: str
    body: dict[str, Any]
    api_key: Secret | None
    session: aiohttp.ClientSession
    timeout_s: float  # between two reads of the answer (a stalled stream is cut off after it)
    client_wants_usage: bool = False
    extra_headers: dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float = 10.0


DEFAULT_CONNECT_TIMEOUT_S = 10.0


@dataclass(slots=True)
class CallStats:
    """What the adapter learned about the call; read by the handler after the stream ends."""

    usage: Usage | None = None
    upstream_status: int = 200


@dataclass(frozen=True, slots=True)
class ChatResponse:
    body: bytes
    usage: Usage | None
    content_type: str = "application/json"


class ChatProvider(Protocol):
    async def complete(self, call: UpstreamCall) -> ChatResponse:
        """Non-streaming completion. Raises GatewayError on upstream failure."""
        ...

    def stream(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        """SSE events (`data: ...\\n\\n`, ending with `data: [DONE]`). Failures before the first
        event raise GatewayError from the first `__anext__`; later ones raise mid-iteration."""
        ...


@runtime_checkable
class NativeProvider(Protocol):
    """Optional capability: the adapter also speaks some ingress APIs natively (full fidelity).

    For those, `call.body` is the client's native body (with `model` set to the upstream id); the
    answer is the provider's native body or SSE events, relayed unchanged; `stats.usage` / the
    returned usage are parsed from it."""

    native_apis: frozenset[str]  # e.g. {"anthropic.messages"}

    async def complete_native(self, api: str, call: UpstreamCall) -> ChatResponse: ...

    def stream_native(self, api: str, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]: ...


def usage_from_openai(u: CompletionUsage) -> Usage:
    """OpenAI usage to ours: prompt tokens include cached ones; completion tokens include reasoning."""
    return Usage(
        input_tokens=u.prompt_tokens,
        output_tokens=u.completion_tokens,
        cache_read_tokens=u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0,
        reasoning_tokens=u.completion_tokens_details.reasoning_tokens if u.completion_tokens_details else 0,
    )


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


_chunk_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class ChunkFramer:
    """Builds the Chat Completions SSE chunks of one streamed answer (translating adapters use it)."""

    completion_id: str
    created: int
    model: str

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse_event(_chunk_encoder.encode({"id": self.completion_id, "object": "chat.completion.chunk",
                                                "created": self.created, "model": self.model, "choices": choices,
                                                **extra}))

    def delta(self, index: int, delta: dict[str, Any], finish: str | None = None, native: str | None = None) -> bytes:
        """A choice delta; a finishing one also carries the provider's own reason as `native_finish_reason`."""
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["native_finish_reason"] = native
        return self._chunk([choice])

    def usage(self, usage: CompletionUsage | None) -> bytes:
        """The usage-only chunk (`choices: []`) that `stream_options.include_usage` asks for."""
        return self._chunk([], usage=msgspec.to_builtins(usage or CompletionUsage()))
