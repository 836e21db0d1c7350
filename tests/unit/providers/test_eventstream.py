"""dataplane/providers/eventstream.py: AWS vectors, round trips, arbitrary chunking, corruption."""

from __future__ import annotations

import struct
import zlib
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.providers.eventstream import (
    MAX_MESSAGE_BYTES,
    EventMessage,
    EventStreamDecoder,
    EventStreamError,
    HeaderValue,
    decode_headers,
    encode_message,
)

FOO_BAR = b"{'foo':'bar'}"

# The event-stream test vectors AWS SDKs share (hex of the encoded message).
VECTORS: list[tuple[str, str, dict[str, HeaderValue], bytes]] = [
    ("empty_message", "000000100000000005c248eb7d98c8ff", {}, b""),
    ("payload_no_headers", "0000001d00000000fd528c5a7b27666f6f273a27626172277dc3653936", {}, FOO_BAR),
    ("int32_header", "0000002d0000001041c424b80a6576656e742d7479706504" "0000a00c7b27666f6f273a27626172277d36f480a0",
     {"event-type": 40972}, FOO_BAR),
    ("payload_one_str_header",
     "0000003d0000002007fd83960c636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e"
     "7b27666f6f273a27626172277d8d9c08b1",
     {"content-type": "application/json"}, FOO_BAR),
]


def decode_all(data: bytes) -> list[EventMessage]:
    decoder = EventStreamDecoder()
    out = decoder.feed(data)
    decoder.close()
    return out


@pytest.mark.parametrize(("name", "hexed", "headers", "payload"), VECTORS, ids=[v[0] for v in VECTORS])
def test_aws_vectors(name: str, hexed: str, headers: dict[str, HeaderValue], payload: bytes) -> None:
    raw = bytes.fromhex(hexed)
    assert encode_message(headers, payload) == raw
    assert decode_all(raw) == [EventMessage(headers, payload)]


def test_every_header_type_round_trips() -> None:
    headers: dict[str, HeaderValue] = {
        ":message-type": "event", "yes": True, "no": False, "i32": -(2**31), "i64": 2**62, "raw": b"\x00\xff",
        "when": datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC), "id": UUID("12345678-1234-5678-1234-567812345678"),
    }
    [message] = decode_all(encode_message(headers, b"payload"))
    assert message.headers == headers
    assert message.message_type == "event"
    assert message.header("i32") is None  # not a string


def test_narrow_integer_types_decode() -> None:
    # byte (2) and short (3) are never written by our encoder but are valid on the wire.
    block = b"\x01a\x02\xfe" + b"\x01b\x03\x01\x00"
    assert decode_headers(block) == {"a": -2, "b": 256}


header_values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=40),
    st.text(max_size=40),
    st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)).map(
        lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)),
    st.uuids(),
)
headers_st = st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) < 256),
                             header_values, max_size=6)
messages_st = st.lists(st.tuples(headers_st, st.binary(max_size=200)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(messages_st, st.data())
def test_arbitrary_chunk_boundaries(messages: list[tuple[dict[str, HeaderValue], bytes]], data: st.DataObject) -> None:
    stream = b"".join(encode_message(h, p) for h, p in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = EventStreamDecoder()
    out: list[EventMessage] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[prev:cut])
        prev = cut
    decoder.close()
    assert out == [EventMessage(h, p) for h, p in messages]
    assert decoder.pending == 0


@settings(max_examples=200, deadline=None)
@given(headers_st, st.binary(max_size=100), st.data())
def test_any_flipped_byte_is_detected(headers: dict[str, HeaderValue], payload: bytes, data: st.DataObject) -> None:
    raw = bytearray(encode_message(headers, payload))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(EventStreamError):
        decode_all(bytes(raw))


def test_crc_mismatch_messages() -> None:
    good = bytearray(encode_message({"a": "b"}, b"xyz"))
    bad_payload = bytearray(good)
    bad_payload[-5] ^= 1
    with pytest.raises(EventStreamError, match="message CRC"):
        EventStreamDecoder().feed(bytes(bad_payload))
    bad_prelude = bytearray(good)
    bad_prelude[9] ^= 1  # inside the prelude CRC itself
    with pytest.raises(EventStreamError, match="prelude CRC"):
        EventStreamDecoder().feed(bytes(bad_prelude))


def test_prelude_is_checked_before_waiting_for_the_body() -> None:
    decoder = EventStreamDecoder()
    raw = bytearray(encode_message({}, b"x" * 100))
    raw[2] ^= 0x7F  # a huge bogus length: must fail now, not wait for megabytes
    with pytest.raises(EventStreamError):
        decoder.feed(bytes(raw[:12]))


def _frame(total: int, head_len: int) -> bytes:
    prelude = struct.pack(">II", total, head_len)
    return prelude + struct.pack(">I", zlib.crc32(prelude))


def test_impossible_lengths_are_rejected() -> None:
    for total, head_len in ((15, 0), (MAX_MESSAGE_BYTES + 1, 0), (20, 5)):
        with pytest.raises(EventStreamError, match="out of range"):
            EventStreamDecoder().feed(_frame(total, head_len))


def test_truncated_stream_fails_on_close() -> None:
    raw = encode_message({":event-type": "x"}, b"payload")
    decoder = EventStreamDecoder()
    assert decoder.feed(raw + raw[:-3]) == [EventMessage({":event-type": "x"}, b"payload")]
    assert decoder.pending == len(raw) - 3
    with pytest.raises(EventStreamError, match="ended inside a message"):
        decoder.close()


def test_malformed_header_blocks() -> None:
    with pytest.raises(EventStreamError, match="unknown event-stream header type"):
        decode_headers(b"\x01a\x0b")
    for block in (b"\x05ab", b"\x01a\x07\x00\x09abc", b"\x01a\x04\x00", b"\x01a\x09\x00\x01"):
        with pytest.raises(EventStreamError):
            decode_headers(block)


def test_naive_timestamps_encode_as_utc() -> None:
    naive = datetime(2020, 1, 1, 0, 0, 0)
    [message] = decode_all(encode_message({"t": naive}))
    when = message.headers["t"]
    assert isinstance(when, datetime) and when == naive.replace(tzinfo=UTC)
    assert when - datetime(1970, 1, 1, tzinfo=UTC) == timedelta(days=18262)


def test_good_messages_before_a_corrupt_one_are_returned_first() -> None:
    good = encode_message({"n": 1}, b"a")
    bad = bytearray(encode_message({"n": 2}, b"b"))
    bad[-1] ^= 1
    decoder = EventStreamDecoder()
    assert decoder.feed(good + bytes(bad) + good) == [EventMessage({"n": 1}, b"a")]
    with pytest.raises(EventStreamError, match="message CRC"):
        decoder.feed(b"")
    with pytest.raises(EventStreamError, match="message CRC"):
        decoder.close()
