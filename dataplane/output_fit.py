"""Fit a translated Chat body's output bound to the OpenAI model it goes to.

Clients written for one provider send bounds another refuses: Claude Code routed to an OpenAI
model sends `max_tokens: 32000`, which OpenAI's reasoning models (o1, o3, o4, gpt-5) refuse
(they take `max_completion_tokens`) and which most models' output cap is below. Before dispatch
to an `openai` or `azure` provider, `fit_output_tokens` renames the field for reasoning models
and lowers the bound to the model's known output cap (`schemas.catalog.max_output_tokens`;
a model whose cap is unknown is not clamped). The call's event says so (`anomalies`:
"max_tokens_renamed", "max_tokens_clamped").

A fit only ever lowers a bound, never raises it, so a budget hold computed from the client's
(or governance's injected) `max_tokens` still covers the call.
"""

from __future__ import annotations

from typing import Any

from dataplane.call import Call
from schemas.catalog import is_reasoning_model, max_output_tokens

RENAMED = "max_tokens_renamed"
CLAMPED = "max_tokens_clamped"
# Provider types that serve OpenAI's own models behind the Chat Completions API.
OPENAI_HOSTS = frozenset({"openai", "azure"})
BOUND_FIELDS = ("max_completion_tokens", "max_tokens")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def fit_output_tokens(body: dict[str, Any], provider_type: str, model: str) -> tuple[str, ...]:
    """Rename and clamp the output bound of the Chat `body` (mutated in place) for `model` on a
    provider of `provider_type`; the notes of what changed (`RENAMED`, `CLAMPED`), in that order.

    Pure and idempotent: a second pass changes nothing. Other provider types are left alone."""
    if provider_type not in OPENAI_HOSTS:
        return ()
    notes: list[str] = []
    if "max_tokens" in body and is_reasoning_model(model):
        value = body.pop("max_tokens")
        # A body that names both keeps its max_completion_tokens (OpenAI's own precedence).
        body.setdefault("max_completion_tokens", value)
        notes.append(RENAMED)
    cap = max_output_tokens(provider_type, model)
    if cap is not None:
        for name in BOUND_FIELDS:
            value = body.get(name)
            if isinstance(value, int) and _positive_int(value) and value > cap:
                body[name] = cap
                if CLAMPED not in notes:
                    notes.append(CLAMPED)
    return tuple(notes)


def fit_call_output(call: Call, body: dict[str, Any]) -> None:
    """`fit_output_tokens` for the call's target, with its notes flagged on the call and the
    call's `max_tokens` lowered to the clamped bound (never raised)."""
    target = call.target
    if target is None:
        return
    for note in fit_output_tokens(body, target.provider.type, target.model):
        call.flag(note)
    bound = next((v for v in (body.get(n) for n in BOUND_FIELDS) if _positive_int(v)), None)
    if bound is not None and call.max_tokens is not None and bound < call.max_tokens:
        call.max_tokens = bound
