"""Ollama's native chat API: Chat Completions <-> `POST {base}/api/chat` (JSON or NDJSON stream).

Base URL `http://127.0.0.1:11434` unless the provider sets one; a key, when configured (ollama.com
cloud), goes in `Authorization: Bearer`. Ollama's OpenAI-compatible endpoint needs no adapter:
configure a provider of type `openai` with base URL `http://<host>:11434/v1` and the existing
OpenAI adapter serves it (Ollama ignores the key locally). This adapter exists for the native API,
which exposes `thinking`, `keep_alive`, `num_ctx` and accurate token counts on every server version.

Request translation (pure, `to_ollama_request`): system/developer/user/assistant/tool messages keep
their roles (developer -> system); text parts are joined with newlines and base64 image data URLs
become `images` (Ollama takes no remote URLs); assistant tool calls are sent with `arguments` as
an object; tool results carry `tool_name` (from the matching call id) and `tool_call_id`; tools
pass through in OpenAI's function format (`tool_choice: "none"` drops them; Ollama has no forced
tool choice). max_tokens -> `options.num_predict`, temperature/top_p/stop/seed/penalties ->
`options`, response_format -> `format` ("json" or the JSON schema), reasoning_effort -> `think`.
Operator options from `provider.options`: `num_ctx` (int) and `keep_alive` (e.g. "10m").

Response translation: `message.thinking` -> `reasoning_content`; tool calls get their Ollama `id`
or a generated `call_<hex>` and JSON-string arguments; `done_reason` stop/length -> stop/length,
`tool_calls` when the answer has tool calls, anything else (`load`, `unload`) -> stop with the raw
value in `native_finish_reason`. Usage: prompt = `prompt_eval_count`, completion = `eval_count`.
A stream that ends without its `done: true` line, or carries an `{"error": ...}` line, raises
`UpstreamError` mid-iteration.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

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
from dataplane.providers.upstream import (
    MAX_ERROR_BODY,
    decode_json_body,
    iter_lines,
    map_upstream_error,
    post,
    read_all,
    stream_broken,
)
from schemas.errors import InvalidRequest, UpstreamError
from schemas.openai import CompletionUsage

DEFAULT_BASE_URL = "http://127.0.0.1:11434"

_encoder = msgspec.json.Encoder()
_any_decoder = msgspec.json.Decoder()


# --- Ollama response wire shapes (unknown fields tolerated) ---------------------------------------


class OllamaFunction(msgspec.Struct, kw_only=True):
    name: str = ""
    arguments: Any = None


class OllamaToolCall(msgspec.Struct, kw_only=True):
    function: OllamaFunction
    id: str | None = None


class OllamaMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[OllamaToolCall] | None = None


class OllamaChatResponse(msgspec.Struct, kw_only=True):
    model: str = ""
    message: OllamaMessage | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = 0
    eval_count: int = 0
    error: str | None = None


_response_decoder = msgspec.json.Decoder(OllamaChatResponse)


# --- pure mappings --------------------------------------------------------------------------------


def map_done_reason(raw: str | None, has_tool_calls: bool) -> str:
    """Ollama `done_reason` -> OpenAI `finish_reason` (providers.md §1.0)."""
    if raw == "length":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def usage_from_ollama(resp: OllamaChatResponse) -> CompletionUsage:
    """Ollama reports no cache or reasoning split: prompt_eval_count / eval_count as they are."""
    return CompletionUsage(prompt_tokens=resp.prompt_eval_count, completion_tokens=resp.eval_count,
                           total_tokens=resp.prompt_eval_count + resp.eval_count)


def _text_and_images(content: Any) -> tuple[str, list[str]]:
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise InvalidRequest("Message content must be a string or a list of parts.", param="messages")
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            texts.append(part.get("text") or part.get("refusal") or "")
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url", "") if isinstance(image, dict) else str(image or "")
            meta, sep, data = url.partition(",")
            if not (url.startswith("data:image/") and sep and meta.endswith(";base64")):
                raise InvalidRequest("Ollama accepts images only as base64 data URLs.", param="messages")
            images.append(data)
        else:
            raise InvalidRequest(f"Content part type '{kind}' is not supported by Ollama.", param="messages")
    return "\n".join(t for t in texts if t), images


def _message(msg: Any, names: dict[str, str]) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise InvalidRequest("Each message must be an object.", param="messages")
    role = msg.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise InvalidRequest(f"Message role '{role}' is not supported by Ollama.", param="messages")
    text, images = _text_and_images(msg.get("content"))
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
    if images:
        out["images"] = images
    if role == "assistant":
        if isinstance(msg.get("reasoning_content"), str) and msg["reasoning_content"]:
            out["thinking"] = msg["reasoning_content"]
        calls = []
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") or {}
            raw = fn.get("arguments") or "{}"
            try:
                args = _any_decoder.decode(raw) if isinstance(raw, str) else raw
            except msgspec.DecodeError:
                # Agents replay a model's malformed call so it can see its mistake; keep it as text.
                args = {"raw_arguments": raw}
            names[str(call.get("id") or "")] = str(fn.get("name") or "")
            calls.append({"function": {"name": fn.get("name") or "",
                                       "arguments": args if isinstance(args, dict) else {"value": args}}})
        if calls:
            out["tool_calls"] = calls
    if role == "tool":
        call_id = str(msg.get("tool_call_id") or "")
        name = names.get(call_id) or msg.get("name")
        if name:
            out["tool_name"] = name
        if call_id:
            out["tool_call_id"] = call_id
    return out


def _options(body: Mapping[str, Any], provider_options: Mapping[str, str]) -> dict[str, Any]:
    simple = {"temperature": "temperature", "top_p": "top_p", "seed": "seed",
              "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
    options: dict[str, Any] = {o: body[k] for k, o in simple.items() if body.get(k) is not None}
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    stop = body.get("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    num_ctx = provider_options.get("num_ctx", "")
    if num_ctx.isdigit():
        options["num_ctx"] = int(num_ctx)
    return options


def to_ollama_request(body: Mapping[str, Any], model: str, stream: bool,
                      provider_options: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Chat Completions body -> Ollama `/api/chat` body. Pure; raises InvalidRequest for what
    Ollama cannot express (n > 1, remote image URLs, unknown roles or part types)."""
    if (body.get("n") or 1) != 1:
        raise InvalidRequest("Ollama returns a single choice; 'n' must be 1.", param="n")
    names: dict[str, str] = {}
    out: dict[str, Any] = {"model": model, "messages": [_message(m, names) for m in body.get("messages") or []],
                           "stream": stream}
    tools = body.get("tools")
    if tools and body.get("tool_choice") != "none":
        out["tools"] = [{"type": "function", "function": {k: v for k, v in (t.get("function") or {}).items()
                                                          if k in ("name", "description", "parameters")}}
                        for t in tools if isinstance(t, dict) and t.get("type", "function") == "function"]
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["format"] = "json"
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["format"] = (fmt.get("json_schema") or {}).get("schema") or "json"
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        levels = effort in ("low", "medium", "high") and "gpt-oss" in model
        out["think"] = effort if levels else effort != "none"
    options = _options(body, provider_options or {})
    if options:
        out["options"] = options
    if provider_options and provider_options.get("keep_alive"):
        out["keep_alive"] = provider_options["keep_alive"]
    return out


def _tool_call(call: OllamaToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {} if index is None else {"index": index}
    args = call.function.arguments
    text = args if isinstance(args, str) else _encoder.encode(args if args is not None else {}).decode()
    out.update({"id": call.id or "call_" + os.urandom(12).hex(), "type": "function",
                "function": {"name": call.function.name, "arguments": text}})
    return out


def completion_from_ollama(resp: OllamaChatResponse, completion_id: str, created: int,
                           model: str) -> dict[str, Any]:
    """A non-streamed `/api/chat` answer -> `chat.completion` (dict, ready to encode)."""
    msg = resp.message or OllamaMessage()
    message: dict[str, Any] = {"role": "assistant", "content": msg.content, "refusal": None}
    if msg.thinking:
        message["reasoning_content"] = msg.thinking
    if msg.tool_calls:
        message["tool_calls"] = [_tool_call(c) for c in msg.tool_calls]
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": map_done_reason(resp.done_reason, bool(msg.tool_calls)),
              "native_finish_reason": resp.done_reason}
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": msgspec.to_builtins(usage_from_ollama(resp))}


@dataclass(slots=True)
class OllamaStreamTranslator:
    """NDJSON lines -> OpenAI chunk events: role delta on the first line, thinking/content deltas,
    each tool call as a header delta (index, id, name) then its arguments, the finish chunk on the
    `done: true` line (whose counts become `usage`)."""

    completion_id: str
    created: int
    model: str
    started: bool = False
    tool_calls: int = 0
    usage: CompletionUsage | None = None

    def _event(self, delta: dict[str, Any], finish: str | None = None, native: str | None = None) -> bytes:
        return ChunkFramer(self.completion_id, self.created, self.model).delta(0, delta, finish, native)

    def usage_event(self) -> bytes:
        return ChunkFramer(self.completion_id, self.created, self.model).usage(self.usage)

    def feed(self, line: OllamaChatResponse) -> list[bytes]:
        events: list[bytes] = []
        if not self.started:
            self.started = True
            events.append(self._event({"role": "assistant", "content": ""}))
        msg = line.message or OllamaMessage()
        if msg.thinking:
            events.append(self._event({"reasoning_content": msg.thinking}))
        if msg.content:
            events.append(self._event({"content": msg.content}))
        for call in msg.tool_calls or []:
            head = _tool_call(call, self.tool_calls)
            args = head["function"]["arguments"]
            head["function"]["arguments"] = ""
            events.append(self._event({"tool_calls": [head]}))
            events.append(self._event({"tool_calls": [{"index": self.tool_calls, "function": {"arguments": args}}]}))
            self.tool_calls += 1
        if line.done:
            self.usage = usage_from_ollama(line)
            events.append(self._event({}, map_done_reason(line.done_reason, self.tool_calls > 0), line.done_reason))
        return events


# --- IO -------------------------------------------------------------------------------------------


class OllamaProvider:
    """`ChatProvider` for Ollama's native `/api/chat`. Stateless; safe to share across requests."""

    async def _post(self, call: UpstreamCall, stream: bool) -> aiohttp.ClientResponse:
        base = (call.provider.base_url or DEFAULT_BASE_URL).rstrip("/")
        headers = {"Content-Type": "application/json", **call.extra_headers}
        if call.api_key:
            headers["Authorization"] = f"Bearer {call.api_key.reveal()}"
        body = to_ollama_request(call.body, call.model, stream, call.provider.options)
        return await post(call, f"{base}/api/chat", _encoder.encode(body), headers)

    def _line_error(self, call: UpstreamCall, raw: bytes) -> UpstreamError:
        secret = call.api_key.reveal() if call.api_key else None
        err = map_upstream_error(call.provider.name, 500, raw[:MAX_ERROR_BODY], {}, secret)
        return UpstreamError(err.message, status=502)

    async def complete(self, call: UpstreamCall) -> ChatResponse:
        resp = await self._post(call, stream=False)
        raw = await read_all(call, resp)
        parsed = decode_json_body(call, _response_decoder, raw)
        if parsed.error is not None:
            raise self._line_error(call, raw)
        body = completion_from_ollama(parsed, "chatcmpl-" + os.urandom(12).hex(), int(time.time()),
                                      parsed.model or call.model)
        return ChatResponse(_encoder.encode(body), usage_from_openai(usage_from_ollama(parsed)))

    async def stream(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        resp = await self._post(call, stream=True)
        translator = OllamaStreamTranslator("chatcmpl-" + os.urandom(12).hex(), int(time.time()), call.model)
        try:
            async for raw in iter_lines(resp.content, call.provider.name):
                line = raw.strip()
                if not line:
                    continue
                try:
                    parsed = _response_decoder.decode(line)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    raise UpstreamError(f"Provider '{call.provider.name}' sent a stream line that is not "
                                        "valid JSON.") from None
                if parsed.error is not None:
                    raise self._line_error(call, line)
                events = translator.feed(parsed)
                if translator.usage is not None:  # before yielding: the consumer may stop at any event
                    stats.usage = usage_from_openai(translator.usage)
                for event in events:
                    yield event
                if parsed.done:
                    break
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise stream_broken(call, exc) from None
        finally:
            resp.release()
        if translator.usage is None:
            raise UpstreamError(f"Provider '{call.provider.name}' ended the stream before its final line.")
        if call.client_wants_usage:
            yield translator.usage_event()
        yield SSE_DONE
