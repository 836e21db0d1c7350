"""The policy decision: may this request go out, and in what shape? Pure, shared by both planes.

`decide(policies, key, workspace, req, now)` is a function of its arguments only (no await, no IO,
no clock read): the data plane's policy stage calls it on every request, the control plane's
`POST /admin/v1/decisions/dry-run` calls it with the same inputs, so both always agree.

Which policy decides
--------------------
`policies` are those attached on the request's path (workspace -> department -> member -> agent
-> key), in any order. Specificity is `SCOPE_SPECIFICITY`, except that a `workflow` policy counts
as agent level (a workflow label is chosen by the client per request, so it must not outrank the
key's own policies); at the same level an `agent` policy beats a `workflow` one, and two policies
on the same level are ordered by id (the smaller id wins), so the input order never matters.

* Deny lists are unioned: `models_deny` anywhere on the path matching the model, or a tool in
  any `tools_deny`, refuses (or strips) it, whatever any allow list says. When several match, the
  most specific one is named.
* Allow lists (`models_allow`, `tools_allow`, `endpoints_allow`, `prompts_allow`: globs over the
  name of the prompt template a request renders; a request without one passes) and settings (`windows`,
  `max_tokens_cap` with its `max_tokens_action`, `max_cost_nanos`, `escalate_over_nanos`) are
  decided by the MOST SPECIFIC policy that sets them (a non-empty list, a non-None value); less
  specific ones are overridden, not intersected. `tool_action` comes from the most specific
  policy that has any tool list (it only means something next to one).
* The key's `models_allow` (globs over `provider/model`) and `providers_allow` (globs over the
  provider NAME, the part of the model before "/"), and the workspace's `providers_allow` (globs
  over the provider TYPE, e.g. "openai"), restrict further: they must match as well.
* Globs are `fnmatch.fnmatchcase` over `provider/model` and over the endpoint path. Tool names
  match exactly. A request naming no model (`model == ""`) skips model and key provider rules;
  `provider_type == ""` skips the workspace's provider list.

Order of checks, the first refusal decides: endpoint -> models (deny, policy allow, key allow) ->
prompt template -> providers (workspace, key) -> time window -> tools -> max_tokens -> max cost -> escalation.

* Time windows: allowed when `now` falls in ANY window of the deciding policy: the local weekday
  (0 = Monday) is in `days` and the local time is in [start, end) in the window's timezone. An
  `end` <= `start` spans midnight, and then the day is the day the window started ("Fri 22:00 to
  02:00" admits Saturday 01:00, not Sunday 01:00); `end` == `start` is the 24 hours from `start`.
  "24:00" is a valid end ("00:00" to "24:00" is the whole day). A window whose
  timezone or times do not parse admits nothing (fail closed; the admin API refuses them).
* Tools not allowed (in a `tools_deny`, or missing from the deciding non-empty `tools_allow`):
  `tool_action` "deny" refuses naming the first such tool; "strip" lets the request through with
  `strip_tools` listing them and one "strip" `Effect` per deciding rule.
* `max_tokens_cap`: a request with max_tokens above the cap, or with none, is clamped to the cap
  (`Verdict.max_tokens`, a "clamp" `Effect`); with action "reject" a max_tokens above the cap is
  refused, while a missing one is still clamped (there is nothing to reject, and the provider's
  default could exceed the cap).
* `max_cost_nanos`: `est_cost_nanos` above it refuses. `escalate_over_nanos`: above it refuses
  with `escalation_required` (outcome "escalate") unless `req.escalation` is set, which the
  caller does only for a grant of this key that is unexpired (single use is enforced in Redis;
  the grant's `rule` is not compared here). A grant never lifts `max_cost_nanos`.
  Costs are the caller's estimate as given (0 when unknown, which passes both caps); it is not
  recomputed after a clamp, so an estimate made before clamping is conservative.

Refusals carry `code` in `REFUSAL_CODES`, a `rule` such as "policy:<id>.models_deny",
"key.models_allow", "workspace.providers_allow", "policy:<id>.windows", "policy:<id>.max_cost_usd"
or "policy:<id>.escalate_over_usd", the scope it is attached to, and a message naming the rule
and why (at most `MAX_MESSAGE_LEN` characters; client-supplied names are cut short in it).

Nothing on the path returns the shared `ALLOW` without allocating. For the admin API:
`parse_hhmm`, `valid_timezone` and `window_problem` validate windows, `in_window` tests one.
The module's only state is bounded caches of pure functions of config strings (zones, window
bounds, compiled glob lists): they change a result's cost, never the result.
"""

from __future__ import annotations

import datetime
import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

from schemas.entities import SCOPE_SPECIFICITY, EscalationGrant, Policy, TimeWindow, VirtualKey, Workspace
from schemas.money import nanos_to_decimal_str

__all__ = [
    "ALLOW", "MAX_MESSAGE_LEN", "REFUSAL_CODES", "Effect", "PolicyInput", "Verdict", "decide", "in_window",
    "parse_hhmm", "valid_timezone", "window_problem",
]

REFUSAL_CODES = frozenset({"policy_denied", "outside_time_window", "escalation_required"})
MAX_MESSAGE_LEN = 300


@dataclass(frozen=True, slots=True)
class PolicyInput:
    """The request facts a policy looks at. `model` is `provider/model_id` after alias resolution
    ("" when the endpoint names none, and then `provider_type` is "" too); `est_cost_nanos` is an
    upper bound on the call's cost (0 if unknown); `escalation` a grant the caller has already
    checked belongs to the key and is unexpired."""

    endpoint: str
    model: str
    provider_type: str
    tools: tuple[str, ...]
    max_tokens: int | None
    est_cost_nanos: int
    escalation: EscalationGrant | None = None
    prompt: str = ""  # the name of the prompt template the request renders ("" for none)


@dataclass(frozen=True, slots=True)
class Effect:
    """A change the policy makes to a request it lets through."""

    kind: Literal["clamp", "strip"]
    rule: str
    scope: str
    scope_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision. Refused: `allowed` False, `code` in `REFUSAL_CODES`, `outcome` "deny" or
    "escalate", and the deciding `rule`, its `scope`/`scope_id` and a `message`. Allowed: the
    request goes out with `max_tokens` (when not None) and without `strip_tools`; `effects`
    records those changes (empty for a plain allow)."""

    allowed: bool
    code: str | None = None
    outcome: str = "allow"
    rule: str = ""
    scope: str = ""
    scope_id: str = ""
    message: str = ""
    max_tokens: int | None = None
    strip_tools: tuple[str, ...] = ()
    effects: tuple[Effect, ...] = ()


ALLOW = Verdict(allowed=True)  # shared: a plain allow allocates nothing

_RANK: dict[str, int] = {**SCOPE_SPECIFICITY, "workflow": SCOPE_SPECIFICITY["agent"]}
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def parse_hhmm(text: str) -> int:
    """Minutes since midnight of "HH:MM" (two ASCII digits each, 00:00..23:59, or "24:00" = 1440,
    which only makes sense as a window's end). Raises ValueError otherwise."""
    if text == "24:00":
        return 1440
    m = _HHMM.fullmatch(text)
    if m is None:
        raise ValueError(f"expected a time as HH:MM (00:00 to 24:00), got {text[:20]!r}")
    return int(m.group(1)) * 60 + int(m.group(2))


# The module's only state: caches of pure functions of config strings, bounded because config is
# not trusted to stay small. Like fnmatch's own cache they change no result, only its cost.
@functools.lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError, OSError):
        return None


@functools.lru_cache(maxsize=1024)
def _bounds(timezone: str, start: str, end: str) -> tuple[ZoneInfo, int, int] | None:
    zone = _zone(timezone)
    try:
        return None if zone is None else (zone, parse_hhmm(start), parse_hhmm(end))
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _globs(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """One regex for a whole glob list: `_globs(ps)(s)` is truthy iff `fnmatchcase(s, p)` for some p."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


def valid_timezone(name: str) -> bool:
    """Whether `name` is an IANA timezone this host knows (e.g. "Europe/Paris", "UTC")."""
    return _zone(name) is not None


def window_problem(window: TimeWindow) -> str | None:
    """Why the admin API should refuse `window` (a sentence), or None when it is valid."""
    if not valid_timezone(window.timezone):
        return f"unknown timezone {window.timezone[:60]!r}"
    if not window.days or any(d not in range(7) for d in window.days):
        return "days must be a non-empty list of 0 (Monday) to 6 (Sunday)"
    try:
        start, _ = parse_hhmm(window.start), parse_hhmm(window.end)
    except ValueError as exc:
        return str(exc)
    return "start may not be 24:00" if start == 1440 else None


def in_window(window: TimeWindow, now: datetime.datetime) -> bool:
    """Whether the aware datetime `now` falls in `window` (see the module docstring)."""
    bounds = _bounds(window.timezone, window.start, window.end)
    if bounds is None:
        return False
    zone, start, end = bounds
    local = now.astimezone(zone)
    minute = local.hour * 60 + local.minute
    day = local.weekday()
    if start < end:
        return day in window.days and start <= minute < end
    # Spans midnight: the evening part belongs to today, the morning part to yesterday's window.
    return (day in window.days and minute >= start) or ((day - 1) % 7 in window.days and minute < end)


def _order(p: Policy) -> tuple[int, bool, str]:
    return (-_RANK.get(p.scope, -1), p.scope == "workflow", p.id)


def _q(value: str, limit: int = 60) -> str:
    """A quoted name for a message, cut short: client-supplied strings must not bloat it."""
    return f"'{value}'" if len(value) <= limit else f"'{value[:limit]}...'"


def _list(values: Iterable[str], limit: int = 3) -> str:
    items = list(values)
    shown = ", ".join(_q(v, 30) for v in items[:limit])
    return f"[{shown}, +{len(items) - limit} more]" if len(items) > limit else f"[{shown}]"


def _where(p: Policy) -> str:
    return f"policy {p.id} ({p.scope} {p.scope_id})"


def _usd(nanos: int) -> str:
    return f"${nanos_to_decimal_str(nanos)}"


def _window_text(w: TimeWindow) -> str:
    days = ",".join(_DAY_NAMES[d] for d in w.days if d in range(7))
    return f"{days} {w.start[:5]}-{w.end[:5]} {w.timezone[:40]}"


def _refuse(code: str, rule: str, scope: str, scope_id: str, message: str, outcome: str = "deny") -> Verdict:
    if len(message) > MAX_MESSAGE_LEN:
        message = message[: MAX_MESSAGE_LEN - 3] + "..."
    return Verdict(allowed=False, code=code, outcome=outcome, rule=rule, scope=scope, scope_id=scope_id,
                   message=message)


def _deny(p: Policy, field: str, message: str, code: str = "policy_denied") -> Verdict:
    return _refuse(code, f"policy:{p.id}.{field}", p.scope, p.scope_id, message)


def decide(policies: Sequence[Policy], key: VirtualKey | None, workspace: Workspace | None,
           req: PolicyInput, now: datetime.datetime) -> Verdict:
    """Decide `req` against the policies on its path, the key's and the workspace's lists, at the
    aware datetime `now`. Never raises; returns the shared `ALLOW` for a plain allow."""
    key_models = key.models_allow if key is not None else ()
    key_providers = key.providers_allow if key is not None else ()
    ws_providers = workspace.providers_allow if workspace is not None else ()
    if not policies and not key_models and not key_providers and not ws_providers:
        return ALLOW
    ordered = sorted(policies, key=_order) if len(policies) > 1 else policies
    # The deciding policy of each setting: the first (most specific) that sets it.
    ep = ma = pa = tw = mt = mc = es = None
    for p in ordered:
        if ep is None and p.endpoints_allow:
            ep = p
        if pa is None and p.prompts_allow:
            pa = p
        if ma is None and p.models_allow:
            ma = p
        if tw is None and p.windows:
            tw = p
        if mt is None and p.max_tokens_cap is not None:
            mt = p
        if mc is None and p.max_cost_nanos is not None:
            mc = p
        if es is None and p.escalate_over_nanos is not None:
            es = p

    if ep is not None and not _globs(ep.endpoints_allow)(req.endpoint):
        return _deny(ep, "endpoints_allow", f"Endpoint {_q(req.endpoint)} is not allowed by {_where(ep)}: "
                                            f"endpoints_allow {_list(ep.endpoints_allow)}.")

    model = req.model
    if model:
        for p in ordered:
            if p.models_deny and _globs(p.models_deny)(model):
                return _deny(p, "models_deny", f"Model {_q(model)} is denied by {_where(p)}: "
                                               f"models_deny {_list(p.models_deny)}.")
        if ma is not None and not _globs(ma.models_allow)(model):
            return _deny(ma, "models_allow", f"Model {_q(model)} is not allowed by {_where(ma)}: "
                                             f"models_allow {_list(ma.models_allow)}.")
        if key is not None and key_models and not _globs(key_models)(model):
            return _refuse("policy_denied", "key.models_allow", "key", key.id,
                           f"Model {_q(model)} is not allowed for key {key.id}: models_allow {_list(key_models)}.")

    if req.prompt and pa is not None and not _globs(pa.prompts_allow)(req.prompt):
        return _deny(pa, "prompts_allow", f"Prompt template {_q(req.prompt)} is not allowed by {_where(pa)}: "
                                          f"prompts_allow {_list(pa.prompts_allow)}.")

    if workspace is not None and ws_providers and req.provider_type and not _globs(ws_providers)(req.provider_type):
        return _refuse("policy_denied", "workspace.providers_allow", "workspace", workspace.id,
                       f"Provider type {_q(req.provider_type)} is not allowed in workspace {workspace.id}: "
                       f"providers_allow {_list(ws_providers)}.")
    if key is not None and key_providers and model:
        name = model.partition("/")[0]
        if not _globs(key_providers)(name):
            return _refuse("policy_denied", "key.providers_allow", "key", key.id,
                           f"Provider {_q(name)} is not allowed for key {key.id}: "
                           f"providers_allow {_list(key_providers)}.")

    if tw is not None and not any(in_window(w, now) for w in tw.windows):
        return _deny(tw, "windows", f"Outside the time windows of {_where(tw)}: "
                                    f"{'; '.join(_window_text(w) for w in tw.windows[:3])}.",
                     code="outside_time_window")

    effects: list[Effect] = []
    strip: tuple[str, ...] = ()
    if req.tools and ordered:
        verdict, strip = _tools(ordered, req.tools, effects)
        if verdict is not None:
            return verdict

    max_tokens: int | None = None
    if mt is not None and mt.max_tokens_cap is not None:
        cap = mt.max_tokens_cap
        asked = req.max_tokens
        if asked is None or asked > cap:
            if asked is not None and mt.max_tokens_action == "reject":
                return _deny(mt, "max_tokens_cap", f"max_tokens {asked} exceeds the cap {cap} of {_where(mt)}: "
                                                   "max_tokens_cap with max_tokens_action 'reject'.")
            max_tokens = cap
            effects.append(Effect("clamp", f"policy:{mt.id}.max_tokens_cap", mt.scope, mt.scope_id,
                                  f"max_tokens {'unset' if asked is None else asked} -> {cap}"))

    cost = req.est_cost_nanos
    if mc is not None and mc.max_cost_nanos is not None and cost > mc.max_cost_nanos:
        return _deny(mc, "max_cost_usd", f"Estimated cost {_usd(cost)} exceeds the limit "
                                         f"{_usd(mc.max_cost_nanos)} of {_where(mc)}: max_cost_usd.")
    if es is not None and es.escalate_over_nanos is not None and cost > es.escalate_over_nanos \
            and req.escalation is None:
        return _refuse("escalation_required", f"policy:{es.id}.escalate_over_usd", es.scope, es.scope_id,
                       f"Estimated cost {_usd(cost)} is over the escalation threshold "
                       f"{_usd(es.escalate_over_nanos)} of {_where(es)}: escalate_over_usd; "
                       "retry with an approved Alephant-Escalation-Id.", outcome="escalate")

    if not effects:
        return ALLOW
    return Verdict(allowed=True, max_tokens=max_tokens, strip_tools=strip, effects=tuple(effects))


def _tools(ordered: Sequence[Policy], tools: tuple[str, ...],
           effects: list[Effect]) -> tuple[Verdict | None, tuple[str, ...]]:
    """The tool rules: a refusal, or the tools to strip (appending their "strip" effects)."""
    acting = allow = None  # the policy whose tool_action applies; the deciding tools_allow
    for p in ordered:
        if p.tools_allow or p.tools_deny:
            acting = acting or p
            if p.tools_allow:
                allow = p
                break
    if acting is None:
        return None, ()
    # (tool, deciding policy, field) per refused tool, first occurrence only, in request order.
    refused: list[tuple[str, Policy, str]] = []
    for tool in dict.fromkeys(tools):
        for p in ordered:
            if tool in p.tools_deny:
                refused.append((tool, p, "tools_deny"))
                break
        else:
            if allow is not None and tool not in allow.tools_allow:
                refused.append((tool, allow, "tools_allow"))
    if not refused:
        return None, ()
    if acting.tool_action == "deny":
        tool, p, field = refused[0]
        listed = p.tools_deny if field == "tools_deny" else p.tools_allow
        how = "denied" if field == "tools_deny" else "not allowed"
        return _deny(p, field, f"Tool {_q(tool)} is {how} by {_where(p)}: {field} {_list(listed)}."), ()
    by_rule: dict[tuple[str, str, str], list[str]] = {}
    for tool, p, field in refused:
        by_rule.setdefault((f"policy:{p.id}.{field}", p.scope, p.scope_id), []).append(tool)
    for (rule, scope, scope_id), names in by_rule.items():
        effects.append(Effect("strip", rule, scope, scope_id, f"stripped tools {_list(names)}"))
    return None, tuple(tool for tool, _, _ in refused)
