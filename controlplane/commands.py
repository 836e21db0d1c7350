"""Admin commands: validate input, then in ONE Postgres transaction write the entity's state and
an outbox row carrying its `config.changed` event and KV entry; then let the relay publish.

Inputs reject unknown fields. Responses never contain secrets except the one-time plaintext of
a newly created virtual key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Annotated, Any, TypeVar

import msgspec
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from controlplane.relay import OutboxRelay
from controlplane.ssrf import check_base_url_resolving
from schemas.entities import (
    RESERVED_PROVIDER_NAMES,
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
from schemas.http import validate
from schemas.ids import new_id, uuid7
from schemas.keys import KeyRing, display_prefix, generate_virtual_key

T = TypeVar("T")

# Caps on every admin string: an entity travels in KV values, events and Postgres rows, and a
# worker keeps all of them in memory, so no field may be unbounded.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
Ident = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ModelRef = Annotated[str, msgspec.Meta(min_length=3, max_length=321)]  # Ident "/" ModelId
BaseUrl = Annotated[str, msgspec.Meta(max_length=2048)]
ApiKey = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
OptionValue = Annotated[str, msgspec.Meta(max_length=1024)]
Options = Annotated[dict[Ident, OptionValue], msgspec.Meta(max_length=32)]
# $1,000,000 per million tokens. With usage clamped at the edge, a call's cost stays far below
# the ledger's bigint columns (2**80 as a price overflowed them and froze the projector).
MAX_PRICE_PER_MTOK_NANOS = 10**15
Price = Annotated[int, msgspec.Meta(ge=0, le=MAX_PRICE_PER_MTOK_NANOS)]

# C0 and C1 control characters, DEL included. A NUL cannot be stored by Postgres (the request
# was a 500), and CR/LF in a provider key made every call to that provider fail as a bad header.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")

# Called inside a command's transaction with the response body it is about to commit (before
# propagation is known), so an idempotency record commits or rolls back with the change itself.
CommitHook = Callable[[psycopg.AsyncConnection[Any], dict[str, Any]], Awaitable[None]]


class CreateWorkspace(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    id: Ident | None = None


class CreateAgent(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    workspace_id: Ident
    name: Name
    id: Ident | None = None


class UpsertProvider(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`name` is the first path segment of `/{name}/...` and the prefix of `name/model`; names the
    data plane serves itself (`v1`, `admin`, `healthz`, ...) are refused. `api_key` is printable
    ASCII (it becomes an HTTP header) of at most 4 KiB."""

    workspace_id: Ident
    name: Ident
    type: ProviderKind
    base_url: BaseUrl = ""
    api_key: ApiKey | None = None
    options: Options = msgspec.field(default_factory=dict)


class CreateVirtualKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`agent_id`, when given, must be an agent of the same workspace."""

    workspace_id: Ident
    name: Annotated[str, msgspec.Meta(max_length=120)] = ""
    agent_id: Ident | None = None


class UpsertAlias(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    workspace_id: Ident
    alias: Name
    target: ModelRef


class UpsertPrice(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Prices in integer nano-USD per million tokens ($2.50/MTok = 2_500_000_000), each at most
    10**15 ($1,000,000/MTok)."""

    provider: Ident
    model: ModelId
    input_per_mtok_nanos: Price
    output_per_mtok_nanos: Price
    cache_read_per_mtok_nanos: Price | None = None
    cache_write_per_mtok_nanos: Price | None = None


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string in a decoded command, with the dotted path of the field holding it."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield path, k
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            yield from _strings(getattr(value, name), f"{path}.{name}" if path else name)


def check_command(cmd: msgspec.Struct) -> None:
    """Rules msgspec constraints cannot state; raises InvalidRequest (400) naming the field.

    No control character in any string (names, ids, URLs, options, keys); a provider key is
    printable ASCII; a provider name is not one of the data plane's own path segments.
    """
    for path, text in _strings(cmd, ""):
        if CONTROL_CHARS.search(text):
            raise InvalidRequest(f"'{path}' must not contain control characters (NUL, CR, LF, tab, ...).",
                                 param=path, code="invalid_characters")
    if isinstance(cmd, UpsertProvider):
        if cmd.name.lower() in RESERVED_PROVIDER_NAMES:
            raise InvalidRequest(
                f"'{cmd.name}' is reserved (it is a gateway path); choose another provider name. Reserved: "
                + ", ".join(sorted(RESERVED_PROVIDER_NAMES)) + ".", param="name", code="reserved_name")
        if cmd.api_key is not None and not _PRINTABLE_ASCII.match(cmd.api_key):
            raise InvalidRequest("'api_key' must be printable ASCII.", param="api_key", code="invalid_characters")
    if isinstance(cmd, UpsertAlias) and "/" not in cmd.target:
        raise InvalidRequest("target must be 'provider/model_id'.", param="target")


def parse_command(raw: Any, schema: type[T]) -> T:
    """Decoded JSON -> a checked command Struct, or a 400 naming the offending field."""
    cmd = validate(raw, schema)
    assert isinstance(cmd, msgspec.Struct)
    check_command(cmd)
    return cmd


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
    """The admin commands. Each one validates, then commits state + outbox in one transaction,
    then waits at most `propagation_wait_s` for the relay.

    Every mutating command returns its response body with `propagated`: true when the change
    reached NATS (with its `snapshot_revision`), false when it is committed but still queued (NATS
    down or slow; `snapshot_revision` is null and the relay keeps retrying). Nothing after the
    commit raises. `on_commit`, when given, runs inside the transaction (see `CommitHook`).
    """

    def __init__(self, pool: AsyncConnectionPool[Any], keyring: KeyRing, relay: OutboxRelay,
                 subject_prefix: str, ssrf_allow: Collection[str] = (), propagation_wait_s: float = 2.0) -> None:
        self._ssrf_allow = ssrf_allow
        self._pool = pool
        self._keyring = keyring
        self._relay = relay
        self._prefix = subject_prefix
        self._wait_s = propagation_wait_s

    async def _require(self, conn: psycopg.AsyncConnection[Any], kind: str, entity_id: str, what: str) -> None:
        cur = await conn.execute("SELECT 1 FROM config_entity WHERE kind = %s AND id = %s AND deleted_at IS NULL",
                                 (kind, entity_id))
        if await cur.fetchone() is None:
            raise NotFound(f"{what} '{entity_id}' does not exist.", code=f"{what.lower().replace(' ', '_')}_not_found")

    async def _require_agent_of(self, conn: psycopg.AsyncConnection[Any], agent_id: str, workspace_id: str) -> None:
        cur = await conn.execute(
            "SELECT workspace_id FROM config_entity WHERE kind = 'agent' AND id = %s AND deleted_at IS NULL",
            (agent_id,))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"Agent '{agent_id}' does not exist.", code="agent_not_found")
        if row[0] != workspace_id:
            raise InvalidRequest(f"Agent '{agent_id}' belongs to another workspace; a key can only be bound to an "
                                 f"agent of its own workspace ('{workspace_id}').", param="agent_id",
                                 code="agent_workspace_mismatch")

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

    async def _commit(self, entity: ConfigEntity, op: str, body: dict[str, Any], on_commit: CommitHook | None,
                      *, requires: tuple[tuple[str, str, str], ...] = (), agent_of: tuple[str, str] | None = None,
                      create_only: bool = False, delete: bool = False) -> dict[str, Any]:
        """Check references, write, run `on_commit`, commit; then relay within the wait bound."""
        async with self._pool.connection() as conn, conn.transaction():
            for kind, ent_id, what in requires:
                await self._require(conn, kind, ent_id, what)
            if agent_of is not None:
                await self._require_agent_of(conn, *agent_of)
            await self._write(conn, entity, op, create_only=create_only, delete=delete)
            if on_commit is not None:
                await on_commit(conn, body | {"propagated": False, "snapshot_revision": None})
        rev = await self._relay.flush_within(self._wait_s)
        return body | {"propagated": rev is not None, "snapshot_revision": rev}

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

    async def create_workspace(self, cmd: CreateWorkspace, on_commit: CommitHook | None = None) -> dict[str, Any]:
        ws = Workspace(id=cmd.id or new_id("ws"), name=cmd.name)
        return await self._commit(ws, "created", public_view(ws), on_commit, create_only=True)

    async def create_agent(self, cmd: CreateAgent, on_commit: CommitHook | None = None) -> dict[str, Any]:
        agent = Agent(id=cmd.id or new_id("agent"), workspace_id=cmd.workspace_id, name=cmd.name)
        return await self._commit(agent, "created", public_view(agent), on_commit,
                                  requires=(("ws", cmd.workspace_id, "Workspace"),), create_only=True)

    async def upsert_provider(self, cmd: UpsertProvider, on_commit: CommitHook | None = None) -> dict[str, Any]:
        if cmd.type != "mock" and cmd.base_url:
            await check_base_url_resolving(cmd.base_url, self._ssrf_allow)
        provider = Provider(
            id=f"{cmd.workspace_id}.{cmd.name}", workspace_id=cmd.workspace_id, name=cmd.name, type=cmd.type,
            base_url=cmd.base_url, api_key_enc=self._keyring.encrypt(cmd.api_key) if cmd.api_key else None,
            options=cmd.options,
        )
        return await self._commit(provider, "upserted", public_view(provider), on_commit,
                                  requires=(("ws", cmd.workspace_id, "Workspace"),))

    async def create_virtual_key(self, cmd: CreateVirtualKey, on_commit: CommitHook | None = None) -> dict[str, Any]:
        """The response carries the plaintext `key`; it exists nowhere else (an idempotency record
        keeps it only encrypted, for a retry of this same request)."""
        plaintext = generate_virtual_key()
        vk = VirtualKey(id=new_id("vk"), workspace_id=cmd.workspace_id, key_hash=self._keyring.hash_key(plaintext),
                        name=cmd.name, agent_id=cmd.agent_id, prefix=display_prefix(plaintext))
        return await self._commit(
            vk, "created", public_view(vk) | {"key": plaintext}, on_commit,
            requires=(("ws", cmd.workspace_id, "Workspace"),),
            agent_of=None if cmd.agent_id is None else (cmd.agent_id, cmd.workspace_id), create_only=True)

    async def revoke_virtual_key(self, key_id: str, on_commit: CommitHook | None = None) -> dict[str, Any]:
        body = await self._load("vk", key_id)
        if body is None:
            raise NotFound(f"No virtual key with id '{key_id}' (or it is already revoked).", code="key_not_found")
        vk = msgspec.convert(body, VirtualKey)
        return await self._commit(vk, "revoked", public_view(vk) | {"revoked": True}, on_commit, delete=True)

    async def upsert_alias(self, cmd: UpsertAlias, on_commit: CommitHook | None = None) -> dict[str, Any]:
        alias = ModelAlias(id=_stable_id(cmd.workspace_id, cmd.alias), workspace_id=cmd.workspace_id,
                           alias=cmd.alias, target=cmd.target)
        return await self._commit(alias, "upserted", public_view(alias), on_commit,
                                  requires=(("ws", cmd.workspace_id, "Workspace"),))

    async def upsert_price(self, cmd: UpsertPrice, on_commit: CommitHook | None = None) -> dict[str, Any]:
        price = PriceOverride(id=_stable_id(cmd.provider, cmd.model), **msgspec.structs.asdict(cmd))
        return await self._commit(price, "upserted", public_view(price), on_commit)
