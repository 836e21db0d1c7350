"""Masking the provider key out of whatever a provider sends back, before a client sees it.

A provider (or whatever answers at its base URL) may echo the key it was sent: in an error
message, a response header, a binary body, or a stream in which the key arrives split across two
network reads. Everything relayed to a client from a provider passes through one of:

* `mask(data, secrets)`: a whole body or one complete stream event (the lifecycle masks each
  event it relays);
* `mask_headers(headers, secrets)`: response headers (a header NAMED after the key is dropped);
* `StreamMasker`: a raw byte stream, masked without buffering it. It holds back only the end of
  a read that could be the start of a secret (at most `len(secret) - 1` bytes, and usually none:
  an SSE event ends in a newline, which starts no key), so streams stay live.

Each occurrence becomes `***`. The cost is one `bytes.find` per secret per chunk, plus a few
`startswith` calls at the chunk's end when its last bytes could begin a key.

What it cannot do: an upstream that spells the key differently (JSON `\\u` escapes, base64, split
over two content deltas) defeats byte matching. That is why keys only travel to addresses the
SSRF policy admits (`dataplane.outbound`) and never to a redirect target; masking is the second
line, for the accidental echo.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from multidict import CIMultiDict

MASK = b"***"
MIN_SECRET = 8  # shorter "keys" (a local Ollama's placeholder) are not masked: it would mangle bodies


@functools.lru_cache(maxsize=1024)  # per request on the hot path; keys are few
def secrets_of(provider_type: str, key: str | None) -> tuple[bytes, ...]:
    """What to mask: the key, and each part of Bedrock `AKID:SECRET[:TOKEN]` credentials; longest
    first (so a whole key is masked before its parts), parts shorter than `MIN_SECRET` never."""
    if not key:
        return ()
    parts = {key, *(key.split(":") if provider_type == "bedrock" else ())}
    return tuple(sorted((p.encode() for p in parts if len(p) >= MIN_SECRET), key=len, reverse=True))


def mask(data: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """`data` with every occurrence of each secret replaced by `***`. Returns `data` itself when
    nothing matched (no copy)."""
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, MASK)
    return data


def mask_headers(headers: Iterable[tuple[str, str]], secrets: tuple[bytes, ...]) -> CIMultiDict[str]:
    """The headers with secrets masked in values; a header whose NAME carries a secret is dropped."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        if secrets:
            raw_name = name.encode("utf-8", "surrogateescape")
            if mask(raw_name, secrets) is not raw_name:
                continue
            raw = value.encode("utf-8", "surrogateescape")
            masked = mask(raw, secrets)
            if masked is not raw:
                value = masked.decode("utf-8", "surrogateescape")
        out.add(name, value)
    return out


def _partial_tail(data: bytes, secret: bytes) -> int:
    """The length of the longest end of `data` that is a proper prefix of `secret` (0 if none)."""
    n = len(data)
    first = secret[0]
    i = data.find(first, max(0, n - len(secret) + 1))
    while i != -1:
        if secret.startswith(data[i:]):
            return n - i
        i = data.find(first, i + 1)
    return 0


class StreamMasker:
    """Masks secrets in a byte stream fed chunk by chunk (SSE, NDJSON, AWS event stream, anything).

    `feed(chunk)` returns what may be sent now; `flush()` returns the held-back rest at the end of
    the stream. Concatenating every output equals `mask(whole stream)` (with several secrets, a
    part such as a Bedrock key id may be masked before its whole key is seen: nothing leaks either
    way). Not thread-safe; one per stream."""

    __slots__ = ("_enders", "_held", "_secrets")

    def __init__(self, secrets: tuple[bytes, ...]) -> None:
        self._secrets = secrets
        # A read can end inside a secret only on a byte of that secret (its last byte excluded):
        # SSE and NDJSON reads end in a newline, so this one set lookup usually settles it.
        self._enders = frozenset(b for s in secrets for b in s[:-1])
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        if not data:
            return data
        data = mask(data, self._secrets)
        keep = 0
        if data[-1] in self._enders:
            keep = max(_partial_tail(data, s) for s in self._secrets)
        if keep:
            self._held = data[-keep:]
            return data[:-keep]
        self._held = b""
        return data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held
