"""Prompt templates: placeholder parsing, rendering, and applying a template to a request. Pure.

A template (`schemas.entities.PromptTemplate`) is a list of chat messages whose contents may hold
`{{variable}}` placeholders (a name of letters, digits, `_`, `.` or `-`, not starting with a digit
or punctuation; spaces inside the braces are allowed). A `{{` with no `}}` after it, or braces
around anything but such a name, is malformed (`placeholders` raises, the admin API answers 400).
A lone `}}` is literal text.

A request names a template with the OpenAI Responses `prompt` shape,
`{"id": <name or entity id>, "version"?: "<n>", "variables": {...}}` (`apply_prompt`). The
variables must be exactly the template's placeholders: missing or extra ones are a 400 naming
them (`param` "prompt.variables"); an unknown name or version a 404 naming it. Substitution is one
pass (a value containing `{{x}}` is not expanded again). The template's messages come first, then
the request's own; its `model` and `params` fill only what the request leaves unset.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.entities import PromptMessage, PromptTemplate
from schemas.errors import InvalidRequest, NotFound
from schemas.snapshot import Snapshot

__all__ = ["AppliedPrompt", "apply_prompt", "find_template", "placeholders", "render", "template_variables"]

_NAME = r"[A-Za-z_][A-Za-z0-9_.-]{0,63}"
_PLACEHOLDER = re.compile(r"\{\{\s*(" + _NAME + r")\s*\}\}")
_OPEN = "{{"
_MAX_VERSION = 10**9
# The ingress APIs a template applies to (`Ingress.name`).
CHAT, RESPONSES = "chat.completions", "openai.responses"
PROMPT_APIS = frozenset({CHAT, RESPONSES})


def placeholders(text: str, where: str = "content") -> tuple[str, ...]:
    """The variable names `text` refers to, in order of first use. Raises InvalidRequest
    (`param` `where`, code `malformed_placeholder`) for a `{{` that does not open a valid one."""
    names: list[str] = []
    pos = 0
    while (start := text.find(_OPEN, pos)) >= 0:
        match = _PLACEHOLDER.match(text, start)
        if match is None:
            end = text.find("}}", start + 2)
            shown = text[start:start + 40] if end < 0 else text[start:min(end + 2, start + 40)]
            why = "is never closed with '}}'" if end < 0 else f"must wrap a variable name ({_NAME})"
            raise InvalidRequest(f"Malformed placeholder at '{where}' offset {start}: {shown!r} {why}.",
                                 param=where, code="malformed_placeholder")
        if match.group(1) not in names:
            names.append(match.group(1))
        pos = match.end()
    return tuple(names)


def template_variables(messages: Iterable[PromptMessage], where: str = "messages") -> tuple[str, ...]:
    """Every variable the messages use, in order of first use; raises as `placeholders` does."""
    names: list[str] = []
    for i, msg in enumerate(messages):
        for name in placeholders(msg.content, f"{where}[{i}].content"):
            if name not in names:
                names.append(name)
    return tuple(names)


def _value(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = value.get("text") if isinstance(value, dict) and value.get("type") == "input_text" else None
    if isinstance(text, str):
        return text
    raise InvalidRequest(f"Prompt variable '{name}' must be a string, a number, a boolean or an input_text "
                         "object; only text can be substituted.", param=f"prompt.variables.{name}")


def render(template: PromptTemplate, variables: dict[str, Any]) -> list[dict[str, Any]]:
    """The template's messages as chat messages with every placeholder substituted. Raises
    InvalidRequest (`prompt.variables`) naming missing and extra variables."""
    wanted = template_variables(template.messages)
    missing = [n for n in wanted if n not in variables]
    extra = sorted(n for n in variables if n not in wanted)
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f"'{n}'" for n in missing))
        if extra:
            parts.append("unexpected " + ", ".join(f"'{n[:64]}'" for n in extra[:10]))
        raise InvalidRequest(f"Prompt '{template.name}' version {template.version} variables: {'; '.join(parts)} "
                             f"(it uses: {', '.join(wanted) or 'none'}).", param="prompt.variables",
                             code="invalid_prompt_variables")
    values = {n: _value(n, variables[n]) for n in wanted}
    return [{"role": m.role, "content": _PLACEHOLDER.sub(lambda mt: values[mt.group(1)], m.content)}
            for m in template.messages]


def _version(raw: Any) -> int | None:
    if raw is None:
        return None
    text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if isinstance(text, str) and text.isdigit() and 0 < int(text) <= _MAX_VERSION:
        return int(text)
    raise InvalidRequest("'prompt.version' must be a positive integer (or its string).", param="prompt.version")


def find_template(snap: Snapshot, workspace_id: str, ref: str, version: int | None) -> PromptTemplate:
    """The template `ref` (a name, or one version's entity id) of the workspace: `version`, or
    the newest when None (an entity id with no version is that version). 404 naming it."""
    versions = snap.prompts.get((workspace_id, ref), ())
    if not versions:
        by_id = snap.entities.get(f"prompt.{ref}")
        if isinstance(by_id, PromptTemplate) and by_id.workspace_id == workspace_id:
            if version is None:
                return by_id
            versions = snap.prompts.get((workspace_id, by_id.name), ())
    if not versions:
        raise NotFound(f"Prompt template '{ref[:64]}' does not exist in this workspace.", param="prompt.id",
                       code="prompt_not_found")
    if version is None:
        return max(versions, key=lambda t: t.version)
    for t in versions:
        if t.version == version:
            return t
    raise NotFound(f"Prompt template '{ref[:64]}' has no version {version} (latest: "
                   f"{max(t.version for t in versions)}).", param="prompt.version", code="prompt_version_not_found")


@dataclass(frozen=True, slots=True)
class AppliedPrompt:
    """The request body with the template applied (`prompt` removed), the template used, and the
    size in bytes of what the template added (for the input-token bound)."""

    body: dict[str, Any]
    template: PromptTemplate
    added_bytes: int


# Template params by API: Chat takes them all; Responses knows fewer, `max_tokens` by its name.
_RESPONSES_PARAMS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_output_tokens"}


def apply_prompt(snap: Snapshot, workspace_id: str, raw: dict[str, Any], api: str) -> AppliedPrompt:
    """Render `raw["prompt"]` (a dict) into `raw` for the ingress `api` (CHAT or RESPONSES; a
    Responses-shaped body posted to Chat, `input` and no `messages`, counts as RESPONSES). Does
    not modify `raw`. Raises InvalidRequest / NotFound as the module docstring says."""
    prompt = raw["prompt"]
    ref = prompt.get("id")
    if not isinstance(ref, str) or not ref:
        raise InvalidRequest("'prompt.id' must name a prompt template (its name or id).", param="prompt.id")
    variables = prompt.get("variables") or {}
    if not isinstance(variables, dict):
        raise InvalidRequest("'prompt.variables' must be an object.", param="prompt.variables")
    template = find_template(snap, workspace_id, ref, _version(prompt.get("version")))
    rendered = render(template, variables)
    body = {k: v for k, v in raw.items() if k != "prompt"}
    if template.model and not body.get("model"):
        body["model"] = template.model
    params = msgspec.to_builtins(template.params)
    if api == RESPONSES or ("input" in body and "messages" not in body):
        own = body.get("input", [])
        body["input"] = rendered + ([{"role": "user", "content": own}] if isinstance(own, str) else list(own))
        for name, value in params.items():
            if name in _RESPONSES_PARAMS:
                body.setdefault(_RESPONSES_PARAMS[name], value)
    else:
        own_messages = body.get("messages") or []
        if isinstance(own_messages, list):  # anything else stays as sent, for validation to refuse
            body["messages"] = rendered + own_messages
        for name, value in params.items():
            if name == "max_tokens" and "max_completion_tokens" in body:
                continue
            body.setdefault(name, value)
    return AppliedPrompt(body, template, len(msgspec.json.encode(rendered)))
