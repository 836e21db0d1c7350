"""`POST /v1/chat/completions`: the canonical shape, so requests and answers pass through as they are."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from dataplane.ingress.base import ChatPlan
from dataplane.ingress.responses_request import looks_like_responses_body, responses_body_to_chat
from dataplane.providers.sse import format_sse, sse_comment
from schemas.errors import GatewayError, render_openai
from schemas.http import validate
from schemas.openai import ChatCompletionRequest

DONE = b"data: [DONE]"


class ChatIngress:
    name = "chat.completions"

    def plan(self, raw: dict[str, Any], headers: Mapping[str, str]) -> ChatPlan:
        if looks_like_responses_body(raw):  # Cursor posts Responses-shaped bodies here, and wants Chat back
            raw = responses_body_to_chat(raw)
        typed = validate(raw, ChatCompletionRequest)
        return ChatPlan(model=typed.model, body=raw, stream=bool(typed.stream),
                        include_usage=bool(typed.stream_options and typed.stream_options.include_usage))

    def render(self, chat_body: bytes, plan: ChatPlan) -> bytes:
        return chat_body

    async def render_stream(self, chunks: AsyncIterator[bytes], plan: ChatPlan) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if not chunk.startswith(DONE):  # re-sent by stream_end, after the cost comment
                yield chunk

    def stream_end(self, cost_usd: str) -> bytes:
        # An SSE comment: clients ignore it; humans and tests can read the cost of a stream.
        return sse_comment(f"alephant-cost-usd {cost_usd}") + DONE + b"\n\n"

    def stream_error(self, err: GatewayError) -> bytes:
        # The openai SDK raises APIError on a `data:` payload with an "error" key.
        return format_sse(render_openai(err))
