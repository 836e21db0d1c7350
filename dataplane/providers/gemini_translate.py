"""Chat Completions request -> Gemini `GenerateContentRequest`, and the tool-call id scheme that
carries thought signatures. Pure: no IO, no clock reads (only `new_call_id` draws randomness).

Mapping: system/developer -> `systemInstruction`; user/assistant -> `contents` with roles
user/model (consecutive same-role turns merged, since parallel tool results must share one turn);
image data URLs, audio and files -> `inlineData`, remote image URLs -> `fileData`; assistant tool
calls -> `functionCall` parts with their thought signature restored; tool results ->
`functionResponse` parts named from the matching call id (a JSON-object result is sent as the
response, anything else as `{"output": text}`); tools -> `functionDeclarations` with the JSON
Schema narrowed by `gemini_schema`; tool_choice -> `toolConfig.functionCallingConfig`;
max_tokens, temperature, top_p, stop, n, seed, penalties, response_format and reasoning_effort ->
`generationConfig` (reasoning_effort sets `thinkingLevel` on gemini-3 models, a `thinkingBudget`
otherwise, and asks for thoughts unless it is "none").

Lossy on purpose: `reasoning_content` in history is not replayed (Gemini keeps reasoning context
through signatures instead); malformed tool-call arguments are replayed as
`{"raw_arguments": text}` rather than refused, because agents echo a model's broken call back to
it; `parallel_tool_calls`, `logprobs`, `user` and `metadata` have no Gemini form and are ignored.

Thought-signature id scheme: `<id>__ts_<signature as unpadded base64url>` (see `tool_call_id`).
Ids Gemini issued are sent back as `functionCall.id` / `functionResponse.id`; generated ids
(`call_<hex>`) never are.
"""

from __future__ import annotations

import mimetypes
import os
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from schemas.errors import InvalidRequest

SIGNATURE_SEPARATOR = "__ts_"

_encoder = msgspec.json.Encoder()
_any_decoder = msgspec.json.Decoder()


def tool_call_id(base: str, signature: str | None) -> str:
    """The OpenAI tool call id carrying `signature`: `<base>__ts_<unpadded base64url>`, so it stays
    within `[A-Za-z0-9_-]` (ids some clients validate). A signature that is not base64 is not
    embedded (it still travels in `extra_content`)."""
    if signature and re.fullmatch(r"[A-Za-z0-9+/_-]+=*", signature):
        return base + SIGNATURE_SEPARATOR + signature.rstrip("=").replace("+", "-").replace("/", "_")
    return base


def split_tool_call_id(call_id: str) -> tuple[str, str | None]:
    """Inverse of `tool_call_id`: (base id, signature as padded standard base64, or None). The
    bytes are the ones Gemini sent even if it had used the URL-safe alphabet."""
    base, sep, encoded = call_id.partition(SIGNATURE_SEPARATOR)
    if not sep or not encoded:
        return call_id, None
    std = encoded.replace("-", "+").replace("_", "/")
    return base, std + "=" * (-len(std) % 4)


def new_call_id() -> str:
    return "call_" + os.urandom(12).hex()


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
        return "\n".join(t for p in content if isinstance(p, dict) for t in [p.get("text") or p.get("refusal")] if t)
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
    Gemini cannot express (unknown roles, part types or tool kinds, a tool result whose call id
    matches no earlier assistant tool call, a conversation with no non-system message)."""
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
