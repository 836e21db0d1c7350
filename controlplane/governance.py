"""Admin commands of the organisation model and governance config: departments, members,
budgets, limits and policies (see commands.py for how a command is validated and committed).

Amounts are decimal strings of US dollars ("12.50", at most 9 decimals) converted exactly to
integer nano-USD; floats, exponents and negatives are refused naming the field. Timezones are
IANA names this host knows (400 `invalid_timezone`). A scope names where the rule attaches:
`workspace` (its `scope_id` is the workspace itself), `department`, `member`, `agent`, `key`
(a live entity of the same workspace) or `workflow` (a free label, as sent in
`Alephant-Workflow-Id`).
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from controlplane.budget_state import budget_state
from controlplane.commands import ConfigCommands, KindSpec, Prior, _builtins
from controlplane.inputs import Command, Globs, Ident, Name
from schemas.entities import Budget, BudgetPeriod, Department, Limit, Member, Policy, Scope, TimeWindow
from schemas.errors import InvalidRequest
from schemas.ids import new_id
from schemas.money import NANOS_PER_UNIT, nanos_to_decimal_str
from schemas.policy import valid_timezone, window_problem

MAX_USD = 10**6
UsdAmount = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
Zone = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Email = Annotated[str, msgspec.Meta(max_length=254, pattern=r"^$|^[^@\s]+@[^@\s]+$")]
_USD = re.compile(r"^(0|[1-9][0-9]{0,6})(\.[0-9]{1,9})?$")


def usd_to_nanos(text: str, param: str, *, allow_zero: bool = False) -> int:
    """"12.50" -> 12_500_000_000, exactly; 400 `invalid_amount` naming `param` otherwise."""
    floor = "at least 0" if allow_zero else "more than 0"
    if _USD.match(text):
        nanos = int(Decimal(text) * NANOS_PER_UNIT)
        if (nanos > 0 or allow_zero) and nanos <= MAX_USD * NANOS_PER_UNIT:
            return nanos
    raise InvalidRequest(f"'{param}' must be a decimal string of US dollars such as \"12.50\" (digits, at most 9 "
                         f"decimals, {floor} and at most {MAX_USD}); got {text[:40]!r}.", param=param,
                         code="invalid_amount")


def check_timezone(name: str, param: str) -> None:
    if not valid_timezone(name):
        raise InvalidRequest(f"'{param}' must be an IANA timezone such as 'Europe/Paris' or 'UTC'; "
                             f"{name[:64]!r} is unknown.", param=param, code="invalid_timezone")


def _check_scope(workspace_id: str, scope: str, scope_id: str) -> None:
    if scope == "workspace" and scope_id != workspace_id:
        raise InvalidRequest(f"A workspace-scoped rule's 'scope_id' is its workspace ('{workspace_id}').",
                             param="scope_id", code="scope_mismatch")


class CreateDepartment(Command):
    workspace_id: Ident
    name: Name
    id: Ident | None = None


class PatchDepartment(Command):
    name: Name | msgspec.UnsetType = msgspec.UNSET


class CreateMember(Command):
    """`department_id`, when given, must be a department of the same workspace."""

    workspace_id: Ident
    name: Name
    id: Ident | None = None
    department_id: Ident | None = None
    email: Email = ""


class PatchMember(Command):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    department_id: Ident | msgspec.UnsetType | None = msgspec.UNSET
    email: Email | msgspec.UnsetType = msgspec.UNSET


AlertPct = Annotated[int, msgspec.Meta(ge=1, le=100)]


class CreateBudget(Command):
    """A spend ceiling: `limit_usd` (decimal string, > 0, <= 1,000,000) per calendar `period` in
    `timezone` (`total` = never resets). `alert_at`: percentages (1-100) that each emit one
    `budget.alert` per period."""

    workspace_id: Ident
    scope: Scope
    scope_id: Ident
    period: BudgetPeriod
    limit_usd: UsdAmount
    timezone: Zone = "UTC"
    alert_at: Annotated[tuple[AlertPct, ...], msgspec.Meta(max_length=10)] = ()
    id: Ident | None = None

    def check(self) -> None:
        _check_scope(self.workspace_id, self.scope, self.scope_id)
        usd_to_nanos(self.limit_usd, "limit_usd")
        check_timezone(self.timezone, "timezone")


class PatchBudget(Command):
    limit_usd: UsdAmount | msgspec.UnsetType = msgspec.UNSET
    alert_at: Annotated[tuple[AlertPct, ...], msgspec.Meta(max_length=10)] | msgspec.UnsetType = msgspec.UNSET
    timezone: Zone | msgspec.UnsetType = msgspec.UNSET


LimitValue = Annotated[int, msgspec.Meta(ge=1, le=10**9)]
_LIMIT_FIELDS = ("rpm", "rpd", "tpm", "tpd", "concurrency")


class CreateLimit(Command):
    """Requests per minute/day, tokens per minute/day, concurrent requests: positive integers, at
    least one."""

    workspace_id: Ident
    scope: Scope
    scope_id: Ident
    rpm: LimitValue | None = None
    rpd: LimitValue | None = None
    tpm: LimitValue | None = None
    tpd: LimitValue | None = None
    concurrency: LimitValue | None = None
    id: Ident | None = None

    def check(self) -> None:
        _check_scope(self.workspace_id, self.scope, self.scope_id)
        if all(getattr(self, f) is None for f in _LIMIT_FIELDS):
            raise InvalidRequest("Set at least one of rpm, rpd, tpm, tpd, concurrency.", param="rpm",
                                 code="empty_limit")


class PatchLimit(Command):
    """null removes that limit (at least one must remain)."""

    rpm: LimitValue | msgspec.UnsetType | None = msgspec.UNSET
    rpd: LimitValue | msgspec.UnsetType | None = msgspec.UNSET
    tpm: LimitValue | msgspec.UnsetType | None = msgspec.UNSET
    tpd: LimitValue | msgspec.UnsetType | None = msgspec.UNSET
    concurrency: LimitValue | msgspec.UnsetType | None = msgspec.UNSET


Day = Annotated[int, msgspec.Meta(ge=0, le=6)]
StartTime = Annotated[str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
EndTime = Annotated[str, msgspec.Meta(pattern=r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")]
ToolName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class WindowIn(Command):
    """Allowed days (0 = Monday .. 6 = Sunday) and hours [start, end) as "HH:MM" in `timezone`;
    `end` <= `start` spans midnight."""

    days: Annotated[tuple[Day, ...], msgspec.Meta(min_length=1, max_length=7)] = (0, 1, 2, 3, 4, 5, 6)
    start: StartTime = "00:00"
    end: EndTime = "24:00"
    timezone: Zone = "UTC"


Windows = Annotated[tuple[WindowIn, ...], msgspec.Meta(max_length=16)]
Tools = Annotated[tuple[ToolName, ...], msgspec.Meta(max_length=128)]
TokensCap = Annotated[int, msgspec.Meta(ge=1, le=10**8)]


class CreatePolicy(Command):
    """Rules on one scope (see schemas/policy.py for how policies on a path combine). Globs over
    `provider/model` and endpoint paths; tools by name. `max_cost_usd` refuses calls estimated
    above it; `escalate_over_usd` refuses them with an escalation an admin may approve."""

    workspace_id: Ident
    scope: Scope
    scope_id: Ident
    models_allow: Globs = ()
    models_deny: Globs = ()
    tools_allow: Tools = ()
    tools_deny: Tools = ()
    tool_action: Literal["deny", "strip"] = "deny"
    endpoints_allow: Globs = ()
    prompts_allow: Globs = ()
    windows: Windows = ()
    max_tokens_cap: TokensCap | None = None
    max_tokens_action: Literal["clamp", "reject"] = "clamp"
    max_cost_usd: UsdAmount | None = None
    escalate_over_usd: UsdAmount | None = None
    id: Ident | None = None

    def check(self) -> None:
        _check_scope(self.workspace_id, self.scope, self.scope_id)
        for i, w in enumerate(self.windows):
            check_timezone(w.timezone, f"windows[{i}].timezone")
            problem = window_problem(_window(w))
            if problem is not None:
                raise InvalidRequest(f"'windows[{i}]': {problem}.", param=f"windows[{i}]", code="invalid_window")
        for field in ("max_cost_usd", "escalate_over_usd"):
            value = getattr(self, field)
            if value is not None:
                usd_to_nanos(value, field, allow_zero=True)


class PatchPolicy(Command):
    models_allow: Globs | msgspec.UnsetType = msgspec.UNSET
    models_deny: Globs | msgspec.UnsetType = msgspec.UNSET
    tools_allow: Tools | msgspec.UnsetType = msgspec.UNSET
    tools_deny: Tools | msgspec.UnsetType = msgspec.UNSET
    tool_action: Literal["deny", "strip"] | msgspec.UnsetType = msgspec.UNSET
    endpoints_allow: Globs | msgspec.UnsetType = msgspec.UNSET
    prompts_allow: Globs | msgspec.UnsetType = msgspec.UNSET
    windows: Windows | msgspec.UnsetType = msgspec.UNSET
    max_tokens_cap: TokensCap | msgspec.UnsetType | None = msgspec.UNSET
    max_tokens_action: Literal["clamp", "reject"] | msgspec.UnsetType = msgspec.UNSET
    max_cost_usd: UsdAmount | msgspec.UnsetType | None = msgspec.UNSET
    escalate_over_usd: UsdAmount | msgspec.UnsetType | None = msgspec.UNSET


def _window(w: WindowIn) -> TimeWindow:
    return TimeWindow(days=tuple(sorted(set(w.days))), start=w.start, end=w.end, timezone=w.timezone)


def _usd(nanos: int | None) -> str | None:
    return None if nanos is None else nanos_to_decimal_str(nanos)


def _opt_nanos(text: str | None, param: str) -> int | None:
    return None if text is None else usd_to_nanos(text, param, allow_zero=True)


async def _build_department(_: ConfigCommands, cmd: CreateDepartment, ent_id: str, prior: Prior | None) -> Department:
    return Department(id=ent_id, workspace_id=cmd.workspace_id, name=cmd.name)


async def _build_member(_: ConfigCommands, cmd: CreateMember, ent_id: str, prior: Prior | None) -> Member:
    return Member(id=ent_id, workspace_id=cmd.workspace_id, name=cmd.name, department_id=cmd.department_id,
                  email=cmd.email)


async def _build_budget(_: ConfigCommands, cmd: CreateBudget, ent_id: str, prior: Prior | None) -> Budget:
    return Budget(id=ent_id, workspace_id=cmd.workspace_id, scope=cmd.scope, scope_id=cmd.scope_id,
                  period=cmd.period, limit_nanos=usd_to_nanos(cmd.limit_usd, "limit_usd"), timezone=cmd.timezone,
                  alert_at=tuple(sorted(set(cmd.alert_at))))


async def _build_limit(_: ConfigCommands, cmd: CreateLimit, ent_id: str, prior: Prior | None) -> Limit:
    return Limit(id=ent_id, workspace_id=cmd.workspace_id, scope=cmd.scope, scope_id=cmd.scope_id,
                 **{f: getattr(cmd, f) for f in _LIMIT_FIELDS})


async def _build_policy(_: ConfigCommands, cmd: CreatePolicy, ent_id: str, prior: Prior | None) -> Policy:
    return Policy(
        id=ent_id, workspace_id=cmd.workspace_id, scope=cmd.scope, scope_id=cmd.scope_id,
        models_allow=cmd.models_allow, models_deny=cmd.models_deny, tools_allow=cmd.tools_allow,
        tools_deny=cmd.tools_deny, tool_action=cmd.tool_action, endpoints_allow=cmd.endpoints_allow,
        prompts_allow=cmd.prompts_allow,
        windows=tuple(_window(w) for w in cmd.windows), max_tokens_cap=cmd.max_tokens_cap,
        max_tokens_action=cmd.max_tokens_action, max_cost_nanos=_opt_nanos(cmd.max_cost_usd, "max_cost_usd"),
        escalate_over_nanos=_opt_nanos(cmd.escalate_over_usd, "escalate_over_usd"))


def _budget_fields(b: Budget) -> dict[str, Any]:
    return _builtins(b, "id", "workspace_id", "scope", "scope_id", "period", "timezone", "alert_at") | {
        "limit_usd": nanos_to_decimal_str(b.limit_nanos)}


def _policy_fields(p: Policy) -> dict[str, Any]:
    plain = _builtins(p, "id", "workspace_id", "scope", "scope_id", "models_allow", "models_deny", "tools_allow",
                      "tools_deny", "tool_action", "endpoints_allow", "prompts_allow", "windows", "max_tokens_cap",
                      "max_tokens_action")
    return plain | {"max_cost_usd": _usd(p.max_cost_nanos), "escalate_over_usd": _usd(p.escalate_over_nanos)}


DEPARTMENT = KindSpec("dept", "Department", CreateDepartment, PatchDepartment, lambda c: c.id or new_id("dept"),
                      lambda e: _builtins(e, "id", "workspace_id", "name"), _build_department)
MEMBER = KindSpec("member", "Member", CreateMember, PatchMember, lambda c: c.id or new_id("member"),
                  lambda e: _builtins(e, "id", "workspace_id", "name", "department_id", "email"), _build_member)
BUDGET = KindSpec("budget", "Budget", CreateBudget, PatchBudget, lambda c: c.id or new_id("budget"),
                  _budget_fields, _build_budget)
LIMIT = KindSpec("limit", "Limit", CreateLimit, PatchLimit, lambda c: c.id or new_id("limit"),
                 lambda e: _builtins(e, "id", "workspace_id", "scope", "scope_id", *_LIMIT_FIELDS), _build_limit)
POLICY = KindSpec("policy", "Policy", CreatePolicy, PatchPolicy, lambda c: c.id or new_id("policy"),
                  _policy_fields, _build_policy)


async def budget_usage(redis: Redis | None, budget: Budget, now: dt.datetime) -> dict[str, Any]:
    """The budget's current period from Redis as decimal USD strings: `spent_usd`, `held_usd`,
    `remaining_usd`, the period bounds and `budget_store` "ok"; with Redis unreachable the
    amounts are null and `budget_store` is "unavailable" (never an error)."""
    unavailable: dict[str, Any] = {"spent_usd": None, "held_usd": None, "remaining_usd": None,
                                   "budget_store": "unavailable"}
    if redis is None:
        return unavailable
    try:
        state = await budget_state(redis, budget, now)
    except (RedisError, OSError, TimeoutError):
        return unavailable
    return {"spent_usd": nanos_to_decimal_str(state.spent_nanos), "held_usd": nanos_to_decimal_str(state.held_nanos),
            "remaining_usd": nanos_to_decimal_str(state.remaining_nanos),
            "leased_usd": nanos_to_decimal_str(state.leased_nanos), "period_key": state.period_key,
            "period_start": state.period_start.isoformat(), "period_end": _iso_or_none(state.period_end),
            "budget_store": "ok"}


def _iso_or_none(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
