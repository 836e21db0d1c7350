"""schemas/prompts.py: placeholder parsing, rendering, template lookup and applying a template to
Chat and Responses bodies; the policy's `prompts_allow`."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from schemas.entities import Policy, PromptMessage, PromptParams, PromptTemplate, kv_key
from schemas.errors import InvalidRequest, NotFound
from schemas.policy import PolicyInput, decide
from schemas.prompts import CHAT, RESPONSES, apply_prompt, find_template, placeholders, render, template_variables
from schemas.snapshot import Snapshot


def tpl(version: int = 1, *contents: str, name: str = "greet", model: str | None = None,
        params: PromptParams | None = None, tid: str | None = None) -> PromptTemplate:
    msgs = tuple(PromptMessage(role="system" if i == 0 else "user", content=c) for i, c in enumerate(contents))
    return PromptTemplate(id=tid or f"prompt_{name}_{version}", workspace_id="ws_1", name=name, version=version,
                          messages=msgs or (PromptMessage(role="system", content="Hello {{name}}"),), model=model,
                          params=params or PromptParams())


def snap_of(*templates: PromptTemplate) -> Snapshot:
    return Snapshot.build({kv_key(t): t for t in templates}, 7)


# --- placeholders ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "names"), [
    ("no placeholders", ()),
    ("Hi {{name}}, from {{ city }} to {{name}}", ("name", "city")),
    ("{{a}}{{b_2}}{{c.d}}{{e-f}}", ("a", "b_2", "c.d", "e-f")),
    ("a lone }} is text", ()),
    ("{ {not} }", ()),
])
def test_placeholders_in_order_of_first_use(text: str, names: tuple[str, ...]) -> None:
    assert placeholders(text) == names


@pytest.mark.parametrize("text", ["Hi {{name", "{{}}", "{{ two words }}", "{{1abc}}", "ok {{a}} then {{", "{{a}"])
def test_malformed_placeholders_are_refused_naming_where(text: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        placeholders(text, "messages[2].content")
    assert exc.value.param == "messages[2].content"
    assert exc.value.code == "malformed_placeholder"
    assert "messages[2].content" in str(exc.value)


def test_template_variables_span_messages_and_name_the_bad_message() -> None:
    t = tpl(1, "You are {{role}}.", "Tell {{name}} about {{role}}")
    assert template_variables(t.messages) == ("role", "name")
    with pytest.raises(InvalidRequest) as exc:
        template_variables((PromptMessage(role="user", content="ok"), PromptMessage(role="user", content="{{x")))
    assert exc.value.param == "messages[1].content"


# --- render ------------------------------------------------------------------------------------

def test_render_substitutes_every_placeholder_once() -> None:
    t = tpl(1, "You are {{ role }}.", "Hi {{name}}, {{name}}! {{role}}")
    out = render(t, {"role": "a pirate", "name": "{{role}}"})
    assert out == [{"role": "system", "content": "You are a pirate."},
                   {"role": "user", "content": "Hi {{role}}, {{role}}! a pirate"}]  # values are not re-expanded


def test_render_converts_numbers_booleans_and_input_text() -> None:
    t = tpl(1, "{{n}} {{b}} {{t}}")
    out = render(t, {"n": 3, "b": True, "t": {"type": "input_text", "text": "words"}})
    assert out[0]["content"] == "3 true words"


def test_render_refuses_non_text_values() -> None:
    with pytest.raises(InvalidRequest) as exc:
        render(tpl(1, "{{img}}"), {"img": {"type": "input_image", "image_url": "x"}})
    assert exc.value.param == "prompt.variables.img"


def test_missing_and_extra_variables_are_named() -> None:
    t = tpl(1, "{{a}} {{b}} {{c}}")
    with pytest.raises(InvalidRequest) as exc:
        render(t, {"a": "1", "zz": "2", "yy": "3"})
    err = exc.value
    assert err.status == 400 and err.type == "invalid_request_error" and err.param == "prompt.variables"
    assert "missing 'b', 'c'" in str(err) and "unexpected 'yy', 'zz'" in str(err)
    with pytest.raises(InvalidRequest, match="missing 'a'"):
        render(tpl(1, "{{a}}"), {})
    with pytest.raises(InvalidRequest, match="unexpected 'x'"):
        render(tpl(1, "no variables"), {"x": 1})


# --- lookup ------------------------------------------------------------------------------------

def test_find_by_name_latest_or_pinned_and_by_entity_id() -> None:
    v1, v2 = tpl(1, "one {{name}}"), tpl(2, "two {{name}}")
    snap = snap_of(v2, v1)
    assert find_template(snap, "ws_1", "greet", None) is v2
    assert find_template(snap, "ws_1", "greet", 1) is v1
    assert find_template(snap, "ws_1", v1.id, None) is v1  # an entity id is that version
    assert find_template(snap, "ws_1", v1.id, 2) is v2


def test_unknown_template_version_or_workspace_is_404_naming_it() -> None:
    snap = snap_of(tpl(1))
    with pytest.raises(NotFound, match="'nope'") as exc:
        find_template(snap, "ws_1", "nope", None)
    assert exc.value.code == "prompt_not_found" and exc.value.param == "prompt.id"
    with pytest.raises(NotFound, match="no version 9") as exc:
        find_template(snap, "ws_1", "greet", 9)
    assert exc.value.code == "prompt_version_not_found"
    with pytest.raises(NotFound):
        find_template(snap, "ws_2", "greet", None)
    with pytest.raises(NotFound):
        find_template(snap, "ws_2", "prompt_greet_1", None)  # another workspace's entity id


# --- apply -------------------------------------------------------------------------------------

def body(**fields: Any) -> dict[str, Any]:
    return {"prompt": {"id": "greet", "variables": {"name": "Ada"}}, **fields}


def test_apply_to_chat_prepends_and_fills_model_and_params() -> None:
    snap = snap_of(tpl(1, "Hello {{name}}", model="mock/echo", params=PromptParams(temperature=0.2, max_tokens=50)))
    raw = body(messages=[{"role": "user", "content": "and you?"}], temperature=0.9)
    applied = apply_prompt(snap, "ws_1", raw, CHAT)
    assert applied.body == {"model": "mock/echo", "temperature": 0.9, "max_tokens": 50,
                            "messages": [{"role": "system", "content": "Hello Ada"},
                                         {"role": "user", "content": "and you?"}]}
    assert "prompt" in raw and "messages" in raw and raw["messages"][0]["content"] == "and you?"  # untouched
    assert applied.template.version == 1 and applied.added_bytes > len("Hello Ada")


def test_apply_to_chat_keeps_the_requests_model_and_max_completion_tokens() -> None:
    snap = snap_of(tpl(1, "Hi {{name}}", model="mock/echo", params=PromptParams(max_tokens=50)))
    applied = apply_prompt(snap, "ws_1", body(model="mock/fixed", max_completion_tokens=9), CHAT)
    assert applied.body["model"] == "mock/fixed" and "max_tokens" not in applied.body
    assert applied.body["messages"] == [{"role": "system", "content": "Hi Ada"}]


def test_apply_to_responses_prepends_to_input_and_maps_params() -> None:
    snap = snap_of(tpl(1, "Hi {{name}}", model="mock/echo",
                       params=PromptParams(max_tokens=50, top_p=0.5, seed=3)))
    applied = apply_prompt(snap, "ws_1", body(input="question"), RESPONSES)
    assert applied.body == {"model": "mock/echo", "max_output_tokens": 50, "top_p": 0.5,
                            "input": [{"role": "system", "content": "Hi Ada"},
                                      {"role": "user", "content": "question"}]}
    items = [{"type": "message", "role": "user", "content": "x"}]
    assert apply_prompt(snap, "ws_1", body(input=items), RESPONSES).body["input"][1:] == items
    # A Responses-shaped body posted to Chat (Cursor) is applied in its own shape.
    assert "input" in apply_prompt(snap, "ws_1", body(input="q"), CHAT).body


@pytest.mark.parametrize(("prompt", "param"), [
    ({"variables": {}}, "prompt.id"),
    ({"id": "greet", "variables": []}, "prompt.variables"),
    ({"id": "greet", "version": "v1", "variables": {"name": "x"}}, "prompt.version"),
    ({"id": "greet", "version": 0, "variables": {"name": "x"}}, "prompt.version"),
])
def test_malformed_prompt_objects_are_400_naming_the_field(prompt: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        apply_prompt(snap_of(tpl(1)), "ws_1", {"prompt": prompt}, RESPONSES)
    assert exc.value.param == param


def test_version_as_string_or_int_pins() -> None:
    snap = snap_of(tpl(1, "one {{name}}"), tpl(2, "two {{name}}"))
    for version in ("1", 1):
        raw = {"prompt": {"id": "greet", "version": version, "variables": {"name": "A"}}, "input": "q"}
        assert apply_prompt(snap, "ws_1", raw, RESPONSES).body["input"][0]["content"] == "one A"


def test_the_apis_are_the_chat_and_responses_ingresses() -> None:
    from dataplane.ingress.chat import ChatIngress
    from dataplane.ingress.responses import ResponsesIngress
    assert (ChatIngress.name, ResponsesIngress.name) == (CHAT, RESPONSES)


# --- policy: prompts_allow ---------------------------------------------------------------------

NOON = datetime.datetime(2026, 1, 5, 12, 0, tzinfo=datetime.UTC)


def ask(prompt: str) -> PolicyInput:
    return PolicyInput(endpoint="/v1/responses", model="mock/echo", provider_type="mock", tools=(), max_tokens=None,
                       est_cost_nanos=0, prompt=prompt)


def test_prompts_allow_denies_other_templates_naming_the_rule() -> None:
    ws = Policy(id="p_ws", workspace_id="ws_1", scope="workspace", scope_id="ws_1", prompts_allow=("support-*",))
    assert decide([ws], None, None, ask("support-reply"), NOON).allowed
    assert decide([ws], None, None, ask(""), NOON).allowed  # no template: nothing to restrict
    v = decide([ws], None, None, ask("marketing"), NOON)
    assert not v.allowed and v.code == "policy_denied" and v.rule == "policy:p_ws.prompts_allow"
    assert "'marketing'" in v.message and "support-*" in v.message


def test_the_most_specific_prompts_allow_decides() -> None:
    ws = Policy(id="p_ws", workspace_id="ws_1", scope="workspace", scope_id="ws_1", prompts_allow=("a",))
    key = Policy(id="p_key", workspace_id="ws_1", scope="key", scope_id="vk_1", prompts_allow=("b",))
    assert decide([ws, key], None, None, ask("b"), NOON).allowed
    assert decide([ws, key], None, None, ask("a"), NOON).rule == "policy:p_key.prompts_allow"
