"""OpenAI Responses API wire shapes (`POST /v1/responses`), and the Chat Completions answer shapes
the Responses ingress reads back.

Requests are tolerant: unknown top-level fields are ignored, and input items and tools are kept as
plain dicts here and converted one by one (so an error can name `input[3].content`). Output Structs
encode exactly the fields the `openai` SDK (3.x) and Codex parse; nullable fields are written as
`null` rather than omitted, as the API does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
JsonObject = dict[str, Any]

# --- request ---------------------------------------------------------------------------------


class ReasoningConfig(msgspec.Struct, frozen=True, kw_only=True):
    effort: str | None = None
    summary: str | None = None


class TextConfig(msgspec.Struct, frozen=True, kw_only=True):
    format: JsonObject | None = None
    verbosity: str | None = None


class ResponsesRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The fields the gateway reads or refuses; everything else is ignored."""

    model: str
    input: str | list[JsonObject]
    instructions: str | None = None
    tools: list[JsonObject] | None = None
    tool_choice: str | JsonObject | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = None
    store: bool | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    # Server-side state and hosted prompts: the gateway stores nothing, so it refuses these.
    previous_response_id: str | None = None
    conversation: str | JsonObject | None = None
    prompt: JsonObject | None = None
    background: bool | None = None


class MessageItem(msgspec.Struct, frozen=True, kw_only=True):
    """`{type?: "message", role, content}`; `type` may be omitted (an "easy" input message)."""

    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[JsonObject]
    type: Literal["message"] = "message"


class InputText(msgspec.Struct, frozen=True, kw_only=True):
    text: str


class InputImage(msgspec.Struct, frozen=True, kw_only=True):
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputFile(msgspec.Struct, frozen=True, kw_only=True):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None
    file_url: str | None = None


class RefusalPart(msgspec.Struct, frozen=True, kw_only=True):
    refusal: str


class FunctionCallItem(msgspec.Struct, frozen=True, kw_only=True):
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(msgspec.Struct, frozen=True, kw_only=True):
    call_id: str
    output: str | list[JsonObject]


class CustomToolCallItem(msgspec.Struct, frozen=True, kw_only=True):
    call_id: str
    name: str
    input: str


class CustomToolCallOutputItem(msgspec.Struct, frozen=True, kw_only=True):
    call_id: str
    output: str | list[JsonObject]


class FunctionTool(msgspec.Struct, frozen=True, kw_only=True):
    """A flat Responses function tool: `{type: "function", name, parameters, strict}`."""

    name: str
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class NamespaceTool(msgspec.Struct, frozen=True, kw_only=True):
    """Codex's group of function tools; the model calls them with `{name, namespace}`."""

    name: str
    tools: list[JsonObject]
    description: str | None = None


# --- response object ---------------------------------------------------------------------------


class OutputText(msgspec.Struct, kw_only=True, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class OutputRefusal(msgspec.Struct, kw_only=True, tag_field="type", tag="refusal"):
    refusal: str


class ReasoningText(msgspec.Struct, kw_only=True, tag_field="type", tag="reasoning_text"):
    text: str


ContentPart = OutputText | OutputRefusal


class OutputMessage(msgspec.Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    status: str
    content: list[ContentPart]
    role: Literal["assistant"] = "assistant"


class OutputFunctionCall(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str
    namespace: str | None = None  # only for a tool of a Codex `namespace` tool


class OutputReasoning(msgspec.Struct, kw_only=True, tag_field="type", tag="reasoning"):
    id: str
    status: str
    content: list[ReasoningText]
    summary: list[Any] = msgspec.field(default_factory=list)


OutputItem = OutputMessage | OutputFunctionCall | OutputReasoning


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    """`input_tokens` includes cached ones; `output_tokens` includes reasoning ones."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class IncompleteDetails(msgspec.Struct, kw_only=True):
    reason: str


class ResponseError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    type: str | None = None
    param: str | None = None


class Response(msgspec.Struct, kw_only=True):
    id: str
    created_at: int
    status: str  # completed | incomplete | failed | in_progress
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    tool_choice: Any
    tools: list[Any]
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    reasoning: JsonObject | None = None
    store: bool = False
    temperature: float | None = None
    text: JsonObject = msgspec.field(default_factory=lambda: {"format": {"type": "text"}})
    top_p: float | None = None
    truncation: str = "disabled"
    user: str | None = None
    metadata: JsonObject = msgspec.field(default_factory=dict)
    object: Literal["response"] = "response"


# --- stream events (named SSE; `type` repeats the event name) ----------------------------------


class LifecycleEvent(msgspec.Struct, kw_only=True):
    """response.created | in_progress | completed | incomplete | failed."""

    type: str
    sequence_number: int
    response: Response


class OutputItemEvent(msgspec.Struct, kw_only=True):
    """response.output_item.added | response.output_item.done."""

    type: str
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(msgspec.Struct, kw_only=True):
    """response.content_part.added | response.content_part.done."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: ContentPart


class DeltaEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """output_text / refusal / reasoning_text `.delta` (content) and function_call_arguments.delta
    (no `content_index`). `logprobs` is written only for output_text."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    delta: str
    content_index: int | None = None
    logprobs: list[Any] | None = None


class TextDoneEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """response.output_text.done | response.reasoning_text.done (`text`)."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] | None = None


class RefusalDoneEvent(msgspec.Struct, kw_only=True):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    refusal: str


class ArgumentsDoneEvent(msgspec.Struct, kw_only=True):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    arguments: str
    name: str


# --- Chat Completions answers, as the Responses ingress reads them -----------------------------


class ChatPromptDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class ChatCompletionDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class ChatUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: ChatPromptDetails | None = None
    completion_tokens_details: ChatCompletionDetails | None = None


class ChatFunction(msgspec.Struct, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class ChatToolCall(msgspec.Struct, kw_only=True):
    """A full tool call (in a message) or one streamed fragment of it (in a delta)."""

    index: int = 0
    id: str | None = None
    function: ChatFunction = msgspec.field(default_factory=ChatFunction)


class ChatAnswerMessage(msgspec.Struct, kw_only=True):
    """An assistant message or a stream delta. `reasoning_content` (DeepSeek, vLLM) and
    `reasoning` (OpenRouter, Ollama) carry visible reasoning text."""

    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class ChatAnswerChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: ChatAnswerMessage | None = None
    delta: ChatAnswerMessage | None = None
    finish_reason: str | None = None


class ChatAnswer(msgspec.Struct, kw_only=True):
    """A `chat.completion` body or one `chat.completion.chunk`; unknown fields are ignored.
    `error` is set on the error payloads some providers put in a stream."""

    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[ChatAnswerChoice] = msgspec.field(default_factory=list)
    usage: ChatUsage | None = None
    error: Any = None


# --- a native Responses upstream, as the OpenAI adapter reads it to price the call --------------


class ResponseUsageOnly(msgspec.Struct, kw_only=True):
    """A Response object (non-streamed body, or the `response` of a terminal stream event)."""

    usage: ResponseUsage | None = None


class ResponseStreamEventHead(msgspec.Struct, kw_only=True):
    type: str = ""
    response: ResponseUsageOnly | None = None
