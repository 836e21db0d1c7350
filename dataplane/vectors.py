"""Embedding vectors on the wire: OpenAI's `encoding_format: "base64"` is little-endian float32,
base64-encoded. Shared by the embeddings ingress and the semantic cache (no other imports, so
either may use it without an import cycle)."""

from __future__ import annotations

import array
import base64
import sys


def floats_to_base64(vector: list[float]) -> str:
    """Little-endian float32, base64 (standard alphabet, padded)."""
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def base64_to_floats(text: str) -> list[float]:
    """The inverse of `floats_to_base64`. Raises ValueError for text that is not base64 of a
    whole number of float32 values."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 4:
        raise ValueError("not a whole number of float32 values")
    values = array.array("f")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()
