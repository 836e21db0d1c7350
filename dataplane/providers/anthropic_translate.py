"""Pure translation between OpenAI Chat Completions (our canonical shape) and Anthropic Messages,
for the adapter's direction: a Chat request becomes a Messages request, and a Messages answer (a
body, or a stream of events) becomes a Chat answer. No IO and no clock reads: callers pass
`created`.

The mapping tables (stop reason <-> finish reason, usage in both shapes) live here and are shared
with the `/v1/messages` ingress, which translates the other way.

Lossy by necessity, on purpose:
    * every system/developer message (also mid-conversation) is hoisted into top-level `system`;
    * `reasoning_content` on assistant history is dropped (Anthropic needs a signature to replay
      thinking, and a Chat client has none);
    * redacted thinking and server-tool blocks of an answer have no Chat form and are dropped;
    * `n > 1` and audio input are refused with a 400 naming the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from schemas.anthropic import (
    AnthropicUsage,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    Message,
    MessageDelta,
    MessageStart,
    MessageStop,
    StreamError,
    StreamEvent,
)
from schemas.errors import GatewayError, InvalidRequest, UpstreamError
from schemas.events import Usage

DEFAULT_MAX_TOKENS = 4096
# First API version that rejects temperature/top_p/top_k (reference §0.1).
SAMPLING_REMOVED_IN = "2026-10-21"

STOP_TO_FINISH: Mapping[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",  # a server-tool loop paused; the client resends to continue
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}
FINISH_TO_STOP: Mapping[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Thinking budgets for Chat's `reasoning_effort`; Anthropic's minimum budget is 1024.
EFFORT_BUDGET: Mapping[str, int] = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}

_json = msgspec.json.Encoder()
_any = msgspec.json.Decoder()


def finish_reason(stop_reason: str | None) -> str:
    """Anthropic `stop_reason` -> Chat `finish_reason`; unknown or missing values read as `stop`."""
    return STOP_TO_FINISH.get(stop_reason or "", "stop")


def stop_reason(finish: str | None) -> str:
    """Chat `finish_reason` -> Anthropic `stop_reason`; unknown or missing values read as `end_turn`."""
    return FINISH_TO_STOP.get(finish or "", "end_turn")


def usage_from_anthropic(u: AnthropicUsage) -> Usage:
    """Anthropic usage to ours: Anthropic's `input_tokens` excludes cache reads and writes, ours includes them."""
    cache_read = u.cache_read_input_tokens or 0
    cache_write = u.cache_creation_input_tokens or 0
    return Usage(
        input_tokens=(u.input_tokens or 0) + cache_read + cache_write,
        output_tokens=u.output_tokens or 0,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=u.output_tokens_details.thinking_tokens if u.output_tokens_details else 0,
    )


def merge_usage(base: AnthropicUsage, update: AnthropicUsage | None) -> AnthropicUsage:
    """`message_start` usage overlaid with a `message_delta` usage (whose fields are cumulative)."""
    if update is None:
        return base
    fields = {f: getattr(update, f) for f in update.__struct_fields__ if getattr(update, f) is not None}
    return msgspec.structs.replace(base, **fields)


def chat_usage(u: Usage) -> dict[str, Any]:
    """Ours -> the OpenAI `usage` object (prompt tokens inclusive of cache, completion of reasoning)."""
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens, "cache_write_tokens": u.cache_write_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def anthropic_usage(u: Usage) -> dict[str, int]:
    """Ours -> the Anthropic `usage` object (input tokens exclusive of cache)."""
    return {
        "input_tokens": max(0, u.input_tokens - u.cache_read_tokens - u.cache_write_tokens),
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cache_read_tokens,
    }


def tool_input(arguments: Any) -> dict[str, Any]:
    """A Chat tool call's `arguments` (a JSON string) as an Anthropic `input` object.

    Models sometimes emit truncated JSON (e.g. at max_tokens); refusing the replayed history would
    wedge the agent's session, so invalid or non-object arguments travel as `{"_raw_arguments": s}`.
    """
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = _any.decode(arguments)
    except msgspec.DecodeError:
        return {"_raw_arguments": arguments}
    return parsed if isinstance(parsed, dict) else {"_raw_arguments": arguments}


def parse_data_url(url: str) -> tuple[str, str] | None:
    """`data:<media type>;base64,<data>` -> (media type, data); None for anything else."""
    if not url.startswith("data:"):
        return None
    header, sep, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not sep or encoding != "base64":
        return None
    return media_type or "application/octet-stream", data


# -- Chat request -> Anthropic request -------------------------------------------------------


def _text_block(text: str, part: Mapping[str, Any] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if part is not None and part.get("cache_control") is not None:
        # Cursor sends Anthropic-style cache_control on Chat parts for Claude models; honouring it keeps caching.
        block["cache_control"] = part["cache_control"]
    return block


def _image_block(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise InvalidRequest("An image_url part needs a URL.", param=f"{where}.image_url.url")
    data_url = parse_data_url(url)
    source: dict[str, Any] = (
        {"type": "base64", "media_type": data_url[0], "data": data_url[1]} if data_url else {"type": "url", "url": url}
    )
    if data_url is None and url.startswith("data:"):
        raise InvalidRequest("Image data URLs must be base64 encoded.", param=f"{where}.image_url.url")
    return {"type": "image", "source": source}


def _file_block(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, dict) else None
    parsed = parse_data_url(data) if isinstance(data, str) else None
    if parsed is None:
        raise InvalidRequest("Only inline base64 files (file.file_data) can be sent to Anthropic.",
                             param=f"{where}.file")
    block: dict[str, Any] = {"type": "document", "source": {"type": "base64", "media_type": parsed[0],
                                                           "data": parsed[1]}}
    if isinstance(file, dict) and isinstance(file.get("filename"), str):
        block["title"] = file["filename"]
    return block


def _content_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """Chat message content (string or parts) -> Anthropic blocks. Empty text is dropped:
    Anthropic rejects empty text blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [_text_block(content)] if content else []
    if not isinstance(content, list):
        raise InvalidRequest("Message content must be a string or a list of parts.", param=f"{where}.content")
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal", "input_text", "output_text"):
            text = part.get("text") if kind != "refusal" else part.get("refusal")
            if isinstance(text, str) and text:
                blocks.append(_text_block(text, part))
        elif kind == "image_url":
            blocks.append(_image_block(part, at))
        elif kind == "file":
            blocks.append(_file_block(part, at))
        elif kind in ("image", "document") and isinstance(part, dict):
            blocks.append(dict(part))  # already Anthropic-shaped (Cursor does this for Claude models)
        else:
            raise InvalidRequest(f"Content part type '{kind}' is not supported by Anthropic models.", param=at)
    return blocks


def _tool_result(msg: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest("A tool message needs its tool_call_id.", param=f"{where}.tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content:
        block["content"] = _content_blocks(content, where)
    return block


def _assistant_blocks(msg: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    blocks = _content_blocks(msg.get("content"), where)
    for j, call in enumerate(msg.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest("A tool call needs function.name.", param=f"{where}.tool_calls[{j}].function")
        blocks.append({"type": "tool_use", "id": call.get("id") or f"toolu_{j}", "name": fn["name"],
                       "input": tool_input(fn.get("arguments"))})
    return blocks


def _messages(chat: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, messages). Consecutive same-role turns are merged, so consecutive tool
    results become one user turn, as Anthropic requires."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(chat):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest("Each message must be an object.", param=where)
        role = msg.get("role")
        if role in ("system", "developer"):
            # Anthropic's system prompt holds text only.
            system.extend(b for b in _content_blocks(msg.get("content"), where) if b["type"] == "text")
            continue
        if role == "user":
            turn, blocks = "user", _content_blocks(msg.get("content"), where)
        elif role == "assistant":
            turn, blocks = "assistant", _assistant_blocks(msg, where)
        elif role == "tool":
            turn, blocks = "user", [_tool_result(msg, where)]
        else:
            raise InvalidRequest(f"Message role '{role}' is not supported by Anthropic models.", param=f"{where}.role")
        if not blocks:
            continue  # Anthropic rejects empty turns
        if out and out[-1]["role"] == turn:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": turn, "content": blocks})
    return system, out


def _tools(tools: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest("Only function tools with a name can be sent to Anthropic models.",
                                 param=f"tools[{i}]")
        entry: dict[str, Any] = {"name": fn["name"],
                                 "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
        if fn.get("description"):
            entry["description"] = fn["description"]
        out.append(entry)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice in (None, "auto"):
        out = {"type": "auto"} if parallel is False else None
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise InvalidRequest("tool_choice must be 'auto', 'none', 'required' or a named function.",
                             param="tool_choice")
    if out is not None and parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def to_anthropic_request(body: Mapping[str, Any], *, api_version: str) -> dict[str, Any]:
    """A Chat Completions body -> an Anthropic Messages body for `api_version`.

    Raises InvalidRequest (with `param`) for what Anthropic cannot express. Idempotent and pure.
    """
    chat = body.get("messages")
    if not isinstance(chat, list):
        raise InvalidRequest("messages must be a list.", param="messages")
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise InvalidRequest("Anthropic models return one choice; n must be 1.", param="n")
    system, messages = _messages(chat)
    explicit_max = body.get("max_completion_tokens") or body.get("max_tokens")
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages,
                           "max_tokens": explicit_max or DEFAULT_MAX_TOKENS}
    if system:
        out["system"] = system
    if body.get("stream"):
        out["stream"] = True
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    thinking = _thinking(body.get("reasoning_effort"), explicit_max, out)
    # Thinking is incompatible with temperature/top_k; API versions from 2026-10-21 reject all three.
    if api_version < SAMPLING_REMOVED_IN and not thinking:
        if isinstance(body.get("temperature"), int | float):
            out["temperature"] = min(float(body["temperature"]), 1.0)  # Chat allows 0..2, Anthropic 0..1
        for name in ("top_p", "top_k"):
            if body.get(name) is not None:
                out[name] = body[name]
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    return out


def _thinking(effort: Any, explicit_max: Any, out: dict[str, Any]) -> bool:
    """Map `reasoning_effort` to a thinking budget in `out` (which it updates); True when enabled.
    The budget must stay below `max_tokens`: without a client cap it is added to the default;
    with one, it takes at most half of it (below Anthropic's minimum of 1024, no thinking)."""
    budget = EFFORT_BUDGET.get(effort) if isinstance(effort, str) else None
    if budget is None:
        return False
    if explicit_max:
        budget = min(budget, int(explicit_max) // 2)
        if budget < 1024:
            return False
    else:
        out["max_tokens"] = DEFAULT_MAX_TOKENS + budget
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    return True


# -- Anthropic answer -> Chat answer ---------------------------------------------------------


def to_chat_completion(msg: Message, created: int) -> tuple[dict[str, Any], Usage]:
    """A Messages response -> (Chat `chat.completion` body, normalized usage). Text blocks join
    into `content` (None when there is none); thinking becomes `reasoning_content`."""
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.content:
        if block.type == "text":
            texts.append(block.text or "")
        elif block.type == "thinking":
            thinking.append(block.thinking or "")
        elif block.type == "tool_use":
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": _json.encode(block.input or {}).decode()}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    usage = usage_from_anthropic(msg.usage)
    body = {
        "id": msg.id,
        "object": "chat.completion",
        "created": created,
        "model": msg.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(msg.stop_reason),
                     "logprobs": None}],
        "usage": chat_usage(usage),
    }
    return body, usage


def stream_error(provider: str, event: StreamError) -> GatewayError:
    """An `event: error` inside a stream -> the UpstreamError that ends the client's stream."""
    kind, text = event.error.type, event.error.message[:300]
    status = 503 if kind == "overloaded_error" else 502
    return UpstreamError(f"Provider '{provider}' stream failed: {kind}: {text}", status=status,
                         code="upstream_overloaded" if status == 503 else "upstream_stream_error")


class ChatStreamTranslator:
    """Sans-IO: Anthropic stream events in, Chat Completions SSE events (`data: ...\\n\\n`) out.

    Feed events in arrival order. Text -> `delta.content`, thinking -> `delta.reasoning_content`,
    each tool_use block -> one tool call (`index` counts tool calls; id and name on the first
    fragment, then `arguments` fragments). `message_stop` yields the finish chunk, the usage-only
    chunk (only when `wants_usage`) and `[DONE]`, and sets `done`. `usage` is current after every
    event, so a broken stream still reports what was consumed. `event: error` raises UpstreamError.
    """

    def __init__(self, provider: str, created: int, *, wants_usage: bool) -> None:
        self.provider = provider
        self.created = created
        self.wants_usage = wants_usage
        self.done = False
        self.usage: Usage | None = None
        self._id = ""
        self._model = ""
        self._raw_usage = AnthropicUsage()
        self._stop: str | None = None
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._args_seen: set[int] = set()

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload = {"id": self._id, "object": "chat.completion.chunk", "created": self.created, "model": self._model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return b"data: " + _json.encode(payload) + b"\n\n"

    def _tool_delta(self, call: int, fn: dict[str, Any], head: dict[str, Any] | None = None) -> bytes:
        return self._chunk({"tool_calls": [{"index": call, **(head or {}), "function": fn}]})

    def feed(self, event: StreamEvent) -> list[bytes]:
        if isinstance(event, ContentBlockDelta):
            return self._delta(event)
        if isinstance(event, MessageStart):
            self._id, self._model = event.message.id, event.message.model
            self._raw_usage = event.message.usage
            self.usage = usage_from_anthropic(self._raw_usage)
            return [self._chunk({"role": "assistant", "content": ""})]
        if isinstance(event, ContentBlockStart):
            block = event.content_block
            if block.type == "text" and block.text:
                return [self._chunk({"content": block.text})]
            if block.type == "tool_use":
                call = self._tools[event.index] = len(self._tools)
                return [self._tool_delta(call, {"name": block.name, "arguments": ""},
                                         {"id": block.id, "type": "function"})]
            return []
        if isinstance(event, ContentBlockStop):
            open_call = self._tools.get(event.index)
            if open_call is not None and event.index not in self._args_seen:
                return [self._tool_delta(open_call, {"arguments": "{}"})]  # a tool called with no input
            return []
        if isinstance(event, MessageDelta):
            self._stop = event.delta.stop_reason or self._stop
            self._raw_usage = merge_usage(self._raw_usage, event.usage)
            self.usage = usage_from_anthropic(self._raw_usage)
            return []
        if isinstance(event, MessageStop):
            self.done = True
            out = [self._chunk({}, finish_reason(self._stop))]
            if self.wants_usage and self.usage is not None:
                payload = {"id": self._id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self._model, "choices": [], "usage": chat_usage(self.usage)}
                out.append(b"data: " + _json.encode(payload) + b"\n\n")
            out.append(b"data: [DONE]\n\n")
            return out
        if isinstance(event, StreamError):
            raise stream_error(self.provider, event)
        return []  # ping

    def _delta(self, event: ContentBlockDelta) -> list[bytes]:
        delta = event.delta
        if delta.type == "text_delta" and delta.text:
            return [self._chunk({"content": delta.text})]
        if delta.type == "thinking_delta" and delta.thinking:
            return [self._chunk({"reasoning_content": delta.thinking})]
        if delta.type == "input_json_delta" and delta.partial_json:
            call = self._tools.get(event.index)
            if call is None:
                return []
            self._args_seen.add(event.index)
            return [self._tool_delta(call, {"arguments": delta.partial_json})]
        return []  # signature_delta, citations_delta: no Chat form
