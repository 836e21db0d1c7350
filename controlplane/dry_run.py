"""`POST /admin/v1/decisions/dry-run`: what the policy stage would decide for a request, without
sending it. The same pure `schemas.policy.decide` the data plane runs, over the config as
committed in Postgres (which the workers' snapshots converge to).

The request's path is built as the data plane builds it (`dataplane.stages.access.agent`,
`dataplane.stages.governance.scope_path`): the workspace; the key's department and member, else
its agent's, else the member's department; the agent (the key's binding, else the
`Alephant-Agent-Id` header); the key; the `Alephant-Workflow-Id` label.

Not modelled: the cost estimate. It is `est_cost_usd` from the dry-run body, or 0 (which passes
`max_cost_usd` and `escalate_over_usd`); pass the amount to try those rules. An
`Alephant-Escalation-Id` header is honoured when it names an unexpired grant of the key
(whether it was already used is not checked). Limits and budgets are not evaluated.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import msgspec

from controlplane.commands import ConfigCommands
from controlplane.governance import UsdAmount, usd_to_nanos
from controlplane.inputs import Command, Ident, iso_ms, now_ms
from schemas.entities import (
    SCOPE_SPECIFICITY,
    Agent,
    ConfigEntity,
    EscalationGrant,
    Member,
    ModelAlias,
    Policy,
    PromptTemplate,
    Provider,
    VirtualKey,
    Workspace,
)
from schemas.errors import InvalidRequest, NotFound
from schemas.http import validate
from schemas.money import nanos_to_decimal_str
from schemas.policy import PolicyInput, decide

HeaderName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
HeaderValue = Annotated[str, msgspec.Meta(max_length=1024)]


class DryRun(Command):
    """Exactly one of `key` (the plaintext virtual key) or `key_id`. `body` is the request JSON
    as the client would send it; `headers` its Alephant-* headers."""

    body: dict[str, Any]
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None
    key_id: Ident | None = None
    headers: Annotated[dict[HeaderName, HeaderValue], msgspec.Meta(max_length=64)] = msgspec.field(
        default_factory=dict)
    endpoint: Annotated[str, msgspec.Meta(pattern=r"^/[\x21-\x7e]{0,511}$")] = "/v1/chat/completions"
    est_cost_usd: UsdAmount | None = None

    def check(self) -> None:
        if (self.key is None) == (self.key_id is None):
            raise InvalidRequest("Give exactly one of 'key' (the plaintext virtual key) or 'key_id'.", param="key",
                                 code="invalid_key_reference")
        if self.est_cost_usd is not None:
            usd_to_nanos(self.est_cost_usd, "est_cost_usd", allow_zero=True)


def parse_dry_run(raw: Any) -> DryRun:
    """Not `parse_command`: the request body may hold any text (newlines in messages are normal)."""
    cmd = validate(raw, DryRun)
    cmd.check()
    return cmd


def _prompt_name(body: Mapping[str, Any], workspace_id: str, entities: Iterable[ConfigEntity]) -> str:
    """The template a body's `prompt.id` names (a name, or one version's entity id), as the data
    plane's policy sees it: its name; "" without one."""
    prompt = body.get("prompt")
    ref = prompt.get("id") if isinstance(prompt, dict) else None
    if not isinstance(ref, str):
        return ""
    return next((e.name for e in entities if isinstance(e, PromptTemplate) and e.workspace_id == workspace_id
                 and e.id == ref), ref)


def _tool_names(body: Mapping[str, Any]) -> tuple[str, ...]:
    """Tool names in any of the three APIs' shapes (as `dataplane.lifecycle.tool_names`)."""
    names: list[str] = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict):
            fn = tool.get("function")
            name = tool.get("name") or (fn.get("name") if isinstance(fn, dict) else None) or tool.get("type")
            if isinstance(name, str) and name not in names:
                names.append(name)
    return tuple(names)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class DecisionDryRun:
    def __init__(self, commands: ConfigCommands) -> None:
        self._commands = commands

    async def _key(self, cmd: DryRun) -> VirtualKey:
        async with self._commands.pool.connection() as conn:
            if cmd.key is not None:
                cur = await conn.execute("SELECT body FROM config_entity WHERE kind = 'vk' AND kv_key = %s "
                                         "AND deleted_at IS NULL", (f"vk.{self._commands.keyring.hash_key(cmd.key)}",))
            else:
                cur = await conn.execute("SELECT body FROM config_entity WHERE kind = 'vk' AND id = %s "
                                         "AND deleted_at IS NULL", (cmd.key_id,))
            row = await cur.fetchone()
        if row is None:
            what = "The key" if cmd.key is not None else f"Virtual key '{cmd.key_id}'"
            raise NotFound(f"{what} is unknown or revoked.", param="key" if cmd.key is not None else "key_id",
                           code="key_not_found")
        return msgspec.convert(row[0], VirtualKey)

    async def _workspace_entities(self, workspace_id: str) -> list[ConfigEntity]:
        async with self._commands.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT body FROM config_entity WHERE workspace_id = %s AND deleted_at IS NULL AND kind IN "
                "('ws', 'agent', 'member', 'policy', 'alias', 'provider', 'escalation')", (workspace_id,))
            rows = await cur.fetchall()
        return [msgspec.convert(r[0], ConfigEntity) for r in rows]

    async def run(self, cmd: DryRun) -> dict[str, Any]:
        vk = await self._key(cmd)
        ws_id = vk.workspace_id
        entities = await self._workspace_entities(ws_id)
        headers = {k.lower(): v for k, v in cmd.headers.items()}
        workspace = next((e for e in entities if isinstance(e, Workspace) and e.id == ws_id), None)
        agents = {e.id: e for e in entities if isinstance(e, Agent)}
        members = {e.id: e for e in entities if isinstance(e, Member)}
        asked_agent = headers.get("alephant-agent-id") or None
        now = now_ms()
        base: dict[str, Any] = {"key_id": vk.id, "workspace_id": ws_id, "est_cost_usd": None, "policies": [],
                                "path": [], "model": None, "max_tokens": None, "strip_tools": [], "effects": []}
        if vk.expires_at_ms is not None and vk.expires_at_ms <= now:
            return base | _refusal("key_expired", "key.expires_at", "key", vk.id,
                                   f"Key {vk.id} expired at {iso_ms(vk.expires_at_ms)}.")
        if vk.agent_id is not None and asked_agent is not None and asked_agent != vk.agent_id:
            return base | _refusal("agent_mismatch", "key.agent_id", "key", vk.id,
                                   f"This key is bound to agent '{vk.agent_id}' and cannot act as '{asked_agent}'.")
        agent_id = vk.agent_id or asked_agent
        department, member = vk.department_id, vk.member_id
        ag = agents.get(agent_id) if agent_id else None
        if ag is not None:
            department, member = department or ag.department_id, member or ag.member_id
        if member is not None and department is None and member in members:
            department = members[member].department_id
        path = [("workspace", ws_id), ("department", department), ("member", member), ("agent", agent_id),
                ("key", vk.id), ("workflow", headers.get("alephant-workflow-id") or None)]
        on_path = [(s, i) for s, i in path if i is not None]
        policies = sorted((e for e in entities if isinstance(e, Policy) and (e.scope, e.scope_id) in on_path),
                          key=lambda p: (SCOPE_SPECIFICITY.get(p.scope, 0), p.id))

        model = cmd.body.get("model")
        model = model if isinstance(model, str) else ""
        aliases = {e.alias: e.target for e in entities if isinstance(e, ModelAlias)}
        resolved = aliases.get(model, model)
        provider_name = resolved.partition("/")[0] if "/" in resolved else ""
        provider = next((e for e in entities if isinstance(e, Provider) and e.name == provider_name), None)
        cost = usd_to_nanos(cmd.est_cost_usd, "est_cost_usd", allow_zero=True) if cmd.est_cost_usd else 0
        esc_id = headers.get("alephant-escalation-id")
        grant = next((e for e in entities if isinstance(e, EscalationGrant) and e.id == esc_id
                      and e.key_id == vk.id and e.expires_at_ms > now), None)
        req = PolicyInput(endpoint=cmd.endpoint, model=resolved, provider_type=provider.type if provider else "",
                          tools=_tool_names(cmd.body), max_tokens=_max_tokens(cmd.body), est_cost_nanos=cost,
                          escalation=grant, prompt=_prompt_name(cmd.body, ws_id, entities))
        verdict = decide(policies, vk, workspace, req, dt.datetime.fromtimestamp(now / 1000, dt.UTC))
        return base | {
            "decision": "allow" if verdict.allowed else verdict.outcome, "code": verdict.code, "rule": verdict.rule,
            "scope": verdict.scope, "scope_id": verdict.scope_id, "message": verdict.message,
            "max_tokens": verdict.max_tokens, "strip_tools": list(verdict.strip_tools),
            "effects": [{"kind": e.kind, "rule": e.rule, "scope": e.scope, "scope_id": e.scope_id, "detail": e.detail}
                        for e in verdict.effects],
            "policies": [p.id for p in policies], "path": [{"scope": s, "id": i} for s, i in on_path],
            "model": resolved or None, "provider_type": provider.type if provider else None,
            "est_cost_usd": nanos_to_decimal_str(cost), "escalation_grant": grant.id if grant else None,
        }


def _refusal(code: str, rule: str, scope: str, scope_id: str, message: str) -> dict[str, Any]:
    return {"decision": "deny", "code": code, "rule": rule, "scope": scope, "scope_id": scope_id, "message": message}
