"""`schemas.redaction`: what archived bodies and logs mask."""

from __future__ import annotations

import re
from typing import Any

from schemas.redaction import REDACTED, redact_json, redact_text

BODY: dict[str, Any] = {
    "model": "fake/gpt-4o-mini",
    "messages": [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "my key is sk-proj-ABCDEFGHIJKLMNOP1234 and SSN-123-45-6789"}],
    "metadata": {"api_key": "plain-secret", "user_email": "a@example.com", "nested": {"Authorization": "x"}},
    "tools": [{"name": "t", "description": "Bearer abcdefghijklmnop"}],
}


def test_key_shapes_and_secret_fields_are_always_masked() -> None:
    clean = redact_json(BODY)
    assert clean["messages"][1]["content"] == f"my key is {REDACTED} and SSN-123-45-6789"
    assert clean["metadata"]["api_key"] == REDACTED and clean["metadata"]["nested"]["Authorization"] == REDACTED
    assert clean["tools"][0]["description"] == REDACTED
    assert clean["metadata"]["user_email"] == "a@example.com" and clean["model"] == "fake/gpt-4o-mini"
    assert BODY["metadata"]["api_key"] == "plain-secret"  # a copy: the input is untouched


def test_configured_paths_patterns_and_exact_values() -> None:
    clean = redact_json(BODY, paths=("messages.*.content", "metadata.user_email"),
                        patterns=(re.compile(r"SSN-[0-9-]+"),), exact=("fake/gpt-4o-mini",))
    assert [m["content"] for m in clean["messages"]] == [REDACTED, REDACTED]
    assert clean["metadata"]["user_email"] == REDACTED and clean["model"] == REDACTED
    only_ssn = redact_json(BODY, patterns=(re.compile(r"SSN-[0-9-]+"),))
    assert only_ssn["messages"][1]["content"].endswith(f"and {REDACTED}")
    assert redact_json(BODY, paths=("messages.1",))["messages"] == [BODY["messages"][0], REDACTED]
    assert redact_json(BODY, exact=("short",))["metadata"]["user_email"] == "a@example.com"  # < 8 chars: not used


def test_token_counts_are_not_secrets_but_tokens_are() -> None:
    usage = {"usage": {"prompt_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 1}}, "max_tokens": 9,
             "access_token": "abc", "token": "def", "x-auth-token": "ghi", "tokenizer": "bpe"}
    assert redact_json(usage) == {"usage": usage["usage"], "max_tokens": 9, "access_token": REDACTED,
                                  "token": REDACTED, "x-auth-token": REDACTED, "tokenizer": "bpe"}


def test_text_masks_gateway_provider_cloud_and_wallet_keys() -> None:
    for secret in ("sk-alph-abcdefgh", "sk-ant-api03-abcdefghijklmnop", "AKIAABCDEFGHIJKLMNOP",
                   "AIza" + "x" * 35, "0x" + "ab" * 32):
        assert redact_text(f"k={secret};") == f"k={REDACTED};", secret
    assert redact_text("0x" + "ab" * 20) == "0x" + "ab" * 20  # an address is not a secret
