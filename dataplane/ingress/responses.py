"""`POST /v1/responses`: the OpenAI Responses API over the canonical Chat Completions shape.

Request (`plan`): `responses_request.translate_request` builds the Chat body (what is translated,
dropped and refused is listed there). The client's body also rides along as `native_body`, so an
adapter that speaks Responses natively gets it unchanged and its answer is relayed unchanged.

Answer (`render`, `render_stream`): a Chat answer becomes a Response object; a Chat SSE stream
becomes the named Responses event sequence: `response.created`, `response.in_progress`, then per
output item `output_item.added`, its parts and deltas, `output_item.done`, and finally
`response.completed` (or `response.incomplete` on length / content_filter) carrying the whole
Response with usage. No `[DONE]`. Chat tool names flattened from a Codex namespace are split back
into `{name, namespace}`. A stream that fails mid-way ends with `response.failed` (`stream_error`).

The ingress is stateless and may be shared. `stream_error` has no plan argument, so when a stream
fails mid-way `render_stream` renders the `response.failed` event itself (same response id, next
sequence number, the output so far) and attaches it to the `GatewayError` it re-raises, for
`stream_error` to return. A failure of the native passthrough continues the response the relay
saw (`openai_responses.StreamPosition`: same id, next sequence number); any other gets a fresh one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from dataplane.ingress.base import ChatPlan
from dataplane.ingress.responses_request import (
    flat_tool_name,
    looks_like_responses_body,
    responses_body_to_chat,
    translate_request,
)
from dataplane.providers.openai_responses import STREAM_POSITION, StreamPosition
from dataplane.providers.sse import format_sse, iter_sse, sse_comment
from schemas.errors import GatewayError, UpstreamError
from schemas.responses import (
    ArgumentsDoneEvent,
    ChatAnswer,
    ChatAnswerMessage,
    ChatToolCall,
    ChatUsage,
    ContentPartEvent,
    DeltaEvent,
    IncompleteDetails,
    InputTokensDetails,
    LifecycleEvent,
    OutputFunctionCall,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputReasoning,
    OutputRefusal,
    OutputText,
    OutputTokensDetails,
    ReasoningText,
    RefusalDoneEvent,
    Response,
    ResponseError,
    ResponseUsage,
    TextDoneEvent,
)

__all__ = ["RESPONSES_API", "ResponsesIngress", "looks_like_responses_body", "random_id", "responses_body_to_chat",
           "translate_request"]

log = structlog.get_logger(__name__)

RESPONSES_API = "openai.responses"
_FAILED_EVENT = "_responses_failed_event"  # set on a GatewayError by render_stream
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_encoder = msgspec.json.Encoder()
_answer_decoder = msgspec.json.Decoder(ChatAnswer)


def random_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(slots=True)
class _Echo:
    """What a Response repeats from its request, and the namespaced tool names to split back."""

    raw: dict[str, Any]
    aliases: dict[str, tuple[str, str]]

    @classmethod
    def of(cls, plan: ChatPlan) -> _Echo:
        raw = plan.native_body or {}
        aliases: dict[str, tuple[str, str]] = {}
        for tool in raw.get("tools") or []:
            if isinstance(tool, dict) and tool.get("type") == "namespace" and isinstance(tool.get("name"), str):
                for inner in tool.get("tools") or []:
                    if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                        aliases[flat_tool_name(tool["name"], inner["name"])] = (tool["name"], inner["name"])
        return cls(raw, aliases)

    def function_call(self, item_id: str, call_id: str, chat_name: str, arguments: str,
                      status: str) -> OutputFunctionCall:
        namespace, name = self.aliases.get(chat_name, (None, chat_name))
        return OutputFunctionCall(id=item_id, call_id=call_id, name=name, arguments=arguments, status=status,
                                  namespace=namespace)

    def response(self, response_id: str, answer: ChatAnswer, output: list[OutputItem], status: str,
                 usage: ChatUsage | None = None, error: ResponseError | None = None,
                 finish: str | None = None) -> Response:
        raw = self.raw
        reason = _INCOMPLETE.get(finish or "") if status == "incomplete" else None
        return Response(
            id=response_id, created_at=answer.created, status=status, model=answer.model or str(raw.get("model", "")),
            output=output, usage=_usage(usage), error=error,
            incomplete_details=IncompleteDetails(reason=reason) if reason else None,
            parallel_tool_calls=raw.get("parallel_tool_calls") is not False,
            tool_choice=raw.get("tool_choice") if raw.get("tool_choice") is not None else "auto",
            tools=list(raw.get("tools") or []), instructions=_echoed(raw, "instructions", str),
            max_output_tokens=_echoed(raw, "max_output_tokens", int), reasoning=_echoed(raw, "reasoning", dict),
            temperature=_echoed(raw, "temperature", (int, float)), top_p=_echoed(raw, "top_p", (int, float)),
            user=_echoed(raw, "user", str), metadata=_echoed(raw, "metadata", dict) or {},
            text=_echoed(raw, "text", dict) or {"format": {"type": "text"}},
        )


def _echoed(raw: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _usage(usage: ChatUsage | None) -> ResponseUsage | None:
    """Chat usage as Responses usage: input includes cached tokens, output includes reasoning."""
    if usage is None:
        return None
    prompt, completion = usage.prompt_tokens_details, usage.completion_tokens_details
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=prompt.cached_tokens if prompt else 0,
                                                cache_write_tokens=prompt.cache_write_tokens if prompt else 0),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=completion.reasoning_tokens if completion else 0),
        total_tokens=usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
    )


def _status(finish: str | None) -> str:
    return "incomplete" if finish in _INCOMPLETE else "completed"


def _reasoning_of(msg: ChatAnswerMessage) -> str | None:
    return msg.reasoning_content if msg.reasoning_content is not None else msg.reasoning


def _decode(payload: bytes) -> ChatAnswer:
    """A Chat answer or chunk. A payload with an `error` (some providers put one in a stream)
    raises UpstreamError, so the stream ends with `response.failed`."""
    try:
        answer = _answer_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError("The provider returned a Chat Completions answer the gateway could not read.") from None
    if answer.error is not None:
        err = answer.error
        message = err.get("message") if isinstance(err, dict) else err
        raise UpstreamError(f"The provider failed mid-answer: {str(message)[:300]}")
    return answer


def _failure(err: GatewayError) -> ResponseError:
    """Our error as a Responses `error`, with the codes Codex acts on: `context_length_exceeded`,
    `insufficient_quota` (budgets), and `rate_limit_exceeded` with "try again in Ns"."""
    message = err.message
    quota = err.type == "insufficient_quota" or err.code in ("budget_exceeded", "insufficient_quota")
    if err.status == 429 and quota:
        code = "insufficient_quota"
    elif err.status == 429:
        code = "rate_limit_exceeded"
        retry = err.headers.get("Retry-After", "")
        if retry.isdigit() and "try again in" not in message.lower():
            message = f"{message} Please try again in {retry}s."
    elif re.search(r"context[_ ]length|context window|maximum context|prompt is too long", message, re.I):
        code = "context_length_exceeded"
    elif err.status >= 500:
        code = "server_error"
    else:
        code = err.code or "invalid_request"
    return ResponseError(code=code, message=message, type=err.type, param=err.param)


class ResponsesIngress:
    """The `openai.responses` ingress. `new_id(prefix)` makes response and item ids."""

    name = RESPONSES_API

    def __init__(self, *, new_id: Callable[[str], str] = random_id) -> None:
        self._new_id = new_id

    def plan(self, raw: dict[str, Any], headers: Mapping[str, str]) -> ChatPlan:
        translation = translate_request(raw)
        if translation.dropped:
            log.debug("responses_translation_dropped", dropped=translation.dropped)
        return ChatPlan(model=translation.request.model, body=translation.body, stream=bool(translation.request.stream),
                        include_usage=True, native_api=RESPONSES_API, native_body=raw)

    def render(self, chat_body: bytes, plan: ChatPlan) -> bytes:
        answer = _decode(chat_body)
        echo = _Echo.of(plan)
        response_id = self._new_id("resp")
        msg = (answer.choices[0].message if answer.choices else None) or ChatAnswerMessage()
        finish = answer.choices[0].finish_reason if answer.choices else None
        status = _status(finish)
        calls = msg.tool_calls or []
        output: list[OutputItem] = []
        reasoning, text = _reasoning_of(msg), msg.content or ""
        if reasoning:
            last = status == "incomplete" and not (text or msg.refusal or calls)
            output.append(OutputReasoning(id=self._new_id("rs"), status="incomplete" if last else "completed",
                                          content=[ReasoningText(text=reasoning)]))
        if text or msg.refusal or not (output or calls):
            parts: list[OutputText | OutputRefusal] = [OutputText(text=text)] if text or not msg.refusal else []
            if msg.refusal:
                parts.append(OutputRefusal(refusal=msg.refusal))
            last = status == "incomplete" and not calls
            output.append(OutputMessage(id=self._new_id("msg"), status="incomplete" if last else "completed",
                                        content=parts))
        for call in calls:
            output.append(echo.function_call(self._new_id("fc"), call.id or self._new_id("call"),
                                             call.function.name or "", call.function.arguments or "", status))
        return _encoder.encode(echo.response(response_id, answer, output, status, answer.usage, finish=finish))

    async def render_stream(self, chunks: AsyncIterator[bytes], plan: ChatPlan) -> AsyncIterator[bytes]:
        renderer = _StreamRenderer(_Echo.of(plan), self._new_id)

        async def lines() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                for line in chunk.splitlines(keepends=True):
                    yield line

        try:
            async for event in iter_sse(lines()):
                if event.done:
                    break
                for out in renderer.feed(_decode(event.data)):
                    yield out
        except GatewayError as err:
            if renderer.started:  # before the first event the lifecycle answers with a JSON error
                setattr(err, _FAILED_EVENT, renderer.failed(_failure(err)))
            raise
        for out in renderer.finish():
            yield out

    def stream_end(self, cost_usd: str) -> bytes:
        return sse_comment(f"alephant-cost-usd {cost_usd}")

    def stream_error(self, err: GatewayError) -> bytes:
        event = getattr(err, _FAILED_EVENT, None)
        if isinstance(event, bytes):
            return event
        renderer = _StreamRenderer(_Echo({}, {}), self._new_id)
        position = getattr(err, STREAM_POSITION, None)
        if isinstance(position, StreamPosition):  # a relayed native stream: continue the client's response
            renderer.resume(position)
        return renderer.failed(_failure(err))


class _StreamRenderer:
    """Chat chunks in, named Responses events out. Items open as their first delta arrives and
    close when a different kind of item starts (text before tool calls, reasoning before text) or
    at the end; function calls stay open until the end, so interleaved fragments are fine.
    `sequence_number` increases by one per event, from 0."""

    def __init__(self, echo: _Echo, new_id: Callable[[str], str]) -> None:
        self.echo, self.new_id = echo, new_id
        self.response_id = new_id("resp")
        self.seq = 0
        self.answer = ChatAnswer()
        self.output: list[OutputItem] = []
        self.reasoning: int | None = None  # output index of the open reasoning item
        self.message: int | None = None  # output index of the open message
        self.calls: dict[int, int] = {}  # Chat tool-call index -> output index of the open call
        self.finish_reason: str | None = None
        self.usage: ChatUsage | None = None
        self.started = False

    def _emit(self, event: Any) -> bytes:
        self.seq += 1
        return format_sse(_encoder.encode(event), event.type)

    def _lifecycle(self, kind: str, status: str, error: ResponseError | None = None) -> bytes:
        response = self.echo.response(self.response_id, self.answer, list(self.output) if status != "in_progress"
                                      else [], status, self.usage if status != "in_progress" else None,
                                      error=error, finish=self.finish_reason)
        return self._emit(LifecycleEvent(type=kind, sequence_number=self.seq, response=response))

    def _item(self, kind: str, index: int) -> bytes:
        return self._emit(OutputItemEvent(type=kind, sequence_number=self.seq, output_index=index,
                                          item=self.output[index]))

    def _open(self, item: OutputItem) -> tuple[int, bytes]:
        self.output.append(item)
        return len(self.output) - 1, self._item("response.output_item.added", len(self.output) - 1)

    def feed(self, chunk: ChatAnswer) -> list[bytes]:
        out: list[bytes] = []
        if not self.started:
            out += self._start(chunk)
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta or choice.message or ChatAnswerMessage()
            if reasoning := _reasoning_of(delta):
                out += self._reasoning_delta(reasoning)
            if delta.content:
                out += self._message_delta(delta.content, refusal=False)
            if delta.refusal:
                out += self._message_delta(delta.refusal, refusal=True)
            for call in delta.tool_calls or []:
                out += self._call_delta(call)
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
        return out

    def _start(self, chunk: ChatAnswer) -> list[bytes]:
        self.started = True
        self.answer = ChatAnswer(id=chunk.id, created=chunk.created, model=chunk.model)
        return [self._lifecycle("response.created", "in_progress"),
                self._lifecycle("response.in_progress", "in_progress")]

    def _reasoning_delta(self, text: str) -> list[bytes]:
        out = self._close_message()
        if self.reasoning is None:
            self.reasoning, added = self._open(OutputReasoning(id=self.new_id("rs"), status="in_progress", content=[]))
            out.append(added)
        item = self.output[self.reasoning]
        assert isinstance(item, OutputReasoning)
        if not item.content:
            item.content.append(ReasoningText(text=""))
        item.content[0].text += text
        out.append(self._emit(DeltaEvent(type="response.reasoning_text.delta", sequence_number=self.seq,
                                         item_id=item.id, output_index=self.reasoning, content_index=0, delta=text)))
        return out

    def _message_delta(self, text: str, *, refusal: bool) -> list[bytes]:
        out = self._close_reasoning()
        if self.message is None:
            self.message, added = self._open(OutputMessage(id=self.new_id("msg"), status="in_progress", content=[]))
            out.append(added)
        item = self.output[self.message]
        assert isinstance(item, OutputMessage)
        part_type = OutputRefusal if refusal else OutputText
        if not item.content or not isinstance(item.content[-1], part_type):
            item.content.append(OutputRefusal(refusal="") if refusal else OutputText(text=""))
            out.append(self._emit(ContentPartEvent(type="response.content_part.added", sequence_number=self.seq,
                                                   item_id=item.id, output_index=self.message,
                                                   content_index=len(item.content) - 1, part=item.content[-1])))
        part = item.content[-1]
        if not text:  # the empty message of an empty answer: a part, but no delta
            return out
        if isinstance(part, OutputRefusal):
            part.refusal += text
            event = DeltaEvent(type="response.refusal.delta", sequence_number=self.seq, item_id=item.id,
                               output_index=self.message, content_index=len(item.content) - 1, delta=text)
        else:
            part.text += text
            event = DeltaEvent(type="response.output_text.delta", sequence_number=self.seq, item_id=item.id,
                               output_index=self.message, content_index=len(item.content) - 1, delta=text,
                               logprobs=[])
        out.append(self._emit(event))
        return out

    def _call_delta(self, call: ChatToolCall) -> list[bytes]:
        out = self._close_reasoning() + self._close_message()
        index = self.calls.get(call.index)
        if index is None:
            index, added = self._open(self.echo.function_call(self.new_id("fc"), call.id or self.new_id("call"),
                                                              call.function.name or "", "", "in_progress"))
            self.calls[call.index] = index
            out.append(added)
        item = self.output[index]
        assert isinstance(item, OutputFunctionCall)
        if call.function.arguments:
            item.arguments += call.function.arguments
            out.append(self._emit(DeltaEvent(type="response.function_call_arguments.delta", sequence_number=self.seq,
                                             item_id=item.id, output_index=index, delta=call.function.arguments)))
        return out

    def _close_reasoning(self, status: str = "completed") -> list[bytes]:
        if self.reasoning is None:
            return []
        index, self.reasoning = self.reasoning, None
        item = self.output[index]
        assert isinstance(item, OutputReasoning)
        item.status = status
        done = TextDoneEvent(type="response.reasoning_text.done", sequence_number=self.seq, item_id=item.id,
                             output_index=index, content_index=0, text=item.content[0].text)
        return [self._emit(done), self._item("response.output_item.done", index)]

    def _close_message(self, status: str = "completed") -> list[bytes]:
        if self.message is None:
            return []
        index, self.message = self.message, None
        item = self.output[index]
        assert isinstance(item, OutputMessage)
        out: list[bytes] = []
        for i, part in enumerate(item.content):
            if isinstance(part, OutputRefusal):
                out.append(self._emit(RefusalDoneEvent(type="response.refusal.done", sequence_number=self.seq,
                                                       item_id=item.id, output_index=index, content_index=i,
                                                       refusal=part.refusal)))
            else:
                out.append(self._emit(TextDoneEvent(type="response.output_text.done", sequence_number=self.seq,
                                                    item_id=item.id, output_index=index, content_index=i,
                                                    text=part.text, logprobs=[])))
            out.append(self._emit(ContentPartEvent(type="response.content_part.done", sequence_number=self.seq,
                                                   item_id=item.id, output_index=index, content_index=i, part=part)))
        item.status = status
        out.append(self._item("response.output_item.done", index))
        return out

    def _close_calls(self, status: str) -> list[bytes]:
        out: list[bytes] = []
        for index in sorted(self.calls.values()):
            item = self.output[index]
            assert isinstance(item, OutputFunctionCall)
            item.status = status
            out.append(self._emit(ArgumentsDoneEvent(type="response.function_call_arguments.done",
                                                     sequence_number=self.seq, item_id=item.id, output_index=index,
                                                     arguments=item.arguments, name=item.name)))
            out.append(self._item("response.output_item.done", index))
        self.calls.clear()
        return out

    def finish(self) -> list[bytes]:
        """Close what is open and emit `response.completed` (or `.incomplete` on length or
        content_filter), carrying the whole Response and its usage."""
        out = [] if self.started else self._start(ChatAnswer())
        status = _status(self.finish_reason)
        if not self.output:  # an empty answer is still one (empty) message
            out += self._message_delta("", refusal=False)
        out += self._close_reasoning(status) + self._close_message(status) + self._close_calls(status)
        out.append(self._lifecycle(f"response.{status}", status))
        return out

    def resume(self, position: StreamPosition) -> None:
        """Continue a stream this renderer did not produce (the native passthrough): same response
        id, created_at and model, next sequence number."""
        self.started = True
        if position.response_id:
            self.response_id = position.response_id
        self.seq = position.next_sequence_number
        self.answer = ChatAnswer(created=position.created_at, model=position.model)

    def failed(self, error: ResponseError) -> bytes:
        """`response.failed` with what was produced so far (open items marked incomplete)."""
        for index in [self.reasoning, self.message, *self.calls.values()]:
            if index is not None:
                self.output[index].status = "incomplete"
        return self._lifecycle("response.failed", "failed", error)
