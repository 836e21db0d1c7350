"""The config snapshot: immutable indexes over the config entities at one KV revision.

Pure data, shared by both planes: the data plane swaps one in per revision (`dataplane.snapshot`),
the control plane builds one from Postgres rows to answer catalog queries the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from schemas.entities import (
    Agent,
    ConfigEntity,
    Heartbeat,
    ModelAlias,
    PriceOverride,
    Provider,
    VirtualKey,
    Workspace,
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Indexes over the config entities at one KV revision. Never mutated after build."""

    revision: int
    entities: Mapping[str, ConfigEntity]
    keys_by_hash: Mapping[str, VirtualKey]
    workspaces: Mapping[str, Workspace]
    agents: Mapping[str, Agent]
    providers: Mapping[tuple[str, str], Provider]
    aliases: Mapping[tuple[str, str], ModelAlias]
    prices: Mapping[tuple[str, str], PriceOverride]
    heartbeat_ms: int | None = None

    @classmethod
    def build(cls, entities: Mapping[str, ConfigEntity], revision: int) -> Snapshot:
        keys: dict[str, VirtualKey] = {}
        workspaces: dict[str, Workspace] = {}
        agents: dict[str, Agent] = {}
        providers: dict[tuple[str, str], Provider] = {}
        aliases: dict[tuple[str, str], ModelAlias] = {}
        prices: dict[tuple[str, str], PriceOverride] = {}
        heartbeat: int | None = None
        for ent in entities.values():
            match ent:
                case VirtualKey():
                    keys[ent.key_hash] = ent
                case Workspace():
                    workspaces[ent.id] = ent
                case Agent():
                    agents[ent.id] = ent
                case Provider():
                    providers[(ent.workspace_id, ent.name)] = ent
                case ModelAlias():
                    aliases[(ent.workspace_id, ent.alias)] = ent
                case PriceOverride():
                    prices[(ent.provider, ent.model)] = ent
                case Heartbeat():
                    heartbeat = ent.ts_ms
        return cls(
            revision=revision,
            entities=MappingProxyType(dict(entities)),
            keys_by_hash=MappingProxyType(keys),
            workspaces=MappingProxyType(workspaces),
            agents=MappingProxyType(agents),
            providers=MappingProxyType(providers),
            aliases=MappingProxyType(aliases),
            prices=MappingProxyType(prices),
            heartbeat_ms=heartbeat,
        )

    @classmethod
    def empty(cls) -> Snapshot:
        return cls.build({}, 0)
