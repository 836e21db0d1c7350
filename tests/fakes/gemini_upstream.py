"""A faithful fake of the Gemini API's `generateContent`, for adapter tests.

Endpoints: ``POST /{v1beta|v1}/models/{model}:generateContent`` (a ``GenerateContentResponse``)
and ``POST /{v1beta|v1}/models/{model}:streamGenerateContent?alt=sse`` (SSE, every ``data:`` a
whole ``GenerateContentResponse``, no ``[DONE]``; the last one carries ``finishReason`` and the
final ``usageMetadata``, earlier ones a running ``usageMetadata`` as Gemini sends).

The key goes in ``x-goog-api-key`` (or ``?key=``); without one the answer is Gemini's 403
``PERMISSION_DENIED``, with a key outside ``valid_keys`` (when set) its 400 ``API_KEY_INVALID``.

What it answers: the next queued :class:`GeminiAnswer` (:meth:`FakeGemini.queue`), else
``answer``, else ``words`` words of text. ``candidateCount`` repeats the answer per candidate.
Text parts stream one word per chunk (a part's ``thoughtSignature`` rides on its last chunk);
function calls stream whole. With ``sign_function_calls`` every ``functionCall`` part without an
explicit signature gets a fresh random one (standard base64 with padding, as Gemini sends) that
is remembered in ``issued_signatures``; with ``require_thought_signatures`` a request whose
current turn (after the last user text) has a model ``functionCall`` part without an issued
signature is refused with Gemini's 400.

Requests are validated like Gemini validates them: unknown fields anywhere in the request,
in ``generationConfig`` or in a function declaration's ``Schema`` (``additionalProperties``,
``$schema``, ``strict``...) are 400 ``INVALID_ARGUMENT`` "Unknown name", as are empty parts,
roles other than user/model and a ``functionResponse`` without a name.

Usage: ``promptTokenCount`` is ``ceil(chars / 4)`` over all request text, candidates/thoughts
are words of answer text / thought text (+1 per function call), all overridable on the answer.

Knobs (attributes, read per request): ``fail_next(status, retry_delay=..., retry_after=...)``,
``truncate_after`` (stream: close the connection after N chunks), ``error_after`` (stream: send a
``data: {"error": ...}`` event after N chunks), ``models`` (unknown model -> 404). Requests are
recorded in ``requests`` with the key redacted (header and query).
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web

from tests.fakes.server import REDACTED, Failure, FakeServer, RecordedRequest, recorded, write_stream

__all__ = ["FakeGemini", "GeminiAnswer"]

_STATUS_NAMES: Final = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                        404: "NOT_FOUND", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
                        500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_TOP_LEVEL: Final = {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig",
                     "safetySettings", "cachedContent", "labels"}
_GENERATION: Final = {"temperature", "topP", "topK", "maxOutputTokens", "stopSequences", "candidateCount",
                      "responseMimeType", "responseSchema", "responseJsonSchema", "thinkingConfig", "seed",
                      "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs"}
_SCHEMA: Final = {"type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
                  "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
                  "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum", "maximum"}
_TYPES: Final = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"}
_OVERLOADED: Final = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
_PART_DATA: Final = {"text", "inlineData", "fileData", "functionCall", "functionResponse",
                     "executableCode", "codeExecutionResult"}


@dataclass(slots=True)
class GeminiAnswer:
    """One scripted model answer. ``parts`` are Gemini parts verbatim (``{"text"}``,
    ``{"text", "thought": True}``, ``{"functionCall": {"name", "args"}}``, optional
    ``thoughtSignature``). Token counts left ``None`` are derived from the request and parts."""

    parts: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = "STOP"
    block_reason: str | None = None
    prompt_tokens: int | None = None
    candidates_tokens: int | None = None
    thoughts_tokens: int | None = None
    cached_tokens: int = 0
    tool_use_prompt_tokens: int = 0

    @classmethod
    def text(cls, text: str, **kw: Any) -> GeminiAnswer:
        return cls(parts=[{"text": text}], **kw)


class _Invalid(ValueError):
    pass


class FakeGemini(FakeServer):
    """The fake on ``host:port`` (port 0 picks one). Not thread-safe; ``stop`` is idempotent.

    ``base_url`` is the provider ``base_url`` (no version segment), e.g. ``http://127.0.0.1:41234``.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, words: int = 6) -> None:
        self.host, self.port, self.words = host, port, words
        self.answer: GeminiAnswer | None = None
        self.sign_function_calls = True
        self.require_thought_signatures = False
        self.valid_keys: set[str] | None = None
        self.models: set[str] | None = None
        self.truncate_after: int | None = None
        self.error_after: int | None = None
        self.requests: list[RecordedRequest] = []
        self.issued_signatures: set[str] = set()
        self._queue: deque[GeminiAnswer] = deque()
        self._failures: deque[Failure] = deque()

    def queue(self, *answers: GeminiAnswer) -> None:
        """Answer the next requests with these, in order, before falling back to ``answer``."""
        self._queue.extend(answers)

    def fail_next(self, status: int, *, count: int = 1, message: str | None = None,
                  retry_after: str | None = None, retry_delay: str | None = None) -> None:
        """Answer the next ``count`` requests with a Gemini error body; ``retry_delay`` ("7s")
        goes into a ``RetryInfo`` detail, ``retry_after`` into the header."""
        self._failures.extend(Failure(status, retry_after, message, retry_delay) for _ in range(count))

    # -- handling -----------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read() if request.body_exists else b""
        key = request.headers.get("x-goog-api-key") or request.query.get("key", "")
        self._record(request, raw, key)
        match = re.fullmatch(r"/(v1beta|v1)/models/([^/:]+):(generateContent|streamGenerateContent)",
                             request.path)
        if request.method != "POST" or match is None:
            return _error(404, f"Invalid URL {request.method} {request.path}")
        if not key:
            return _error(403, "Method doesn't allow unregistered callers (callers without established "
                               "identity). Please use API Key or other form of API consumer identity to call "
                               "this API.")
        if self.valid_keys is not None and key not in self.valid_keys:
            return _error(400, "API key not valid. Please pass a valid API key.", reason="API_KEY_INVALID")
        if self._failures:
            failure = self._failures.popleft()
            return _error(failure.status, failure.message, retry_delay=failure.retry_delay,
                          headers={"retry-after": failure.retry_after} if failure.retry_after else None)
        model, stream = match.group(2), match.group(3) == "streamGenerateContent"
        if self.models is not None and model not in self.models:
            return _error(404, f"models/{model} is not found for API version {match.group(1)}, or is not "
                               "supported for generateContent.")
        try:
            body = msgspec.json.decode(raw)
            _validate(body)
            self._check_signatures(body)
        except msgspec.DecodeError:
            return _error(400, "Invalid JSON payload received.")
        except _Invalid as exc:
            return _error(400, str(exc))
        answer = self._queue.popleft() if self._queue else self.answer or GeminiAnswer.text(
            " ".join(f"word{i}" for i in range(self.words)))
        n = int((body.get("generationConfig") or {}).get("candidateCount") or 1)
        parts = [self._signed(p) for p in answer.parts]
        usage = _usage(answer, body, parts, n)
        response_id = os.urandom(8).hex()
        if not stream:
            out: dict[str, Any] = {"usageMetadata": usage, "modelVersion": model, "responseId": response_id}
            if answer.block_reason:
                out["promptFeedback"] = {"blockReason": answer.block_reason}
            else:
                out["candidates"] = [_candidate(i, parts, answer.finish_reason) for i in range(n)]
            return web.json_response(out)
        if "alt=sse" not in request.query_string:
            return _error(400, "this fake only streams with alt=sse")
        chunks = _chunks(answer, parts, usage, n, model, response_id)
        return await write_stream(request, "text/event-stream", [_sse(chunk) for chunk in chunks],
                                  drop_at=self.truncate_after, error_at=self.error_after, error=_sse(_OVERLOADED))

    def _signed(self, part: dict[str, Any]) -> dict[str, Any]:
        if "functionCall" in part and "thoughtSignature" not in part and self.sign_function_calls:
            sig = base64.b64encode(b"\xfb\xff" + os.urandom(31)).decode()  # '+', '/' and '=' all likely
            self.issued_signatures.add(sig)
            return {**part, "thoughtSignature": sig}
        if "thoughtSignature" in part:
            self.issued_signatures.add(part["thoughtSignature"])
        return part

    def _check_signatures(self, body: dict[str, Any]) -> None:
        if not self.require_thought_signatures:
            return
        contents = body["contents"]
        start = max((i for i, c in enumerate(contents) if c["role"] == "user"
                     and any("text" in p for p in c["parts"])), default=0)
        for i, content in enumerate(contents[start:], start):
            for j, part in enumerate(content["parts"]):
                if "functionCall" in part and part.get("thoughtSignature") not in self.issued_signatures:
                    raise _Invalid("Function call is missing a thought_signature in functionCall parts. This "
                                   f"is required for tools to work correctly. Position contents[{i}].parts[{j}].")

    def _record(self, request: web.BaseRequest, raw: bytes, key: str) -> None:
        path = re.sub(r"([?&]key=)[^&]*", r"\1" + REDACTED, request.path_qs)
        self.requests.append(recorded(request, raw, key, secrets=("x-goog-api-key",), path=path))


# --- pure builders ---------------------------------------------------------------------------


def _sse(data: Any) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\r\n\r\n"


def _error(status: int, message: str | None = None, *, reason: str | None = None, retry_delay: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    name = _STATUS_NAMES.get(status, "UNKNOWN")
    err: dict[str, Any] = {"code": status, "message": message or f"Fake {name}.", "status": name}
    details: list[dict[str, Any]] = []
    if reason:
        details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                        "domain": "googleapis.com"})
    if retry_delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    if details:
        err["details"] = details
    return web.json_response({"error": err}, status=status, headers=headers)


def _validate_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise _Invalid(f"Invalid value at '{where}': expected a Schema object.")
    for key, value in schema.items():
        if key not in _SCHEMA:
            raise _Invalid(f'Invalid JSON payload received. Unknown name "{key}" at \'{where}\': Cannot find field.')
        if key == "type" and str(value).upper() not in _TYPES:
            raise _Invalid(f"Invalid value at '{where}.type': {value!r}")
        if key == "properties":
            for name, sub in value.items():
                _validate_schema(sub, f"{where}.properties[{name}]")
        elif key == "items":
            _validate_schema(value, f"{where}.items")
        elif key == "anyOf":
            for i, sub in enumerate(value):
                _validate_schema(sub, f"{where}.any_of[{i}]")
        elif key == "enum" and not all(isinstance(v, str) for v in value):
            raise _Invalid(f"Invalid value at '{where}.enum': only strings are allowed.")


def _validate(body: Any) -> None:
    if not isinstance(body, dict):
        raise _Invalid("Invalid JSON payload received. Expected an object.")
    for key in body:
        if key not in _TOP_LEVEL:
            raise _Invalid(f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _Invalid("* GenerateContentRequest.contents: contents is not specified")
    for i, content in enumerate(contents):
        if content.get("role") not in ("user", "model"):
            raise _Invalid(f"Please use a valid role: user, model. (contents[{i}])")
        parts = content.get("parts")
        if not parts:
            raise _Invalid(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.")
        for j, part in enumerate(parts):
            if len(_PART_DATA & part.keys()) != 1:
                raise _Invalid(f"* GenerateContentRequest.contents[{i}].parts[{j}].data: required oneof field "
                               "'data' must have one initialized field")
            fr = part.get("functionResponse")
            if fr is not None and (not fr.get("name") or not isinstance(fr.get("response"), dict)):
                raise _Invalid(f"* contents[{i}].parts[{j}].function_response.name: Name cannot be empty.")
    for key in body.get("generationConfig") or {}:
        if key not in _GENERATION:
            raise _Invalid(f'Invalid JSON payload received. Unknown name "{key}" at \'generation_config\'.')
    schema = (body.get("generationConfig") or {}).get("responseSchema")
    if schema is not None:
        _validate_schema(schema, "generation_config.response_schema")
    for t, tool in enumerate(body.get("tools") or []):
        for d, decl in enumerate(tool.get("functionDeclarations") or []):
            if "parameters" in decl:
                _validate_schema(decl["parameters"], f"tools[{t}].function_declarations[{d}].parameters")


def _prompt_chars(body: dict[str, Any]) -> int:
    parts = [p for c in body["contents"] for p in c["parts"]]
    parts += (body.get("systemInstruction") or {}).get("parts") or []
    return sum(len(p.get("text") or msgspec.json.encode(p).decode()) for p in parts)


def _words(text: str) -> int:
    return len(text.split())


def _usage(answer: GeminiAnswer, body: dict[str, Any], parts: list[dict[str, Any]], n: int) -> dict[str, int]:
    prompt = answer.prompt_tokens if answer.prompt_tokens is not None else math.ceil(_prompt_chars(body) / 4)
    thoughts = answer.thoughts_tokens if answer.thoughts_tokens is not None else sum(
        _words(p.get("text", "")) for p in parts if p.get("thought"))
    cands = answer.candidates_tokens if answer.candidates_tokens is not None else sum(
        _words(p.get("text", "")) if "text" in p else 1 for p in parts if not p.get("thought"))
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": cands * n, "totalTokenCount": 0}
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts * n
    if answer.cached_tokens:
        usage["cachedContentTokenCount"] = answer.cached_tokens
    if answer.tool_use_prompt_tokens:
        usage["toolUsePromptTokenCount"] = answer.tool_use_prompt_tokens
    usage["totalTokenCount"] = sum(v for k, v in usage.items() if k != "cachedContentTokenCount")
    return usage


def _candidate(index: int, parts: list[dict[str, Any]], finish: str | None) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": index}
    if finish:
        cand["finishReason"] = finish
    return cand


def _pieces(part: dict[str, Any]) -> list[dict[str, Any]]:
    if "text" not in part:
        return [part]
    words = re.findall(r"\s*\S+\s*", part["text"]) or [part["text"]]
    flags = {k: v for k, v in part.items() if k not in ("text", "thoughtSignature")}
    out = [{**flags, "text": w} for w in words]
    if "thoughtSignature" in part:
        out[-1]["thoughtSignature"] = part["thoughtSignature"]
    return out


def _chunks(answer: GeminiAnswer, parts: list[dict[str, Any]], usage: dict[str, int], n: int, model: str,
            response_id: str) -> list[dict[str, Any]]:
    head = {"modelVersion": model, "responseId": response_id}
    if answer.block_reason:
        return [{**head, "promptFeedback": {"blockReason": answer.block_reason}, "usageMetadata": usage}]
    running = {"promptTokenCount": usage["promptTokenCount"], "totalTokenCount": usage["promptTokenCount"]}
    pieces = [p for part in parts for p in _pieces(part)] or [{"text": ""}]
    chunks: list[dict[str, Any]] = []
    for index in range(n):
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            cand = _candidate(index, [piece], answer.finish_reason if last else None)
            final = last and index == n - 1
            chunks.append({"candidates": [cand], "usageMetadata": usage if final else running, **head})
    return chunks
