"""What the `/{provider}/*` passthrough may forward: methods and paths per provider type, and the
client headers that would pick an account on the operator's provider.

The passthrough sends requests with the OPERATOR's provider key, so by default it forwards only
what the gateway can account for: inference and read-only model endpoints. Everything that
manages the account (files, batches, fine-tuning, uploads, vector stores, assistants, stored
responses, organisation and admin APIs, model management) is opt-in per provider with the option
`passthrough_allow`, a comma-separated list of the groups below (`all` allows any ordinary
method and path). Methods outside `ORDINARY_METHODS` (TRACE, CONNECT, PROPFIND, ...) are never
forwarded. Refusal happens before the body is read, so nothing reaches the provider.

Paths are matched relative to the provider's base URL (after the passthrough drops the leading
segments that repeat the base path), percent-decoded per segment (an encoded `/` stays `%2F`, so
a Bedrock ARN stays one segment), with an optional API-version prefix (`v1/`, `v1beta/`) and
vendor prefix (`openai/`, `api/`, ...), since operators configure base URLs with or without them.

Account headers (`ACCOUNT_HEADERS`: OpenAI-Organization, OpenAI-Project, x-goog-user-project,
...) are dropped unless the provider sets `forward_account_headers=true`: a client must not move
its calls to another organisation, project or billing account of the operator's.

Everything here is pure; the compiled tables are cached per (type, option value).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from urllib.parse import unquote

from dataplane.providers.openai_compat import PROFILES
from schemas.entities import Provider

ALLOW_OPTION = "passthrough_allow"
ACCOUNT_OPTION = "forward_account_headers"
ORDINARY_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
ACCOUNT_HEADERS = frozenset({
    "openai-organization", "openai-project",  # OpenAI and Azure's v1 API
    "anthropic-workspace", "anthropic-workspace-id", "anthropic-organization",
    "x-goog-user-project",  # Google: the project billed and whose quota is used
    "x-ms-client-tenant-id",  # Azure: the tenant of the caller
})

_PREFIX = r"^(?:(?:openai|api|inference|compatibility)/)?(?:v\d+[a-z0-9]*/)?"
_ID = r"[^/]+"
_ANY = ("GET", "POST", "PUT", "PATCH", "DELETE")

# (methods, path pattern) per group; the "default" group is always on.
Rules = dict[str, tuple[tuple[tuple[str, ...], str], ...]]

_OPENAI: Rules = {
    "default": (
        (("POST",), r"(?:chat/completions|completions|responses|responses/input_tokens|embeddings|moderations)"),
        (("GET",), rf"models(?:/{_ID})?"),
    ),
    "audio": ((("POST",), r"audio/(?:speech|transcriptions|translations)"),),
    "images": ((("POST",), r"images/(?:generations|edits|variations)"),),
    "stored": ((_ANY, rf"responses/{_ID}(?:/.*)?"), (("GET", "POST", "DELETE"), r"chat/completions/.+"),
               (("GET",), r"chat/completions")),
    "files": ((_ANY, r"files(?:/.*)?"),),
    "uploads": ((_ANY, r"uploads(?:/.*)?"),),
    "batches": ((_ANY, r"batches(?:/.*)?"),),
    "fine_tuning": ((_ANY, r"fine_tuning(?:/.*)?"), (("DELETE",), rf"models/{_ID}")),
    "vector_stores": ((_ANY, r"vector_stores(?:/.*)?"),),
    "assistants": ((_ANY, r"(?:assistants|threads)(?:/.*)?"),),
    "organization": ((_ANY, r"(?:organization|projects)(?:/.*)?"),),
}
_AZURE: Rules = {
    **_OPENAI,
    "default": (
        *_OPENAI["default"],
        (("POST",), rf"deployments/{_ID}/(?:chat/completions|completions|embeddings)"),
    ),
    "audio": (*_OPENAI["audio"], (("POST",), rf"deployments/{_ID}/audio/(?:speech|transcriptions|translations)")),
    "images": (*_OPENAI["images"], (("POST",), rf"deployments/{_ID}/images/generations")),
}
_ANTHROPIC: Rules = {
    "default": (
        (("POST",), r"messages(?:/count_tokens)?"),
        (("GET",), rf"models(?:/{_ID})?"),
    ),
    "batches": ((_ANY, r"messages/batches(?:/.*)?"),),
    "files": ((_ANY, r"files(?:/.*)?"),),
    "organization": ((_ANY, r"organizations(?:/.*)?"),),
}
_GEMINI: Rules = {
    "default": (
        (("POST",), rf"(?:models|tunedModels)/{_ID}:(?:generateContent|streamGenerateContent|countTokens"
                    r"|embedContent|batchEmbedContents)"),
        (("GET",), rf"models(?:/{_ID})?"),
    ),
    "batches": ((("POST",), rf"models/{_ID}:batchGenerateContent"), (_ANY, r"batches(?:/.*)?")),
    "files": ((_ANY, r"(?:upload/v\d+[a-z0-9]*/)?files(?:/.*)?"),),
    "caching": ((_ANY, r"cachedContents(?:/.*)?"),),
    "fine_tuning": ((_ANY, r"tunedModels(?:/.*)?"),),
}
_BEDROCK: Rules = {
    "default": (
        (("POST",), rf"model/{_ID}/(?:converse|converse-stream|invoke|invoke-with-response-stream|count-tokens)"),
    ),
    "batches": ((_ANY, r"async-invoke(?:/.*)?"),),
    "guardrails": ((("POST",), rf"guardrail/{_ID}/version/{_ID}/apply"),),
}
_OLLAMA: Rules = {
    "default": (
        (("POST",), r"api/(?:chat|generate|embed|embeddings|show)"),
        (("GET",), r"api/(?:tags|version|ps)"),
        *_OPENAI["default"],  # Ollama's OpenAI-compatible /v1
        *_ANTHROPIC["default"],  # and its Anthropic-compatible /v1/messages
    ),
    "model_management": ((_ANY, r"api/(?:pull|push|create|copy|delete|blobs/.+)"),),
}


_FAMILIES: dict[str, Rules] = {"openai": _OPENAI, "azure": _AZURE, "anthropic": _ANTHROPIC, "gemini": _GEMINI,
                               "bedrock": _BEDROCK, "ollama": _OLLAMA, **dict.fromkeys(PROFILES, _OPENAI)}


@functools.lru_cache(maxsize=256)
def compiled(provider_type: str, allow_option: str) -> tuple[bool, dict[str, re.Pattern[str]]]:
    """`(allow everything ordinary, {method: one pattern})` for a type and its `passthrough_allow`
    value. Unknown group names are ignored (they allow nothing)."""
    groups = {g.strip().lower() for g in allow_option.split(",") if g.strip()}
    if "all" in groups:
        return True, {}
    family = _FAMILIES.get(provider_type, {})
    by_method: dict[str, list[str]] = {}
    for group in ("default", *sorted(groups)):
        for methods, pattern in family.get(group, ()):
            for method in methods:
                by_method.setdefault(method, []).append(pattern)
    return False, {m: re.compile(_PREFIX + "(?:" + "|".join(ps) + ")$") for m, ps in by_method.items()}


def canonical_path(relative: str) -> str:
    """The path as matched: each segment percent-decoded, a decoded `/` kept as `%2F`."""
    if "%" not in relative:
        return relative
    return "/".join(unquote(s).replace("/", "%2F") for s in relative.split("/"))


def refusal(provider_type: str, options: Mapping[str, str], method: str, relative: str) -> str | None:
    """Why `method relative` must not be forwarded to this provider, or None when it may.
    `relative` is the raw path below the provider's base URL."""
    method = method.upper()
    if method not in ORDINARY_METHODS:
        return f"the method {method} is never forwarded"
    everything, table = compiled(provider_type, options.get(ALLOW_OPTION, ""))
    if everything:
        return None
    pattern = table.get(method)
    if pattern is not None and pattern.match(canonical_path(relative.strip("/"))):
        return None
    return (f"{method} /{relative[:200]} is not an inference or model endpoint; the operator can allow "
            f"more with the provider option {ALLOW_OPTION}")


def forwards_account_headers(provider: Provider) -> bool:
    return provider.option_on(ACCOUNT_OPTION)
