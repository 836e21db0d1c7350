"""`application/vnd.amazon.eventstream`: the binary framing of AWS streaming responses (Bedrock
ConverseStream, Transcribe, Lex, ...). Sans-IO: a decoder fed arbitrary byte chunks and a pure
encoder (for fakes and tests).

One message on the wire (all integers big-endian)::

    total_length u32 | headers_length u32 | prelude_crc u32 (CRC32 of the first 8 bytes)
    headers (headers_length bytes) | payload | message_crc u32 (CRC32 of everything before it)

One header::

    name_length u8 | name (UTF-8) | type u8 | value

Value types: 0 true, 1 false (no value bytes), 2 int8, 3 int16, 4 int32, 5 int64, 6 bytes
(u16 length + bytes), 7 string (u16 length + UTF-8), 8 timestamp (int64 milliseconds since
the epoch), 9 UUID (16 bytes). Spec: https://docs.aws.amazon.com/lexv2/latest/dg/event-stream-encoding.html
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

PRELUDE_BYTES = 12
OVERHEAD_BYTES = 16  # prelude + message CRC
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the service-side limit; also bounds our buffer
MAX_HEADERS_BYTES = 128 * 1024

HeaderValue = bool | int | bytes | str | datetime | UUID

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT_TYPES = {2: ">b", 3: ">h", 4: ">i", 5: ">q"}


class EventStreamError(ValueError):
    """The byte stream is not valid event-stream framing (bad CRC, impossible lengths, bad header
    encoding, or a message cut short). The stream cannot be resynchronized afterwards."""


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One decoded message. Header values keep their wire type's Python equivalent."""

    headers: dict[str, HeaderValue]
    payload: bytes

    def header(self, name: str) -> str | None:
        """A string header's value, None when absent or not a string."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else None

    @property
    def message_type(self) -> str | None:
        """`event`, `exception` or `error`."""
        return self.header(":message-type")

    @property
    def event_type(self) -> str | None:
        return self.header(":event-type")

    @property
    def exception_type(self) -> str | None:
        return self.header(":exception-type")


# -- encoding ----------------------------------------------------------------------------------


def _encode_value(value: HeaderValue) -> bytes:
    if isinstance(value, bool):
        return b"\x00" if value else b"\x01"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"\x04" + struct.pack(">i", value)
        return b"\x05" + struct.pack(">q", value)
    if isinstance(value, str):
        raw = value.encode()
        return b"\x07" + struct.pack(">H", len(raw)) + raw
    if isinstance(value, bytes):
        return b"\x06" + struct.pack(">H", len(value)) + value
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        millis = (aware - _EPOCH) // timedelta(milliseconds=1)
        return b"\x08" + struct.pack(">q", millis)
    return b"\x09" + value.bytes


def encode_headers(headers: Mapping[str, HeaderValue]) -> bytes:
    """Headers in the given order. `int` is written as int32 (int64 when it does not fit),
    `bytes` as a byte array, `str` as a string, `datetime` as a timestamp (naive = UTC)."""
    out = bytearray()
    for name, value in headers.items():
        raw_name = name.encode()
        if not 0 < len(raw_name) < 256:
            raise ValueError("event-stream header names must be 1..255 bytes")
        out += bytes([len(raw_name)]) + raw_name + _encode_value(value)
    return bytes(out)


def encode_message(headers: Mapping[str, HeaderValue], payload: bytes = b"") -> bytes:
    """One complete, CRC-protected message."""
    head = encode_headers(headers)
    total = OVERHEAD_BYTES + len(head) + len(payload)
    prelude = struct.pack(">II", total, len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + head + payload
    return body + struct.pack(">I", zlib.crc32(body))


# -- decoding ----------------------------------------------------------------------------------


def decode_headers(raw: bytes) -> dict[str, HeaderValue]:
    """Parse a header block. Raises EventStreamError on truncation or an unknown type."""
    headers: dict[str, HeaderValue] = {}
    view = memoryview(raw)
    pos, end = 0, len(raw)
    try:
        while pos < end:
            name_len = view[pos]
            name = bytes(view[pos + 1 : pos + 1 + name_len]).decode()
            pos += 1 + name_len
            kind = view[pos]
            pos += 1
            value: HeaderValue
            if kind in (0, 1):
                value = kind == 0
            elif kind in _INT_TYPES:
                fmt = _INT_TYPES[kind]
                (value,) = struct.unpack_from(fmt, view, pos)
                pos += struct.calcsize(fmt)
            elif kind in (6, 7):
                (length,) = struct.unpack_from(">H", view, pos)
                data = bytes(view[pos + 2 : pos + 2 + length])
                if len(data) != length:
                    raise EventStreamError("event-stream header value is truncated")
                value = data.decode() if kind == 7 else data
                pos += 2 + length
            elif kind == 8:
                (millis,) = struct.unpack_from(">q", view, pos)
                value = _EPOCH + timedelta(milliseconds=millis)
                pos += 8
            elif kind == 9:
                data = bytes(view[pos : pos + 16])
                if len(data) != 16:
                    raise EventStreamError("event-stream UUID header is truncated")
                value = UUID(bytes=data)
                pos += 16
            else:
                raise EventStreamError(f"unknown event-stream header type {kind}")
            if pos > end:
                raise EventStreamError("event-stream header block is truncated")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError, OverflowError):
        raise EventStreamError("event-stream header block is malformed") from None
    return headers


class EventStreamDecoder:
    """Incremental decoder: `feed` any chunking of the stream, get the messages completed by it.

    Holds at most one incomplete message (bounded by MAX_MESSAGE_BYTES). A framing error is
    final. It is raised by `feed` when no message precedes it in that call; otherwise `feed`
    returns the good messages before it and the next `feed` or `close` raises, so no decoded
    message is ever lost to a later corrupt one. Call `close` at end of input; it raises if a
    message was cut short.
    """

    __slots__ = ("_buf", "_error")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: EventStreamError | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[EventMessage]:
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[EventMessage] = []
        try:
            self._decode_into(out)
        except EventStreamError as exc:
            if not out:
                raise
            self._error = exc
        return out

    def _decode_into(self, out: list[EventMessage]) -> None:
        buf = self._buf
        while len(buf) >= PRELUDE_BYTES:
            total, head_len, prelude_crc = struct.unpack_from(">III", buf, 0)
            if zlib.crc32(buf[:8]) != prelude_crc:
                raise EventStreamError("event-stream prelude CRC mismatch")
            if total < OVERHEAD_BYTES or total > MAX_MESSAGE_BYTES:
                raise EventStreamError(f"event-stream message length {total} is out of range")
            if head_len > MAX_HEADERS_BYTES or head_len > total - OVERHEAD_BYTES:
                raise EventStreamError(f"event-stream headers length {head_len} is out of range")
            if len(buf) < total:
                break
            (message_crc,) = struct.unpack_from(">I", buf, total - 4)
            with memoryview(buf) as view:  # released before the buffer is resized below
                actual = zlib.crc32(view[: total - 4])
            if actual != message_crc:
                raise EventStreamError("event-stream message CRC mismatch")
            headers = decode_headers(bytes(buf[PRELUDE_BYTES : PRELUDE_BYTES + head_len]))
            payload = bytes(buf[PRELUDE_BYTES + head_len : total - 4])
            del buf[:total]
            out.append(EventMessage(headers, payload))

    def close(self) -> None:
        """End of input. Raises the deferred framing error, or EventStreamError if an incomplete
        message is buffered."""
        if self._error is not None:
            raise self._error
        if self._buf:
            raise EventStreamError(f"event-stream ended inside a message ({len(self._buf)} bytes pending)")
