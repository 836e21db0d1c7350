"""Admin commands: validate input, then in ONE Postgres transaction write the entity's state and
an outbox row carrying its `config.changed` event and KV entry; then let the relay publish.

Inputs reject unknown fields. Responses never contain secrets except the one-time plaintext of
a newly created (or rotated) virtual key.

Every entity kind is described by a `KindSpec` (its create and patch commands, how an entity maps
back to create fields, how a validated command builds the entity), so create, PATCH and DELETE
share one validation path: a PATCH is merged over the stored entity's fields and validated as a
create. References (`workspace_id`, `department_id`, `member_id`, `agent_id`, `router_id`, a
budget's or policy's `scope_id`, a router's providers) must name a live entity of the same
workspace: 404 `<what>_not_found` or 400 `<what>_workspace_mismatch`, naming the field. Nothing
is written on any error.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, cast

import msgspec
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

# Re-exported (`as`): the admin app and the tests name them through this module.
from controlplane.inputs import CONTROL_CHARS as CONTROL_CHARS
from controlplane.inputs import (
    PRINTABLE_ASCII,
    ApiKey,
    BaseUrl,
    Command,
    Globs,
    Ident,
    KeyTtl,
    ModelId,
    ModelRef,
    Name,
    Options,
    ProviderKinds,
    Timestamp,
    given_fields,
    iso_ms,
    now_ms,
    parse_timestamp_ms,
)
from controlplane.inputs import check_command as check_command
from controlplane.inputs import parse_command as parse_command
from controlplane.references import Ref, check_ref, references, referrers, slug
from controlplane.relay import OutboxRelay
from controlplane.ssrf import check_base_url_resolving
from schemas.entities import (
    OPERATOR,
    RESERVED_PROVIDER_NAMES,
    Agent,
    Budget,
    ConfigEntity,
    EscalationGrant,
    LogDestination,
    McpServer,
    ModelAlias,
    PaidEndpoint,
    Policy,
    PriceOverride,
    PriceScope,
    Provider,
    ProviderKind,
    Router,
    VirtualKey,
    Wallet,
    Workspace,
    entity_encoder,
    kv_key,
)
from schemas.errors import Conflict, InvalidRequest, NotFound
from schemas.events import ConfigChanged, event_encoder, subject_for
from schemas.ids import new_id, uuid7
from schemas.keys import KeyRing, display_prefix, generate_virtual_key
from schemas.money import nanos_to_decimal_str
from schemas.pricing import discount_fraction

# $1,000,000 per million tokens. With usage clamped at the edge, a call's cost stays far below
# the ledger's bigint columns (2**80 as a price overflowed them and froze the projector).
MAX_PRICE_PER_MTOK_NANOS = 10**15
MAX_ROTATION_OVERLAP_S = 7 * 86400
Price = Annotated[int, msgspec.Meta(ge=0, le=MAX_PRICE_PER_MTOK_NANOS)]

# Called inside a command's transaction with the response body it is about to commit (before
# propagation is known), so an idempotency record commits or rolls back with the change itself.
CommitHook = Callable[[psycopg.AsyncConnection[Any], dict[str, Any]], Awaitable[None]]


class CreateWorkspace(Command):
    """`providers_allow`: provider TYPES this workspace may call (empty = any). `default_provider`:
    the provider name a bare model name (no `provider/`) goes to."""

    name: Name
    id: Ident | None = None
    providers_allow: ProviderKinds = ()
    default_provider: Ident | None = None


class PatchWorkspace(Command):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    providers_allow: ProviderKinds | msgspec.UnsetType = msgspec.UNSET
    default_provider: Ident | msgspec.UnsetType | None = msgspec.UNSET


class CreateAgent(Command):
    """`department_id` / `member_id` / `router_id`, when given, must be of the same workspace.
    `router_id`: the router the agent's calls go through when they name no `provider/model`."""

    workspace_id: Ident
    name: Name
    id: Ident | None = None
    department_id: Ident | None = None
    member_id: Ident | None = None
    router_id: Ident | None = None


class PatchAgent(Command):
    """null unbinds a department, member or router."""

    name: Name | msgspec.UnsetType = msgspec.UNSET
    department_id: Ident | msgspec.UnsetType | None = msgspec.UNSET
    member_id: Ident | msgspec.UnsetType | None = msgspec.UNSET
    router_id: Ident | msgspec.UnsetType | None = msgspec.UNSET


class UpsertProvider(Command):
    """`name` is the first path segment of `/{name}/...` and the prefix of `name/model`; names the
    data plane serves itself (`v1`, `admin`, `healthz`, ...) are refused. `api_key` is printable
    ASCII (it becomes an HTTP header) of at most 4 KiB."""

    workspace_id: Ident
    name: Ident
    type: ProviderKind
    base_url: BaseUrl = ""
    api_key: ApiKey | None = None
    options: Options = msgspec.field(default_factory=dict)

    def check(self) -> None:
        if self.name.lower() in RESERVED_PROVIDER_NAMES:
            raise InvalidRequest(
                f"'{self.name}' is reserved (it is a gateway path); choose another provider name. Reserved: "
                + ", ".join(sorted(RESERVED_PROVIDER_NAMES)) + ".", param="name", code="reserved_name")
        if self.api_key is not None and not PRINTABLE_ASCII.match(self.api_key):
            raise InvalidRequest("'api_key' must be printable ASCII.", param="api_key", code="invalid_characters")


class PatchProvider(Command):
    """An omitted `api_key` keeps the stored one; null removes it."""

    type: ProviderKind | msgspec.UnsetType = msgspec.UNSET
    base_url: BaseUrl | msgspec.UnsetType = msgspec.UNSET
    api_key: ApiKey | msgspec.UnsetType | None = msgspec.UNSET
    options: Options | msgspec.UnsetType = msgspec.UNSET


class CreateVirtualKey(Command):
    """`agent_id`, `department_id`, `member_id`, `router_id`, when given, must be of the same
    workspace (`router_id`: the key's default router, which wins over its agent's).
    `models_allow` globs over `provider/model`, `providers_allow` globs over provider names (empty
    = any). Expiry: `expires_at` (ISO-8601 with an offset, in the future) or `ttl_s`, not both."""

    workspace_id: Ident
    name: Annotated[str, msgspec.Meta(max_length=120)] = ""
    agent_id: Ident | None = None
    department_id: Ident | None = None
    member_id: Ident | None = None
    models_allow: Globs = ()
    providers_allow: Globs = ()
    expires_at: Timestamp | None = None
    ttl_s: KeyTtl | None = None
    # Provider name -> provider key id (the workspace's or a master key): this key's own choice.
    provider_keys: Annotated[dict[Ident, Ident], msgspec.Meta(max_length=32)] = msgspec.field(default_factory=dict)
    router_id: Ident | None = None

    def check(self) -> None:
        if self.expires_at is not None and self.ttl_s is not None:
            raise InvalidRequest("Give either 'expires_at' or 'ttl_s', not both.", param="ttl_s",
                                 code="conflicting_fields")
        if self.expires_at is not None:
            parse_timestamp_ms(self.expires_at, "expires_at")


class PatchVirtualKey(Command):
    """`expires_at: null` removes the expiry; an omitted one keeps it. The workspace is fixed."""

    name: Annotated[str, msgspec.Meta(max_length=120)] | msgspec.UnsetType = msgspec.UNSET
    agent_id: Ident | msgspec.UnsetType | None = msgspec.UNSET
    department_id: Ident | msgspec.UnsetType | None = msgspec.UNSET
    member_id: Ident | msgspec.UnsetType | None = msgspec.UNSET
    models_allow: Globs | msgspec.UnsetType = msgspec.UNSET
    providers_allow: Globs | msgspec.UnsetType = msgspec.UNSET
    expires_at: Timestamp | msgspec.UnsetType | None = msgspec.UNSET
    ttl_s: KeyTtl | msgspec.UnsetType = msgspec.UNSET
    provider_keys: Annotated[dict[Ident, Ident], msgspec.Meta(max_length=32)] | msgspec.UnsetType = msgspec.UNSET
    router_id: Ident | msgspec.UnsetType | None = msgspec.UNSET


class RotateVirtualKey(Command):
    """The old key keeps working for `overlap_s` seconds (0 = it stops now), at most 7 days."""

    overlap_s: Annotated[int, msgspec.Meta(ge=0, le=MAX_ROTATION_OVERLAP_S)] = 3600


class UpsertAlias(Command):
    workspace_id: Ident
    alias: Name
    target: ModelRef

    def check(self) -> None:
        if "/" not in self.target:
            raise InvalidRequest("target must be 'provider/model_id'.", param="target")


class PatchAlias(Command):
    target: ModelRef | msgspec.UnsetType = msgspec.UNSET


PRICE_SCOPES: tuple[PriceScope, ...] = ("platform", "workspace", "provider_key")
DiscountPct = Annotated[str, msgspec.Meta(min_length=1, max_length=16)]
UsdText = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]


class UpsertPrice(Command):
    """Prices in integer nano-USD per million tokens ($2.50/MTok = 2_500_000_000), each at most
    10**15 ($1,000,000/MTok); `model` "*" prices every model of the provider.

    `scope`: platform (default: every workspace), workspace (`workspace_id`) or provider_key
    (`provider_key_id`: calls made with that upstream credential). Token prices (input and
    output, both or neither), `discount_pct` (a decimal string, 0 < pct < 100: off the price found
    below this one when it has no token prices) and `per_request_usd` (a decimal string, added to
    each successful call): at least one of the three. One price per provider, model and scope:
    setting it again replaces it."""

    provider: Ident
    model: ModelId
    # Omitted (not null) when the price has no token prices of its own.
    input_per_mtok_nanos: Price | msgspec.UnsetType = msgspec.UNSET
    output_per_mtok_nanos: Price | msgspec.UnsetType = msgspec.UNSET
    cache_read_per_mtok_nanos: Price | None = None
    cache_write_per_mtok_nanos: Price | None = None
    scope: Annotated[str, msgspec.Meta(max_length=32)] = "platform"
    workspace_id: Ident | None = None
    provider_key_id: Ident | None = None
    discount_pct: DiscountPct | None = None
    per_request_usd: UsdText | None = None

    def check(self) -> None:
        if self.scope not in PRICE_SCOPES:
            raise InvalidRequest(f"'scope' must be one of {', '.join(PRICE_SCOPES)}; got {self.scope[:32]!r}.",
                                 param="scope", code="invalid_scope")
        needs = {"workspace": "workspace_id", "provider_key": "provider_key_id"}.get(self.scope)
        for field in ("workspace_id", "provider_key_id"):
            given = getattr(self, field) is not None
            if field == needs and not given:
                raise InvalidRequest(f"A {self.scope}-scoped price needs '{field}'.", param=field,
                                     code="missing_scope_id")
            if field != needs and given:
                raise InvalidRequest(f"'{field}' is only for a {field.removesuffix('_id')}-scoped price; this one's "
                                     f"scope is {self.scope}.", param=field, code="unexpected_scope_id")
        if (self.input_per_mtok_nanos is msgspec.UNSET) != (self.output_per_mtok_nanos is msgspec.UNSET):
            missing = ("output_per_mtok_nanos" if self.output_per_mtok_nanos is msgspec.UNSET
                       else "input_per_mtok_nanos")
            raise InvalidRequest("Give both 'input_per_mtok_nanos' and 'output_per_mtok_nanos', or neither (a "
                                 "discount or per-request price only).", param=missing, code="incomplete_price")
        tokens = self.input_per_mtok_nanos is not msgspec.UNSET
        for field in ("cache_read_per_mtok_nanos", "cache_write_per_mtok_nanos"):
            if getattr(self, field) is not None and not tokens:
                raise InvalidRequest(f"'{field}' needs the token prices 'input_per_mtok_nanos' and "
                                     "'output_per_mtok_nanos'.", param=field, code="incomplete_price")
        if not tokens and self.discount_pct is None and self.per_request_usd is None:
            raise InvalidRequest("A price needs token prices ('input_per_mtok_nanos' and 'output_per_mtok_nanos'), "
                                 "'discount_pct' or 'per_request_usd'.", param="input_per_mtok_nanos",
                                 code="incomplete_price")
        if self.discount_pct is not None:
            try:
                discount_fraction(self.discount_pct)
            except ValueError as exc:
                raise InvalidRequest(f"'discount_pct': {exc}; got {self.discount_pct!r}.", param="discount_pct",
                                     code="invalid_discount") from None
        if self.per_request_usd is not None:
            _per_request_nanos(self.per_request_usd)


class PatchPrice(Command):
    """The provider, model and scope are fixed (they name the price); null removes an optional
    field. To drop a price's token prices, set it again (POST) without them."""

    input_per_mtok_nanos: Price | msgspec.UnsetType = msgspec.UNSET
    output_per_mtok_nanos: Price | msgspec.UnsetType = msgspec.UNSET
    cache_read_per_mtok_nanos: Price | msgspec.UnsetType | None = msgspec.UNSET
    cache_write_per_mtok_nanos: Price | msgspec.UnsetType | None = msgspec.UNSET
    discount_pct: DiscountPct | msgspec.UnsetType | None = msgspec.UNSET
    per_request_usd: UsdText | msgspec.UnsetType | None = msgspec.UNSET


def _per_request_nanos(text: str) -> int:
    # Imported here: controlplane.governance imports this module.
    from controlplane.governance import usd_to_nanos

    return usd_to_nanos(text, "per_request_usd")


def price_id(provider: str, model: str, scope: str = "platform", scope_id: str | None = None) -> str:
    """The id of the price of `provider/model` at a scope: the same for the same natural key, so
    setting it again replaces it (a platform price keeps the id it had before scopes existed)."""
    if scope == "platform":
        return _stable_id(provider, model)
    return _stable_id(provider, model, scope, scope_id or "")


def _stable_id(*parts: str) -> str:
    """A KV-safe id that is the same for the same natural key, so upserts replace."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def public_view(entity: ConfigEntity) -> dict[str, Any]:
    """An entity as the API shows it: no key hash, no ciphertext (`has_api_key`,
    `has_private_key`, `has_secret` say whether there is one; an MCP server's `headers` are
    its header names); money also as decimal USD
    strings and epoch-ms instants also as ISO-8601."""
    data: dict[str, Any] = msgspec.to_builtins(entity)
    data.pop("key_hash", None)
    if "api_key_enc" in data:
        data["has_api_key"] = data.pop("api_key_enc") is not None
    if "private_key_enc" in data:
        data["has_private_key"] = data.pop("private_key_enc") is not None
    if "secret_enc" in data:
        data["has_secret"] = data.pop("secret_enc") is not None
    match entity:
        case Budget():
            data["limit_usd"] = nanos_to_decimal_str(entity.limit_nanos)
        case Policy():
            for usd, nanos in (("max_cost_usd", entity.max_cost_nanos), ("escalate_over_usd",
                                                                           entity.escalate_over_nanos)):
                data[usd] = None if nanos is None else nanos_to_decimal_str(nanos)
        case VirtualKey() | EscalationGrant():
            data["expires_at"] = None if entity.expires_at_ms is None else iso_ms(entity.expires_at_ms)
        case PriceOverride():
            data["per_request_usd"] = (None if entity.per_request_nanos is None
                                       else nanos_to_decimal_str(entity.per_request_nanos))
        case Router():
            # Every setting shown, defaults included (the entity omits them on the wire).
            data["targets"] = [_all_fields(t) for t in entity.targets]
            data["rules"] = [_all_fields(r) | {"when": _all_fields(r.when), "targets": [_all_fields(t) for t in
                                                                                        r.targets]}
                             for r in entity.rules]
            for name in ("retry", "timeouts", "health"):
                data[name] = _all_fields(getattr(entity, name))
        case PaidEndpoint():
            # Every x402 setting and the price's decimals shown, defaults included.
            data["price"] = {name: _all_fields(price) for name, price in (("per_call", entity.price.per_call),
                                                                           ("per_token", entity.price.per_token))
                             if price is not None}
            data["rails"] = {name: _all_fields(rail) for name, rail in (("x402", entity.rails.x402),
                                                                        ("mpp", entity.rails.mpp))
                             if rail is not None}
        case Wallet():
            # Every asset setting shown, defaults included.
            data["assets"] = [_all_fields(a) for a in entity.assets]
        case LogDestination():
            # The API names the destination's type `kind` (the entity's `kind` is its tag).
            data["kind"] = data.pop("type")
            data["created_at"] = iso_ms(entity.created_at_ms) if entity.created_at_ms else None
        case McpServer():
            # Header names only: the values are credentials (`headers_enc`, never shown).
            data["headers"] = sorted(data.pop("headers_enc"))
            from controlplane.mcp_servers import tool_view  # it imports this module

            data["tools"] = {name: tool_view(t) | {"price_nanos": t.price_nanos}
                             for name, t in sorted(entity.tools.items())}
    return data


def _all_fields(struct: msgspec.Struct) -> dict[str, Any]:
    return {name: msgspec.to_builtins(getattr(struct, name)) for name in struct.__struct_fields__}


# ---- kinds -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Prior:
    """What a PATCH starts from: the stored entity and the fields the PATCH body set."""

    entity: Any
    given: frozenset[str]


Build = Callable[["ConfigCommands", Any, str, Prior | None], Awaitable[ConfigEntity]]


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One entity kind: `create` and `patch` commands, the create fields of a stored entity
    (`fields`, what a PATCH is merged over), and `build` (a checked create command -> entity)."""

    kind: str
    what: str
    create: type[Command]
    patch: type[Command]
    new_id: Callable[[Any], str]
    fields: Callable[[Any], dict[str, Any]]
    build: Build
    upsert: bool = False
    # Checks that need the write's transaction (e.g. a natural key unique in the workspace), run
    # after `build` on create and PATCH.
    guard: Callable[[psycopg.AsyncConnection[Any], Any], Awaitable[None]] | None = None


async def taken_by(conn: psycopg.AsyncConnection[Any], kind: str, field: str, value: str, own_id: str,
                   workspace_id: str | None = None) -> str | None:
    """The id of another live entity of `kind` whose `field` is `value` (within `workspace_id`;
    None: across the gateway), or None. For a command's uniqueness guard: writes of one value
    are serialised by a transaction-level advisory lock, so two concurrent ones cannot both pass."""
    scope = workspace_id if workspace_id is not None else "*"
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{kind}/{scope}/{field}/{value}",))
    cur = await conn.execute(
        "SELECT id FROM config_entity WHERE kind = %s AND body->>%s = %s AND id <> %s AND deleted_at IS NULL "
        "AND (%s::text IS NULL OR workspace_id = %s) LIMIT 1", (kind, field, value, own_id, workspace_id, workspace_id))
    row = await cur.fetchone()
    return None if row is None else str(row[0])


def unique_name(kind: str, noun: str) -> Callable[[psycopg.AsyncConnection[Any], Any], Awaitable[None]]:
    """A KindSpec guard: 409 `name_taken` when another live `kind` of the entity's workspace has
    its `name` (`noun` names the kind in the message, e.g. "wallet")."""
    async def guard(conn: psycopg.AsyncConnection[Any], entity: Any) -> None:
        other = await taken_by(conn, kind, "name", entity.name, entity.id, entity.workspace_id)
        if other is not None:
            raise Conflict(f"Workspace '{entity.workspace_id}' already has a {noun} named '{entity.name}' ({other}); "
                           f"{noun} names are unique in a workspace.", param="name", code="name_taken")

    return guard


def _builtins(entity: Any, *names: str) -> dict[str, Any]:
    return {n: msgspec.to_builtins(getattr(entity, n)) for n in names}


@dataclass(frozen=True, slots=True)
class Write:
    """One entity write of a command. `refs` are checked first (a PATCH checks only new ones)."""

    entity: ConfigEntity
    op: str
    refs: tuple[Ref, ...] = ()
    create_only: bool = False
    delete: bool = False


Plan = Callable[[psycopg.AsyncConnection[Any]], Awaitable[tuple[Sequence[Write], dict[str, Any]]]]


# Who a command runs for, written into its `config.changed` events (and an escalation's
# `decided_by`): "admin" for the admin API's bearer token, "console:<name>" for a console session.
ACTOR: ContextVar[str] = ContextVar("actor", default="admin")


class ConfigCommands:
    """The admin commands. Each one validates, then commits state + outbox in one transaction,
    then waits at most `propagation_wait_s` for the relay.

    Every mutating command returns its response body with `propagated`: true when the change
    reached NATS (with its `snapshot_revision`, also given as `revision`), false when it is
    committed but still queued (NATS down or slow; the revisions are null and the relay keeps
    retrying). Nothing after the commit raises. `on_commit`, when given, runs inside the
    transaction (see `CommitHook`).
    """

    def __init__(self, pool: AsyncConnectionPool[Any], keyring: KeyRing, relay: OutboxRelay,
                 subject_prefix: str, ssrf_allow: Collection[str] = (), propagation_wait_s: float = 2.0) -> None:
        self.ssrf_allow = ssrf_allow
        self.pool = pool
        self.keyring = keyring
        self.relay = relay
        self._prefix = subject_prefix
        self._wait_s = propagation_wait_s

    async def _write(self, conn: psycopg.AsyncConnection[Any], w: Write) -> None:
        entity = w.entity
        kind = type(entity).__struct_config__.tag
        assert isinstance(kind, str)
        ent_id: str = entity.id  # type: ignore[union-attr]
        ws = getattr(entity, "workspace_id", None)
        for ref in w.refs:
            await check_ref(conn, ref, ws or "")
        key = kv_key(entity)
        body = msgspec.to_builtins(entity)
        if w.create_only:
            # A deleted entity's id may be reused; a live one is a conflict.
            cur = await conn.execute(
                "INSERT INTO config_entity (kind, id, workspace_id, kv_key, body) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (kind, id) DO UPDATE SET body = EXCLUDED.body, kv_key = EXCLUDED.kv_key, "
                "workspace_id = EXCLUDED.workspace_id, deleted_at = NULL, created_at = now(), updated_at = now() "
                "WHERE config_entity.deleted_at IS NOT NULL RETURNING id",
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
                (kind, ent_id, ws, key, Jsonb(body), w.delete),
            )
        event = ConfigChanged(
            event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=ws or "_system",
            entity=kind, entity_id=ent_id, op=w.op, actor=ACTOR.get(), data=public_view(entity),
        )
        await conn.execute(
            "INSERT INTO config_outbox (event_id, subject, event, kv_key, kv_value) VALUES (%s, %s, %s, %s, %s)",
            (event.event_id, subject_for(event, self._prefix), event_encoder.encode(event), key,
             None if w.delete else entity_encoder.encode(entity)),
        )

    async def commit(self, plan: Plan, on_commit: CommitHook | None) -> dict[str, Any]:
        """In one transaction: `plan` (reads, checks, side rows) returns the writes and the body;
        write them, run `on_commit`; commit; then relay within the wait bound."""
        async with self.pool.connection() as conn, conn.transaction():
            writes, body = await plan(conn)
            for w in writes:
                await self._write(conn, w)
            if on_commit is not None:
                await on_commit(conn, body | {"propagated": False, "snapshot_revision": None, "revision": None})
        rev = await self.relay.flush_within(self._wait_s)
        return body | {"propagated": rev is not None, "snapshot_revision": rev, "revision": rev}

    async def load_for_update(self, conn: psycopg.AsyncConnection[Any], kind: str, entity_id: str,
                              what: str) -> Any:
        """The live entity, row-locked for this transaction, or 404 `<what>_not_found`."""
        cur = await conn.execute("SELECT body FROM config_entity WHERE kind = %s AND id = %s AND deleted_at IS NULL "
                                 "FOR UPDATE", (kind, entity_id))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"No {what.lower()} with id '{entity_id}'.", code=f"{slug(what)}_not_found")
        return msgspec.convert(dict(row[0]) | {"kind": kind}, ConfigEntity)

    async def load(self, kind: str, entity_id: str) -> Any:
        """The live entity or None."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT body FROM config_entity WHERE kind = %s AND id = %s AND deleted_at IS NULL", (kind, entity_id))
            row = await cur.fetchone()
        return None if row is None else msgspec.convert(dict(row[0]) | {"kind": kind}, ConfigEntity)

    async def get(self, kind: str, entity_id: str) -> dict[str, Any]:
        entity = await self.load(kind, entity_id)
        if entity is None:
            raise NotFound(f"No {kind} with id '{entity_id}'.", code="not_found")
        return public_view(entity)

    async def list(self, kind: str, workspace_id: str | None) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT body FROM config_entity WHERE kind = %s AND deleted_at IS NULL "
                "AND (%s::text IS NULL OR workspace_id = %s) ORDER BY created_at",
                (kind, workspace_id, workspace_id),
            )
            rows = await cur.fetchall()
        return [public_view(msgspec.convert(r[0] | {"kind": kind}, ConfigEntity)) for r in rows]

    # ---- generic create / patch / delete over a KindSpec --------------------------------------

    async def create(self, spec: KindSpec, cmd: Any, on_commit: CommitHook | None = None) -> dict[str, Any]:
        async def plan(conn: psycopg.AsyncConnection[Any]) -> tuple[Sequence[Write], dict[str, Any]]:
            entity = await spec.build(self, cmd, spec.new_id(cmd), None)
            if spec.guard is not None:
                await spec.guard(conn, entity)
            op = "upserted" if spec.upsert else "created"
            return [Write(entity, op, references(entity), create_only=not spec.upsert)], public_view(entity)
        return await self.commit(plan, on_commit)

    async def patch(self, spec: KindSpec, entity_id: str, patch: Command,
                    on_commit: CommitHook | None = None) -> dict[str, Any]:
        """Merge the set fields over the stored entity and validate the result as a create;
        references are re-checked where they changed."""
        given = given_fields(patch)
        if not given:
            raise InvalidRequest("Nothing to change: the body sets no field.", code="empty_patch")

        async def plan(conn: psycopg.AsyncConnection[Any]) -> tuple[Sequence[Write], dict[str, Any]]:
            old = await self.load_for_update(conn, spec.kind, entity_id, spec.what)
            cmd = parse_command(spec.fields(old) | given, spec.create)
            new = await spec.build(self, cmd, entity_id, Prior(old, frozenset(given)))
            if spec.guard is not None:
                await spec.guard(conn, new)
            before = set(references(old))
            refs = tuple(r for r in references(new) if r not in before)
            return [Write(new, "updated", refs)], public_view(new)
        return await self.commit(plan, on_commit)

    async def delete(self, spec: KindSpec, entity_id: str, on_commit: CommitHook | None = None) -> dict[str, Any]:
        """Refused (409 `still_referenced`) while other live entities point at it."""
        async def plan(conn: psycopg.AsyncConnection[Any]) -> tuple[Sequence[Write], dict[str, Any]]:
            old = await self.load_for_update(conn, spec.kind, entity_id, spec.what)
            users = await referrers(conn, spec.kind, old)
            if users:
                raise Conflict(f"{spec.what} '{entity_id}' is still referenced by: {', '.join(users)}; delete or "
                               "re-point those first.", code="still_referenced")
            return [Write(old, "deleted", delete=True)], public_view(old) | {"deleted": True}
        return await self.commit(plan, on_commit)

    # ---- the original kinds (kept as named methods: the routes and the CLI call them) ---------

    async def create_workspace(self, cmd: CreateWorkspace, on_commit: CommitHook | None = None) -> dict[str, Any]:
        return await self.create(WORKSPACE, cmd, on_commit)

    async def create_agent(self, cmd: CreateAgent, on_commit: CommitHook | None = None) -> dict[str, Any]:
        return await self.create(AGENT, cmd, on_commit)

    async def upsert_provider(self, cmd: UpsertProvider, on_commit: CommitHook | None = None) -> dict[str, Any]:
        return await self.create(PROVIDER, cmd, on_commit)

    async def upsert_alias(self, cmd: UpsertAlias, on_commit: CommitHook | None = None) -> dict[str, Any]:
        return await self.create(ALIAS, cmd, on_commit)

    async def upsert_price(self, cmd: UpsertPrice, on_commit: CommitHook | None = None) -> dict[str, Any]:
        return await self.create(PRICE, cmd, on_commit)

    async def create_virtual_key(self, cmd: CreateVirtualKey, on_commit: CommitHook | None = None) -> dict[str, Any]:
        """The response carries the plaintext `key`; it exists nowhere else (an idempotency record
        keeps it only encrypted, for a retry of this same request)."""
        plaintext = generate_virtual_key()

        async def plan(conn: psycopg.AsyncConnection[Any]) -> tuple[Sequence[Write], dict[str, Any]]:
            vk = _virtual_key(cmd, new_id("vk"), self.keyring.hash_key(plaintext), display_prefix(plaintext), None)
            return [Write(vk, "created", references(vk), create_only=True)], public_view(vk) | {"key": plaintext}
        return await self.commit(plan, on_commit)

    async def rotate_virtual_key(self, key_id: str, cmd: RotateVirtualKey,
                                 on_commit: CommitHook | None = None) -> dict[str, Any]:
        """A new key with the old one's bindings and expiry (plaintext in the response, once); the
        old key expires `overlap_s` from now (or keeps an earlier expiry). Both in one transaction.
        An expired key is not rotated (409 `key_expired`)."""
        plaintext = generate_virtual_key()

        async def plan(conn: psycopg.AsyncConnection[Any]) -> tuple[Sequence[Write], dict[str, Any]]:
            old: VirtualKey = await self.load_for_update(conn, "vk", key_id, "Virtual key")
            now = now_ms()
            if old.expires_at_ms is not None and old.expires_at_ms <= now:
                raise Conflict(f"Virtual key '{key_id}' has expired; create a new key instead of rotating it.",
                               code="key_expired")
            end_ms = now + cmd.overlap_s * 1000
            if old.expires_at_ms is not None:
                end_ms = min(end_ms, old.expires_at_ms)
            new = msgspec.structs.replace(old, id=new_id("vk"), key_hash=self.keyring.hash_key(plaintext),
                                          prefix=display_prefix(plaintext))
            retiring = msgspec.structs.replace(old, expires_at_ms=end_ms)
            body = public_view(new) | {"key": plaintext, "rotated_from": key_id, "old_key_expires_at": iso_ms(end_ms)}
            return [Write(new, "created", references(new), create_only=True), Write(retiring, "rotated")], body
        return await self.commit(plan, on_commit)

    async def revoke_virtual_key(self, key_id: str, on_commit: CommitHook | None = None) -> dict[str, Any]:
        """Revocation is never refused: budgets, limits and policies on the key stay (inert)."""
        async def plan(conn: psycopg.AsyncConnection[Any]) -> tuple[Sequence[Write], dict[str, Any]]:
            cur = await conn.execute("SELECT body FROM config_entity WHERE kind = 'vk' AND id = %s "
                                     "AND deleted_at IS NULL FOR UPDATE", (key_id,))
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"No virtual key with id '{key_id}' (or it is already revoked).",
                               code="key_not_found")
            vk = msgspec.convert(row[0], VirtualKey)
            return [Write(vk, "revoked", delete=True)], public_view(vk) | {"revoked": True}
        return await self.commit(plan, on_commit)


def _virtual_key(cmd: CreateVirtualKey, key_id: str, key_hash: str, prefix: str, prior: Prior | None) -> VirtualKey:
    if prior is not None and not {"expires_at", "ttl_s"} & prior.given:
        expires: int | None = prior.entity.expires_at_ms
    elif cmd.ttl_s is not None:
        expires = now_ms() + cmd.ttl_s * 1000
    elif cmd.expires_at is not None:
        expires = parse_timestamp_ms(cmd.expires_at, "expires_at")
        if expires <= now_ms():
            raise InvalidRequest("'expires_at' is in the past; to stop a key now, revoke it (DELETE).",
                                 param="expires_at", code="invalid_timestamp")
    else:
        expires = None
    return VirtualKey(id=key_id, workspace_id=cmd.workspace_id, key_hash=key_hash, name=cmd.name,
                      agent_id=cmd.agent_id, prefix=prefix, department_id=cmd.department_id, member_id=cmd.member_id,
                      models_allow=cmd.models_allow, providers_allow=cmd.providers_allow, expires_at_ms=expires,
                      provider_keys=dict(cmd.provider_keys), router_id=cmd.router_id)


async def _build_workspace(_: ConfigCommands, cmd: CreateWorkspace, ent_id: str, prior: Prior | None) -> Workspace:
    return Workspace(id=ent_id, name=cmd.name, providers_allow=tuple(cmd.providers_allow),
                     default_provider=cmd.default_provider)


async def _build_agent(_: ConfigCommands, cmd: CreateAgent, ent_id: str, prior: Prior | None) -> Agent:
    return Agent(id=ent_id, workspace_id=cmd.workspace_id, name=cmd.name, department_id=cmd.department_id,
                 member_id=cmd.member_id, router_id=cmd.router_id)


async def _build_provider(cc: ConfigCommands, cmd: UpsertProvider, ent_id: str, prior: Prior | None) -> Provider:
    if cmd.type != "mock" and cmd.base_url:
        await check_base_url_resolving(cmd.base_url, cc.ssrf_allow)
    if prior is not None and "api_key" not in prior.given:
        key_enc = prior.entity.api_key_enc
    else:
        key_enc = cc.keyring.encrypt(cmd.api_key) if cmd.api_key else None
    return Provider(id=ent_id, workspace_id=cmd.workspace_id, name=cmd.name, type=cmd.type, base_url=cmd.base_url,
                    api_key_enc=key_enc, options=cmd.options)


async def _build_vk(_: ConfigCommands, cmd: CreateVirtualKey, ent_id: str, prior: Prior | None) -> VirtualKey:
    assert prior is not None, "a virtual key is created by create_virtual_key (it mints the secret)"
    return _virtual_key(cmd, ent_id, prior.entity.key_hash, prior.entity.prefix, prior)


async def _build_alias(_: ConfigCommands, cmd: UpsertAlias, ent_id: str, prior: Prior | None) -> ModelAlias:
    return ModelAlias(id=ent_id, workspace_id=cmd.workspace_id, alias=cmd.alias, target=cmd.target)


async def _build_price(cc: ConfigCommands, cmd: UpsertPrice, ent_id: str, prior: Prior | None) -> PriceOverride:
    # The workspace is checked in the write's transaction (`references`); a provider key here.
    workspace_id = cmd.workspace_id
    if cmd.scope == "provider_key":
        assert cmd.provider_key_id is not None  # UpsertPrice.check
        pk = await cc.load("pkey", cmd.provider_key_id)
        if pk is None:
            raise NotFound(f"Provider key '{cmd.provider_key_id}' does not exist.", param="provider_key_id",
                           code="provider_key_not_found")
        if pk.provider_name and pk.provider_name != cmd.provider:
            raise InvalidRequest(f"Provider key '{pk.id}' is a key of provider '{pk.provider_name}', not "
                                 f"'{cmd.provider}'.", param="provider", code="provider_mismatch")
        workspace_id = None if pk.workspace_id == OPERATOR else pk.workspace_id
    per_in = None if isinstance(cmd.input_per_mtok_nanos, msgspec.UnsetType) else cmd.input_per_mtok_nanos
    per_out = None if isinstance(cmd.output_per_mtok_nanos, msgspec.UnsetType) else cmd.output_per_mtok_nanos
    tokens = per_in is not None  # UpsertPrice.check: both or neither
    return PriceOverride(
        id=ent_id, provider=cmd.provider, model=cmd.model, input_per_mtok_nanos=per_in,
        output_per_mtok_nanos=per_out,
        cache_read_per_mtok_nanos=cmd.cache_read_per_mtok_nanos if tokens else None,
        cache_write_per_mtok_nanos=cmd.cache_write_per_mtok_nanos if tokens else None,
        scope=cast(PriceScope, cmd.scope), workspace_id=workspace_id, provider_key_id=cmd.provider_key_id,
        discount_pct=cmd.discount_pct,
        per_request_nanos=None if cmd.per_request_usd is None else _per_request_nanos(cmd.per_request_usd))


def _price_fields(p: PriceOverride) -> dict[str, Any]:
    tokens = ("input_per_mtok_nanos", "output_per_mtok_nanos") if p.has_token_prices else ()
    return _builtins(p, "provider", "model", *tokens, "cache_read_per_mtok_nanos", "cache_write_per_mtok_nanos",
                     "scope", "provider_key_id", "discount_pct") | {
        "workspace_id": p.workspace_id if p.scope == "workspace" else None,
        "per_request_usd": None if p.per_request_nanos is None else nanos_to_decimal_str(p.per_request_nanos)}


WORKSPACE = KindSpec("ws", "Workspace", CreateWorkspace, PatchWorkspace, lambda c: c.id or new_id("ws"),
                     lambda e: _builtins(e, "id", "name", "providers_allow", "default_provider"),
                     _build_workspace)
AGENT = KindSpec("agent", "Agent", CreateAgent, PatchAgent, lambda c: c.id or new_id("agent"),
                 lambda e: _builtins(e, "id", "workspace_id", "name", "department_id", "member_id", "router_id"),
                 _build_agent)
PROVIDER = KindSpec("provider", "Provider", UpsertProvider, PatchProvider, lambda c: f"{c.workspace_id}.{c.name}",
                    lambda e: _builtins(e, "workspace_id", "name", "type", "base_url", "options"), _build_provider,
                    upsert=True)
VIRTUAL_KEY = KindSpec("vk", "Virtual key", CreateVirtualKey, PatchVirtualKey, lambda c: new_id("vk"),
                       lambda e: _builtins(e, "workspace_id", "name", "agent_id", "department_id", "member_id",
                                           "models_allow", "providers_allow", "provider_keys", "router_id"),
                       _build_vk)
ALIAS = KindSpec("alias", "Model alias", UpsertAlias, PatchAlias, lambda c: _stable_id(c.workspace_id, c.alias),
                 lambda e: _builtins(e, "workspace_id", "alias", "target"), _build_alias, upsert=True)
PRICE = KindSpec("price", "Price", UpsertPrice, PatchPrice,
                 lambda c: price_id(c.provider, c.model, c.scope, c.workspace_id or c.provider_key_id),
                 _price_fields, _build_price, upsert=True)
