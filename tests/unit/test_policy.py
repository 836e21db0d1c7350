"""schemas/policy.py: the pure policy decision (rule by rule, specificity, and its properties)."""

from __future__ import annotations

import datetime
import itertools
import random
from fnmatch import fnmatchcase
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.entities import EscalationGrant, Policy, Scope, TimeWindow, VirtualKey, Workspace
from schemas.policy import (
    ALLOW,
    MAX_MESSAGE_LEN,
    REFUSAL_CODES,
    Effect,
    PolicyInput,
    Verdict,
    decide,
    in_window,
    parse_hhmm,
    valid_timezone,
    window_problem,
)

UTC = datetime.UTC
MONDAY_NOON = datetime.datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # 2026-01-05 is a Monday
KEY = VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="h")
WS = Workspace(id="ws_1", name="one")
GRANT = EscalationGrant(id="esc_1", workspace_id="ws_1", key_id="vk_1", rule="policy:p.escalate_over_usd",
                        expires_at_ms=2**62)
_ids = itertools.count()


def pol(scope: Scope = "workspace", pid: str | None = None, **rules: Any) -> Policy:
    """A policy on `scope` (scope_id `<scope>_1`) with the given rules."""
    return Policy(id=pid or f"pol_{next(_ids)}", workspace_id="ws_1", scope=scope, scope_id=f"{scope}_1", **rules)


def ask(model: str = "openai/gpt-4o", *, endpoint: str = "/v1/chat/completions", provider_type: str | None = None,
        tools: tuple[str, ...] = (), max_tokens: int | None = None, cost: int = 0,
        escalation: EscalationGrant | None = None) -> PolicyInput:
    ptype = provider_type if provider_type is not None else model.partition("/")[0] if model else ""
    return PolicyInput(endpoint=endpoint, model=model, provider_type=ptype, tools=tools, max_tokens=max_tokens,
                       est_cost_nanos=cost, escalation=escalation)


def at(day: int, hhmm: str, tz: str = "UTC") -> datetime.datetime:
    """The UTC instant of local `hhmm` in `tz` on weekday `day` (0 = Mon) of the week of 2026-01-05."""
    h, m = (int(x) for x in hhmm.split(":"))
    return datetime.datetime(2026, 1, 5 + day, h, m, tzinfo=ZoneInfo(tz)).astimezone(UTC)


def check(v: Verdict, allowed: bool, code: str | None, rule: str) -> None:
    assert v.allowed is allowed, v
    assert v.code == code, v
    assert v.rule == rule, v
    if not allowed:
        assert v.message and len(v.message) <= MAX_MESSAGE_LEN
        assert v.outcome == ("escalate" if code == "escalation_required" else "deny")


# --- the fast path -------------------------------------------------------------------------------


def test_nothing_on_the_path_is_the_shared_allow() -> None:
    assert decide((), None, None, ask(), MONDAY_NOON) is ALLOW
    assert decide([], KEY, WS, ask(tools=("x",), max_tokens=10**6, cost=10**15), MONDAY_NOON) is ALLOW


def test_policies_without_effect_return_the_shared_allow() -> None:
    p = pol(models_allow=("openai/*",), max_tokens_cap=100)
    assert decide((p,), KEY, WS, ask(max_tokens=50), MONDAY_NOON) is ALLOW


# --- models, providers, endpoints ----------------------------------------------------------------

D, TW = "policy_denied", "outside_time_window"
P1 = pol("workspace", "p_ws", models_allow=("openai/*",))
P2 = pol("agent", "p_ag", models_allow=("anthropic/*",))
P3 = pol("workspace", "p_wsd", models_deny=("openai/gpt-4o*",))
P4 = pol("agent", "p_ag2", models_allow=("openai/gpt-4o",))
P5 = pol("key", "p_key", models_deny=("*/o1*",), models_allow=("*",))


@pytest.mark.parametrize(
    ("policies", "key", "ws", "req", "allowed", "code", "rule"),
    [
        pytest.param((P1,), None, None, ask("openai/gpt-4o"), True, None, "", id="allow-glob-match"),
        pytest.param((P1,), None, None, ask("anthropic/claude"), False, D, "policy:p_ws.models_allow",
                     id="allow-glob-miss"),
        pytest.param((P1, P2), None, None, ask("anthropic/claude"), True, None, "", id="agent-allow-overrides-ws"),
        pytest.param((P2, P1), None, None, ask("openai/gpt-4o"), False, D, "policy:p_ag.models_allow",
                     id="agent-allow-overrides-ws-both-ways"),
        pytest.param((P3, P4), None, None, ask("openai/gpt-4o"), False, D, "policy:p_wsd.models_deny",
                     id="ws-deny-wins-over-agent-allow"),
        pytest.param((P3,), None, None, ask("openai/gpt-4"), True, None, "", id="deny-glob-miss"),
        pytest.param((P3,), None, None, ask("openai/gpt-4o-mini"), False, D, "policy:p_wsd.models_deny",
                     id="deny-glob-prefix"),
        pytest.param((P5,), None, None, ask("openai/o1-mini"), False, D, "policy:p_key.models_deny",
                     id="deny-before-allow-in-one-policy"),
        pytest.param((P1,), None, None, ask("OpenAI/gpt-4o"), False, D, "policy:p_ws.models_allow",
                     id="globs-are-case-sensitive"),
        pytest.param((P3,), None, None, ask("", endpoint="/v1/models"), True, None, "", id="no-model-skips-models"),
        pytest.param((), VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="h", models_allow=("mock/*",)), None,
                     ask("openai/gpt-4o"), False, D, "key.models_allow", id="key-models-allow"),
        pytest.param((P1,), VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="h", models_allow=("*/gpt-4o",)),
                     None, ask("openai/gpt-4o-mini"), False, D, "key.models_allow", id="key-list-restricts-further"),
        pytest.param((), VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="h", models_allow=("openai/*",)),
                     None, ask("openai/gpt-4o"), True, None, "", id="key-models-allow-match"),
        pytest.param((), VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="h", providers_allow=("mock",)),
                     None, ask("openai/gpt-4o"), False, D, "key.providers_allow", id="key-providers-by-name"),
        pytest.param((), VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="h", providers_allow=("my-*",)),
                     None, ask("my-openai/gpt-4o", provider_type="openai"), True, None, "",
                     id="key-providers-glob"),
        pytest.param((), None, Workspace(id="ws_1", name="w", providers_allow=("anthropic",)),
                     ask("corp/gpt-4o", provider_type="openai"), False, D, "workspace.providers_allow",
                     id="workspace-providers-by-type"),
        pytest.param((), None, Workspace(id="ws_1", name="w", providers_allow=("openai",)),
                     ask("corp/gpt-4o", provider_type="openai"), True, None, "", id="workspace-providers-match"),
        pytest.param((), None, Workspace(id="ws_1", name="w", providers_allow=("openai",)),
                     ask("", endpoint="/v1/models"), True, None, "", id="workspace-providers-skip-no-model"),
        pytest.param((pol("agent", "p_ep", endpoints_allow=("/v1/chat/*", "/v1/models")),), None, None,
                     ask(endpoint="/v1/embeddings"), False, D, "policy:p_ep.endpoints_allow", id="endpoint-miss"),
        pytest.param((pol("agent", "p_ep", endpoints_allow=("/v1/chat/*",)),), None, None,
                     ask(endpoint="/v1/chat/completions"), True, None, "", id="endpoint-glob"),
        pytest.param((pol("agent", "p_ep", endpoints_allow=("/openai/*",)),), None, None,
                     ask("", endpoint="/openai/v1/files"), True, None, "", id="endpoint-passthrough"),
        pytest.param((pol("workspace", "p_ep1", endpoints_allow=("/v1/chat/*",)),
                      pol("member", "p_ep2", endpoints_allow=("/v1/embeddings",))), None, None,
                     ask(endpoint="/v1/chat/completions"), False, D, "policy:p_ep2.endpoints_allow",
                     id="endpoint-most-specific"),
        pytest.param((pol("agent", "p_ep", endpoints_allow=("/v1/embeddings",)), P3), None, None,
                     ask("openai/gpt-4o"), False, D, "policy:p_ep.endpoints_allow", id="endpoint-checked-first"),
    ],
)
def test_models_providers_endpoints(policies: tuple[Policy, ...], key: VirtualKey | None, ws: Workspace | None,
                                    req: PolicyInput, allowed: bool, code: str | None, rule: str) -> None:
    check(decide(policies, key, ws, req, MONDAY_NOON), allowed, code, rule)


def test_deny_message_names_the_rule_and_scope() -> None:
    p = pol("agent", "pol_x", models_deny=("openai/*",))
    v = decide((p,), None, None, ask("openai/gpt-4o"), MONDAY_NOON)
    assert v.message == "Model 'openai/gpt-4o' is denied by policy pol_x (agent agent_1): models_deny ['openai/*']."
    assert (v.scope, v.scope_id) == ("agent", "agent_1")


def test_key_rule_is_scoped_to_the_key() -> None:
    key = VirtualKey(id="vk_9", workspace_id="ws_1", key_hash="h", models_allow=("mock/*",))
    v = decide((), key, None, ask("openai/gpt-4o"), MONDAY_NOON)
    assert (v.scope, v.scope_id) == ("key", "vk_9") and "vk_9" in v.message


def test_specificity_key_over_agent_and_workflow_like_agent() -> None:
    key_p = pol("key", "p_k", models_allow=("mock/*",))
    agent_p = pol("agent", "p_a", models_allow=("openai/*",))
    flow_p = pol("workflow", "p_f", models_allow=("anthropic/*",))
    member_p = pol("member", "p_m", models_allow=("xai/*",))
    assert decide((agent_p, key_p), None, None, ask("openai/x"), MONDAY_NOON).rule == "policy:p_k.models_allow"
    # workflow ranks as agent level, and at that level the agent policy decides
    assert decide((flow_p, agent_p), None, None, ask("openai/x"), MONDAY_NOON).allowed
    assert decide((member_p, flow_p), None, None, ask("anthropic/x"), MONDAY_NOON).allowed
    # same scope: the smaller id decides, whatever the order
    a, b = pol("agent", "p_1", models_allow=("a/*",)), pol("agent", "p_2", models_allow=("b/*",))
    for order in ((a, b), (b, a)):
        assert decide(order, None, None, ask("a/x"), MONDAY_NOON).allowed
        assert not decide(order, None, None, ask("b/x"), MONDAY_NOON).allowed


def test_long_client_strings_keep_the_message_short() -> None:
    p = pol("agent", "p_long", models_allow=tuple(f"prov{i}/" + "m" * 100 for i in range(20)))
    v = decide((p,), None, None, ask("x/" + "y" * 5000), MONDAY_NOON)
    assert not v.allowed and len(v.message) <= MAX_MESSAGE_LEN and v.message.endswith("+17 more].")


# --- time windows --------------------------------------------------------------------------------

WEEKDAYS_9_18_PARIS = TimeWindow(days=(0, 1, 2, 3, 4), start="09:00", end="18:00", timezone="Europe/Paris")
FRI_NIGHT = TimeWindow(days=(4,), start="22:00", end="02:00")


@pytest.mark.parametrize(
    ("windows", "now", "inside"),
    [
        pytest.param((WEEKDAYS_9_18_PARIS,), at(0, "09:00", "Europe/Paris"), True, id="start-inclusive"),
        pytest.param((WEEKDAYS_9_18_PARIS,), at(0, "17:59", "Europe/Paris"), True, id="before-end"),
        pytest.param((WEEKDAYS_9_18_PARIS,), at(0, "18:00", "Europe/Paris"), False, id="end-exclusive"),
        pytest.param((WEEKDAYS_9_18_PARIS,), at(0, "08:59", "Europe/Paris"), False, id="before-start"),
        pytest.param((WEEKDAYS_9_18_PARIS,), at(5, "12:00", "Europe/Paris"), False, id="saturday"),
        # 08:30 UTC is 09:30 in Paris (winter, UTC+1): the window's timezone decides, not UTC
        pytest.param((WEEKDAYS_9_18_PARIS,), datetime.datetime(2026, 1, 5, 8, 30, tzinfo=UTC), True,
                     id="timezone-shift"),
        pytest.param((WEEKDAYS_9_18_PARIS,), datetime.datetime(2026, 1, 5, 17, 30, tzinfo=UTC), False,
                     id="timezone-shift-late"),
        # summer time (UTC+2): 07:30 UTC on Monday 2026-07-06 is 09:30 in Paris
        pytest.param((WEEKDAYS_9_18_PARIS,), datetime.datetime(2026, 7, 6, 7, 30, tzinfo=UTC), True, id="dst"),
        # Sunday 23:30 UTC is Monday 00:30 in Tokyo: the local weekday decides
        pytest.param((TimeWindow(days=(0,), timezone="Asia/Tokyo"),),
                     datetime.datetime(2026, 1, 11, 23, 30, tzinfo=UTC), True, id="local-weekday"),
        pytest.param((FRI_NIGHT,), at(4, "23:00"), True, id="midnight-span-evening"),
        pytest.param((FRI_NIGHT,), at(5, "01:59"), True, id="midnight-span-next-morning"),
        pytest.param((FRI_NIGHT,), at(5, "02:00"), False, id="midnight-span-end"),
        pytest.param((FRI_NIGHT,), at(5, "23:00"), False, id="midnight-span-not-saturday-evening"),
        pytest.param((FRI_NIGHT,), at(4, "01:00"), False, id="midnight-span-not-friday-morning"),
        pytest.param((TimeWindow(days=(6,), start="22:00", end="02:00"),), at(0, "01:00"), True,
                     id="midnight-span-sunday-to-monday"),
        pytest.param((TimeWindow(start="12:00", end="24:00"),), at(3, "23:59"), True, id="end-24"),
        pytest.param((TimeWindow(start="00:00", end="00:00"),), at(3, "00:00"), True, id="equal-is-full-day"),
        pytest.param((TimeWindow(days=(1,), start="06:00", end="08:00"), WEEKDAYS_9_18_PARIS),
                     at(2, "10:00", "Europe/Paris"), True, id="any-window"),
        pytest.param((TimeWindow(timezone="Mars/Olympus"),), MONDAY_NOON, False, id="bad-timezone-fails-closed"),
        pytest.param((TimeWindow(start="9:00"),), MONDAY_NOON, False, id="bad-time-fails-closed"),
    ],
)
def test_time_windows(windows: tuple[TimeWindow, ...], now: datetime.datetime, inside: bool) -> None:
    p = pol("department", "p_tw", windows=windows)
    v = decide((p,), None, None, ask(), now)
    if inside:
        assert v is ALLOW
    else:
        check(v, False, TW, "policy:p_tw.windows")


def test_most_specific_window_decides() -> None:
    never = TimeWindow(days=(6,), start="00:00", end="00:01")
    always = TimeWindow()
    assert decide((pol("agent", windows=(always,)), pol("workspace", windows=(never,))), None, None, ask(),
                  MONDAY_NOON).allowed
    v = decide((pol("agent", "p_n", windows=(never,)), pol("workspace", windows=(always,))), None, None, ask(),
               MONDAY_NOON)
    check(v, False, TW, "policy:p_n.windows")
    assert "Sun 00:00-00:01 UTC" in v.message


def test_in_window_directly() -> None:
    assert in_window(TimeWindow(), MONDAY_NOON)
    assert not in_window(TimeWindow(days=()), MONDAY_NOON)


@pytest.mark.parametrize(("text", "minutes"), [("00:00", 0), ("09:30", 570), ("23:59", 1439), ("24:00", 1440)])
def test_parse_hhmm(text: str, minutes: int) -> None:
    assert parse_hhmm(text) == minutes


ARABIC_INDIC_12_00 = "\u0661\u0662:\u0660\u0660"  # str.isdigit() says yes; a time it is not


@pytest.mark.parametrize("text", ["", "9:00", "24:01", "25:00", "12:60", "12-00", "12:00:00", ARABIC_INDIC_12_00,
                                  " 12:00"])
def test_parse_hhmm_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="HH:MM"):
        parse_hhmm(text)


@pytest.mark.parametrize(("name", "ok"), [("UTC", True), ("Europe/Paris", True), ("Etc/GMT+5", True),
                                          ("", False), ("utc", False), ("Mars/Olympus", False),
                                          ("../etc/passwd", False), ("/etc/passwd", False), ("zone.tab", False)])
def test_valid_timezone(name: str, ok: bool) -> None:
    assert valid_timezone(name) is ok


@pytest.mark.parametrize(
    ("window", "problem"),
    [
        (TimeWindow(), None),
        (TimeWindow(start="22:00", end="02:00", timezone="America/New_York"), None),
        (TimeWindow(timezone="Nowhere"), "unknown timezone"),
        (TimeWindow(days=()), "days"),
        (TimeWindow(days=(7,)), "days"),
        (TimeWindow(start="9am"), "HH:MM"),
        (TimeWindow(start="24:00"), "start may not be 24:00"),
    ],
)
def test_window_problem(window: TimeWindow, problem: str | None) -> None:
    found = window_problem(window)
    assert (found is None) if problem is None else (found is not None and problem in found)


# --- tools ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policies", "tools", "allowed", "rule", "strip"),
    [
        pytest.param((pol("agent", "p_t", tools_deny=("shell",)),), ("search", "shell"), False,
                     "policy:p_t.tools_deny", (), id="deny-list"),
        pytest.param((pol("agent", "p_t", tools_allow=("search",)),), ("search", "shell"), False,
                     "policy:p_t.tools_allow", (), id="allow-list"),
        pytest.param((pol("agent", "p_t", tools_allow=("search", "shell")),), ("search", "shell"), True, "", (),
                     id="allow-list-all-in"),
        pytest.param((pol("agent", "p_t", tools_deny=("shell",), tool_action="strip"),),
                     ("search", "shell", "shell"), True, "", ("shell",), id="strip-deny"),
        pytest.param((pol("agent", "p_t", tools_allow=("search",), tool_action="strip"),),
                     ("web_search", "search", "exec"), True, "", ("web_search", "exec"), id="strip-allow"),
        pytest.param((pol("workspace", "p_w", tools_deny=("shell",)),
                      pol("agent", "p_a", tools_allow=("shell", "search"))), ("shell",), False,
                     "policy:p_w.tools_deny", (), id="ws-deny-wins-over-agent-allow"),
        pytest.param((pol("workspace", "p_w", tools_allow=("search",)),
                      pol("agent", "p_a", tools_allow=("shell",))), ("shell",), True, "", (),
                     id="agent-allow-overrides-ws"),
        pytest.param((pol("workspace", "p_w", tools_deny=("shell",)),
                      pol("agent", "p_a", tools_allow=("search",), tool_action="strip")), ("shell", "x"), True, "",
                     ("shell", "x"), id="most-specific-action-strips-a-ws-deny"),
        pytest.param((pol("workspace", "p_w", tools_deny=("shell",), tool_action="strip"),
                      pol("agent", "p_a", tools_deny=("x",))), ("shell",), False, "policy:p_w.tools_deny", (),
                     id="most-specific-action-denies"),
        pytest.param((pol("agent", "p_t", models_allow=("*",), tool_action="strip"),), ("shell",), True, "", (),
                     id="action-alone-constrains-nothing"),
    ],
)
def test_tools(policies: tuple[Policy, ...], tools: tuple[str, ...], allowed: bool, rule: str,
               strip: tuple[str, ...]) -> None:
    v = decide(policies, None, None, ask(tools=tools), MONDAY_NOON)
    check(v, allowed, None if allowed else D, rule)
    assert v.strip_tools == strip
    assert {e.kind for e in v.effects} == ({"strip"} if strip else set())
    if strip:
        stripped_in_effects = " ".join(e.detail for e in v.effects)
        assert all(t in stripped_in_effects for t in strip)


def test_tool_denial_names_the_tool() -> None:
    v = decide((pol("agent", "p_t", tools_deny=("shell",)),), None, None, ask(tools=("shell",)), MONDAY_NOON)
    assert v.message == "Tool 'shell' is denied by policy p_t (agent agent_1): tools_deny ['shell']."


def test_strip_effects_are_grouped_by_rule() -> None:
    policies = (pol("workspace", "p_w", tools_deny=("a", "b")), pol("agent", "p_a", tools_allow=("a", "b", "c"),
                                                                    tool_action="strip"))
    v = decide(policies, None, None, ask(tools=("a", "d", "b", "c")), MONDAY_NOON)
    assert v.strip_tools == ("a", "d", "b")
    assert v.effects == (
        Effect("strip", "policy:p_w.tools_deny", "workspace", "workspace_1", "stripped tools ['a', 'b']"),
        Effect("strip", "policy:p_a.tools_allow", "agent", "agent_1", "stripped tools ['d']"),
    )


# --- max_tokens, cost, escalation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "asked", "allowed", "sent"),
    [
        ("clamp", 4000, True, 1000),
        ("clamp", None, True, 1000),
        ("clamp", 1000, True, None),
        ("clamp", 10, True, None),
        ("reject", 4000, False, None),
        ("reject", None, True, 1000),  # nothing to reject: clamped so the provider default cannot exceed the cap
        ("reject", 1000, True, None),
    ],
)
def test_max_tokens_cap(action: str, asked: int | None, allowed: bool, sent: int | None) -> None:
    p = pol("member", "p_mt", max_tokens_cap=1000, max_tokens_action=action)
    v = decide((p,), None, None, ask(max_tokens=asked), MONDAY_NOON)
    check(v, allowed, None if allowed else D, "" if allowed else "policy:p_mt.max_tokens_cap")
    assert v.max_tokens == sent
    if sent is not None:
        assert v.effects == (Effect("clamp", "policy:p_mt.max_tokens_cap", "member", "member_1",
                                    f"max_tokens {'unset' if asked is None else asked} -> 1000"),)
    elif allowed:
        assert v is ALLOW


def test_max_tokens_cap_most_specific_and_with_strip() -> None:
    policies = (pol("workspace", max_tokens_cap=100, max_tokens_action="reject"),
                pol("agent", "p_a", max_tokens_cap=500, tools_deny=("x",), tool_action="strip"))
    v = decide(policies, None, None, ask(tools=("x", "y"), max_tokens=800), MONDAY_NOON)
    assert v.allowed and v.max_tokens == 500 and v.strip_tools == ("x",)
    assert [e.kind for e in v.effects] == ["strip", "clamp"]


GB = 1_000_000_000


@pytest.mark.parametrize(
    ("cost", "escalation", "code", "rule"),
    [
        pytest.param(GB // 2, None, None, "", id="under-both"),
        pytest.param(GB, None, None, "", id="at-threshold-is-not-over"),
        pytest.param(GB + 1, None, "escalation_required", "policy:p_es.escalate_over_usd", id="escalate"),
        pytest.param(GB + 1, GRANT, None, "", id="escalate-with-grant"),
        pytest.param(5 * GB + 1, None, D, "policy:p_mc.max_cost_usd", id="over-max-cost"),
        pytest.param(5 * GB + 1, GRANT, D, "policy:p_mc.max_cost_usd", id="grant-does-not-lift-max-cost"),
        pytest.param(0, None, None, "", id="unknown-cost-passes"),
    ],
)
def test_cost_and_escalation(cost: int, escalation: EscalationGrant | None, code: str | None, rule: str) -> None:
    policies = (pol("workspace", "p_mc", max_cost_nanos=5 * GB), pol("agent", "p_es", escalate_over_nanos=GB))
    v = decide(policies, None, None, ask(cost=cost, escalation=escalation), MONDAY_NOON)
    check(v, code is None, code, rule)


def test_cost_messages_show_dollars() -> None:
    v = decide((pol("agent", "p_mc", max_cost_nanos=2_500_000),), None, None, ask(cost=3_000_000), MONDAY_NOON)
    assert "$0.003" in v.message and "$0.0025" in v.message and "p_mc" in v.message
    v = decide((pol("agent", "p_es", escalate_over_nanos=GB),), None, None, ask(cost=2 * GB), MONDAY_NOON)
    assert v.outcome == "escalate" and "$2" in v.message and "$1" in v.message


def test_check_order_first_refusal_decides() -> None:
    p = pol("agent", "p_all", endpoints_allow=("/v1/embeddings",), models_deny=("*",), windows=(TimeWindow(days=()),),
            tools_deny=("t",), max_tokens_cap=1, max_tokens_action="reject", max_cost_nanos=0, escalate_over_nanos=0)
    ws = Workspace(id="ws_1", name="w", providers_allow=("none",))
    req = ask(tools=("t",), max_tokens=5, cost=9)
    # Each refusal in check order, and what lifts it so the next one shows.
    steps: list[tuple[str, dict[str, Any] | None]] = [
        ("policy:p_all.endpoints_allow", {"endpoints_allow": ()}),
        ("policy:p_all.models_deny", {"models_deny": ()}),
        ("workspace.providers_allow", None),
        ("policy:p_all.windows", {"windows": ()}),
        ("policy:p_all.tools_deny", {"tools_deny": ()}),
        ("policy:p_all.max_tokens_cap", {"max_tokens_cap": None}),
        ("policy:p_all.max_cost_usd", {"max_cost_nanos": None}),
        ("policy:p_all.escalate_over_usd", {"escalate_over_nanos": None}),
    ]
    for rule, lift in steps:
        assert decide((p,), None, ws, req, MONDAY_NOON).rule == rule
        if lift is None:
            ws = Workspace(id="ws_1", name="w")
        else:
            p = msgspec.structs.replace(p, **lift)
    assert decide((p,), None, ws, req, MONDAY_NOON) is ALLOW


# --- properties ----------------------------------------------------------------------------------

MODELS = ("openai/gpt-4o", "openai/gpt-4o-mini", "anthropic/claude-3", "mock/fixed", "groq/llama")
PATTERNS = ("openai/*", "*/gpt-4o*", "anthropic/*", "mock/fixed", "*", "groq/l?ama", "x/*")
PLAIN_SCOPES: tuple[Scope, ...] = ("workspace", "department", "member", "agent", "key")
ALL_SCOPES: tuple[Scope, ...] = (*PLAIN_SCOPES, "workflow")
patterns = st.lists(st.sampled_from(PATTERNS), max_size=3).map(tuple)


@given(levels=st.lists(st.tuples(st.sampled_from(PLAIN_SCOPES), patterns), max_size=5, unique_by=lambda t: t[0]),
       model=st.sampled_from(MODELS), seed=st.randoms())
def test_most_specific_allow_list_decides(levels: list[tuple[Scope, tuple[str, ...]]], model: str,
                                          seed: random.Random) -> None:
    policies = [pol(scope, f"p_{scope}", models_allow=allow) for scope, allow in levels]
    seed.shuffle(policies)
    v = decide(policies, None, None, ask(model), MONDAY_NOON)
    setters = [p for p in policies if p.models_allow]
    if not setters:
        assert v is ALLOW
        return
    decider = max(setters, key=lambda p: PLAIN_SCOPES.index(p.scope))
    expected = any(fnmatchcase(model, g) for g in decider.models_allow)
    assert v.allowed is expected
    if not expected:
        assert v.rule == f"policy:{decider.id}.models_allow"


@given(levels=st.lists(st.tuples(st.sampled_from(ALL_SCOPES), patterns, patterns), max_size=5),
       model=st.sampled_from(MODELS), key_allow=patterns)
def test_a_model_denied_anywhere_is_never_allowed(levels: list[tuple[Scope, tuple[str, ...], tuple[str, ...]]],
                                                  model: str, key_allow: tuple[str, ...]) -> None:
    policies = [pol(scope, models_allow=allow, models_deny=deny) for scope, allow, deny in levels]
    key = VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="h", models_allow=key_allow)
    v = decide(policies, key, WS, ask(model), MONDAY_NOON)
    denied_by = [p for p in policies if any(fnmatchcase(model, g) for g in p.models_deny)]
    if denied_by:
        assert not v.allowed and v.rule.endswith(".models_deny")
        assert v.rule.removeprefix("policy:").removesuffix(".models_deny") in {p.id for p in denied_by}


windows = st.builds(TimeWindow, days=st.lists(st.integers(0, 6), max_size=3).map(tuple),
                    start=st.sampled_from(["00:00", "08:00", "22:00", "bad"]),
                    end=st.sampled_from(["24:00", "18:00", "02:00"]),
                    timezone=st.sampled_from(["UTC", "Asia/Kolkata", "America/Los_Angeles", "Nope/Nope"]))
policies_st = st.builds(
    pol, scope=st.sampled_from(ALL_SCOPES),
    models_allow=patterns, models_deny=patterns,
    tools_allow=st.lists(st.sampled_from(["a", "b", "c"]), max_size=2).map(tuple),
    tools_deny=st.lists(st.sampled_from(["a", "b", "c"]), max_size=2).map(tuple),
    tool_action=st.sampled_from(["deny", "strip"]),
    endpoints_allow=st.lists(st.sampled_from(["/v1/*", "/v1/chat/completions", "/openai/*"]), max_size=2).map(tuple),
    windows=st.lists(windows, max_size=2).map(tuple),
    max_tokens_cap=st.none() | st.integers(1, 5000), max_tokens_action=st.sampled_from(["clamp", "reject"]),
    max_cost_nanos=st.none() | st.integers(0, 10 * GB), escalate_over_nanos=st.none() | st.integers(0, 10 * GB),
)
inputs = st.builds(
    PolicyInput, endpoint=st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/openai/v1/files"]),
    model=st.sampled_from((*MODELS, "")), provider_type=st.sampled_from(["openai", "anthropic", ""]),
    tools=st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=4).map(tuple),
    max_tokens=st.none() | st.integers(1, 10_000), est_cost_nanos=st.integers(0, 20 * GB),
    escalation=st.none() | st.just(GRANT),
)
keys = st.builds(VirtualKey, id=st.just("vk_1"), workspace_id=st.just("ws_1"), key_hash=st.just("h"),
                 models_allow=patterns, providers_allow=st.lists(st.sampled_from(["openai", "mock", "*"]),
                                                                 max_size=2).map(tuple))
workspaces = st.builds(Workspace, id=st.just("ws_1"), name=st.just("w"),
                       providers_allow=st.lists(st.sampled_from(["openai", "anthropic"]), max_size=2).map(tuple))
instants = st.datetimes(min_value=datetime.datetime(2020, 1, 1), max_value=datetime.datetime(2035, 1, 1),
                        timezones=st.just(UTC))


@given(policies=st.lists(policies_st, max_size=4), key=st.none() | keys, ws=st.none() | workspaces, req=inputs,
       now=instants, seed=st.randoms())
def test_every_verdict_is_well_formed_and_order_independent(policies: list[Policy], key: VirtualKey | None,
                                                            ws: Workspace | None, req: PolicyInput,
                                                            now: datetime.datetime, seed: random.Random) -> None:
    v = decide(policies, key, ws, req, now)
    if not v.allowed:
        assert v.code in REFUSAL_CODES and v.rule and v.message and len(v.message) <= MAX_MESSAGE_LEN
        assert v.scope and v.scope_id
        assert v.outcome == ("escalate" if v.code == "escalation_required" else "deny")
        assert v.max_tokens is None and not v.strip_tools and not v.effects
    else:
        assert v.code is None and v.outcome == "allow" and not v.rule
        assert set(v.strip_tools) <= set(req.tools)
        assert (v.max_tokens is not None) == any(e.kind == "clamp" for e in v.effects)
        assert bool(v.strip_tools) == any(e.kind == "strip" for e in v.effects)
        if not v.effects:
            assert v is ALLOW
    shuffled = list(policies)
    seed.shuffle(shuffled)
    assert decide(shuffled, key, ws, req, now) == v


glob_text = st.text(alphabet="ab/.*?[]!-\n", max_size=8)


@given(globs=st.lists(glob_text, min_size=1, max_size=4).map(tuple), model=glob_text.filter(bool))
def test_model_globs_mean_fnmatchcase(globs: tuple[str, ...], model: str) -> None:
    v = decide((pol("agent", models_allow=globs),), None, None, ask(model), MONDAY_NOON)
    assert v.allowed is any(fnmatchcase(model, g) for g in globs)
