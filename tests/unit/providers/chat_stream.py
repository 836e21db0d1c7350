"""Driving an adapter and reading its Chat Completions answer, shared by the adapter tests."""

from __future__ import annotations

from typing import Any

import msgspec

from dataplane.providers.base import SSE_DONE, CallStats, ChatProvider, UpstreamCall
from schemas.events import Usage


def chat_chunks(events: list[bytes]) -> list[dict[str, Any]]:
    """The decoded chunks of an adapter's stream, checking the framing and the final `[DONE]`."""
    assert events[-1] == SSE_DONE
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    return [msgspec.json.decode(e[6:-2]) for e in events[:-1]]


async def complete_json(adapter: ChatProvider, call: UpstreamCall) -> tuple[dict[str, Any], Usage | None]:
    resp = await adapter.complete(call)
    return msgspec.json.decode(resp.body), resp.usage


async def stream_chunks(adapter: ChatProvider, call: UpstreamCall) -> tuple[list[dict[str, Any]], CallStats]:
    stats = CallStats()
    events = [e async for e in adapter.stream(call, stats)]
    return chat_chunks(events), stats
