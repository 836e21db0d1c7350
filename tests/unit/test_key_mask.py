"""dataplane/key_mask.py: the provider key never survives masking, whatever the chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.key_mask import StreamMasker, mask, mask_headers, secrets_of

KEY = b"sk-live-0123456789abcdef"


def fed(chunks: list[bytes], secrets: tuple[bytes, ...]) -> tuple[list[bytes], bytes]:
    masker = StreamMasker(secrets)
    outs = [masker.feed(c) for c in chunks]
    return outs, b"".join(outs) + masker.flush()


def test_secrets_cover_bedrock_parts_and_skip_short_keys() -> None:
    secrets = secrets_of("bedrock", "AKIDEXAMPLE12:secretsecretsecret:tok")
    assert secrets == (b"AKIDEXAMPLE12:secretsecretsecret:tok", b"secretsecretsecret", b"AKIDEXAMPLE12")
    assert mask(b"bad key AKIDEXAMPLE12 / secretsecretsecret", secrets) == b"bad key *** / ***"
    assert secrets_of("ollama", "x") == ()
    assert secrets_of("openai", None) == ()
    assert secrets_of("openai", "sk-a:b-long-enough") == (b"sk-a:b-long-enough",)


def test_mask_returns_the_same_object_when_clean() -> None:
    data = b"nothing to see"
    assert mask(data, (KEY,)) is data


@pytest.mark.parametrize("cut", range(1, len(KEY)))
def test_key_split_at_every_byte_is_masked(cut: int) -> None:
    event = b'data: {"echo":"' + KEY + b'"}\n\n'
    at = event.index(KEY) + cut
    outs, whole = fed([event[:at], event[at:]], (KEY,))
    assert whole == b'data: {"echo":"***"}\n\n'
    assert all(KEY[:4] not in out or b"***" in out for out in outs)
    assert KEY not in b"".join(outs)


def test_key_spread_over_single_bytes_is_masked() -> None:
    stream = b"\x00\x01binary" + KEY + b"\xff tail " + KEY
    _, whole = fed([bytes([b]) for b in stream], (KEY,))
    assert whole == b"\x00\x01binary***\xff tail ***"


def test_nothing_is_held_back_when_the_end_cannot_start_a_key() -> None:
    masker = StreamMasker((KEY,))
    assert masker.feed(b'data: {"a":1}\n\n') == b'data: {"a":1}\n\n'  # live streams stay live
    assert masker.feed(b"ends with s") == b"ends with "  # `s` could start `sk-...`: held
    assert masker.feed(b"ure\n") == b"sure\n"
    assert masker.flush() == b""


def test_held_bytes_are_released_at_the_end() -> None:
    masker = StreamMasker((KEY,))
    assert masker.feed(b"x" + KEY[:10]) == b"x"
    assert masker.flush() == KEY[:10]  # a prefix alone is not the key


def test_headers_are_masked_and_key_named_headers_dropped() -> None:
    secrets = (KEY,)
    headers = [("X-Echo", "Bearer " + KEY.decode()), ("x-" + KEY.decode(), "1"), ("content-type", "text/plain")]
    out = mask_headers(headers, secrets)
    assert list(out.items()) == [("X-Echo", "Bearer ***"), ("content-type", "text/plain")]
    assert list(mask_headers(headers, ()).items()) == headers


@given(prefix=st.binary(max_size=60), suffix=st.binary(max_size=60), cuts=st.lists(st.integers(0, 200), max_size=8),
       second=st.booleans())
def test_any_chunking_equals_masking_the_whole(prefix: bytes, suffix: bytes, cuts: list[int], second: bool) -> None:
    secrets = secrets_of("bedrock", "AKIDEXAMPLE12:secretsecretsecret") if second else (KEY,)
    stream = prefix + secrets[-1] + suffix + secrets[0]
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    _, whole = fed(chunks, secrets)
    if not second:
        assert whole == mask(stream, secrets)
    # With Bedrock parts a cut may mask a part before the whole key is seen: still nothing leaks.
    for secret in secrets:
        assert secret not in whole
