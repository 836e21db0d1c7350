"""Tool-aware wrappers around the fakes in `tests.fakes`, for the SDK contract suite.

Every wrapper answers by looking at the request in its provider's own wire format:

* the request offers a tool named `get_weather` and its last turn is not a tool result: the
  model calls `get_weather` with `WEATHER_ARGS` (streamed in fragments where the provider
  streams tool arguments in fragments), and `get_time` too when that is offered (two parallel
  calls);
* its last turn carries tool results: the model says `tool_answer(<every string in them>)`, so
  a test can check that the result made it upstream;
* otherwise: the stock fake's text answer (`ANSWERS[kind]`).

The stock fakes keep doing everything else (auth checks, validation, failure knobs, recording).
The OpenAI-compatible one additionally serves `/v1/responses` (the Responses fake, extended with
function calls) and `/v1/embeddings` on the same port, as api.openai.com does.
"""

from __future__ import annotations

import base64
import itertools
import math
import struct
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from tests.fakes.anthropic_upstream import FakeAnswer, FakeAnthropic
from tests.fakes.azure_upstream import FakeAzure
from tests.fakes.bedrock_upstream import FakeBedrock, Script, Text, ToolUse
from tests.fakes.gemini_upstream import FakeGemini, GeminiAnswer
from tests.fakes.ollama_upstream import FakeOllama, OllamaAnswer
from tests.fakes.openai_bodies import DONE_EVENT, Answer, ChunkFramer, count_prompt_tokens, usage
from tests.fakes.responses_upstream import FakeResponses
from tests.fakes.upstream import FakeUpstream, _error

TOOL_NAME = "get_weather"
WEATHER_ARGS: dict[str, Any] = {"city": "Paris", "unit": "celsius", "days": 3}
TIME_TOOL = "get_time"  # offered together with get_weather: the model calls both, in this order
TIME_ARGS: dict[str, Any] = {"timezone": "Europe/Paris", "format": "24h"}
TOOL_ARGS: dict[str, dict[str, Any]] = {TOOL_NAME: WEATHER_ARGS, TIME_TOOL: TIME_ARGS}
_PIECE = 6  # characters per streamed argument fragment (OpenAI and Responses fakes)

# What each fake says when no tool is involved.
OPENAI_TEXT = Answer.of_words(8).content
ANSWERS: dict[str, str] = {
    "openai": OPENAI_TEXT,
    "azure": OPENAI_TEXT,
    "groq": OPENAI_TEXT,
    "anthropic": "Hello from the contract Anthropic fake.",
    "gemini": "Hello from the contract Gemini fake.",
    "bedrock": "Hello from the contract Bedrock fake.",
    "ollama": "Hello from the contract Ollama fake.",
    "responses": "Hello from the contract Responses fake.",
}

_ids = itertools.count(1)
_decode = msgspec.json.decode
_encode = msgspec.json.encode
_SKIPPED_KEYS = frozenset({"type", "id", "tool_use_id", "toolUseId", "tool_call_id", "call_id", "name", "role",
                           "cache_control", "status", "is_error"})


def tool_answer(result: str) -> str:
    return f"The tool said: {result}"


def _strings(value: Any) -> list[str]:
    """Every string inside a tool result, in order (ids, names and types left out)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k not in _SKIPPED_KEYS for s in _strings(v)]
    return []


def _pieces(text: str, size: int = _PIECE) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = _decode(raw) if raw else {}
    except msgspec.DecodeError:
        return {}
    return body if isinstance(body, dict) else {}


# --- per-format decisions: ("call", None) | ("result", text) | None --------------------------------


Decision = tuple[str, Any] | None  # ("call", [tool names]) | ("result", answer text) | None


def _decide(offered: list[Any], results: list[Any]) -> Decision:
    if results:
        return "result", tool_answer(" ".join(_strings(results)))
    if TOOL_NAME in offered:
        return "call", [name for name in TOOL_ARGS if name in offered]
    return None


def _args_json(name: str) -> str:
    return _encode(TOOL_ARGS[name]).decode()


def chat_decision(body: dict[str, Any]) -> Decision:
    messages = body.get("messages") or []
    trailing: list[Any] = []
    for msg in reversed(messages):
        if not isinstance(msg, dict) or msg.get("role") != "tool":
            break
        trailing.insert(0, msg.get("content"))
    offered = [(t.get("function") or {}).get("name") for t in body.get("tools") or [] if isinstance(t, dict)]
    return _decide(offered, trailing)


def anthropic_decision(body: dict[str, Any]) -> Decision:
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    content = last.get("content") if isinstance(last, dict) else None
    results = [b.get("content") for b in content or [] if isinstance(b, dict) and b.get("type") == "tool_result"] \
        if isinstance(content, list) else []
    offered = [t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)]
    return _decide(offered, results)


def gemini_decision(body: dict[str, Any]) -> Decision:
    contents = body.get("contents") or []
    last = contents[-1] if contents else {}
    results = [p["functionResponse"].get("response") for p in last.get("parts") or []
               if isinstance(p, dict) and isinstance(p.get("functionResponse"), dict)]
    offered = [d.get("name") for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]
    return _decide(offered, results)


def bedrock_decision(body: dict[str, Any]) -> Decision:
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    results = [b["toolResult"].get("content") for b in last.get("content") or []
               if isinstance(b, dict) and isinstance(b.get("toolResult"), dict)]
    offered = [(t.get("toolSpec") or {}).get("name") for t in (body.get("toolConfig") or {}).get("tools") or []]
    return _decide(offered, results)


def responses_decision(body: dict[str, Any]) -> Decision:
    items = body.get("input")
    trailing: list[Any] = []
    for item in reversed(items if isinstance(items, list) else []):
        if not isinstance(item, dict) or item.get("type") != "function_call_output":
            break
        trailing.insert(0, item.get("output"))
    offered = [t.get("name") for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    return _decide(offered, trailing)


# --- OpenAI Chat Completions (FakeUpstream engine; Azure and Groq too) --------------------------------


class ToolChatMixin:
    """Overrides `FakeUpstream._chat` for tool calls and tool results; plain chats go to the stock fake."""

    async def _chat(self, request: web.BaseRequest, raw: bytes) -> web.StreamResponse:
        fake: Any = self
        body = _json_body(raw)
        decision = chat_decision(body)
        if decision is None or not isinstance(body.get("model"), str):
            return await super()._chat(request, raw)  # type: ignore[misc, no-any-return]
        failure = fake._take_failure(request.headers)
        if failure is not None:
            extra = {"retry-after": failure.retry_after} if failure.retry_after is not None else None
            return _error(failure.status, headers=extra)
        kind, payload = decision
        text: str | None = None if kind == "call" else payload
        completion_id, created, model = fake._next_id(), int(time.time()), body["model"]
        prompt = count_prompt_tokens(body["messages"])
        completion_tokens = 9 if kind == "call" else len((text or "").split())
        usage_obj = usage(prompt, completion_tokens)
        calls = [{"id": f"call_contract{next(_ids):06d}", "type": "function",
                  "function": {"name": name, "arguments": _args_json(name)}} for name in payload] \
            if kind == "call" else []
        finish = "tool_calls" if kind == "call" else "stop"
        if body.get("stream") is not True:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
            if calls:
                message["tool_calls"] = calls
            out = {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                   "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                   "usage": usage_obj, "service_tier": "default", "system_fingerprint": "fp_fake0001"}
            return web.Response(body=_encode(out), content_type="application/json")
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        framer = ChunkFramer(completion_id=completion_id, created=created, model=model, include_usage=include_usage)

        def choice(delta: dict[str, Any]) -> bytes:
            return framer.event(_encode({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}))

        if calls:  # as OpenAI streams them: each call's header, then its argument fragments, in turn
            events = []
            for i, call in enumerate(calls):
                head = {**call, "index": i, "function": {"name": call["function"]["name"], "arguments": ""}}
                delta: dict[str, Any] = {"tool_calls": [head]}
                events.append(choice({"role": "assistant", "content": None, **delta, "refusal": None} if i == 0
                                     else delta))
                events += [choice({"tool_calls": [{"index": i, "function": {"arguments": p}}]})
                           for p in _pieces(call["function"]["arguments"])]
        else:
            events = [framer.role_event()]
            events += [choice({"content": w if i == 0 else " " + w}) for i, w in enumerate((text or "").split(" "))]
        events.append(framer.finish_event(finish))
        if include_usage:
            events.append(framer.usage_event(usage_obj))
        events.append(DONE_EVENT)
        return await fake._stream(request, events, None, 0.0, completion_id)  # type: ignore[no-any-return]


class ContractResponses(FakeResponses):
    """The Responses fake, plus a `function_call` answer when `get_weather` is offered."""

    def __init__(self) -> None:
        super().__init__(answer=ANSWERS["responses"])
        self.calling: list[tuple[str, str]] = []  # (call_id, name) of this answer's function calls

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        decision = responses_decision(_json_body(await request.read()))
        names = decision[1] if decision is not None and decision[0] == "call" else []
        self.calling = [(f"call_resp{next(_ids):06d}", name) for name in names]
        result = decision is not None and decision[0] == "result"
        self.answer = (decision[1] or "") if decision is not None and result else ANSWERS["responses"]
        return await self._handle(request)

    def _call_item(self, index: int, complete: bool) -> dict[str, Any]:
        call_id, name = self.calling[index]
        return {"type": "function_call", "id": f"fc_fake{index}", "call_id": call_id, "name": name,
                "arguments": _args_json(name) if complete else "", "status": "completed" if complete
                else "in_progress"}

    def response(self, status: str, text: str | None) -> dict[str, Any]:
        body = super().response(status, None if self.calling else text)
        if self.calling and status == "completed":
            body["output"] = [self._call_item(i, True) for i in range(len(self.calling))]
        return body

    def _events(self) -> list[bytes]:
        """The real API's sequence. (The stock fake streams text as bare `output_text.delta`s, without
        the `output_item` / `content_part` events that Codex reads its items from.)"""
        seq = itertools.count()

        def sse(kind: str, data: dict[str, Any]) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + _encode({"type": kind, "sequence_number": next(seq),
                                                                        **data}) + b"\n\n"

        events = [sse(k, {"response": self.response("in_progress", None)})
                  for k in ("response.created", "response.in_progress")]
        if not self.calling:
            where = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
            text = self.answer

            def message(status: str, body: str | None) -> dict[str, Any]:
                content = [] if body is None else [{"type": "output_text", "text": body, "annotations": []}]
                return {"type": "message", "id": "msg_fake", "status": status, "role": "assistant",
                        "content": content}

            events.append(sse("response.output_item.added", {"output_index": 0, "item": message("in_progress", None)}))
            events.append(sse("response.content_part.added", {
                **where, "part": {"type": "output_text", "text": "", "annotations": []}}))
            events += [sse("response.output_text.delta", {**where, "delta": w if i == 0 else " " + w, "logprobs": []})
                       for i, w in enumerate(text.split(" "))]
            if self.truncate:  # the stock fake's knobs: no terminal event, or an `error` event instead
                return events
            if self.error_event:
                return [*events, sse("error", {"code": "server_error", "message": "boom", "param": None})]
            events.append(sse("response.output_text.done", {**where, "text": text, "logprobs": []}))
            events.append(sse("response.content_part.done", {
                **where, "part": {"type": "output_text", "text": text, "annotations": []}}))
            events.append(sse("response.output_item.done", {"output_index": 0, "item": message("completed", text)}))
            events.append(sse("response.completed", {"response": self.response("completed", text)}))
            return events
        for i, (_, name) in enumerate(self.calling):
            where = {"item_id": f"fc_fake{i}", "output_index": i}
            events.append(sse("response.output_item.added", {"output_index": i, "item": self._call_item(i, False)}))
            events += [sse("response.function_call_arguments.delta", {**where, "delta": p})
                       for p in _pieces(_args_json(name))]
            events.append(sse("response.function_call_arguments.done", {**where, "name": name,
                                                                        "arguments": _args_json(name)}))
            events.append(sse("response.output_item.done", {"output_index": i, "item": self._call_item(i, True)}))
        events.append(sse("response.completed", {"response": self.response("completed", None)}))
        return events


def embedding_for(text: str, dims: int) -> list[float]:
    """The fake's deterministic vector for `text` (float32 values)."""
    seed = sum(text.encode())
    return [struct.unpack("<f", struct.pack("<f", math.sin(seed + i)))[0] for i in range(dims)]


class ContractOpenAI(ToolChatMixin, FakeUpstream):
    """FakeUpstream with tool answers, `/v1/responses` and `/v1/embeddings` (default 8 dimensions)."""

    def __init__(self) -> None:
        super().__init__(max_recorded=1_000_000)  # tests count requests by index: never drop any
        self.responses = ContractResponses()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path in ("/v1/responses", "/v1/embeddings") and request.method == "POST":
            raw = await request.read()
            auth = request.headers.get("Authorization", "")
            self._record(request, raw, auth)
            if not auth.startswith("Bearer ") or not auth[7:].strip():
                return _error(401, "You didn't provide an API key.")
            if request.path == "/v1/responses":
                return await self.responses.handle(request)
            return self._embeddings(_json_body(raw))
        return await super()._handle(request)

    @staticmethod
    def _embeddings(body: dict[str, Any]) -> web.Response:
        inputs = body.get("input")
        texts = inputs if isinstance(inputs, list) else [inputs]
        dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else 8
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vector = embedding_for(str(text), dims)
            packed = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": packed if as_base64 else vector})
        tokens = sum(math.ceil(len(str(t)) / 4) for t in texts)
        return web.json_response({"object": "list", "data": data, "model": body.get("model"),
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


class ContractAzure(ToolChatMixin, FakeAzure):
    def __init__(self) -> None:
        super().__init__(max_recorded=1_000_000)


# --- the other providers: set the stock fake's scripted answer from the request ----------------------


class ScriptFromRequest:
    """Before the stock fake answers, script its answer from the request: `_answer_calls` with the tool
    names to call, else `_answer_text` (`plain`: no tool involved, the text is `ANSWERS[kind]`)."""

    kind: str
    decide: Callable[[dict[str, Any]], Decision]

    def _answer_text(self, text: str, *, plain: bool) -> None:
        raise NotImplementedError

    def _answer_calls(self, names: list[str]) -> None:
        raise NotImplementedError

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        decision = self.decide(_json_body(await request.read()))
        if decision is not None and decision[0] == "call":
            self._answer_calls(decision[1])
        else:
            self._answer_text(ANSWERS[self.kind] if decision is None else decision[1] or "", plain=decision is None)
        return await super()._handle(request)  # type: ignore[misc, no-any-return]


class ContractAnthropic(ScriptFromRequest, FakeAnthropic):
    """`usage_knobs`: extra `FakeAnswer` token counts (e.g. `cache_read_input_tokens`)."""

    kind, decide = "anthropic", staticmethod(anthropic_decision)
    usage_knobs: dict[str, int] = {}  # replaced per test, never mutated

    def _answer_text(self, text: str, *, plain: bool) -> None:
        self.answer = FakeAnswer(blocks=({"type": "text", "text": text},), **self.usage_knobs)

    def _answer_calls(self, names: list[str]) -> None:
        blocks = tuple({"type": "tool_use", "id": f"toolu_contract{next(_ids):06d}", "name": name,
                        "input": TOOL_ARGS[name]} for name in names)
        self.answer = FakeAnswer(blocks=blocks, stop_reason="tool_use", **self.usage_knobs)


class ContractGemini(ScriptFromRequest, FakeGemini):
    """`usage_knobs`: explicit `GeminiAnswer` token counts for plain text answers."""

    kind, decide = "gemini", staticmethod(gemini_decision)
    usage_knobs: dict[str, int] = {}  # replaced per test, never mutated

    def _answer_text(self, text: str, *, plain: bool) -> None:
        self.answer = GeminiAnswer.text(text, **(self.usage_knobs if plain else {}))

    def _answer_calls(self, names: list[str]) -> None:
        self.answer = GeminiAnswer(parts=[{"functionCall": {"name": name, "args": TOOL_ARGS[name]}} for name in names])


class ContractBedrock(ScriptFromRequest, FakeBedrock):
    """`usage_knobs`: extra `Script` token counts for plain text answers (`cache_read`, ...)."""

    kind, decide = "bedrock", staticmethod(bedrock_decision)
    usage_knobs: dict[str, int] = {}  # replaced per test, never mutated

    def _answer_text(self, text: str, *, plain: bool) -> None:
        self.script = Script(blocks=(Text(text),), **(self.usage_knobs if plain else {}))

    def _answer_calls(self, names: list[str]) -> None:
        self.script = Script(blocks=tuple(ToolUse(f"tooluse_contract{next(_ids):06d}", name, TOOL_ARGS[name])
                                          for name in names), stop_reason="tool_use")


class ContractOllama(ScriptFromRequest, FakeOllama):
    kind, decide = "ollama", staticmethod(chat_decision)

    def _answer_text(self, text: str, *, plain: bool) -> None:
        self.answer = OllamaAnswer(content=text)

    def _answer_calls(self, names: list[str]) -> None:
        self.answer = OllamaAnswer(tool_calls=[{"function": {"name": name, "arguments": TOOL_ARGS[name]}}
                                               for name in names])
