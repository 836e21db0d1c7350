"""The OpenAI-compatible family: one table of per-type quirks that the OpenAI adapter consults.

Groq, Mistral, DeepSeek, xAI, Together, Fireworks, OpenRouter, Perplexity and Cohere's
compatibility API all speak Chat Completions, each with small deviations (providers.md §1.0,
§1.9). A `CompatProfile` names them; the functions below apply them:

* `prepare_chat` / `prepare_embeddings`: the outgoing body (copy-on-write; the client's body is
  never mutated, so a fallback to another provider sees it unchanged).
* `fix_completion`: a non-streamed body. Usage is normalized, finish reasons mapped, in-body
  errors raised. Unchanged bodies are relayed byte-for-byte; changed ones are re-encoded.
* `relay_events`: the stream. Each `data:` event is decoded, fixed like a body, and re-encoded
  only if something changed. SSE comments (OpenRouter's `: OPENROUTER PROCESSING`) are dropped:
  the ingress contract is `data:` events only.
* `map_compat_error`: the error table of `upstream.py`, fed with the message these providers
  put in flat (`{"object": "error", "message": ...}`) or numeric-code bodies.

Decisions (documented for billing and for clients):

* Usage follows OpenAI semantics *everywhere*, our `Usage` and the client's alike: xAI reports
  reasoning tokens outside `completion_tokens`, so the gateway adds them (xAI's `total_tokens`
  already counts them); DeepSeek's `prompt_cache_hit_tokens` becomes `cached_tokens` (and is
  added to the client's `prompt_tokens_details` when missing).
* A finish reason that means "the provider failed" (`error`, DeepSeek's
  `insufficient_system_resource`) raises a `GatewayError`: mid-stream it ends the stream with an
  error event, after the usage seen so far is recorded. Non-streamed, the call fails.
* Mistral requires tool-call ids of exactly 9 characters `[A-Za-z0-9]`. Ids that do not match
  (e.g. `call_...` from another provider earlier in the conversation) are rewritten to a
  deterministic hash, identically in `assistant.tool_calls[].id` and `tool.tool_call_id`, so
  the pairing survives. Ids Mistral generates already match and pass unchanged, so nothing
  needs mapping back.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dataplane.providers.base import SSE_DONE, CallStats
from dataplane.providers.sse import format_sse, iter_sse
from dataplane.providers.upstream import map_upstream_error
from schemas.errors import GatewayError, UpstreamError
from schemas.events import Usage

Json = dict[str, Any]

# A finish reason that is never valid OpenAI output and always means the generation failed.
_COMMON_ERROR_FINISHES: Mapping[str, tuple[int, str]] = {"error": (502, "upstream_error")}


@dataclass(frozen=True, slots=True)
class CompatProfile:
    """The quirks of one provider type. Everything not named here is plain OpenAI behaviour."""

    type: str
    base_url: str  # the default when the provider entity has none
    # Send `stream_options.include_usage` when streaming. False where the API rejects the field
    # (it is then stripped from the client's body too); those providers report usage anyway.
    stream_options: bool = True
    finish_reasons: Mapping[str, str] = field(default_factory=dict)  # provider value -> OpenAI value
    error_finishes: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # -> (status, code)
    strict_tool_ids: bool = False  # Mistral: tool-call ids must match [A-Za-z0-9]{9}
    renames: Mapping[str, str] = field(default_factory=dict)  # request field -> the name it accepts
    reasoning_outside_completion: bool = False  # xAI: completion_tokens excludes reasoning

    def finish_error(self, reason: str) -> tuple[int, str] | None:
        return self.error_finishes.get(reason) or _COMMON_ERROR_FINISHES.get(reason)


PROFILES: Mapping[str, CompatProfile] = {p.type: p for p in (
    # Streams carry usage with stream_options; older ones only in `x_groq.usage` (both read).
    CompatProfile(type="groq", base_url="https://api.groq.com/openai/v1"),
    # 422 `extra_forbidden` for stream_options and max_completion_tokens; usage is always sent.
    CompatProfile(type="mistral", base_url="https://api.mistral.ai/v1", stream_options=False,
                  finish_reasons={"model_length": "length"}, strict_tool_ids=True,
                  renames={"max_completion_tokens": "max_tokens"}),
    # `reasoning_content` deltas pass through untouched; cache hits in prompt_cache_hit_tokens.
    CompatProfile(type="deepseek", base_url="https://api.deepseek.com",
                  error_finishes={"insufficient_system_resource": (503, "upstream_overloaded")}),
    CompatProfile(type="xai", base_url="https://api.x.ai/v1", reasoning_outside_completion=True),
    CompatProfile(type="together", base_url="https://api.together.xyz/v1",
                  finish_reasons={"eos": "stop", "eos_token": "stop"}),
    CompatProfile(type="fireworks", base_url="https://api.fireworks.ai/inference/v1"),
    # Keep-alive comments; mid-stream errors as `data:` with `error` + finish_reason "error";
    # numeric (HTTP) or string error codes.
    CompatProfile(type="openrouter", base_url="https://openrouter.ai/api/v1"),
    # Usage is cumulative on every chunk; stream_options is not part of its API.
    CompatProfile(type="perplexity", base_url="https://api.perplexity.ai", stream_options=False),
    # The compatibility API rejects stream_options. Native Cohere finish values are mapped
    # defensively in case the compatibility layer lets one through.
    CompatProfile(type="cohere", base_url="https://api.cohere.ai/compatibility/v1", stream_options=False,
                  finish_reasons={"COMPLETE": "stop", "STOP_SEQUENCE": "stop", "MAX_TOKENS": "length",
                                  "TOOL_CALL": "tool_calls"},
                  error_finishes={"ERROR": (502, "upstream_error"), "TIMEOUT": (504, "upstream_timeout")}),
)}

_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

# --- requests ------------------------------------------------------------------------------------

_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def strict_tool_id(original: str) -> str:
    """`original` if it is 9 characters of [A-Za-z0-9], else a stable 9-character hash of it."""
    if _MISTRAL_ID.fullmatch(original):
        return original
    n = int.from_bytes(hashlib.sha256(original.encode()).digest()[:8], "big")
    out = []
    for _ in range(9):
        n, r = divmod(n, 62)
        out.append(_BASE62[r])
    return "".join(out)


def _rewrite_tool_ids(messages: list[Any]) -> list[Any]:
    out: list[Any] = []
    for msg in messages:
        if not isinstance(msg, dict):
            out.append(msg)
            continue
        calls = msg.get("tool_calls")
        if isinstance(calls, list) and calls:
            msg = {**msg, "tool_calls": [
                {**c, "id": strict_tool_id(c["id"])} if isinstance(c, dict) and isinstance(c.get("id"), str) else c
                for c in calls
            ]}
        if isinstance(msg.get("tool_call_id"), str):
            msg = {**msg, "tool_call_id": strict_tool_id(msg["tool_call_id"])}
        out.append(msg)
    return out


def prepare_chat(profile: CompatProfile, body: Json, *, stream: bool) -> Json:
    """The body to send upstream for a chat completion; `body` itself is left unchanged."""
    out = dict(body)
    if stream and profile.stream_options:
        out["stream_options"] = {**(out.get("stream_options") or {}), "include_usage": True}
    elif not profile.stream_options:
        out.pop("stream_options", None)
    for name, accepted in profile.renames.items():
        if name in out:
            value = out.pop(name)
            out.setdefault(accepted, value)
    if profile.strict_tool_ids and isinstance(out.get("messages"), list):
        out["messages"] = _rewrite_tool_ids(out["messages"])
    return out


def prepare_embeddings(profile: CompatProfile, body: Json) -> Json:
    """Embeddings body: ask for floats, whatever the client wanted. Support for `base64` varies
    across the family; the embeddings ingress converts the answer to the requested format."""
    return {k: v for k, v in body.items() if k != "encoding_format"}


# --- usage ---------------------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _dict(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def normalize_usage(profile: CompatProfile, usage: Json) -> tuple[Usage, Json | None]:
    """Our `Usage` from a provider's usage object, and the client's usage object rewritten to
    OpenAI semantics, or None when it already has them (the body then stays byte-exact)."""
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    prompt_details = _dict(usage.get("prompt_tokens_details"))
    reasoning = _int(_dict(usage.get("completion_tokens_details")).get("reasoning_tokens"))
    cached = _int(prompt_details.get("cached_tokens"))
    deepseek_hits = _int(usage.get("prompt_cache_hit_tokens"))
    fixed: Json | None = None
    if profile.reasoning_outside_completion and reasoning:
        completion += reasoning
        fixed = {**usage, "completion_tokens": completion,
                 "total_tokens": max(_int(usage.get("total_tokens")), prompt + completion)}
    if deepseek_hits and not cached:
        cached = deepseek_hits
        fixed = {**(fixed or usage), "prompt_tokens_details": {**prompt_details, "cached_tokens": cached}}
    ours = Usage(input_tokens=prompt, output_tokens=completion, cache_read_tokens=cached,
                 cache_write_tokens=_int(prompt_details.get("cache_write_tokens")), reasoning_tokens=reasoning)
    return ours, fixed


# --- errors --------------------------------------------------------------------------------------

_STRING_CODES = {"rate_limit_exceeded": 429, "overloaded": 503, "overloaded_error": 503, "timeout": 504,
                 "context_length_exceeded": 400, "invalid_request_error": 400}


def _message_of(value: Any) -> str:
    """A readable message from a string, a FastAPI/pydantic `detail` list, or any JSON value."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "detail" in value:
        value = value["detail"]
    if isinstance(value, list) and value and all(isinstance(d, dict) for d in value):
        parts = []
        for d in value:
            loc = ".".join(str(p) for p in d.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", "")))
        return "; ".join(parts)
    return "" if value is None else _encoder.encode(value).decode()


def _error_message(parsed: Any) -> str:
    if not isinstance(parsed, dict):
        return ""
    err = parsed.get("error")
    if isinstance(err, dict):
        msg = _message_of(err.get("message"))
        raw = _dict(err.get("metadata")).get("raw")  # OpenRouter: the upstream provider's own words
        if isinstance(raw, str) and raw and raw not in msg:
            msg = f"{msg} ({raw[:300]})" if msg else raw
        return msg
    if isinstance(err, str):
        return err
    return _message_of(parsed.get("message") if "message" in parsed else parsed.get("detail"))


def map_compat_error(provider: str, status: int, raw: bytes, headers: Mapping[str, str],
                     secret: str | None) -> GatewayError:
    """`upstream.map_upstream_error`, with the message dug out of flat or nested bodies."""
    try:
        msg = _error_message(_decoder.decode(raw))
    except (msgspec.DecodeError, UnicodeDecodeError):
        msg = ""
    body = _encoder.encode({"error": {"message": msg}}) if msg else raw
    return map_upstream_error(provider, status, body, headers, secret)


def _in_body_error(provider: str, err: Any, secret: str | None) -> GatewayError:
    """An error object delivered inside a 200 answer or a stream event."""
    code = err.get("code") if isinstance(err, dict) else None
    status = 502
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        status = code
    elif isinstance(code, str):
        status = _STRING_CODES.get(code, 502)
    msg = _error_message({"error": err}) or "the provider reported an error mid-answer"
    return map_upstream_error(provider, status, _encoder.encode({"error": {"message": msg}}), {}, secret)


# --- answers -------------------------------------------------------------------------------------


def _take_usage(profile: CompatProfile, payload: Json) -> tuple[Usage | None, bool]:
    """`(usage, changed)`: our usage from `usage` (or Groq's older `x_groq.usage`), and whether
    the client's `usage` object was rewritten in place to OpenAI semantics."""
    raw_usage = payload.get("usage")
    if isinstance(raw_usage, dict):
        usage, fixed = normalize_usage(profile, raw_usage)
        if fixed is not None:
            payload["usage"] = fixed
        return usage, fixed is not None
    groq = _dict(_dict(payload.get("x_groq")).get("usage"))
    return (normalize_usage(profile, groq)[0] if groq else None), False


def _check_choices(profile: CompatProfile, provider: str, payload: Json, secret: str | None) -> tuple[bool, bool]:
    """`(changed, finished)`: map finish reasons in place. Raises the mapped GatewayError for an
    in-body `error` and for a finish reason that means the generation failed."""
    err = payload.get("error")
    if err:
        raise _in_body_error(provider, err, secret)
    changed = finished = False
    for choice in payload.get("choices") or ():
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if not isinstance(reason, str):
            continue
        finished = True
        failure = profile.finish_error(reason)
        if failure is not None:
            status, code = failure
            raise UpstreamError(f"Provider '{provider}' stopped generating with finish_reason '{reason}'.",
                                status=status, code=code)
        mapped = profile.finish_reasons.get(reason)
        if mapped is not None:
            choice["finish_reason"] = mapped
            changed = True
    return changed, finished


def _decode_object(provider: str, raw: bytes, what: str) -> Json:
    try:
        payload = _decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise UpstreamError(f"Provider '{provider}' sent {what} that is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise UpstreamError(f"Provider '{provider}' sent {what} that is not a JSON object.")
    return payload


def fix_completion(profile: CompatProfile, provider: str, raw: bytes,
                   secret: str | None) -> tuple[bytes, Usage | None]:
    """A non-streamed chat completion body and its usage. Raises UpstreamError for a body that is
    not a JSON object, and the mapped GatewayError for an error answer with status 200."""
    payload = _decode_object(provider, raw, "a body")
    usage, usage_changed = _take_usage(profile, payload)
    changed, _ = _check_choices(profile, provider, payload, secret)
    return (_encoder.encode(payload) if changed or usage_changed else raw), usage


def fix_chunk(profile: CompatProfile, provider: str, data: bytes, stats: CallStats, *,
              client_wants_usage: bool, secret: str | None) -> tuple[bytes | None, bool]:
    """One stream event's data in; `(event, finished)` out: the SSE event to relay, or None to
    drop it (the usage-only chunk the client did not ask for), and whether it carried a finish
    reason. Usage is recorded in `stats` before an error chunk raises."""
    payload = _decode_object(provider, data, "a stream event")
    usage, changed = _take_usage(profile, payload)
    if usage is not None:
        stats.usage = usage  # cumulative where a provider repeats it (Perplexity): the last one wins
    choices_changed, finished = _check_choices(profile, provider, payload, secret)
    if usage is not None and not client_wants_usage and payload.get("choices") == [] and "usage" in payload:
        return None, finished
    if not client_wants_usage and "usage" in payload:  # usage (or null) on a content chunk: ours, not theirs
        del payload["usage"]
        changed = True
    if changed or choices_changed or b"\n" in data:  # multi-line data cannot be relayed as one line
        return format_sse(_encoder.encode(payload)), finished
    return format_sse(data), finished


async def relay_events(profile: CompatProfile, provider: str, lines: AsyncIterable[bytes], stats: CallStats, *,
                       client_wants_usage: bool, secret: str | None) -> AsyncIterator[bytes]:
    """Upstream SSE lines in; fixed `data:` events out, ending with `data: [DONE]`.

    A stream that ends without `[DONE]` after a finish reason was seen is complete (not every
    compatible API sends the terminator); one that ends before any finish reason raises."""
    finished = False
    async for event in iter_sse(lines):
        if event.done:
            yield SSE_DONE
            return
        if not event.data.strip():  # an empty keep-alive `data:` line
            continue
        if event.event == "error":  # a named error event instead of an `error` key
            parsed = _safe_decode(event.data)
            raise _in_body_error(provider, _dict(parsed).get("error") or parsed or
                                 {"message": event.data[:300].decode("utf-8", "replace")}, secret)
        out, done = fix_chunk(profile, provider, event.data, stats, client_wants_usage=client_wants_usage,
                              secret=secret)
        finished = finished or done
        if out is not None:
            yield out
    if finished:
        yield SSE_DONE
        return
    raise UpstreamError(f"Provider '{provider}' ended the stream without [DONE].")


def _safe_decode(data: bytes) -> Any:
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
