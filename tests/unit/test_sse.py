"""The shared SSE reader and block parser agree on the event-stream rules providers rely on."""

from __future__ import annotations

from collections.abc import AsyncIterator

from dataplane.providers.sse import SseEvent, iter_sse, parse_event

BLOCK = b": keep-alive\nevent: message_start\ndata: {\"a\":\ndata:  1}\nid: 7"


async def _lines(raw: bytes) -> AsyncIterator[bytes]:
    for line in raw.splitlines(keepends=True):
        yield line


def test_parse_event_joins_data_lines_and_skips_comments() -> None:
    # only the one space after the colon is removed; a second one is data
    assert parse_event(BLOCK) == SseEvent(b'{"a":\n 1}', "message_start")


async def test_reader_and_block_parser_agree_with_crlf_and_no_trailing_blank_line() -> None:
    stream = BLOCK.replace(b"\n", b"\r\n") + b"\r\n\r\ndata: [DONE]"
    events = [e async for e in iter_sse(_lines(stream))]
    assert events == [parse_event(BLOCK), SseEvent(b"[DONE]")]
    assert events[-1].done
