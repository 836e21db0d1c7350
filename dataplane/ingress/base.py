"""The ingress seam. OpenAI Chat Completions is the canonical internal shape: an ingress turns its
request into a Chat Completions body (`ChatPlan`), and turns the provider adapter's Chat Completions
answer (a JSON body, or a stream of `data:` SSE events ending in `data: [DONE]`) back into its own
wire format. The Chat Completions ingress is the identity, so that path does no re-encoding.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.errors import GatewayError


@dataclass(slots=True)
class ChatPlan:
    """What an ingress asks the gateway to do, in Chat Completions terms."""

    model: str  # as the client named it: `provider/model_id` or an alias
    body: dict[str, Any]  # a Chat Completions request body; `model` is replaced with the upstream id
    stream: bool
    include_usage: bool  # the client wants the usage-only chunk (Chat Completions semantics)
    forward_headers: dict[str, str] = field(default_factory=dict)  # e.g. anthropic-beta, for native upstreams
    # The client's own body and API (e.g. "anthropic.messages"). When the provider adapter speaks that
    # API natively, the lifecycle sends `native_body` as-is and relays the native answer unchanged.
    native_api: str | None = None
    native_body: dict[str, Any] | None = None


class Ingress(Protocol):
    name: str  # recorded on the `llm.call` event, e.g. "chat.completions"

    def plan(self, raw: dict[str, Any], headers: Mapping[str, str]) -> ChatPlan:
        """Validate the decoded body and translate it. Raises InvalidRequest (400) with a `param`."""
        ...

    def render(self, chat_body: bytes, plan: ChatPlan) -> bytes:
        """A non-streamed Chat Completions body, as this ingress's response body."""
        ...

    def render_stream(self, chunks: AsyncIterator[bytes], plan: ChatPlan) -> AsyncIterator[bytes]:
        """Chat Completions SSE events (each `data: ...\\n\\n`, the last `data: [DONE]`) in, this
        ingress's SSE bytes out, without its final terminator (see `stream_end`)."""
        ...

    def stream_end(self, cost_usd: str) -> bytes:
        """The bytes that close a successful stream; they carry the cost as an SSE comment."""
        ...

    def stream_error(self, err: GatewayError) -> bytes:
        """The event that ends a stream that failed mid-way, in this ingress's streaming format."""
        ...
