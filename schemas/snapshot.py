"""The config snapshot: immutable indexes over the config entities at one KV revision.

Pure data, shared by both planes: the data plane swaps one in per revision (`dataplane.snapshot`),
the control plane builds one from Postgres rows to answer catalog queries the same way.

Every index comes from one table, `INDEXES`: entity class -> (index name, key function, single or
grouped). A single index maps a key to one entity; a grouped one maps it to a tuple of entities,
ordered by id. Adding an entity kind is one row here plus its field on `Snapshot`.

Two ways to make one, with the same result whenever index keys are unique (the control plane's
constraints make them so; with duplicates, which entity a single index keeps is unspecified):
`build` indexes a whole entity dict; `with_changes` derives the next snapshot from this one and a
few changed KV keys, copying only the indexes those kinds touch (untouched indexes are shared by
reference, so caches keyed on their identity survive, e.g. the model catalog's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from types import MappingProxyType
from typing import Any

from schemas.entities import (
    HEARTBEAT_KEY,
    Agent,
    Budget,
    CachePurge,
    CacheSettings,
    ConfigEntity,
    Department,
    EscalationGrant,
    Heartbeat,
    Limit,
    LogDestination,
    LogSettings,
    McpServer,
    Member,
    ModelAlias,
    PaidEndpoint,
    Policy,
    PriceOverride,
    PromptTemplate,
    Provider,
    ProviderKey,
    Router,
    VirtualKey,
    Wallet,
    Workspace,
)

ScopeKey = tuple[str, str, str]  # (workspace_id, scope, scope_id)
# (scope, scope id, provider name, model): workspace and provider-key price overrides, and the
# platform's "*" ones (scope id ""). Platform overrides of one model are in `prices`.
ScopedPriceKey = tuple[str, str, str, str]
ANY_MODEL = "*"  # a price override's `model` that matches every model of its provider


def platform_price_key(price: PriceOverride) -> tuple[str, str] | None:
    """The `prices` key of a platform override of one model (as before scopes existed), else None."""
    if price.scope == "platform" and price.model != ANY_MODEL:
        return (price.provider, price.model)
    return None


def scoped_price_key(price: PriceOverride) -> ScopedPriceKey | None:
    """The `scoped_prices` key of any other override, else None."""
    if price.scope == "workspace":
        return ("workspace", price.workspace_id or "", price.provider, price.model)
    if price.scope == "provider_key":
        return ("provider_key", price.provider_key_id or "", price.provider, price.model)
    if price.model == ANY_MODEL:
        return ("platform", "", price.provider, price.model)
    return None


@dataclass(frozen=True, slots=True)
class Index:
    """One row of the index table: entities of `kind` go into the snapshot field `name` under
    `key(entity)` (an entity whose key is None is not in that index); `grouped` indexes hold a
    tuple of every entity with that key (by id)."""

    kind: type[Any]
    name: str
    key: Callable[[Any], Hashable]
    grouped: bool = False


_by_scope = attrgetter("workspace_id", "scope", "scope_id")
_by_id = attrgetter("id")

INDEXES: tuple[Index, ...] = (
    Index(VirtualKey, "keys_by_hash", attrgetter("key_hash")),
    Index(Workspace, "workspaces", _by_id),
    Index(Department, "departments", _by_id),
    Index(Member, "members", _by_id),
    Index(Agent, "agents", _by_id),
    Index(Provider, "providers", attrgetter("workspace_id", "name")),
    Index(ProviderKey, "provider_keys", _by_id),
    # BYO keys by (workspace, provider name); operator keys by (OPERATOR, "") per type below.
    Index(ProviderKey, "provider_keys_for", attrgetter("workspace_id", "provider_name"), grouped=True),
    Index(ProviderKey, "master_keys", attrgetter("workspace_id", "provider_type"), grouped=True),
    Index(ModelAlias, "aliases", attrgetter("workspace_id", "alias")),
    # Platform prices of one model by (provider, model); every other override (a workspace's, a
    # provider key's, a provider's "*") by (scope, scope id, provider, model); see schemas.pricing.
    Index(PriceOverride, "prices", platform_price_key),
    Index(PriceOverride, "scoped_prices", scoped_price_key),
    Index(EscalationGrant, "escalations", _by_id),
    Index(Budget, "budgets_by_id", _by_id),
    # Everything that governs a scope (policies, limits, budgets), in one index: a request's path
    # costs one lookup per scope.
    Index(Policy, "governance", _by_scope, grouped=True),
    Index(Limit, "governance", _by_scope, grouped=True),
    Index(Budget, "governance", _by_scope, grouped=True),
    # Every version of a prompt template by (workspace, name); see schemas.prompts.
    Index(PromptTemplate, "prompts", attrgetter("workspace_id", "name"), grouped=True),
    # Routers by id (`/router/{id}`, key and agent bindings) and by (workspace, name) (`router/<name>`).
    Index(Router, "routers", _by_id),
    Index(Router, "routers_by_name", attrgetter("workspace_id", "name")),
    # Cache settings by (workspace, scope, scope id); see dataplane/cache.py for which one applies.
    Index(CacheSettings, "cache_settings", _by_scope),
    Index(CachePurge, "cache_purges", attrgetter("workspace_id", "namespace")),
    # Paid endpoints by their public slug (`/paid/{slug}/...`, unique across the gateway).
    Index(PaidEndpoint, "paid_endpoints", attrgetter("slug")),
    # Outbound payment wallets by workspace (by id within it); see dataplane/ingress/egress.py.
    Index(Wallet, "wallets", attrgetter("workspace_id"), grouped=True),
    # Log destinations by id (delivered by the projector's delivery task, events/delivery.py).
    Index(LogDestination, "log_destinations", _by_id),
    # What is kept of requests (bodies, redaction, retention) by (workspace, scope, scope id).
    Index(LogSettings, "log_settings", _by_scope),
    # Upstream MCP servers by (workspace, name): `/mcp/{name}` and the aggregate `/mcp`.
    Index(McpServer, "mcp_servers", attrgetter("workspace_id", "name")),
)

_ROWS_BY_KIND: dict[type[Any], tuple[Index, ...]] = {}
for _row in INDEXES:
    _ROWS_BY_KIND[_row.kind] = (*_ROWS_BY_KIND.get(_row.kind, ()), _row)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Indexes over the config entities at one KV revision. Never mutated after it is made.

    `entities` is keyed by KV key. The index fields are filled from `INDEXES`; `heartbeat_ms` is
    the control plane's newest heartbeat (None before the first)."""

    revision: int
    entities: Mapping[str, ConfigEntity]
    keys_by_hash: Mapping[str, VirtualKey]
    workspaces: Mapping[str, Workspace]
    departments: Mapping[str, Department]
    members: Mapping[str, Member]
    agents: Mapping[str, Agent]
    providers: Mapping[tuple[str, str], Provider]
    provider_keys: Mapping[str, ProviderKey]
    provider_keys_for: Mapping[tuple[str, str], tuple[ProviderKey, ...]]
    master_keys: Mapping[tuple[str, str], tuple[ProviderKey, ...]]
    aliases: Mapping[tuple[str, str], ModelAlias]
    prices: Mapping[tuple[str, str], PriceOverride]
    scoped_prices: Mapping[ScopedPriceKey, PriceOverride]
    escalations: Mapping[str, EscalationGrant]
    budgets_by_id: Mapping[str, Budget]
    governance: Mapping[ScopeKey, tuple[Policy | Limit | Budget, ...]]
    prompts: Mapping[tuple[str, str], tuple[PromptTemplate, ...]]
    routers: Mapping[str, Router]
    routers_by_name: Mapping[tuple[str, str], Router]
    cache_settings: Mapping[ScopeKey, CacheSettings]
    cache_purges: Mapping[tuple[str, str], CachePurge]
    paid_endpoints: Mapping[str, PaidEndpoint]
    wallets: Mapping[str, tuple[Wallet, ...]]
    log_destinations: Mapping[str, LogDestination]
    log_settings: Mapping[ScopeKey, LogSettings]
    mcp_servers: Mapping[tuple[str, str], McpServer]
    heartbeat_ms: int | None = None

    @classmethod
    def build(cls, entities: Mapping[str, ConfigEntity], revision: int) -> Snapshot:
        """Index every entity of `entities` (a KV key -> entity dict, copied, not kept). O(n)."""
        single: dict[str, dict[Hashable, Any]] = {row.name: {} for row in INDEXES if not row.grouped}
        grouped: dict[str, dict[Hashable, list[Any]]] = {row.name: {} for row in INDEXES if row.grouped}
        for ent in entities.values():
            for row in _ROWS_BY_KIND.get(type(ent), ()):
                key = row.key(ent)
                if key is None:
                    continue
                if row.grouped:
                    grouped[row.name].setdefault(key, []).append(ent)
                else:
                    single[row.name][key] = ent
        indexes: dict[str, Any] = {name: MappingProxyType(idx) for name, idx in single.items()}
        for name, groups in grouped.items():
            indexes[name] = MappingProxyType({k: _ordered(v) for k, v in groups.items()})
        return cls(revision=revision, entities=MappingProxyType(dict(entities)), **indexes,
                   heartbeat_ms=_heartbeat_ms(entities))

    @classmethod
    def empty(cls) -> Snapshot:
        return cls.build({}, 0)

    def with_changes(self, changes: Mapping[str, ConfigEntity | None], revision: int) -> Snapshot:
        """The snapshot after `changes` (KV key -> new entity, or None for deleted) at `revision`.

        Copy-on-write: `entities` and the indexes of the kinds involved (old or new value) are
        copied, every other index is shared with `self` (a heartbeat copies only `entities`, a
        C-speed dict copy). Equal to `build` of the changed entity dict (see the module docstring
        on duplicates)."""
        entities = _copy(self.entities)
        copies: dict[str, dict[Hashable, Any]] = {}

        def index(row: Index) -> dict[Hashable, Any]:
            idx = copies.get(row.name)
            if idx is None:
                idx = copies[row.name] = _copy(getattr(self, row.name))
            return idx

        for key, new in changes.items():
            old = entities.pop(key, None)
            if new is not None:
                entities[key] = new
            if old is not None:
                for row in _ROWS_BY_KIND.get(type(old), ()):
                    _remove(index(row), row, old)
            if new is not None:
                for row in _ROWS_BY_KIND.get(type(new), ()):
                    _add(index(row), row, new)
        updated: dict[str, Any] = {name: MappingProxyType(idx) for name, idx in copies.items()}
        return dataclasses.replace(self, revision=revision, entities=MappingProxyType(entities),
                                   heartbeat_ms=_heartbeat_ms(entities), **updated)


def _copy(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    # A proxy's own copy() is the underlying dict's C-level copy; dict(proxy) walks it in Python.
    return mapping.copy() if isinstance(mapping, MappingProxyType) else dict(mapping)


def _ordered(group: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(sorted(group, key=_by_id))


def _add(idx: dict[Hashable, Any], row: Index, ent: Any) -> None:
    key = row.key(ent)
    if key is None:
        return
    if row.grouped:
        idx[key] = _ordered((*idx.get(key, ()), ent))
    else:
        idx[key] = ent


def _remove(idx: dict[Hashable, Any], row: Index, ent: Any) -> None:
    key = row.key(ent)
    if key is None:
        return
    if row.grouped:
        rest = tuple(e for e in idx.get(key, ()) if e is not ent)
        if rest:
            idx[key] = rest
        else:
            idx.pop(key, None)
    elif idx.get(key) is ent:  # another entity may have taken the key since (a rename in the same burst)
        del idx[key]


def _heartbeat_ms(entities: Mapping[str, ConfigEntity]) -> int | None:
    beat = entities.get(HEARTBEAT_KEY)
    return beat.ts_ms if isinstance(beat, Heartbeat) else None

