"""Google Gemini (Generative Language API): Chat Completions <-> `generateContent` over HTTPS + SSE.

Upstream: `POST {base}/{api_version}/models/{model}:generateContent` and
`:streamGenerateContent?alt=sse` (base `https://generativelanguage.googleapis.com`, api_version
`v1beta` unless `provider.options["api_version"]` says otherwise), key in `x-goog-api-key`.
Each SSE `data:` is a whole `GenerateContentResponse`; there is no `[DONE]`, so a stream that ends
before every candidate has a `finishReason` is a truncation and raises `UpstreamError`.

Request translation is pure and lives in `gemini_translate` (`to_gemini_request`).

Response translation: candidates -> choices; `thought: true` parts -> `reasoning_content`;
`functionCall` parts -> `tool_calls` (args serialized as a JSON string); `finishReason` per
`map_finish_reason` with the raw value kept in the extension field `native_finish_reason`; usage
per `usage_from_gemini`. A prompt blocked by `promptFeedback.blockReason` is one empty choice
with `finish_reason: "content_filter"`.

Thought signatures (Gemini 2.5/3 must get them back on the next turn or answer 4xx):
    * a `functionCall` part's signature is carried twice: in the tool call's extension field
      `extra_content.google.thought_signature` (the scheme of Gemini's own OpenAI endpoint) and
      in the tool call id itself, `<id>__ts_<signature in unpadded base64url>`, because most
      OpenAI-shaped clients echo ids verbatim but drop unknown fields. Translating the assistant
      message back, the extension field wins, else the id suffix is decoded (same bytes).
    * a signature on a text part goes to `message.extra_content.google.thought_signature`
      (stream: on the delta) and is restored on the last text part of that model turn; Gemini
      does not enforce those, so clients that drop it lose nothing but reasoning context.
    * ids Gemini issued are used verbatim and sent back as `functionCall.id` /
      `functionResponse.id`; ids we generate (`call_<hex>`) are never sent upstream.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from dataplane.providers.base import (
    SSE_DONE,
    CallStats,
    ChatResponse,
    ChunkFramer,
    UpstreamCall,
    usage_from_openai,
)
from dataplane.providers.gemini_translate import new_call_id, to_gemini_request, tool_call_id
from dataplane.providers.sse import iter_sse
from dataplane.providers.upstream import decode_json_body, iter_lines, map_upstream_error, post, read_all, stream_broken
from schemas.errors import GatewayError, UpstreamError
from schemas.openai import CompletionTokensDetails, CompletionUsage, PromptTokensDetails

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
DEFAULT_API_VERSION = "v1beta"

_encoder = msgspec.json.Encoder()


# --- Gemini response wire shapes (unknown fields tolerated) ---------------------------------------


class GeminiFunctionCall(msgspec.Struct, kw_only=True):
    name: str = ""
    args: dict[str, Any] | None = None
    id: str | None = None


class GeminiPart(msgspec.Struct, kw_only=True, rename="camel"):
    text: str | None = None
    thought: bool = False
    thought_signature: str | None = None
    function_call: GeminiFunctionCall | None = None


class GeminiContent(msgspec.Struct, kw_only=True):
    role: str = "model"
    parts: list[GeminiPart] = msgspec.field(default_factory=list)


class GeminiCandidate(msgspec.Struct, kw_only=True, rename="camel"):
    content: GeminiContent | None = None
    finish_reason: str | None = None
    index: int = 0


class GeminiUsage(msgspec.Struct, kw_only=True, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    cached_content_token_count: int = 0
    thoughts_token_count: int = 0
    tool_use_prompt_token_count: int = 0
    total_token_count: int = 0


class GeminiPromptFeedback(msgspec.Struct, kw_only=True, rename="camel"):
    block_reason: str | None = None


class GeminiStatus(msgspec.Struct, kw_only=True):
    code: int = 500
    message: str = ""
    status: str = ""


class GeminiResponse(msgspec.Struct, kw_only=True, rename="camel"):
    candidates: list[GeminiCandidate] = msgspec.field(default_factory=list)
    usage_metadata: GeminiUsage | None = None
    prompt_feedback: GeminiPromptFeedback | None = None
    model_version: str | None = None
    response_id: str | None = None
    error: GeminiStatus | None = None


_response_decoder = msgspec.json.Decoder(GeminiResponse)


# --- pure mappings -------------------------------------------------------------------------------

_CONTENT_FILTER = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "LANGUAGE", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "MODEL_ARMOR",
})


def map_finish_reason(raw: str | None, has_tool_calls: bool, prompt_blocked: bool = False) -> str:
    """Gemini `finishReason` -> OpenAI `finish_reason` (providers.md §1.0). Everything that is
    neither a normal stop, a length cut nor a filter (MALFORMED_FUNCTION_CALL, OTHER, ...) maps to
    `stop`; callers keep the raw value next to it. A blocked prompt is always `content_filter`."""
    if prompt_blocked:
        return "content_filter"
    if raw == "MAX_TOKENS":
        return "length"
    if raw in _CONTENT_FILTER:
        return "content_filter"
    return "tool_calls" if has_tool_calls and raw in (None, "STOP") else "stop"


def usage_from_gemini(m: GeminiUsage) -> CompletionUsage:
    """`usageMetadata` -> OpenAI usage: prompt includes cached and tool-use prompt tokens;
    completion includes thoughts (Gemini counts candidates without them)."""
    prompt = m.prompt_token_count + m.tool_use_prompt_token_count
    completion = m.candidates_token_count + m.thoughts_token_count
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=m.cached_content_token_count),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=m.thoughts_token_count),
    )


# --- response translation -------------------------------------------------------------------------


def _tool_call(fc: GeminiFunctionCall, signature: str | None, index: int | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {} if index is None else {"index": index}
    call.update({"id": tool_call_id(fc.id or new_call_id(), signature), "type": "function",
                 "function": {"name": fc.name, "arguments": _encoder.encode(fc.args or {}).decode()}})
    if signature:
        call["extra_content"] = {"google": {"thought_signature": signature}}
    return call


def _candidates(resp: GeminiResponse) -> tuple[list[GeminiCandidate], bool]:
    """The candidates, or one empty stand-in carrying `blockReason` when the prompt was blocked."""
    reason = resp.prompt_feedback.block_reason if resp.prompt_feedback else None
    if not resp.candidates and reason:
        return [GeminiCandidate(finish_reason=reason)], True
    return resp.candidates, False


def completion_from_gemini(resp: GeminiResponse, completion_id: str, created: int, model: str) -> dict[str, Any]:
    """A whole `GenerateContentResponse` -> `chat.completion` (dict, ready to encode). Pure
    except for the tool call ids it generates when Gemini sent none."""
    choices: list[dict[str, Any]] = []
    candidates, blocked = _candidates(resp)
    for cand in candidates:
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        text_sig: str | None = None
        for part in cand.content.parts if cand.content else []:
            if part.function_call is not None:
                calls.append(_tool_call(part.function_call, part.thought_signature))
                continue
            (thoughts if part.thought else texts).append(part.text or "")
            text_sig = part.thought_signature or text_sig
        raw = cand.finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None,
                                   "refusal": None}
        if thoughts:
            message["reasoning_content"] = "".join(thoughts)
        if calls:
            message["tool_calls"] = calls
        if text_sig:
            message["extra_content"] = {"google": {"thought_signature": text_sig}}
        choices.append({"index": cand.index, "message": message, "logprobs": None,
                        "finish_reason": map_finish_reason(raw, bool(calls), blocked), "native_finish_reason": raw})
    out: dict[str, Any] = {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                           "choices": choices}
    if resp.usage_metadata is not None:
        out["usage"] = msgspec.to_builtins(usage_from_gemini(resp.usage_metadata))
    return out


@dataclass(slots=True)
class _Choice:
    tool_calls: int = 0
    finished: bool = False


@dataclass(slots=True)
class GeminiStreamTranslator:
    """Gemini stream chunks -> OpenAI chunk events, one `feed` per upstream chunk. Emits the role
    delta first per choice, text / reasoning deltas as they arrive, each function call as a header
    delta (index, id, name) then its arguments, and one finish chunk per choice. `usage` holds the
    latest `usageMetadata` (Gemini repeats the running total on chunks)."""

    completion_id: str
    created: int
    model: str
    usage: CompletionUsage | None = None
    choices: dict[int, _Choice] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return bool(self.choices) and all(c.finished for c in self.choices.values())

    def _event(self, index: int, delta: dict[str, Any], finish: str | None = None,
               native: str | None = None) -> bytes:
        return ChunkFramer(self.completion_id, self.created, self.model).delta(index, delta, finish, native)

    def usage_event(self) -> bytes:
        return ChunkFramer(self.completion_id, self.created, self.model).usage(self.usage)

    def feed(self, chunk: GeminiResponse) -> list[bytes]:
        if chunk.usage_metadata is not None:
            self.usage = usage_from_gemini(chunk.usage_metadata)
        candidates, blocked = _candidates(chunk)
        events: list[bytes] = []
        for cand in candidates:
            state = self.choices.get(cand.index)
            if state is None:
                state = self.choices[cand.index] = _Choice()
                events.append(self._event(cand.index, {"role": "assistant", "content": ""}))
            if state.finished:
                continue
            for part in cand.content.parts if cand.content else []:
                if part.function_call is not None:
                    call = _tool_call(part.function_call, part.thought_signature, state.tool_calls)
                    args = call["function"]["arguments"]
                    call["function"]["arguments"] = ""
                    events.append(self._event(cand.index, {"tool_calls": [call]}))
                    events.append(self._event(cand.index, {"tool_calls": [
                        {"index": state.tool_calls, "function": {"arguments": args}}]}))
                    state.tool_calls += 1
                    continue
                delta: dict[str, Any] = {}
                if part.text:
                    delta["reasoning_content" if part.thought else "content"] = part.text
                if part.thought_signature:
                    delta["extra_content"] = {"google": {"thought_signature": part.thought_signature}}
                if delta:
                    events.append(self._event(cand.index, delta))
            if cand.finish_reason is not None:
                state.finished = True
                finish = map_finish_reason(cand.finish_reason, state.tool_calls > 0, blocked)
                events.append(self._event(cand.index, {}, finish, cand.finish_reason))
        return events


# --- IO ------------------------------------------------------------------------------------------


def map_gemini_error(provider: str, status: int, raw: bytes, headers: Mapping[str, str],
                     secret: str | None) -> GatewayError:
    """Gemini errors -> ours via `map_upstream_error`, plus two Gemini habits: an invalid key is a
    400 `API_KEY_INVALID` (an operator credential problem, so treated as 401), and the retry hint
    of a 429 is `RetryInfo.retryDelay` ("37s") in `error.details`, not a Retry-After header."""
    if status == 400 and (b"API_KEY_INVALID" in raw or b"API key not valid" in raw):
        status = 401
    if status == 429 and not (headers.get("retry-after") or headers.get("Retry-After")):
        match = re.search(rb'"retryDelay"\s*:\s*"([0-9.]+)s"', raw)
        if match:
            headers = {"retry-after": str(math.ceil(float(match.group(1))))}
    return map_upstream_error(provider, status, raw, headers, secret)


class GeminiProvider:
    """`ChatProvider` for the Gemini API. Stateless; safe to share across requests."""

    def _url(self, call: UpstreamCall, stream: bool) -> str:
        base = (call.provider.base_url or DEFAULT_BASE_URL).rstrip("/")
        version = call.provider.options.get("api_version", DEFAULT_API_VERSION)
        model = quote(call.model.removeprefix("models/"), safe="-._~")
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"{base}/{version}/models/{model}:{method}"

    async def _post(self, call: UpstreamCall, stream: bool) -> aiohttp.ClientResponse:
        headers = {"Content-Type": "application/json", **call.extra_headers}
        if call.api_key:
            headers["x-goog-api-key"] = call.api_key.reveal()
        body = _encoder.encode(to_gemini_request({**call.body, "model": call.model}))
        return await post(call, self._url(call, stream), body, headers, map_error=map_gemini_error)

    def _mid_stream_error(self, call: UpstreamCall, status: GeminiStatus, raw: bytes) -> GatewayError:
        secret = call.api_key.reveal() if call.api_key else None
        return map_gemini_error(call.provider.name, status.code or 500, raw, {}, secret)

    async def complete(self, call: UpstreamCall) -> ChatResponse:
        resp = await self._post(call, stream=False)
        raw = await read_all(call, resp)
        parsed = decode_json_body(call, _response_decoder, raw)
        if parsed.error is not None:
            raise self._mid_stream_error(call, parsed.error, raw)
        completion_id = "chatcmpl-" + (parsed.response_id or os.urandom(12).hex())
        body = completion_from_gemini(parsed, completion_id, int(time.time()), parsed.model_version or call.model)
        usage = usage_from_openai(usage_from_gemini(parsed.usage_metadata)) if parsed.usage_metadata else None
        return ChatResponse(_encoder.encode(body), usage)

    async def stream(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        resp = await self._post(call, stream=True)
        translator: GeminiStreamTranslator | None = None
        try:
            async for event in iter_sse(iter_lines(resp.content, call.provider.name)):
                try:
                    chunk = _response_decoder.decode(event.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    raise UpstreamError(f"Provider '{call.provider.name}' sent a stream event that is not "
                                        "valid JSON.") from None
                if chunk.error is not None:
                    raise self._mid_stream_error(call, chunk.error, event.data)
                if translator is None:
                    translator = GeminiStreamTranslator(
                        "chatcmpl-" + (chunk.response_id or os.urandom(12).hex()), int(time.time()),
                        chunk.model_version or call.model)
                events = translator.feed(chunk)
                if translator.usage is not None:  # before yielding: the consumer may stop at any event
                    stats.usage = usage_from_openai(translator.usage)
                for out in events:
                    yield out
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise stream_broken(call, exc) from None
        finally:
            resp.release()
        if translator is None or not translator.finished:
            raise UpstreamError(f"Provider '{call.provider.name}' ended the stream before a finish reason.")
        if call.client_wants_usage and translator.usage is not None:
            yield translator.usage_event()
        yield SSE_DONE
