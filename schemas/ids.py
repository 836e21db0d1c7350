"""Identifier generation: UUIDv7 for events (time-ordered), short random ids for entities."""

from __future__ import annotations

import os
import secrets
import time
import uuid


def uuid7(now_ms: int | None = None) -> uuid.UUID:
    """A RFC 9562 version-7 UUID: 48-bit Unix milliseconds, then 74 random bits."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def new_id(prefix: str) -> str:
    """An entity id such as `ws_3kq9...`: a readable prefix and 16 url-safe random chars."""
    return f"{prefix}_{secrets.token_hex(8)}"
