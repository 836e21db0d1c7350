"""References between config entities: what an entity points at (checked on every write) and
what points at an entity (checked before a delete).

A reference names a live entity of the SAME workspace: otherwise 404 `<what>_not_found` or 400
`<what>_workspace_mismatch`, naming the field. Deleting an entity others point at is refused
(409 `still_referenced`) rather than cascaded: a delete never changes anything but its target.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from schemas.entities import (
    OPERATOR,
    Budget,
    CacheSettings,
    ConfigEntity,
    EscalationGrant,
    Limit,
    LogSettings,
    PaidEndpoint,
    Policy,
    Provider,
    ProviderKey,
    Router,
    RouterTarget,
    VirtualKey,
    Wallet,
)
from schemas.errors import InvalidRequest, NotFound

# Where a scope points: the config kind and how messages name it. `workflow` is a free label.
SCOPE_KIND: dict[str, tuple[str, str]] = {
    "workspace": ("ws", "Workspace"), "department": ("dept", "Department"), "member": ("member", "Member"),
    "agent": ("agent", "Agent"), "key": ("vk", "Virtual key"),
}
CACHE_SCOPE_KIND: dict[str, tuple[str, str]] = {"key": ("vk", "Virtual key"), "router": ("router", "Router")}
_REF_FIELDS = (("department_id", "dept", "Department"), ("member_id", "member", "Member"),
               ("agent_id", "agent", "Agent"), ("router_id", "router", "Router"))


@dataclass(frozen=True, slots=True)
class Ref:
    """`entity.<param>` names the live entity `(kind, id)`, which must be of the same workspace."""

    kind: str
    id: str
    param: str
    what: str


def references(entity: ConfigEntity) -> tuple[Ref, ...]:
    ws = getattr(entity, "workspace_id", None)
    if not isinstance(ws, str) or isinstance(entity, EscalationGrant) or ws == OPERATOR:
        return ()
    refs = [Ref("ws", ws, "workspace_id", "Workspace")]
    if isinstance(entity, ProviderKey):
        refs.append(Ref("provider", f"{ws}.{entity.provider_name}", "provider", "Provider"))
    if isinstance(entity, VirtualKey):  # its own provider-key choices: the workspace's or master keys
        refs += [Ref("pkey", key_id, f"provider_keys.{name}", "Provider key")
                 for name, key_id in sorted(entity.provider_keys.items())]
    if isinstance(entity, Router):  # each target's provider (by name) and pinned credential
        refs += _router_refs(entity)
    for field, kind, what in _REF_FIELDS:
        value = getattr(entity, field, None)
        if isinstance(value, str):
            refs.append(Ref(kind, value, field, what))
    if isinstance(entity, Budget | Limit | Policy) and entity.scope not in ("workflow", "workspace"):
        kind, what = SCOPE_KIND[entity.scope]
        refs.append(Ref(kind, entity.scope_id, "scope_id", what))
    if isinstance(entity, CacheSettings):
        refs += _cache_refs(entity)
    if isinstance(entity, LogSettings) and entity.scope == "key":
        refs.append(Ref("vk", entity.scope_id, "scope_id", "Virtual key"))
    if isinstance(entity, PaidEndpoint):
        refs += _paid_refs(entity)
    if isinstance(entity, Wallet):  # the agents allowed to pay with it
        refs += [Ref("agent", agent_id, f"agent_ids[{i}]", "Agent") for i, agent_id in enumerate(entity.agent_ids)]
    return tuple(refs)


def _paid_refs(endpoint: PaidEndpoint) -> list[Ref]:
    """The provider (by name) a paid endpoint's `provider/model` names. A `router/<name>` is
    checked by name when the endpoint is built; an alias name is resolved per call."""
    model = endpoint.serve.model
    if model is None or "/" not in model or model.startswith("router/"):
        return []
    return [Ref("provider", f"{endpoint.workspace_id}.{model.partition('/')[0]}", "serve.model", "Provider")]


def _cache_refs(settings: CacheSettings) -> list[Ref]:
    """A cache setting's key or router (by id) and its embedding model's provider (by name)."""
    refs: list[Ref] = []
    if settings.scope != "workspace":
        kind, what = CACHE_SCOPE_KIND[settings.scope]
        refs.append(Ref(kind, settings.scope_id, "scope_id", what))
    if settings.embedding_model is not None:
        name = settings.embedding_model.partition("/")[0]
        refs.append(Ref("provider", f"{settings.workspace_id}.{name}", "embedding_model", "Provider"))
    return refs


def router_target_sets(router: Router) -> Iterator[tuple[str, tuple[RouterTarget, ...]]]:
    """Each target set of a router with the param that names it: its own, then its rules'."""
    yield "targets", router.targets
    for i, rule in enumerate(router.rules):
        yield f"rules[{i}].targets", rule.targets


def _router_refs(router: Router) -> list[Ref]:
    refs: list[Ref] = []
    seen: set[tuple[str, str]] = set()
    for where, targets in router_target_sets(router):
        for i, t in enumerate(targets):
            provider = ("provider", f"{router.workspace_id}.{t.model.partition('/')[0]}")
            if provider not in seen:
                seen.add(provider)
                refs.append(Ref(*provider, f"{where}[{i}].model", "Provider"))
            if t.provider_key_id is not None and ("pkey", t.provider_key_id) not in seen:
                seen.add(("pkey", t.provider_key_id))
                refs.append(Ref("pkey", t.provider_key_id, f"{where}[{i}].provider_key_id", "Provider key"))
    return refs


def slug(what: str) -> str:
    return what.lower().replace(" ", "_")


async def check_ref(conn: psycopg.AsyncConnection[Any], ref: Ref, workspace_id: str) -> None:
    # FOR SHARE: a concurrent DELETE of the referenced entity waits for this commit and then
    # sees the new reference (or this insert waits for the delete and finds nothing).
    cur = await conn.execute("SELECT workspace_id FROM config_entity WHERE kind = %s AND id = %s "
                             "AND deleted_at IS NULL FOR SHARE", (ref.kind, ref.id))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"{ref.what} '{ref.id}' does not exist.", param=ref.param, code=f"{slug(ref.what)}_not_found")
    if ref.kind != "ws" and row[0] != workspace_id and not (ref.kind == "pkey" and row[0] == OPERATOR):
        raise InvalidRequest(f"{ref.what} '{ref.id}' belongs to another workspace; '{ref.param}' must name a "
                             f"{ref.what.lower()} of workspace '{workspace_id}'.", param=ref.param,
                             code=f"{slug(ref.what)}_workspace_mismatch")


# Entities whose fields point at an entity of kind K; deleting K while they are live is a 409.
_REFERRERS: dict[str, tuple[tuple[str, str], ...]] = {
    "dept": (("member", "department_id"), ("agent", "department_id"), ("vk", "department_id")),
    "member": (("agent", "member_id"), ("vk", "member_id")),
    "agent": (("vk", "agent_id"), ("paid", "agent_id")),
    "router": (("vk", "router_id"), ("agent", "router_id")),
}
_SCOPE_OF: dict[str, str] = {"dept": "department", "member": "member", "agent": "agent"}


async def referrers(conn: psycopg.AsyncConnection[Any], kind: str, entity: Any) -> list[str]:
    """Up to 5 live entities ("kind id") that would dangle if `entity` were deleted."""
    ent_id: str = entity.id
    if kind == "ws":
        # Escalation grants and cache purges are not counted: grants expire on their own and
        # neither has a delete route (a purge only marks a cache generation).
        cur = await conn.execute("SELECT kind, id FROM config_entity WHERE workspace_id = %s "
                                 "AND kind NOT IN ('ws', 'escalation', 'cachepurge') AND deleted_at IS NULL "
                                 "ORDER BY kind, id LIMIT 5", (ent_id,))
        return [f"{k} {i}" for k, i in await cur.fetchall()]
    if kind == "provider":
        assert isinstance(entity, Provider)
        prefix = f"{entity.name}/"
        cur = await conn.execute(
            "SELECT kind, id FROM config_entity WHERE workspace_id = %s AND deleted_at IS NULL AND ("
            "(kind = 'alias' AND starts_with(body->>'target', %s)) "
            "OR (kind = 'cache' AND starts_with(body->>'embedding_model', %s)) "
            "OR (kind = 'paid' AND starts_with(body->'serve'->>'model', %s)) OR (kind = 'router' AND ("
            "jsonb_path_exists(body, '$.targets[*].model ? (@ starts with $p)', jsonb_build_object('p', %s::text)) "
            "OR jsonb_path_exists(body, '$.rules[*].targets[*].model ? (@ starts with $p)', "
            "jsonb_build_object('p', %s::text))))) ORDER BY kind, id LIMIT 5",
            (entity.workspace_id, prefix, prefix, prefix, prefix, prefix))
        return [f"{k} {i}" for k, i in await cur.fetchall()]
    if kind not in _REFERRERS:
        return []  # nothing points at a price, alias, key, budget, limit, policy, prompt or cache setting
    found: list[str] = []
    ws = entity.workspace_id
    for other, field in _REFERRERS.get(kind, ()):
        cur = await conn.execute("SELECT id FROM config_entity WHERE kind = %s AND workspace_id = %s "
                                 "AND deleted_at IS NULL AND body->>%s = %s LIMIT 5", (other, ws, field, ent_id))
        found += [f"{other} {r[0]}" for r in await cur.fetchall()]
    if kind in _SCOPE_OF:
        cur = await conn.execute("SELECT kind, id FROM config_entity WHERE kind IN ('budget', 'limit', 'policy') "
                                 "AND workspace_id = %s AND deleted_at IS NULL AND body->>'scope' = %s "
                                 "AND body->>'scope_id' = %s LIMIT 5", (ws, _SCOPE_OF[kind], ent_id))
        found += [f"{k} {i}" for k, i in await cur.fetchall()]
    if kind == "agent":  # a wallet the agent may pay with (`agent_ids`, a list)
        cur = await conn.execute("SELECT id FROM config_entity WHERE kind = 'wallet' AND workspace_id = %s "
                                 "AND deleted_at IS NULL AND body->'agent_ids' @> jsonb_build_array(%s::text) "
                                 "LIMIT 5", (ws, ent_id))
        found += [f"wallet {r[0]}" for r in await cur.fetchall()]
    if kind == "router":  # a router's cache setting (a key's stays, inert, when the key is revoked)
        cur = await conn.execute("SELECT id FROM config_entity WHERE kind = 'cache' AND workspace_id = %s "
                                 "AND deleted_at IS NULL AND body->>'scope' = 'router' AND body->>'scope_id' = %s "
                                 "LIMIT 5", (ws, ent_id))
        found += [f"cache {r[0]}" for r in await cur.fetchall()]
        # A paid endpoint serving model 'router/<name>' (by name, as clients call it).
        cur = await conn.execute("SELECT id FROM config_entity WHERE kind = 'paid' AND workspace_id = %s "
                                 "AND deleted_at IS NULL AND body->'serve'->>'model' = %s LIMIT 5",
                                 (ws, f"router/{entity.name}"))
        found += [f"paid {r[0]}" for r in await cur.fetchall()]
    return found[:5]
