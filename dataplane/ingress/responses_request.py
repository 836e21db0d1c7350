"""Responses API requests as Chat Completions requests (pure; no IO).

`translate_request` validates a Responses body and builds the equivalent Chat body:
`instructions` and `system`/`developer` messages become system messages (`developer` is sent as
`system`, which every Chat provider accepts); `function_call` items become assistant `tool_calls`
(consecutive calls merge into one assistant message, after its text); `function_call_output` items
become `tool` messages. Flat function tools become nested Chat tools; the function tools of a
Codex `namespace` tool are flattened to `<namespace>__<name>`, the delimiter Codex itself uses
(the ingress splits them back into `{name, namespace}` on the way out).

Dropped, because Chat has no equivalent (listed in `Translation.dropped`): hosted and non-function
tools (`web_search`, `file_search`, `custom`, `mcp`, `local_shell`, `image_generation`, ...) and a
`tool_choice` naming one; `reasoning` items and hosted-tool call items in `input`; images and files
inside tool outputs; `reasoning.summary`, `include`, `truncation`, `store`, `metadata`.
Refused (400), because they need state the gateway does not keep: `previous_response_id`,
`conversation`, `prompt`, `background`, and `item_reference` input items.

`responses_body_to_chat` is the same translation for Cursor, which sends Responses-shaped bodies
to `/v1/chat/completions`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from schemas.errors import InvalidRequest
from schemas.http import validate
from schemas.responses import (
    CustomToolCallItem,
    CustomToolCallOutputItem,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputFile,
    InputImage,
    InputText,
    MessageItem,
    NamespaceTool,
    RefusalPart,
    ResponsesRequest,
)

log = structlog.get_logger(__name__)

NAMESPACE_DELIMITER = "__"
_STATEFUL = ("previous_response_id", "conversation", "prompt", "background")
S = TypeVar("S")


def flat_tool_name(namespace: str, name: str) -> str:
    """Codex's canonical flat name: `ns__name`, stray underscores at the seam trimmed."""
    return f"{namespace.rstrip('_')}{NAMESPACE_DELIMITER}{name.lstrip('_')}"


@dataclass(slots=True)
class Translation:
    """A Chat Completions body, and what of the Responses request had no Chat equivalent
    (`"tools[7]:web_search"`, `"input[4]:reasoning"`, ...)."""

    request: ResponsesRequest
    body: dict[str, Any]
    dropped: list[str] = field(default_factory=list)


def _convert(raw: Any, schema: type[S], where: str) -> S:
    """`raw` as `schema`, or a 400 whose `param` is rooted at `where` (e.g. `input[3].content`)."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"Invalid request body: '{where}' must be an object.", param=where)
    try:
        return validate(raw, schema)
    except InvalidRequest as err:
        param = f"{where}.{err.param}" if err.param else where
        detail = err.message.removeprefix("Invalid request body: ")
        raise InvalidRequest(f"Invalid request body at '{where}': {detail}", param=param) from None


def _chat_tool(tool: FunctionTool, name: str) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _tools(tools: list[dict[str, Any]], dropped: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind == "function":
            fn = _convert(tool, FunctionTool, f"tools[{i}]")
            out.append(_chat_tool(fn, fn.name))
        elif kind == "namespace":
            ns = _convert(tool, NamespaceTool, f"tools[{i}]")
            for j, inner in enumerate(ns.tools):
                if inner.get("type", "function") != "function":
                    dropped.append(f"tools[{i}].tools[{j}]:{inner.get('type')}")
                    continue
                fn = _convert(inner, FunctionTool, f"tools[{i}].tools[{j}]")
                out.append(_chat_tool(fn, flat_tool_name(ns.name, fn.name)))
        else:
            dropped.append(f"tools[{i}]:{kind}")
    return out


def _tool_choice(choice: str | dict[str, Any], dropped: list[str]) -> str | dict[str, Any] | None:
    if isinstance(choice, str):
        return choice
    kind = choice.get("type")
    if kind == "function":
        name, namespace = choice.get("name"), choice.get("namespace")
        if not isinstance(name, str):
            raise InvalidRequest("Invalid request body: 'tool_choice.name' must be a string.", param="tool_choice.name")
        if isinstance(namespace, str):
            name = flat_tool_name(namespace, name)
        return {"type": "function", "function": {"name": name}}
    if kind == "allowed_tools":
        allowed = [{"type": "function", "function": {"name": t["name"]}} for t in choice.get("tools") or []
                   if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)]
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": allowed}}
    dropped.append(f"tool_choice:{kind}")
    return None


def _text_parts(parts: list[dict[str, Any]], where: str, dropped: list[str]) -> str:
    """The text of a tool output given as content parts; images and files cannot ride along."""
    texts: list[str] = []
    for j, part in enumerate(parts):
        if part.get("type") in ("input_text", "output_text", "text"):
            texts.append(_convert(part, InputText, f"{where}[{j}]").text)
        else:
            dropped.append(f"{where}[{j}]:{part.get('type')}")
    return "\n".join(texts)


def _chat_message(msg: MessageItem, where: str) -> dict[str, Any]:
    role = "system" if msg.role == "developer" else msg.role
    if isinstance(msg.content, str):
        return {"role": role, "content": msg.content}
    parts: list[dict[str, Any]] = []
    refusal: str | None = None
    for j, part in enumerate(msg.content):
        pw = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": _convert(part, InputText, pw).text})
        elif kind == "refusal" and role == "assistant":
            refusal = _convert(part, RefusalPart, pw).refusal
        elif kind == "input_image" and role == "user":
            image = _convert(part, InputImage, pw)
            if not image.image_url:
                raise InvalidRequest(f"Unsupported '{pw}': only images given by 'image_url' (a URL or a data URL) "
                                     "can be forwarded; uploaded file ids cannot.", param=f"{pw}.image_url")
            url: dict[str, Any] = {"url": image.image_url}
            if image.detail:
                url["detail"] = image.detail
            parts.append({"type": "image_url", "image_url": url})
        elif kind == "input_file" and role == "user":
            file = _convert(part, InputFile, pw)
            if not (file.file_data or file.file_id):
                raise InvalidRequest(f"Unsupported '{pw}': send the file as 'file_data' or 'file_id'; "
                                     "'file_url' cannot be forwarded.", param=f"{pw}.file_data")
            spec = {"file_data": file.file_data, "file_id": file.file_id, "filename": file.filename}
            parts.append({"type": "file", "file": {k: v for k, v in spec.items() if v is not None}})
        else:
            raise InvalidRequest(f"Unsupported content part type '{kind}' in a '{msg.role}' message at '{pw}'.",
                                 param=f"{pw}.type")
    all_text = all(p["type"] == "text" for p in parts)
    if role == "assistant":
        out: dict[str, Any] = {"role": role, "content": "".join(p["text"] for p in parts) if parts else None}
        if refusal is not None:
            out["refusal"] = refusal
        return out
    if role == "system" or (all_text and len(parts) == 1):
        return {"role": role, "content": "\n\n".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _append_tool_call(messages: list[dict[str, Any]], call_id: str, name: str, arguments: str) -> None:
    """Consecutive calls (and calls right after assistant text) share one assistant message."""
    last = messages[-1] if messages else None
    if last is None or last.get("role") != "assistant":
        last = {"role": "assistant", "content": None}
        messages.append(last)
    last.setdefault("tool_calls", []).append(
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})


def _messages(items: str | list[dict[str, Any]], dropped: list[str]) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_chat_message(_convert(item, MessageItem, where), where))
        elif kind == "function_call":
            call = _convert(item, FunctionCallItem, where)
            name = flat_tool_name(call.namespace, call.name) if call.namespace else call.name
            _append_tool_call(messages, call.call_id, name, call.arguments)
        elif kind == "function_call_output":
            result = _convert(item, FunctionCallOutputItem, where)
            content = result.output if isinstance(result.output, str) \
                else _text_parts(result.output, f"{where}.output", dropped)
            messages.append({"role": "tool", "tool_call_id": result.call_id, "content": content})
        elif kind == "custom_tool_call":
            # Free-form tools are not offered to Chat models, but their past calls stay in context.
            custom = _convert(item, CustomToolCallItem, where)
            _append_tool_call(messages, custom.call_id, custom.name, json.dumps({"input": custom.input}))
        elif kind == "custom_tool_call_output":
            custom_out = _convert(item, CustomToolCallOutputItem, where)
            content = custom_out.output if isinstance(custom_out.output, str) \
                else _text_parts(custom_out.output, f"{where}.output", dropped)
            messages.append({"role": "tool", "tool_call_id": custom_out.call_id, "content": content})
        elif kind == "item_reference":
            raise InvalidRequest(f"Unsupported '{where}': item references need stored responses, and this "
                                 "gateway stores none. Send the items themselves.", param=f"{where}.type")
        elif isinstance(kind, str):
            dropped.append(f"{where}:{kind}")  # reasoning, web_search_call, local_shell_call, compaction, ...
        else:
            raise InvalidRequest(f"Invalid request body: '{where}' needs a 'type' (or a 'role').",
                                 param=f"{where}.type")
    return messages


def translate_request(raw: dict[str, Any], *, refuse_state: bool = True) -> Translation:
    """Validate a Responses request body and translate it to a Chat Completions body. Pure.

    Raises InvalidRequest (400, with `param`) for malformed bodies, for content that cannot be
    forwarded, and (with `refuse_state`) for fields that need server-side state."""
    req = validate(raw, ResponsesRequest)
    if refuse_state:
        for name in _STATEFUL:
            if getattr(req, name) not in (None, False):
                raise InvalidRequest(f"'{name}' is not supported: this gateway stores no responses or prompts. "
                                     "Send the whole conversation in 'input'.", param=name)
    dropped = [name for name in _STATEFUL if getattr(req, name) not in (None, False)]
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += _messages(req.input, dropped)
    if not messages:
        raise InvalidRequest("Invalid request body: 'input' has no message for the model.", param="input")
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    tools = _tools(req.tools or [], dropped)
    if tools:
        body["tools"] = tools
        if req.tool_choice is not None and (choice := _tool_choice(req.tool_choice, dropped)) is not None:
            body["tool_choice"] = choice
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    elif req.tool_choice not in (None, "auto", "none"):
        dropped.append("tool_choice")  # it named tools that were all dropped
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    for key in ("temperature", "top_p", "user", "prompt_cache_key", "safety_identifier", "service_tier"):
        if (value := getattr(req, key)) is not None:
            body[key] = value
    if req.text is not None:
        fmt = req.text.format or {}
        if fmt.get("type") == "json_schema":
            spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        elif fmt.get("type") == "json_object":
            body["response_format"] = {"type": "json_object"}
        if req.text.verbosity is not None:
            body["verbosity"] = req.text.verbosity
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # the terminal event must carry usage
    return Translation(req, body, dropped)


def responses_body_to_chat(raw: dict[str, Any]) -> dict[str, Any]:
    """For Cursor, which POSTs Responses-shaped bodies (`input`, no `messages`) to
    `/v1/chat/completions` and reads Chat Completions back: the equivalent Chat body. Fields that
    need server state are dropped rather than refused (Cursor sends the whole conversation), and
    the client's own `stream_options` are kept. Raises InvalidRequest like `translate_request`."""
    translation = translate_request(raw, refuse_state=False)
    body = translation.body
    body.pop("stream_options", None)
    if isinstance(raw.get("stream_options"), dict):
        body["stream_options"] = raw["stream_options"]
    if translation.dropped:
        log.debug("responses_to_chat_dropped", dropped=translation.dropped)
    return body


def looks_like_responses_body(raw: dict[str, Any]) -> bool:
    return "input" in raw and "messages" not in raw
