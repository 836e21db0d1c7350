"""Google Gemini (Generative Language API): Chat Completions <-> `generateContent` over HTTPS + SSE.

Upstream: `POST {base}/{api_version}/models/{model}:generateContent` and
`:streamGenerateContent?alt=sse` (base `https://generativelanguage.googleapis.com`, api_version
`v1beta` unless `provider.options["api_version"]` says otherwise), key in `x-goog-api-key`.
Each SSE `data:` is a whole `GenerateContentResponse`; there is no `[DONE]`, so a stream that ends
before every candidate has a `finishReason` is a truncation and raises `UpstreamError`.

Request translation (pure, `to_gemini_request`): system/developer -> `systemInstruction`;
user/assistant -> `contents` with roles user/model (consecutive same-role turns merged); image
data URLs, audio and files -> `inlineData`, remote image URLs -> `fileData`; assistant tool calls
-> `functionCall` parts; tool results -> `functionResponse` parts named from the matching call
id; tools -> `functionDeclarations` with the JSON Schema narrowed to the OpenAPI subset Gemini
accepts (`gemini_schema`); tool_choice -> `toolConfig.functionCallingConfig`; sampling knobs,
`n`, `response_format` and `reasoning_effort` -> `generationConfig`.

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
import mimetypes
import os
import re
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from dataplane.providers.base import SSE_DONE, CallStats, ChatResponse, UpstreamCall, sse_event, usage_from_openai
from dataplane.providers.sse import iter_sse
from dataplane.providers.upstream import map_upstream_error, post
from schemas.errors import GatewayError, InvalidRequest, UpstreamError
from schemas.openai import CompletionTokensDetails, CompletionUsage, PromptTokensDetails

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
DEFAULT_API_VERSION = "v1beta"
SIGNATURE_SEPARATOR = "__ts_"

_encoder = msgspec.json.Encoder()
_any_decoder = msgspec.json.Decoder()


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


def tool_call_id(base: str, signature: str | None) -> str:
    """The OpenAI tool call id carrying `signature` (see the module docstring)."""
    if signature and re.fullmatch(r"[A-Za-z0-9+/_-]+=*", signature):
        return base + SIGNATURE_SEPARATOR + signature.rstrip("=").replace("+", "-").replace("/", "_")
    return base


def split_tool_call_id(call_id: str) -> tuple[str, str | None]:
    """Inverse of `tool_call_id`: (base id, standard base64 signature or None)."""
    base, sep, encoded = call_id.partition(SIGNATURE_SEPARATOR)
    if not sep or not encoded:
        return call_id, None
    std = encoded.replace("-", "+").replace("_", "/")
    return base, std + "=" * (-len(std) % 4)


def new_call_id() -> str:
    return "call_" + os.urandom(12).hex()


# --- request translation --------------------------------------------------------------------------

_SCHEMA_KEEP = frozenset({
    "description", "nullable", "minItems", "maxItems", "minLength", "maxLength", "pattern",
    "minimum", "maximum", "minProperties", "maxProperties", "propertyOrdering", "default",
})
_FORMATS = {"STRING": {"enum", "date-time"}, "INTEGER": {"int32", "int64"}, "NUMBER": {"float", "double"}}
_MAX_SCHEMA_DEPTH = 24


def gemini_schema(schema: Any, defs: Mapping[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    """A JSON Schema narrowed to the OpenAPI 3.0 subset Gemini's `Schema` accepts: local `$ref`s
    inlined (cycles cut at depth 24), type lists and `null` members -> `nullable`, `oneOf` ->
    `anyOf`, `allOf` merged, `const` -> `enum`, non-string enums moved into the description, and
    every other key (`$schema`, `additionalProperties`, `strict`, `title`, `exclusive*`, ...)
    dropped. Pure; never raises."""
    if not isinstance(schema, dict) or depth > _MAX_SCHEMA_DEPTH:
        return {}
    if defs is None:
        defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1]) if ref.startswith(("#/$defs/", "#/definitions/")) else None
        merged = {**(target if isinstance(target, dict) else {}), **{k: v for k, v in schema.items() if k != "$ref"}}
        return gemini_schema(merged, defs, depth + 1)
    out: dict[str, Any] = {k: v for k, v in schema.items() if k in _SCHEMA_KEEP}
    for sub in schema.get("allOf") or []:
        part = gemini_schema(sub, defs, depth + 1)
        out.setdefault("properties", {}).update(part.pop("properties", {}))
        out.setdefault("required", []).extend(part.pop("required", []))
        out.update({k: v for k, v in part.items() if k not in out})
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else [k for k in kind if isinstance(k, str)] if isinstance(
        kind, list) else []
    if "null" in kinds:
        out["nullable"] = True
    kinds = [k.upper() for k in kinds if k != "null"]
    variants = [gemini_schema(s, defs, depth + 1) for s in (schema.get("anyOf") or schema.get("oneOf") or [])]
    if any(v == {"nullable": True} or v.get("type") == "NULL" for v in variants):
        out["nullable"] = True
        variants = [v for v in variants if v != {"nullable": True} and v.get("type") != "NULL"]
    if len(kinds) > 1:
        variants = [{"type": k} for k in kinds]
    elif kinds:
        out["type"] = kinds[0]
    if len(variants) == 1:
        out = {**variants[0], **out}
    elif variants:
        out["anyOf"] = variants
    enum = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(enum, list) and enum:
        if None in enum:
            out["nullable"] = True
        values = [v for v in enum if v is not None]
        if values and all(isinstance(v, str) for v in values):
            out["enum"] = values
            out.setdefault("type", "STRING")
        elif values:
            allowed = "Allowed values: " + ", ".join(_encoder.encode(v).decode() for v in values)
            out["description"] = f"{out['description']} ({allowed})" if out.get("description") else allowed
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt in _FORMATS.get(out.get("type", ""), ()):
        out["format"] = fmt
    props = schema.get("properties")
    if isinstance(props, dict) and props:
        out["properties"] = {**out.get("properties", {}),
                             **{str(k): gemini_schema(v, defs, depth + 1) for k, v in props.items()}}
    if not out.get("properties"):
        out.pop("properties", None)
    required = [*out.pop("required", []), *(schema.get("required") or [])]
    names = out.get("properties", {})
    required = [r for r in dict.fromkeys(required) if r in names]
    if required:
        out["required"] = required
    items = schema.get("items")
    if isinstance(items, list):
        items = items[0] if items else None
    if isinstance(items, dict):
        out["items"] = gemini_schema(items, defs, depth + 1)
    return out


def _data_url(url: str) -> dict[str, Any] | None:
    if not url.startswith("data:"):
        return None
    meta, sep, data = url[5:].partition(",")
    if not sep or not meta.endswith(";base64"):
        raise InvalidRequest("Only base64 data URLs are supported for inline media.", param="messages")
    return {"inlineData": {"mimeType": meta[: -len(";base64")] or "application/octet-stream", "data": data}}


def _media_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url", "") if isinstance(image, dict) else str(image or "")
        inline = _data_url(url)
        if inline is not None:
            return inline
        mime = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        return {"inlineData": {"mimeType": f"audio/{audio.get('format', 'wav')}", "data": audio.get("data", "")}}
    if kind == "file":
        file = part.get("file") or {}
        inline = _data_url(str(file.get("file_data", "")))
        if inline is not None:
            return inline
    raise InvalidRequest(f"Content part type '{kind}' is not supported by Gemini.", param="messages")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or p.get("refusal") or "" for p in content if isinstance(p, dict))
    return ""


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest("Message content must be a string or a list of parts.", param="messages")
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            raise InvalidRequest("Message content parts must be objects.", param="messages")
        if part.get("type") in ("text", "refusal"):
            text = part.get("text") or part.get("refusal") or ""
            if text:
                parts.append({"text": text})
        else:
            parts.append(_media_part(part))
    return parts


def _signature_of(holder: Mapping[str, Any]) -> str | None:
    extra = holder.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    sig = google.get("thought_signature") if isinstance(google, dict) else None
    return sig if isinstance(sig, str) and sig else None


def _model_parts(msg: Mapping[str, Any], names: dict[str, str]) -> list[dict[str, Any]]:
    parts = _parts(msg.get("content"))
    text_sig = _signature_of(msg)
    if text_sig and parts:
        parts[-1]["thoughtSignature"] = text_sig
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        full_id = str(call.get("id") or "")
        base, id_sig = split_tool_call_id(full_id)
        name = str(fn.get("name") or "")
        names[full_id] = names[base] = name
        raw_args = fn.get("arguments") or "{}"
        try:
            args = _any_decoder.decode(raw_args) if isinstance(raw_args, str) else raw_args
        except msgspec.DecodeError:
            # Agents replay a model's malformed call so it can see its mistake; keep it as text.
            args = {"raw_arguments": raw_args}
        fc: dict[str, Any] = {"name": name, "args": args if isinstance(args, dict) else {"value": args}}
        if base and not base.startswith("call_"):
            fc["id"] = base
        part: dict[str, Any] = {"functionCall": fc}
        sig = _signature_of(call) or id_sig
        if sig:
            part["thoughtSignature"] = sig
        parts.append(part)
    return parts


def _function_response(msg: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    call_id = str(msg.get("tool_call_id") or "")
    base, _ = split_tool_call_id(call_id)
    name = names.get(call_id) or names.get(base) or msg.get("name")
    if not name:
        raise InvalidRequest(f"Tool message refers to unknown tool_call_id '{call_id[:64]}'.", param="messages")
    text = _text_of(msg.get("content"))
    try:
        parsed = _any_decoder.decode(text) if text.lstrip().startswith("{") else None
    except msgspec.DecodeError:
        parsed = None
    fr: dict[str, Any] = {"name": name, "response": parsed if isinstance(parsed, dict) else {"output": text}}
    if base and not base.startswith("call_"):
        fr["id"] = base
    return {"functionResponse": fr}


def _contents(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for msg in messages:
        if not isinstance(msg, dict):
            raise InvalidRequest("Each message must be an object.", param="messages")
        role = msg.get("role")
        if role in ("system", "developer"):
            system.extend({"text": t} for t in [_text_of(msg.get("content"))] if t)
            continue
        if role == "user":
            turn, parts = "user", _parts(msg.get("content"))
        elif role == "assistant":
            turn, parts = "model", _model_parts(msg, names)
        elif role in ("tool", "function"):
            turn, parts = "user", [_function_response(msg, names)]
        else:
            raise InvalidRequest(f"Message role '{role}' is not supported by Gemini.", param="messages")
        if not parts:
            continue
        if contents and contents[-1]["role"] == turn:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": turn, "parts": parts})
    return system, contents


def _tools(tools: Any) -> list[dict[str, Any]]:
    decls: list[dict[str, Any]] = []
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise InvalidRequest("Only function tools with a name are supported by Gemini.", param="tools")
        decl: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description"):
            decl["description"] = fn["description"]
        params = gemini_schema(fn.get("parameters"))
        if params.get("properties"):
            decl["parameters"] = {**params, "type": "OBJECT"}
        decls.append(decl)
    return [{"functionDeclarations": decls}] if decls else []


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    modes = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
    if isinstance(choice, str) and choice in modes:
        return {"functionCallingConfig": {"mode": modes[choice]}}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools") or {}
        if allowed.get("mode") != "required":
            return {"functionCallingConfig": {"mode": "AUTO"}}
        names = [(t.get("function") or {}).get("name") for t in allowed.get("tools") or [] if isinstance(t, dict)]
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [n for n in names if n]}}
    raise InvalidRequest("Unsupported tool_choice for Gemini.", param="tool_choice")


_THINKING_BUDGET = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576}


def _generation_config(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    simple = {"temperature": "temperature", "top_p": "topP", "top_k": "topK", "n": "candidateCount",
              "seed": "seed", "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty"}
    config.update({g: body[o] for o, g in simple.items() if body.get(o) is not None})
    if limit is not None:
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema")
        if schema:
            config["responseSchema"] = gemini_schema(schema)
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort in _THINKING_BUDGET:
        thinking: dict[str, Any] = {"includeThoughts": effort != "none"}
        if "gemini-3" in model:
            thinking["thinkingLevel"] = "minimal" if effort == "none" else effort
        else:
            thinking["thinkingBudget"] = _THINKING_BUDGET[effort]
        config["thinkingConfig"] = thinking
    return config


def to_gemini_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """Chat Completions body -> `GenerateContentRequest`. Pure; raises InvalidRequest for input
    Gemini cannot express (unknown roles, part types or tool kinds, bad tool-call JSON)."""
    system, contents = _contents(list(body.get("messages") or []))
    if not contents:
        raise InvalidRequest("Gemini needs at least one user, assistant or tool message.", param="messages")
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        tool_config = _tool_config(body.get("tool_choice"))
        if tool_config:
            out["toolConfig"] = tool_config
    config = _generation_config(body, str(body.get("model") or ""))
    if config:
        out["generationConfig"] = config
    return out


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
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["native_finish_reason"] = native
        return sse_event(_encoder.encode({"id": self.completion_id, "object": "chat.completion.chunk",
                                          "created": self.created, "model": self.model, "choices": [choice]}))

    def usage_event(self) -> bytes:
        return sse_event(_encoder.encode({"id": self.completion_id, "object": "chat.completion.chunk",
                                          "created": self.created, "model": self.model, "choices": [],
                                          "usage": msgspec.to_builtins(self.usage or CompletionUsage())}))

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
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamError(f"Provider '{call.provider.name}' closed the connection mid-response.") from None
        finally:
            resp.release()
        try:
            parsed = _response_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise UpstreamError(f"Provider '{call.provider.name}' returned a body that is not valid JSON.") from None
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
            async for event in iter_sse(resp.content):
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
                for out in translator.feed(chunk):
                    yield out
                if translator.usage is not None:
                    stats.usage = usage_from_openai(translator.usage)
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamError(f"Provider '{call.provider.name}' stream was interrupted.") from None
        finally:
            resp.release()
        if translator is None or not translator.finished:
            raise UpstreamError(f"Provider '{call.provider.name}' ended the stream before a finish reason.")
        if call.client_wants_usage and translator.usage is not None:
            yield translator.usage_event()
        yield SSE_DONE
