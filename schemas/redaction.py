"""Redaction shared by logs (`deploy.logs`) and archived request bodies (`dataplane.bodies`).

`SECRET_VALUES` matches key-shaped text: virtual keys (`sk-alph-...`), provider keys (`sk-...`,
`sk-ant-...`, AWS access key ids, Google API keys), bearer tokens, and 32-byte hex private keys;
`SECRET_KEYS` matches field names that hold secrets (authorization, api_key, token, ...).

`redact_json` walks a decoded JSON value: a field whose name looks secret is replaced whole;
configured `paths` (dot-separated, `*` matching any key or list item, e.g. `messages.*.content`)
are replaced whole; every remaining string has the secret shapes, the configured `patterns` and
the `exact` values (the call's own keys) masked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "***"

# `token` but not `tokens`/`tokenizer` (max_tokens, prompt_tokens are counts, not secrets).
SECRET_KEYS = re.compile(r"(authorization|api[_-]?key|token(?![a-z])|secret|password|passwd|credential"
                         r"|private[_-]?key)", re.I)
SECRET_VALUES = re.compile(
    r"(sk-alph-[A-Za-z0-9_\-]{4,}|sk-[A-Za-z0-9_\-]{16,}|(?i:bearer)\s+[A-Za-z0-9._\-~+/=]{8,}"
    r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_\-]{35}|0x[0-9a-fA-F]{64}\b)"
)


def redact_text(text: str) -> str:
    """Mask key-shaped substrings (virtual keys, provider keys, bearer tokens) in free text."""
    return SECRET_VALUES.sub(REDACTED, text)


def _matches(path: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    return len(path) == len(pattern) and all(p == "*" or p == k for k, p in zip(path, pattern, strict=True))


def redact_json(value: Any, paths: Iterable[str] = (), patterns: Iterable[re.Pattern[str]] = (),
                exact: Iterable[str] = ()) -> Any:
    """A copy of `value` with secrets masked (see the module docstring)."""
    split = [tuple(p.split(".")) for p in paths]
    compiled = list(patterns)
    known = sorted({e for e in exact if len(e) >= 8}, key=len, reverse=True)

    def text(s: str) -> str:
        for e in known:
            if e in s:
                s = s.replace(e, REDACTED)
        s = SECRET_VALUES.sub(REDACTED, s)
        for pattern in compiled:
            s = pattern.sub(REDACTED, s)
        return s

    def walk(v: Any, path: tuple[str, ...]) -> Any:
        if split and any(_matches(path, p) for p in split):
            return REDACTED
        if isinstance(v, str):
            return text(v)
        if isinstance(v, dict):
            return {k: REDACTED if SECRET_KEYS.search(str(k)) else walk(x, (*path, str(k))) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, (*path, str(i))) for i, x in enumerate(v)]
        return v

    return walk(value, ())
