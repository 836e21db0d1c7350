"""AWS Bedrock via the Converse API: `POST {endpoint}/model/{modelId}/converse` and
`/converse-stream` (binary `application/vnd.amazon.eventstream`), translated to and from OpenAI
Chat Completions.

Provider configuration:
    base_url             optional; overrides `https://bedrock-runtime.{region}.amazonaws.com`
                         (VPC endpoints, tests)
    options["region"]    signing region and default endpoint region; default `us-east-1`
    options["auth"]      `bearer` (Bedrock API key) or `sigv4`; when absent a key without `:` is
                         a Bedrock API key and a key with `:` holds IAM credentials
    api key              a Bedrock API key (`Authorization: Bearer <key>`), or IAM credentials
                         `ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]` signed with SigV4
                         (service `bedrock`)

The model id is percent-encoded into the path (inference-profile ARNs contain `:` and `/`) and
sent exactly as signed. Translation rules live in the functions below; what OpenAI has and
Converse does not (`n > 1`, remote image URLs, audio/file parts) is rejected with a 400, and
unmodelled sampling parameters (`seed`, `response_format`, ...) are dropped. Replayed tool-call
arguments that are not a JSON object are sent as `{"raw_arguments": "<text>"}`. Reasoning text is
surfaced as `reasoning_content`. Client `extra_headers` are forwarded unsigned and never
override the signed ones.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from dataplane.providers.aws_sigv4 import AwsCredentials, sign_request
from dataplane.providers.base import SSE_DONE, CallStats, ChatResponse, UpstreamCall, sse_event
from dataplane.providers.eventstream import EventMessage, EventStreamDecoder, EventStreamError
from dataplane.providers.upstream import map_upstream_error, post, provider_message, read_all, stream_broken
from schemas.errors import GatewayError, InvalidRequest, NotFound, RateLimited, UpstreamError
from schemas.events import Usage

DEFAULT_REGION = "us-east-1"
SIGNING_SERVICE = "bedrock"

STOP_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

# AWS error/exception name (lower-cased) -> how the gateway surfaces it. HTTP errors name it in
# `x-amzn-ErrorType` (`ThrottlingException:http://...`), stream frames in `:exception-type`.
_ERRORS: dict[str, str] = {
    "throttlingexception": "rate",
    "servicequotaexceededexception": "rate",
    "validationexception": "invalid",
    "accessdeniedexception": "auth",
    "unrecognizedclientexception": "auth",
    "invalidsignatureexception": "auth",
    "expiredtokenexception": "auth",
    "incompletesignatureexception": "auth",
    "resourcenotfoundexception": "not_found",
    "modelnotreadyexception": "overloaded",
    "serviceunavailableexception": "overloaded",
    "modeltimeoutexception": "timeout",
    "internalserverexception": "upstream",
    "modelerrorexception": "upstream",
    "modelstreamerrorexception": "upstream",
}

_REGION_RE = re.compile(r"^[a-z0-9-]{2,32}$")
_IMAGE_RE = re.compile(r"^data:image/(png|jpeg|jpg|gif|webp);base64,(.+)$", re.S)
_json = msgspec.json.Encoder()
_any_decoder = msgspec.json.Decoder()


class _TokenUsage(msgspec.Struct, rename="camel", kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0


class _OutputMessage(msgspec.Struct, kw_only=True):
    content: list[dict[str, Any]] = msgspec.field(default_factory=list)


class _Output(msgspec.Struct, kw_only=True):
    message: _OutputMessage | None = None


class _ConverseResponse(msgspec.Struct, rename="camel", kw_only=True):
    output: _Output = msgspec.field(default_factory=_Output)
    stop_reason: str = "end_turn"
    usage: _TokenUsage | None = None


_response_decoder = msgspec.json.Decoder(_ConverseResponse)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def finish_reason(stop_reason: str) -> str:
    """Converse `stopReason` -> OpenAI `finish_reason`; unknown values (malformed_model_output,
    malformed_tool_use, future ones) become `stop`."""
    return STOP_REASONS.get(stop_reason, "stop")


def usage_of(u: _TokenUsage) -> tuple[Usage, dict[str, Any]]:
    """(our Usage, OpenAI `usage` object). Bedrock's `inputTokens` excludes cache reads/writes."""
    prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_write_input_tokens
    ours = Usage(input_tokens=prompt, output_tokens=u.output_tokens, cache_read_tokens=u.cache_read_input_tokens,
                 cache_write_tokens=u.cache_write_input_tokens)
    openai = {
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cache_read_input_tokens,
                                  "cache_write_tokens": u.cache_write_input_tokens},
    }
    return ours, openai


# -- Chat Completions -> Converse ---------------------------------------------------------------


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="messages", code="unsupported_for_provider")


def _text_parts(content: Any, role: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise _bad(f"Bedrock accepts only text content in {role} messages.")
            out.append(str(part.get("text") or ""))
        return out
    raise _bad(f"Unsupported content in a {role} message.")


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return [{"text": t} for t in _text_parts(content, "user") if t]
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            if part.get("text"):
                blocks.append({"text": str(part["text"])})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            m = _IMAGE_RE.match(url) if isinstance(url, str) else None
            if m is None:
                raise _bad("Bedrock needs images inline as base64 data URLs (png, jpeg, gif or webp).")
            fmt = "jpeg" if m[1] == "jpg" else m[1]
            blocks.append({"image": {"format": fmt, "source": {"bytes": m[2]}}})
        else:
            raise _bad(f"Bedrock does not support '{kind}' content parts.")
    return blocks


def _assistant_blocks(msg: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"text": t} for t in _text_parts(msg.get("content"), "assistant") if t.strip()]
    for call in msg.get("tool_calls") or []:
        if not isinstance(call, dict) or not isinstance(fn := call.get("function"), dict):
            raise InvalidRequest("Each tool call needs a 'function' object.", param="messages")
        args = fn.get("arguments") or "{}"
        try:
            parsed = _any_decoder.decode(args) if isinstance(args, str) else args
        except msgspec.DecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            # Models do emit malformed arguments and agents replay them; rejecting the replay would
            # wedge the conversation, and Converse (Claude) needs an object, so wrap the text.
            parsed = {"raw_arguments": args if isinstance(args, str) else _json.encode(args).decode()}
        blocks.append({"toolUse": {"toolUseId": str(call.get("id") or ""), "name": str(fn.get("name") or ""),
                                   "input": parsed}})
    return blocks


def _tool_result(msg: dict[str, Any]) -> dict[str, Any]:
    content = msg.get("content")
    items: list[dict[str, Any]]
    if isinstance(content, dict):
        items = [{"json": content}]
    else:
        items = [{"text": t} for t in _text_parts(content, "tool")] or [{"text": ""}]
    return {"toolResult": {"toolUseId": str(msg.get("tool_call_id") or ""), "content": items}}


def _tool_config(body: dict[str, Any], has_tool_blocks: bool) -> dict[str, Any] | None:
    tools = [
        {"toolSpec": {
            "name": fn.get("name"),
            **({"description": fn["description"]} if fn.get("description") else {}),
            "inputSchema": {"json": fn.get("parameters") or {"type": "object", "properties": {}}},
        }}
        for t in body.get("tools") or []
        if isinstance(t, dict) and isinstance(fn := t.get("function"), dict)
    ]
    if not tools:
        return None
    choice = body.get("tool_choice")
    if choice == "none":
        # Converse has no "none"; tools stay only when the history needs a toolConfig.
        return {"tools": tools} if has_tool_blocks else None
    config: dict[str, Any] = {"tools": tools}
    if choice == "auto":
        config["toolChoice"] = {"auto": {}}
    elif choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        config["toolChoice"] = {"tool": {"name": choice["function"].get("name")}}
    return config


def to_converse(body: dict[str, Any]) -> dict[str, Any]:
    """A Chat Completions request body -> a Converse request body (without the model id).

    system/developer messages -> `system`; consecutive messages of the same Converse role are
    merged into one turn (so consecutive tool results become one user turn); empty text blocks
    are dropped (Converse rejects blank text). Raises InvalidRequest for what Converse cannot
    express."""
    if isinstance(body.get("n"), int) and body["n"] > 1:
        raise InvalidRequest("Bedrock does not support n > 1.", param="n", code="unsupported_for_provider")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be a list.", param="messages")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    has_tool_blocks = False
    for msg in messages:
        if not isinstance(msg, dict):
            raise InvalidRequest("Each message must be an object.", param="messages")
        role = msg.get("role")
        if role in ("system", "developer"):
            system.extend({"text": t} for t in _text_parts(msg.get("content"), str(role)) if t)
            continue
        if role == "user":
            conv_role, blocks = "user", _user_blocks(msg.get("content"))
        elif role == "assistant":
            conv_role, blocks = "assistant", _assistant_blocks(msg)
        elif role in ("tool", "function"):
            conv_role, blocks = "user", [_tool_result(msg)]
        else:
            raise InvalidRequest(f"Unknown message role '{role}'.", param="messages")
        has_tool_blocks = has_tool_blocks or any("toolUse" in b or "toolResult" in b for b in blocks)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == conv_role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": conv_role, "content": blocks})
    out: dict[str, Any] = {"messages": turns}
    if system:
        out["system"] = system
    inference: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        inference["maxTokens"] = max_tokens
    if body.get("temperature") is not None:
        inference["temperature"] = body["temperature"]
    if body.get("top_p") is not None:
        inference["topP"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        inference["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if inference:
        out["inferenceConfig"] = inference
    tool_config = _tool_config(body, has_tool_blocks)
    if tool_config is not None:
        out["toolConfig"] = tool_config
    return out


# -- Converse -> Chat Completions ---------------------------------------------------------------


def from_converse(raw: bytes, *, provider: str, completion_id: str, created: int,
                  model: str) -> tuple[bytes, Usage | None]:
    """A Converse response body -> (`chat.completion` JSON, usage). Text blocks are joined
    without a separator, toolUse blocks become `tool_calls` (input re-encoded as JSON text).
    Raises UpstreamError when the body is not a Converse response."""
    try:
        parsed = _response_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError(f"Provider '{provider}' returned a body that is not a Converse response.") from None
    texts: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in parsed.output.message.content if parsed.output.message else []:
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(tool := block.get("toolUse"), dict):
            tool_calls.append({"id": tool.get("toolUseId", ""), "type": "function",
                               "function": {"name": tool.get("name", ""),
                                            "arguments": _json.encode(tool.get("input", {})).decode()}})
        elif isinstance(rc := block.get("reasoningContent"), dict):
            text = (rc.get("reasoningText") or {}).get("text")
            if isinstance(text, str):
                reasoning.append(text)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if tool_calls:
        message["tool_calls"] = tool_calls
    out: dict[str, Any] = {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(parsed.stop_reason),
                     "logprobs": None}],
    }
    usage: Usage | None = None
    if parsed.usage is not None:
        usage, out["usage"] = usage_of(parsed.usage)
    return _json.encode(out), usage


class ConverseStreamTranslator:
    """Sans-IO: decoded ConverseStream messages in, OpenAI chunk SSE events out.

    The role chunk is held back until the first content, so an exception frame that arrives
    before any content raises before anything was yielded (a pre-stream failure). Exception
    and error frames raise the mapped GatewayError. `usage` is set when `metadata` arrives; the
    usage-only chunk is emitted only with `include_usage`. `finish` raises if the stream ended
    without `messageStop`.
    """

    def __init__(self, *, provider: str, completion_id: str, created: int, model: str,
                 include_usage: bool) -> None:
        self.provider = provider
        self.include_usage = include_usage
        self.usage: Usage | None = None
        self._prefix = _json.encode({"id": completion_id, "object": "chat.completion.chunk",
                                     "created": created, "model": model})[:-1]
        self._role_sent = False
        self._stopped = False
        self._tools: dict[int, int] = {}  # Converse content block index -> OpenAI tool index
        self._tool_args_seen: set[int] = set()

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> list[bytes]:
        out: list[bytes] = []
        if not self._role_sent:
            self._role_sent = True
            out.append(self._event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]))
        out.append(self._event([{"index": 0, "delta": delta, "finish_reason": finish}]))
        return out

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        tail: dict[str, Any] = {"choices": choices}
        if usage is not None:
            tail["usage"] = usage
        return sse_event(self._prefix + b"," + _json.encode(tail)[1:])

    def _tool_start(self, block: int, tool_id: str, name: str) -> list[bytes]:
        index = self._tools[block] = len(self._tools)
        return self._chunk({"tool_calls": [{"index": index, "id": tool_id, "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})

    def on_message(self, msg: EventMessage) -> list[bytes]:
        kind = msg.message_type
        if kind == "exception":
            raise stream_exception(self.provider, msg.exception_type or "", msg.payload)
        if kind == "error":
            code = msg.header(":error-code") or "error"
            raise UpstreamError(f"Provider '{self.provider}' stream failed: {code}.")
        try:
            data = _any_decoder.decode(msg.payload) if msg.payload else {}
        except msgspec.DecodeError:
            raise UpstreamError(f"Provider '{self.provider}' sent an undecodable stream event.") from None
        if not isinstance(data, dict):
            return []
        event = msg.event_type
        block = data.get("contentBlockIndex", 0)
        if event == "contentBlockStart":
            tool = _obj(data.get("start")).get("toolUse")
            if isinstance(tool, dict) and block not in self._tools:
                return self._tool_start(block, str(tool.get("toolUseId", "")), str(tool.get("name", "")))
        elif event == "contentBlockDelta":
            delta = _obj(data.get("delta"))
            if isinstance(delta.get("text"), str):
                return self._chunk({"content": delta["text"]}) if delta["text"] else []
            if isinstance(tool := delta.get("toolUse"), dict):
                out = [] if block in self._tools else self._tool_start(block, f"call_{block}", "")
                fragment = str(tool.get("input") or "")
                if fragment:
                    self._tool_args_seen.add(block)
                    out += self._chunk({"tool_calls": [{"index": self._tools[block],
                                                        "function": {"arguments": fragment}}]})
                return out
            if isinstance(rc := delta.get("reasoningContent"), dict) and isinstance(rc.get("text"), str):
                return self._chunk({"reasoning_content": rc["text"]})
        elif event == "contentBlockStop":
            if block in self._tools and block not in self._tool_args_seen:
                self._tool_args_seen.add(block)  # a tool without arguments: `{}` as non-streaming says
                return self._chunk({"tool_calls": [{"index": self._tools[block], "function": {"arguments": "{}"}}]})
        elif event == "messageStop":
            self._stopped = True
            return self._chunk({}, finish_reason(str(data.get("stopReason", "end_turn"))))
        elif event == "metadata" and isinstance(data.get("usage"), dict):
            try:
                usage, openai = usage_of(msgspec.convert(data["usage"], _TokenUsage))
            except msgspec.ValidationError:
                return []
            self.usage = usage
            return [self._event([], openai)] if self.include_usage else []
        return []

    def finish(self) -> list[bytes]:
        if not self._stopped:
            raise UpstreamError(f"Provider '{self.provider}' ended the stream before messageStop.")
        return [SSE_DONE]


# -- errors ------------------------------------------------------------------------------------


def bedrock_error(provider: str, error_type: str, text: str,
                  headers: Mapping[str, str] | None = None) -> GatewayError | None:
    """The GatewayError for an AWS error name (`ThrottlingException`, `throttlingException`,
    `ThrottlingException:http://...`) carrying the client-facing `text`; None when the name is
    unknown. Credential failures never carry the provider's text."""
    kind = _ERRORS.get(error_type.split(":", 1)[0].strip().lower())
    if kind == "rate":
        retry = (headers or {}).get("retry-after")
        return RateLimited(text, code="upstream_rate_limited", headers={"Retry-After": retry} if retry else None)
    if kind == "invalid":
        return InvalidRequest(text, code="upstream_invalid_request")
    if kind == "auth":
        return UpstreamError(f"Provider '{provider}' rejected the gateway's provider credentials.",
                             status=502, code="upstream_auth_error")
    if kind == "not_found":
        return NotFound(text, param="model")
    if kind == "overloaded":
        return UpstreamError(text, status=503, code="upstream_overloaded")
    if kind == "timeout":
        return UpstreamError(text, status=504, code="upstream_timeout")
    if kind == "upstream":
        return UpstreamError(text, status=502)
    return None


def _masked(raw: bytes, secret: str | None) -> bytes:
    # IAM keys are stored as `AKID:SECRET[:TOKEN]`; mask every part, not only the whole string.
    for part in (secret or "").split(":"):
        if len(part) >= 8:
            raw = raw.replace(part.encode(), b"***")
    return raw


def map_bedrock_error(provider: str, status: int, raw: bytes, headers: Mapping[str, str],
                      secret: str | None) -> GatewayError:
    """`upstream.ErrorMapper` for Bedrock: the `x-amzn-ErrorType` header (or a JSON `__type`)
    decides; unknown names fall back to the shared status table."""
    raw = _masked(raw, secret)
    error_type = headers.get("x-amzn-ErrorType") or headers.get("x-amzn-errortype") or ""
    if not error_type:
        try:
            parsed = _any_decoder.decode(raw)
        except msgspec.DecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("__type"), str):
            error_type = parsed["__type"].rsplit("#", 1)[-1]
    text = f"Provider '{provider}' returned {status}: {provider_message(raw, secret)}"
    mapped = bedrock_error(provider, error_type, text, headers)
    return mapped or map_upstream_error(provider, status, raw, headers, secret)


def stream_exception(provider: str, exception_type: str, payload: bytes) -> GatewayError:
    """The GatewayError for an exception frame (`:message-type` = `exception`); unknown
    exception names are a 502."""
    message = provider_message(payload) if payload else "no details"
    text = f"Provider '{provider}' stream failed with {exception_type or 'an exception'}: {message}"
    return bedrock_error(provider, exception_type, text) or UpstreamError(text)


# -- the adapter -------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


class BedrockProvider:
    """`ChatProvider` for Bedrock Converse. Stateless apart from the injectable clock."""

    def __init__(self, clock: Callable[[], datetime] = _utc_now) -> None:
        self._clock = clock

    def _url(self, call: UpstreamCall, action: str) -> str:
        region = call.provider.options.get("region") or DEFAULT_REGION
        if not _REGION_RE.match(region):
            raise UpstreamError(f"Provider '{call.provider.name}' has an invalid region option.",
                                code="provider_misconfigured")
        base = call.provider.base_url.rstrip("/") or f"https://bedrock-runtime.{region}.amazonaws.com"
        return f"{base}/model/{quote(call.model, safe='')}/{action}"

    def _headers(self, call: UpstreamCall, url: str, body: bytes, accept: str) -> dict[str, str]:
        """Auth headers (bearer, or SigV4 over exactly `url` and `body`) plus unsigned extras."""
        if not call.api_key:
            raise UpstreamError(f"Provider '{call.provider.name}' has no credentials configured.",
                                code="upstream_auth_error")
        key = call.api_key.reveal()
        base = {"Content-Type": "application/json", "Accept": accept}
        mode = call.provider.options.get("auth")
        if mode == "bearer" or (mode != "sigv4" and ":" not in key):
            ours = {**base, "Authorization": f"Bearer {key}"}
        else:
            try:
                creds = AwsCredentials.parse(key)
            except ValueError as exc:
                raise UpstreamError(f"Provider '{call.provider.name}': {exc}", code="upstream_auth_error") from None
            region = call.provider.options.get("region") or DEFAULT_REGION
            ours = sign_request(method="POST", url=url, headers=base, body=body, credentials=creds,
                                region=region, service=SIGNING_SERVICE, now=self._clock())
        taken = {k.lower() for k in ours}
        return {**{k: v for k, v in call.extra_headers.items() if k.lower() not in taken}, **ours}

    async def _post(self, call: UpstreamCall, action: str, accept: str) -> aiohttp.ClientResponse:
        url = self._url(call, action)
        body = _json.encode(to_converse(call.body))
        headers = self._headers(call, url, body, accept)
        # `encoded=True` keeps `%3A` in the path exactly as signed (yarl would otherwise decode it).
        wire = URL(url, encoded=True)  # keep %3A/%2F exactly as signed; yarl would decode a str
        return await post(call, wire, body, headers, map_error=map_bedrock_error)

    def _ids(self) -> tuple[str, int]:
        return "chatcmpl-" + os.urandom(12).hex(), int(time.time())

    async def complete(self, call: UpstreamCall) -> ChatResponse:
        resp = await self._post(call, "converse", "application/json")
        raw = await read_all(call, resp)
        completion_id, created = self._ids()
        body, usage = from_converse(raw, provider=call.provider.name, completion_id=completion_id,
                                    created=created, model=call.model)
        return ChatResponse(body, usage)

    async def stream(self, call: UpstreamCall, stats: CallStats) -> AsyncGenerator[bytes, None]:
        resp = await self._post(call, "converse-stream", "application/vnd.amazon.eventstream")
        completion_id, created = self._ids()
        translator = ConverseStreamTranslator(provider=call.provider.name, completion_id=completion_id,
                                              created=created, model=call.model,
                                              include_usage=call.client_wants_usage)
        decoder = EventStreamDecoder()
        try:
            async for data in resp.content.iter_any():
                for message in decoder.feed(data):
                    for event in translator.on_message(message):
                        yield event
                    if translator.usage is not None:
                        stats.usage = translator.usage
            decoder.close()
        except EventStreamError:
            raise UpstreamError(f"Provider '{call.provider.name}' sent a truncated or corrupt event stream.") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise stream_broken(call, exc) from None
        finally:
            resp.release()
        for event in translator.finish():
            yield event
