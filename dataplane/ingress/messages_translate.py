"""Pure translation for the `/v1/messages` ingress: an Anthropic Messages request becomes a Chat
Completions body, and a Chat answer (a body, or a stream of chunks) becomes Anthropic's.

The request translation runs for every request, also those later sent natively to Anthropic, so
it never refuses a valid Anthropic request: what Chat cannot express is dropped, never an error.
Only what Anthropic itself would reject (a malformed known block) raises InvalidRequest, with the
block's path in `param`.

Dropped or approximated on the way to Chat:
    * `cache_control` everywhere; `top_k`; `metadata`; `service_tier`; `context_management`;
    * thinking / redacted_thinking blocks in assistant history (only Anthropic can verify them);
    * server tools (`web_search_*`, `bash_*`, ...) and their blocks; documents that are not
      inline PDF or text; images by `file_id`;
    * `thinking: {type: enabled, budget_tokens}` becomes `reasoning_effort` by budget; adaptive
      thinking and `output_config.effort` are not mapped (non-reasoning models reject the field).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from dataplane.providers.anthropic_translate import anthropic_usage, stop_reason, tool_input
from dataplane.providers.sse import format_sse
from schemas.anthropic import (
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    ToolDef,
    ToolResultBlock,
    ToolUseBlock,
)
from schemas.errors import InvalidRequest, UpstreamError
from schemas.events import Usage

_json = msgspec.json.Encoder()

_BLOCKS: dict[str, type[msgspec.Struct]] = {
    "text": TextBlock, "image": ImageBlock, "document": DocumentBlock, "tool_use": ToolUseBlock,
    "tool_result": ToolResultBlock, "thinking": ThinkingBlock,
}


def _block(raw: Any, where: str) -> msgspec.Struct | None:
    """A known block as its Struct (400 if malformed, like Anthropic); None for other block types."""
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise InvalidRequest("Each content block must be an object with a 'type'.", param=where)
    schema = _BLOCKS.get(raw["type"])
    if schema is None:
        return None
    try:
        return msgspec.convert(raw, schema)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"Invalid {raw['type']} block: {str(exc).split(' - at')[0]}.", param=where) from None


def _blocks(content: str | list[dict[str, Any]] | None, where: str) -> list[msgspec.Struct]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextBlock(text=content)] if content else []
    out = []
    for i, raw in enumerate(content):
        block = _block(raw, f"{where}.content[{i}]")
        if block is not None:
            out.append(block)
    return out


def _media_part(block: msgspec.Struct) -> dict[str, Any] | None:
    """An image or document block as a Chat part; None when Chat has no form for its source."""
    if isinstance(block, ImageBlock):
        src = block.source
        if src.type == "base64" and src.data:
            return {"type": "image_url", "image_url": {"url": f"data:{src.media_type};base64,{src.data}"}}
        if src.type == "url" and src.url:
            return {"type": "image_url", "image_url": {"url": src.url}}
    elif isinstance(block, DocumentBlock):
        src = block.source
        if src.type == "base64" and src.data:
            return {"type": "file", "file": {"filename": block.title or "document.pdf",
                                             "file_data": f"data:{src.media_type};base64,{src.data}"}}
        if src.type == "text" and src.data:
            return {"type": "text", "text": src.data}
    return None


def _chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    # Text-only content goes as a string: several OpenAI-compatible providers accept nothing else.
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _user_turn(content: str | list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """A user turn -> `tool` messages for its tool results (first, as Chat requires them right
    after the assistant's calls), then one user message for the rest."""
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in _blocks(content, where):
        if isinstance(block, TextBlock):
            if block.text:
                parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ToolResultBlock):
            texts: list[str] = []
            for inner in _blocks(block.content, where):
                if isinstance(inner, TextBlock):
                    texts.append(inner.text)
                elif (media := _media_part(inner)) is not None:
                    parts.append(media)  # Chat tool messages carry text only; the image follows as user content
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": "\n".join(texts)})
        elif (media := _media_part(block)) is not None:
            parts.append(media)
    if parts:
        out.append({"role": "user", "content": _chat_content(parts)})
    return out


def _assistant_turn(content: str | list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in _blocks(content, where):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": _json.encode(block.input).decode()}})
    if not texts and not calls:
        return []
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        msg["tool_calls"] = calls
    return [msg]


def system_text(system: str | list[dict[str, Any]] | None, where: str = "system") -> str:
    """A system prompt (string or text blocks) as one string; blocks join with a blank line."""
    return "\n\n".join(b.text for b in _blocks(system, where) if isinstance(b, TextBlock) and b.text)


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for i, raw in enumerate(tools or []):
        try:
            tool = msgspec.convert(raw, ToolDef)
        except msgspec.ValidationError:
            if isinstance(raw, dict) and isinstance(raw.get("type"), str):
                continue  # a server tool (web_search_20250305, ...): it runs at Anthropic only
            raise InvalidRequest("Each tool needs a name and an input_schema.", param=f"tools[{i}]") from None
        if tool.type not in (None, "custom"):
            continue
        fn: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema or {"type": "object"}}
        if tool.description:
            fn["description"] = tool.description
        out.append({"type": "function", "function": fn})
    return out


def to_chat_request(req: MessagesRequest) -> dict[str, Any]:
    """A validated Messages request -> a Chat Completions body. Pure; see the module docstring for
    what is dropped."""
    messages: list[dict[str, Any]] = []
    system = system_text(req.system)
    if system:
        messages.append({"role": "system", "content": system})
    for i, msg in enumerate(req.messages):
        where = f"messages[{i}]"
        if msg.role == "system":  # Claude Code sends these mid-conversation
            text = system_text(msg.content, where)
            if text:
                messages.append({"role": "system", "content": text})
        elif msg.role == "user":
            messages.extend(_user_turn(msg.content, where))
        else:
            messages.extend(_assistant_turn(msg.content, where))
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens}
    if req.stream:
        body["stream"] = True
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    for name in ("temperature", "top_p"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    tools = _tools(req.tools)
    if tools:
        body["tools"] = tools
        choice = req.tool_choice
        if choice is not None:
            if choice.type == "tool" and choice.name:
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type, "auto")
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
    thinking = req.thinking or {}
    budget = thinking.get("budget_tokens")
    if thinking.get("type") == "enabled" and isinstance(budget, int):
        body["reasoning_effort"] = "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    fmt = (req.output_config or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}
    return body


# -- Chat answer -> Anthropic answer ---------------------------------------------------------


class _Fn(msgspec.Struct, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct, kw_only=True):
    index: int = 0
    id: str | None = None
    function: _Fn = msgspec.field(default_factory=_Fn)


class _Message(msgspec.Struct, kw_only=True):
    """A Chat `message` or stream `delta`. `content` is a list for some providers (Mistral)."""

    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text") or "" for p in self.content if p.get("type") == "text")
        return self.content or ""


class _Choice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None


class _CompletionDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int | None = None


class _ChatUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None

    def normalized(self) -> Usage:
        p = self.prompt_tokens_details or _PromptDetails()
        c = self.completion_tokens_details or _CompletionDetails()
        return Usage(input_tokens=self.prompt_tokens, output_tokens=self.completion_tokens,
                     cache_read_tokens=p.cached_tokens or 0, cache_write_tokens=p.cache_write_tokens or 0,
                     reasoning_tokens=c.reasoning_tokens or 0)


class ChatAnswer(msgspec.Struct, kw_only=True):
    """A `chat.completion` or a `chat.completion.chunk` (or an OpenAI-style `{"error": ...}`)."""

    id: str = ""
    model: str = ""
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _ChatUsage | None = None
    error: dict[str, Any] | None = None


_chat_decoder = msgspec.json.Decoder(ChatAnswer)


def decode_chat(raw: bytes) -> ChatAnswer:
    try:
        return _chat_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError("The provider's answer could not be read as a chat completion.") from None


def message_id(chat_id: str) -> str:
    return chat_id if chat_id.startswith("msg_") else f"msg_{chat_id}"


def _usage_dict(usage: _ChatUsage | None) -> dict[str, int]:
    return anthropic_usage(usage.normalized() if usage is not None else Usage())


def to_message(chat_body: bytes, *, thinking: bool) -> bytes:
    """A `chat.completion` body -> an Anthropic `message` body. Reasoning becomes a thinking block
    (empty signature) only when `thinking` (the client asked for visible thinking)."""
    chat = decode_chat(chat_body)
    choice = next((c for c in chat.choices if c.index == 0), None)
    msg = choice.message if choice is not None and choice.message is not None else _Message()
    content: list[dict[str, Any]] = []
    if thinking and msg.reasoning_content:
        content.append({"type": "thinking", "thinking": msg.reasoning_content, "signature": ""})
    text = msg.text() or msg.refusal or ""
    if text:
        content.append({"type": "text", "text": text})
    for i, call in enumerate(msg.tool_calls or []):
        content.append({"type": "tool_use", "id": call.id or f"toolu_{i}", "name": call.function.name or "",
                        "input": tool_input(call.function.arguments)})
    body = {"id": message_id(chat.id), "type": "message", "role": "assistant", "model": chat.model,
            "content": content, "stop_reason": stop_reason(choice.finish_reason if choice else None),
            "stop_sequence": None, "usage": _usage_dict(chat.usage)}
    return _json.encode(body)


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return format_sse(_json.encode({"type": name, **payload}), event=name)


class MessagesStreamRenderer:
    """Sans-IO: Chat chunks in, Anthropic's event sequence out.

    `message_start` (+ `ping`) precede everything; each run of text, reasoning (when `thinking`)
    or one tool call is a content block (`content_block_start`, deltas, `content_block_stop`);
    `finish()` closes the open block and emits `message_delta` (stop reason, final usage incl.
    input and cache counts, which a Chat stream only knows at its end) and `message_stop`. Tool
    arguments for a call whose block was already closed still go to that block's index, which
    the Anthropic SDKs accumulate by index.
    """

    def __init__(self, *, thinking: bool) -> None:
        self.thinking = thinking
        self.started = False
        self._next = 0
        self._open: tuple[str, int] | None = None  # (kind, block index)
        self._tools: dict[int, int] = {}  # Chat tool call index -> block index
        self._stop: str | None = None
        self._usage: _ChatUsage | None = None

    def _start(self, chat: ChatAnswer) -> list[bytes]:
        self.started = True
        message: dict[str, Any] = {
            "id": message_id(chat.id), "type": "message", "role": "assistant", "model": chat.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 1},
        }
        return [_event("message_start", {"message": message}), _event("ping", {})]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open = self._open[1], None
        return [_event("content_block_stop", {"index": index})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._open, self._next = (kind, self._next), self._next + 1
        out.append(_event("content_block_start", {"index": self._open[1], "content_block": block}))
        return out

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"index": index, "delta": delta})

    def feed(self, chat: ChatAnswer) -> list[bytes]:
        out = [] if self.started else self._start(chat)
        if chat.usage is not None:
            self._usage = chat.usage
        for choice in chat.choices:
            if choice.index != 0:
                continue
            delta = choice.delta or _Message()
            if self.thinking and delta.reasoning_content:
                if self._open is None or self._open[0] != "thinking":
                    out += self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta(self._next - 1, {"type": "thinking_delta", "thinking": delta.reasoning_content}))
            text = delta.text()
            if text:
                if self._open is None or self._open[0] != "text":
                    out += self._open_block("text", {"type": "text", "text": ""})
                out.append(self._delta(self._next - 1, {"type": "text_delta", "text": text}))
            for call in delta.tool_calls or []:
                if call.index not in self._tools:
                    block = {"type": "tool_use", "id": call.id or f"toolu_{self._next}",
                             "name": call.function.name or "", "input": {}}
                    out += self._open_block("tool", block)
                    self._tools[call.index] = self._next - 1
                if call.function.arguments:
                    out.append(self._delta(self._tools[call.index],
                                           {"type": "input_json_delta", "partial_json": call.function.arguments}))
            if choice.finish_reason is not None:
                self._stop = stop_reason(choice.finish_reason)
        return out

    def finish(self, fallback: ChatAnswer | None = None) -> list[bytes]:
        out = [] if self.started else self._start(fallback or ChatAnswer())
        out += self._close()
        usage = _usage_dict(self._usage) if self._usage is not None else {"output_tokens": 0}
        out.append(_event("message_delta", {"delta": {"stop_reason": self._stop or "end_turn", "stop_sequence": None},
                                            "usage": usage}))
        out.append(_event("message_stop", {}))
        return out


# -- token estimate --------------------------------------------------------------------------

CHARS_PER_TOKEN = 3.5
MEDIA_TOKENS = 1600  # a ~1.15-megapixel image, Anthropic's largest un-resized size
MESSAGE_OVERHEAD = 3


def _chars(block: msgspec.Struct) -> tuple[int, int]:
    """(characters, media items) of one block; base64 payloads are media, never characters."""
    if isinstance(block, TextBlock):
        return len(block.text), 0
    if isinstance(block, ThinkingBlock):
        return len(block.thinking), 0
    if isinstance(block, ToolUseBlock):
        return len(block.name) + len(_json.encode(block.input)), 0
    if isinstance(block, ToolResultBlock):
        chars = media = 0
        for inner in _blocks(block.content, "tool_result"):
            c, m = _chars(inner)
            chars, media = chars + c, media + m
        return chars, media
    if isinstance(block, DocumentBlock) and block.source.type == "text":
        return len(block.source.data or ""), 0
    return 0, 1


def estimate_input_tokens(req: CountTokensRequest) -> int:
    """A local estimate for providers without a count endpoint: ceil(characters / 3.5) over the
    system prompt, every text, tool input and tool result, and the tool definitions (name,
    description, JSON schema), plus 3 per message and 1600 per image or binary document. It
    overestimates English prose slightly, which is the safe side for context budgeting."""
    chars = len(system_text(req.system))
    media = 0
    for i, msg in enumerate(req.messages):
        for block in _blocks(msg.content, f"messages[{i}]"):
            c, m = _chars(block)
            chars, media = chars + c, media + m
    for tool in req.tools or []:
        chars += len(_json.encode(tool))
    return math.ceil(chars / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD * len(req.messages) + MEDIA_TOKENS * media
