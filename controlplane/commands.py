"""Admin commands: validate input, then in ONE Postgres transaction write the entity's state and
an outbox row carrying its `config.changed` event and KV entry; then let the relay publish.

Inputs reject unknown fields. Responses never contain secrets except the one-time plaintext of
a newly created virtual key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Collection
from typing import Annotated, Any, TypeVar

import msgspec
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from controlplane.relay import OutboxRelay
from controlplane.ssrf import check_base_url_resolving
from schemas.entities import (
    Agent,
    ConfigEntity,
    ModelAlias,
    PriceOverride,
    Provider,
    ProviderKind,
    VirtualKey,
    Workspace,
    entity_encoder,
    kv_key,
)
from schemas.errors import Conflict, InvalidRequest, NotFound
from schemas.events import ConfigChanged, event_encoder, subject_for
from schemas.ids import new_id, uuid7
from schemas.keys import KeyRing, display_prefix, generate_virtual_key

T = TypeVar("T")

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
Ident = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class CreateWorkspace(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    id: Ident | None = None


class CreateAgent(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    workspace_id: str
    name: Name
    id: Ident | None = None


class UpsertProvider(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    workspace_id: str
    name: Ident
    type: ProviderKind
    base_url: str = ""
    api_key: str | None = None
    options: dict[str, str] = msgspec.field(default_factory=dict)


class CreateVirtualKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    workspace_id: str
    name: str = ""
    agent_id: str | None = None


class UpsertAlias(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    workspace_id: str
    alias: Name
    target: Name


class UpsertPrice(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Prices in integer nano-USD per million tokens ($2.50/MTok = 2_500_000_000)."""

    provider: Ident
    model: Name
    input_per_mtok_nanos: NonNegative
    output_per_mtok_nanos: NonNegative
    cache_read_per_mtok_nanos: NonNegative | None = None
    cache_write_per_mtok_nanos: NonNegative | None = None




def _stable_id(*parts: str) -> str:
    """A KV-safe id that is the same for the same natural key, so upserts replace."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def public_view(entity: ConfigEntity) -> dict[str, Any]:
    """An entity as the API shows it: no key hash, no ciphertext."""
    data: dict[str, Any] = msgspec.to_builtins(entity)
    data.pop("key_hash", None)
    if "api_key_enc" in data:
        data["has_api_key"] = data.pop("api_key_enc") is not None
    return data


class ConfigCommands:
    def __init__(self, pool: AsyncConnectionPool[Any], keyring: KeyRing, relay: OutboxRelay,
                 subject_prefix: str, ssrf_allow: Collection[str] = ()) -> None:
        self._ssrf_allow = ssrf_allow
        self._pool = pool
        self._keyring = keyring
        self._relay = relay
        self._prefix = subject_prefix

    async def _require(self, conn: psycopg.AsyncConnection[Any], kind: str, entity_id: str, what: str) -> None:
        cur = await conn.execute("SELECT 1 FROM config_entity WHERE kind = %s AND id = %s AND deleted_at IS NULL",
                                 (kind, entity_id))
        if await cur.fetchone() is None:
            raise NotFound(f"{what} '{entity_id}' does not exist.", code=f"{what.lower().replace(' ', '_')}_not_found")

    async def _write(self, conn: psycopg.AsyncConnection[Any], entity: ConfigEntity, op: str, *,
                     create_only: bool = False, delete: bool = False) -> None:
        kind = type(entity).__struct_config__.tag
        assert isinstance(kind, str)
        ent_id: str = entity.id  # type: ignore[union-attr]
        ws = getattr(entity, "workspace_id", None)
        key = kv_key(entity)
        body = msgspec.to_builtins(entity)
        if create_only:
            cur = await conn.execute(
                "INSERT INTO config_entity (kind, id, workspace_id, kv_key, body) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING id",
                (kind, ent_id, ws, key, Jsonb(body)),
            )
            if await cur.fetchone() is None:
                raise Conflict(f"A {kind} with id '{ent_id}' already exists.", code="already_exists")
        else:
            await conn.execute(
                "INSERT INTO config_entity (kind, id, workspace_id, kv_key, body, deleted_at) "
                "VALUES (%s, %s, %s, %s, %s, CASE WHEN %s THEN now() END) "
                "ON CONFLICT (kind, id) DO UPDATE SET body = EXCLUDED.body, kv_key = EXCLUDED.kv_key, "
                "deleted_at = EXCLUDED.deleted_at, updated_at = now()",
                (kind, ent_id, ws, key, Jsonb(body), delete),
            )
        event = ConfigChanged(
            event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=ws or "_system",
            entity=kind, entity_id=ent_id, op=op, data=public_view(entity),
        )
        await conn.execute(
            "INSERT INTO config_outbox (event_id, subject, event, kv_key, kv_value) VALUES (%s, %s, %s, %s, %s)",
            (event.event_id, subject_for(event, self._prefix), event_encoder.encode(event), key,
             None if delete else entity_encoder.encode(entity)),
        )

    async def _commit_and_publish(self, entity: ConfigEntity, op: str, **kw: bool) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            await self._write(conn, entity, op, **kw)
        return await self._relay.flush()

    async def _load(self, kind: str, entity_id: str) -> dict[str, Any] | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT body FROM config_entity WHERE kind = %s AND id = %s AND deleted_at IS NULL", (kind, entity_id))
            row = await cur.fetchone()
        return None if row is None else dict(row[0])

    async def get(self, kind: str, entity_id: str) -> dict[str, Any]:
        body = await self._load(kind, entity_id)
        if body is None:
            raise NotFound(f"No {kind} with id '{entity_id}'.", code="not_found")
        return public_view(msgspec.convert(body | {"kind": kind}, ConfigEntity))

    async def list(self, kind: str, workspace_id: str | None) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT body FROM config_entity WHERE kind = %s AND deleted_at IS NULL "
                "AND (%s::text IS NULL OR workspace_id = %s) ORDER BY created_at",
                (kind, workspace_id, workspace_id),
            )
            rows = await cur.fetchall()
        return [public_view(msgspec.convert(r[0] | {"kind": kind}, ConfigEntity)) for r in rows]

    async def create_workspace(self, cmd: CreateWorkspace) -> dict[str, Any]:
        ws = Workspace(id=cmd.id or new_id("ws"), name=cmd.name)
        rev = await self._commit_and_publish(ws, "created", create_only=True)
        return public_view(ws) | {"snapshot_revision": rev}

    async def create_agent(self, cmd: CreateAgent) -> dict[str, Any]:
        agent = Agent(id=cmd.id or new_id("agent"), workspace_id=cmd.workspace_id, name=cmd.name)
        async with self._pool.connection() as conn, conn.transaction():
            await self._require(conn, "ws", cmd.workspace_id, "Workspace")
            await self._write(conn, agent, "created", create_only=True)
        return public_view(agent) | {"snapshot_revision": await self._relay.flush()}

    async def upsert_provider(self, cmd: UpsertProvider) -> dict[str, Any]:
        if cmd.type != "mock" and cmd.base_url:
            await check_base_url_resolving(cmd.base_url, self._ssrf_allow)
        provider = Provider(
            id=f"{cmd.workspace_id}.{cmd.name}", workspace_id=cmd.workspace_id, name=cmd.name, type=cmd.type,
            base_url=cmd.base_url, api_key_enc=self._keyring.encrypt(cmd.api_key) if cmd.api_key else None,
            options=cmd.options,
        )
        async with self._pool.connection() as conn, conn.transaction():
            await self._require(conn, "ws", cmd.workspace_id, "Workspace")
            await self._write(conn, provider, "upserted")
        return public_view(provider) | {"snapshot_revision": await self._relay.flush()}

    async def create_virtual_key(self, cmd: CreateVirtualKey) -> dict[str, Any]:
        plaintext = generate_virtual_key()
        vk = VirtualKey(id=new_id("vk"), workspace_id=cmd.workspace_id, key_hash=self._keyring.hash_key(plaintext),
                        name=cmd.name, agent_id=cmd.agent_id, prefix=display_prefix(plaintext))
        async with self._pool.connection() as conn, conn.transaction():
            await self._require(conn, "ws", cmd.workspace_id, "Workspace")
            if cmd.agent_id is not None:
                await self._require(conn, "agent", cmd.agent_id, "Agent")
            await self._write(conn, vk, "created", create_only=True)
        return public_view(vk) | {"key": plaintext, "snapshot_revision": await self._relay.flush()}

    async def revoke_virtual_key(self, key_id: str) -> dict[str, Any]:
        body = await self._load("vk", key_id)
        if body is None:
            raise NotFound(f"No virtual key with id '{key_id}' (or it is already revoked).", code="key_not_found")
        vk = msgspec.convert(body, VirtualKey)
        rev = await self._commit_and_publish(vk, "revoked", delete=True)
        return public_view(vk) | {"revoked": True, "snapshot_revision": rev}

    async def upsert_alias(self, cmd: UpsertAlias) -> dict[str, Any]:
        if "/" not in cmd.target:
            raise InvalidRequest("target must be 'provider/model_id'.", param="target")
        alias = ModelAlias(id=_stable_id(cmd.workspace_id, cmd.alias), workspace_id=cmd.workspace_id,
                           alias=cmd.alias, target=cmd.target)
        async with self._pool.connection() as conn, conn.transaction():
            await self._require(conn, "ws", cmd.workspace_id, "Workspace")
            await self._write(conn, alias, "upserted")
        return public_view(alias) | {"snapshot_revision": await self._relay.flush()}

    async def upsert_price(self, cmd: UpsertPrice) -> dict[str, Any]:
        price = PriceOverride(id=_stable_id(cmd.provider, cmd.model), **msgspec.structs.asdict(cmd))
        rev = await self._commit_and_publish(price, "upserted")
        return public_view(price) | {"snapshot_revision": rev}
