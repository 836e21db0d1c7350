"""The admin API (its own listener, its own bearer token). Every mutating route is a command:
state + `config.*` event in one transaction, then the KV snapshot entry (see commands.py).

Mutating routes answer 201 (or 200) with `"propagated": true` once the change reached NATS, or
202 with `"propagated": false` when it is committed but NATS could not take it within
`ALEPHANT_ADMIN_PROPAGATION_WAIT_S`; the relay keeps retrying and workers apply it when NATS is
back. Every POST accepts an `Idempotency-Key` header (see idempotency.py).

The route table below is also the source of the OpenAPI document at /admin/v1/openapi.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from psycopg_pool import AsyncConnectionPool

from controlplane import commands as c
from controlplane.fleet import FLEET, FleetMonitor, get_fleet
from controlplane.idempotency import HEADER as IDEMPOTENCY_HEADER
from controlplane.idempotency import IdempotencyStore, Replay, check_key
from controlplane.queries import ledger_balance, provider_catalog, run_summary, workspace_models
from controlplane.relay import OutboxRelay
from controlplane.ssrf import parse_allow_list
from events.db import open_pool
from events.jetstream import bus_auth, connect, ensure_kv, ensure_stream
from schemas.errors import AuthenticationFailed, InvalidRequest
from schemas.http import Handler, decode_json, error_middleware, read_body
from schemas.keys import KeyRing
from schemas.settings import Settings

log = structlog.get_logger(__name__)

ADMIN_BODY_LIMIT = 256 * 1024


@dataclass
class AdminState:
    settings: Settings
    pool: AsyncConnectionPool[Any]
    commands: c.ConfigCommands
    relay: OutboxRelay
    idempotency: IdempotencyStore


ADMIN: web.AppKey[AdminState] = web.AppKey("admin", AdminState)


def _auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/admin/v1/openapi.json", "/admin/v1/healthz"):
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise AuthenticationFailed("Missing or invalid admin token. Send 'Authorization: Bearer <admin token>'.",
                                       code="invalid_admin_token")
        return await handler(request)

    return middleware


def _param(value: str, name: str) -> str:
    """An id or filter from the path or query string: it goes into SQL, so body strings' rules."""
    if len(value) > 256 or c.CONTROL_CHARS.search(value):
        raise InvalidRequest(f"'{name}' must be at most 256 characters, without control characters.", param=name,
                             code="invalid_characters")
    return value


def _query(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return None if value is None else _param(value, name)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json",
                        headers=headers)


CommandRun = Callable[[c.CommitHook | None], Awaitable[dict[str, Any]]]


async def _command(request: web.Request, fingerprint_body: Any, run: CommandRun, ok_status: int) -> web.Response:
    """Run a mutating command: `ok_status` when propagated, else 202; with an Idempotency-Key,
    claim it first and answer a replay with the first response (header `Idempotent-Replayed`)."""
    st = request.app[ADMIN]
    header = request.headers.get(IDEMPOTENCY_HEADER)
    if header is None:
        result = await run(None)
        return _json(result, ok_status if result["propagated"] else 202)
    route = request.match_info.route.resource
    scope = f"{request.method} {route.canonical if route is not None else request.path}"
    fingerprint = st.idempotency.fingerprint(request.method, request.path, fingerprint_body)
    claimed = await st.idempotency.claim(scope, check_key(header), fingerprint)
    if isinstance(claimed, Replay):
        return _json(claimed.body, claimed.status, {"Idempotent-Replayed": "true"})
    try:
        result = await run(claimed.record)
    except Exception:
        await claimed.release()
        raise
    status = ok_status if result["propagated"] else 202
    await claimed.finish(status, result)
    return _json(result, status)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    body: type[msgspec.Struct] | None
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    status: int = 200


def _cmd(schema: type[Any], name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        raw = decode_json(await read_body(request, ADMIN_BODY_LIMIT))
        cmd = c.parse_command(raw, schema)
        method = getattr(request.app[ADMIN].commands, name)
        return await _command(request, raw, lambda hook: method(cmd, hook), 201)

    return handler


def _lister(kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        items = await request.app[ADMIN].commands.list(kind, _query(request, "workspace_id"))
        return _json({"object": "list", "data": items})

    return handler


def _getter(kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return _json(await request.app[ADMIN].commands.get(kind, _param(request.match_info["id"], "id")))

    return handler


async def revoke_key(request: web.Request) -> web.StreamResponse:
    key_id = _param(request.match_info["id"], "id")
    commands = request.app[ADMIN].commands
    return await _command(request, None, lambda hook: commands.revoke_virtual_key(key_id, hook), 200)


async def get_run(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    return _json(await run_summary(st.pool, _param(request.match_info["run_id"], "run_id"),
                                   _query(request, "workspace_id")))


async def get_models(request: web.Request) -> web.StreamResponse:
    workspace = _query(request, "workspace_id")
    if not workspace:
        raise InvalidRequest("Pass ?workspace_id= to list the models its keys may call.", param="workspace_id")
    return _json(await workspace_models(request.app[ADMIN].pool, workspace))


async def get_catalog(request: web.Request) -> web.StreamResponse:
    return _json(provider_catalog())


async def get_balance(request: web.Request) -> web.StreamResponse:
    return _json(await ledger_balance(request.app[ADMIN].pool))


async def healthz(request: web.Request) -> web.StreamResponse:
    return _json({"ok": True, "snapshot_revision": request.app[ADMIN].relay.last_revision})


ROUTES: tuple[Route, ...] = (
    Route("POST", "/admin/v1/workspaces", "Create a workspace", c.CreateWorkspace,
          _cmd(c.CreateWorkspace, "create_workspace"), 201),
    Route("GET", "/admin/v1/workspaces", "List workspaces", None, _lister("ws")),
    Route("GET", "/admin/v1/workspaces/{id}", "Get a workspace", None, _getter("ws")),
    Route("POST", "/admin/v1/agents", "Register an agent", c.CreateAgent, _cmd(c.CreateAgent, "create_agent"), 201),
    Route("GET", "/admin/v1/agents", "List agents (?workspace_id=)", None, _lister("agent")),
    Route("GET", "/admin/v1/agents/{id}", "Get an agent", None, _getter("agent")),
    Route("POST", "/admin/v1/providers", "Create or replace a provider (the key is encrypted at rest)",
          c.UpsertProvider, _cmd(c.UpsertProvider, "upsert_provider"), 201),
    Route("GET", "/admin/v1/providers", "List providers (?workspace_id=)", None, _lister("provider")),
    Route("POST", "/admin/v1/virtual-keys", "Create a virtual key; the plaintext `key` is returned only here (and to a "
          "retry with the same Idempotency-Key)",
          c.CreateVirtualKey, _cmd(c.CreateVirtualKey, "create_virtual_key"), 201),
    Route("GET", "/admin/v1/virtual-keys", "List virtual keys (?workspace_id=)", None, _lister("vk")),
    Route("POST", "/admin/v1/virtual-keys/{id}/revoke",
          "Revoke a virtual key fleet-wide (202: revoked, workers not yet told)", None, revoke_key),
    Route("POST", "/admin/v1/model-aliases", "Create or replace a model alias", c.UpsertAlias,
          _cmd(c.UpsertAlias, "upsert_alias"), 201),
    Route("GET", "/admin/v1/model-aliases", "List model aliases (?workspace_id=)", None, _lister("alias")),
    Route("POST", "/admin/v1/prices", "Create or replace a price override (nano-USD per million tokens)",
          c.UpsertPrice, _cmd(c.UpsertPrice, "upsert_price"), 201),
    Route("GET", "/admin/v1/prices", "List price overrides", None, _lister("price")),
    Route("GET", "/admin/v1/models", "Models a workspace's keys may call (?workspace_id=), with context windows",
          None, get_models),
    Route("GET", "/admin/v1/catalog", "Provider types this gateway supports and the models it knows for each",
          None, get_catalog),
    Route("GET", "/admin/v1/runs/{run_id}", "Cost and usage of one agent run (?workspace_id=)", None, get_run),
    Route("GET", "/admin/v1/ledger/balance", "Debits and credits per currency", None, get_balance),
    Route("GET", "/admin/v1/fleet", "Data-plane workers heard in the last 30 s and the config revision each applied",
          None, get_fleet),
    Route("GET", "/admin/v1/healthz", "Liveness of the admin API", None, healthz),
)


_PROPAGATED = "Committed and relayed to the workers' config bucket: `propagated: true`, `snapshot_revision` set."
_NOT_PROPAGATED = ("Committed, but NATS did not take it in time: `propagated: false`, `snapshot_revision: null`. "
                   "The change is durable and the control plane keeps relaying it; workers apply it when NATS is "
                   "back. Do not retry it as if it had failed.")
_IDEMPOTENCY_DOC = ("Makes the POST safe to retry for 24 h: the same key with the same request returns the first "
                    "response (status and body, a created key's plaintext included) with `Idempotent-Replayed: "
                    "true`; with a different request, 422 `idempotency_key_mismatch`; while the first is in flight, "
                    "409 `idempotency_key_in_use`.")


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 built from ROUTES and the msgspec input Structs."""
    bodies = [r.body for r in ROUTES if r.body is not None]
    _, components = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    error_ref = {"$ref": "#/components/schemas/Error"}
    components["Error"] = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        ok = {"content": {"application/json": {"schema": {"type": "object"}}}}
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.method.lower() + "_" + re.sub(r"[^A-Za-z0-9]+", "_", r.path.strip("/")).strip("_"),
            "responses": {
                str(r.status): {"description": "OK" if r.method == "GET" else _PROPAGATED, **ok},
                "default": {"description": "Error", "content": {"application/json": {"schema": error_ref}}},
            },
        }
        params: list[dict[str, Any]] = [{"name": p.strip("{}"), "in": "path", "required": True,
                                         "schema": {"type": "string"}}
                                        for p in r.path.split("/") if p.startswith("{")]
        if r.method == "POST":
            op["responses"]["202"] = {"description": _NOT_PROPAGATED, **ok}
            op["responses"]["409"] = {"description": "idempotency_key_in_use (or the entity already exists)",
                                      "content": {"application/json": {"schema": error_ref}}}
            op["responses"]["422"] = {"description": "idempotency_key_mismatch",
                                      "content": {"application/json": {"schema": error_ref}}}
            params.append({"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
                           "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                           "description": _IDEMPOTENCY_DOC})
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{r.body.__name__}"}}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Alephant Gateway admin API", "version": "1"},
        "components": {"schemas": components, "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}}},
        "security": [{"admin": []}],
        "paths": paths,
    }


async def openapi(request: web.Request) -> web.StreamResponse:
    return _json(openapi_document())


def _resources(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        keyring = KeyRing(settings.secret_key)
        nc = await connect(settings.nats_url, "alephant-controlplane", bus_auth(settings, "controlplane"))
        js = nc.jetstream()
        await ensure_stream(js, settings.stream, settings.subject_prefix, settings.stream_replicas)
        kv = await ensure_kv(js, settings.kv_bucket, settings.stream_replicas)
        pool = open_pool(settings.database_url)
        await pool.open(wait=True, timeout=30)
        relay = OutboxRelay(pool, js, kv, settings.stream)
        await relay.flush()
        changed = await relay.resync()
        log.info("kv_resynced", changed=changed)
        commands = c.ConfigCommands(pool, keyring, relay, settings.subject_prefix,
                                    ssrf_allow=parse_allow_list(settings.ssrf_allow),
                                    propagation_wait_s=settings.admin_propagation_wait_s)
        app[FLEET] = FleetMonitor(lambda: relay.last_revision)
        await app[FLEET].subscribe(nc, settings.subject_prefix)  # ends with nc.drain() below
        app[ADMIN] = AdminState(settings, pool, commands, relay, IdempotencyStore(pool, keyring))
        task = asyncio.create_task(relay.run(settings.heartbeat_interval_s), name="outbox-relay")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.close()
        await nc.drain()

    return ctx


def build_admin_app(settings: Settings) -> web.Application:
    if not settings.admin_token:
        raise ValueError("ALEPHANT_ADMIN_TOKEN must be set for the control plane")
    app = web.Application(middlewares=[error_middleware, _auth_middleware(settings.admin_token.reveal())],
                          client_max_size=ADMIN_BODY_LIMIT)
    app.cleanup_ctx.append(_resources(settings))
    app.router.add_get("/admin/v1/openapi.json", openapi)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    return app
