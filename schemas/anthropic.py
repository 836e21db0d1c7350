"""Anthropic Messages wire shapes (`POST /v1/messages`, its SSE stream and `count_tokens`).

Every Struct here tolerates unknown fields: Anthropic adds fields and block types often, and a
gateway that rejected them would break clients on the day a feature ships. Requests are
validated only as far as the gateway relies on them; the raw body is what travels upstream on
the native path. Content blocks stay plain dicts in `MessagesRequest` (new block types must pass)
and are converted to the block Structs below, by `type`, where a translator reads them.

Stream events are one tagged union (`StreamEvent`) on the `type` field; event types this union
does not know (Anthropic promises to add some) are skipped by the readers, never fatal.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


# -- request ---------------------------------------------------------------------------------


class InputMessage(msgspec.Struct, frozen=True, kw_only=True):
    # `system` is not in Anthropic's schema but Claude Code 2.1.330 sends it mid-conversation.
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class ToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What `/v1/messages` must carry (Anthropic requires `max_tokens`)."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt
    messages: Annotated[list[InputMessage], msgspec.Meta(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(msgspec.Struct, frozen=True, kw_only=True):
    """`/v1/messages/count_tokens`: like a message request, without `max_tokens`."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[InputMessage], msgspec.Meta(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


# -- content blocks (requests and responses) -------------------------------------------------


class TextBlock(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    type: Literal["text"] = "text"


class ImageSource(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["base64", "url", "file", "text"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None
    file_id: str | None = None


class ImageBlock(msgspec.Struct, frozen=True, kw_only=True):
    source: ImageSource
    type: Literal["image"] = "image"


class DocumentBlock(msgspec.Struct, frozen=True, kw_only=True):
    source: ImageSource
    title: str | None = None
    type: Literal["document"] = "document"


class ToolUseBlock(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    type: Literal["tool_use"] = "tool_use"


class ToolResultBlock(msgspec.Struct, frozen=True, kw_only=True):
    tool_use_id: str
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None
    type: Literal["tool_result"] = "tool_result"


class ThinkingBlock(msgspec.Struct, frozen=True, kw_only=True):
    thinking: str
    signature: str = ""
    type: Literal["thinking"] = "thinking"


class ToolDef(msgspec.Struct, frozen=True, kw_only=True):
    """A client tool. Server tools (`web_search_*`, `bash_*`, ...) carry a `type` other than `custom`."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any] = msgspec.field(default_factory=dict)
    type: str | None = None


class ResponseBlock(msgspec.Struct, frozen=True, kw_only=True):
    """Any block of a response or a `content_block_start`, flattened: the fields a type lacks stay unset."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    thinking: str | None = None
    signature: str | None = None


# -- response --------------------------------------------------------------------------------


class CacheCreation(msgspec.Struct, frozen=True, kw_only=True):
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, frozen=True, kw_only=True):
    thinking_tokens: int = 0


class AnthropicUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Anthropic's usage. `input_tokens` EXCLUDES cache reads and cache writes; a `message_delta`
    may repeat any field with a cumulative value (None means "not reported in this event")."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation: CacheCreation | None = None
    output_tokens_details: OutputTokensDetails | None = None


class Message(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    model: str
    content: list[ResponseBlock]
    role: str = "assistant"
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage = msgspec.field(default_factory=AnthropicUsage)
    type: str = "message"


# -- stream events ---------------------------------------------------------------------------


class Delta(msgspec.Struct, frozen=True, kw_only=True):
    """A `content_block_delta` payload, flattened (text_delta, input_json_delta, thinking_delta,
    signature_delta, citations_delta, ...)."""

    type: str
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    signature: str | None = None


class MessageDeltaBody(msgspec.Struct, frozen=True, kw_only=True):
    stop_reason: str | None = None
    stop_sequence: str | None = None


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    type: str = "api_error"
    message: str = ""


class MessageStart(msgspec.Struct, frozen=True, kw_only=True, tag="message_start", tag_field="type"):
    message: Message


class ContentBlockStart(msgspec.Struct, frozen=True, kw_only=True, tag="content_block_start", tag_field="type"):
    index: int
    content_block: ResponseBlock


class ContentBlockDelta(msgspec.Struct, frozen=True, kw_only=True, tag="content_block_delta", tag_field="type"):
    index: int
    delta: Delta


class ContentBlockStop(msgspec.Struct, frozen=True, kw_only=True, tag="content_block_stop", tag_field="type"):
    index: int


class MessageDelta(msgspec.Struct, frozen=True, kw_only=True, tag="message_delta", tag_field="type"):
    delta: MessageDeltaBody = msgspec.field(default_factory=MessageDeltaBody)
    usage: AnthropicUsage | None = None


class MessageStop(msgspec.Struct, frozen=True, kw_only=True, tag="message_stop", tag_field="type"):
    pass


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag="ping", tag_field="type"):
    pass


class StreamError(msgspec.Struct, frozen=True, kw_only=True, tag="error", tag_field="type"):
    error: ErrorInfo = msgspec.field(default_factory=ErrorInfo)


StreamEvent = (
    MessageStart | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta | MessageStop | Ping
    | StreamError
)

STREAM_EVENT_TYPES = frozenset({
    "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
    "message_stop", "ping", "error",
})


class CountTokensResponse(msgspec.Struct, frozen=True, kw_only=True):
    input_tokens: int
