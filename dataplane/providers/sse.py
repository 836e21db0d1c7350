"""Server-sent events, both directions: an incremental reader for upstream streams and a formatter.

The reader follows the WHATWG event-stream rules the providers rely on: `event:` names an event,
several `data:` lines join with newlines, a blank line dispatches, lines starting with `:` are
comments (OpenRouter's keep-alives), and CRLF or LF both end a line. It never buffers more than
one event.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SseEvent:
    data: bytes
    event: str | None = None

    @property
    def done(self) -> bool:
        """OpenAI-style terminator (`data: [DONE]`)."""
        return self.data == b"[DONE]"


def format_sse(data: bytes, event: str | None = None) -> bytes:
    """One event on the wire: optional `event:` line, one `data:` line, blank line."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def sse_comment(text: str) -> bytes:
    return b": " + text.encode() + b"\n\n"


def _field(line: bytes) -> tuple[bytes, bytes]:
    """`(field, value)` of one non-comment line, with the single optional space after `:` removed."""
    field, _, value = line.partition(b":")
    return field, value[1:] if value.startswith(b" ") else value


def parse_event(block: bytes) -> SseEvent:
    """One complete event block (its lines, without the blank line that ends it), comments skipped."""
    event: str | None = None
    data: list[bytes] = []
    for line in block.splitlines():
        if line.startswith(b":"):
            continue
        field, value = _field(line)
        if field == b"data":
            data.append(value)
        elif field == b"event":
            event = value.decode("utf-8", "replace")
    return SseEvent(b"\n".join(data), event)


async def iter_sse(lines: AsyncIterable[bytes]) -> AsyncIterator[SseEvent]:
    """Events from an async iterable of lines (an aiohttp `StreamReader` yields lines).

    A final event without its trailing blank line is still dispatched when the stream ends.
    """
    block: list[bytes] = []
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line:
            block.append(line)
            continue
        if block:
            event = parse_event(b"\n".join(block))
            block = []
            if event.data:
                yield event
    if block:
        event = parse_event(b"\n".join(block))
        if event.data:
            yield event
