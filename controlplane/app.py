"""The admin API (its own listener, its own bearer token). Every mutating route is a command:
state + `config.*` event in one transaction, then the KV snapshot entry (see commands.py).

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
from controlplane.queries import ledger_balance, provider_catalog, run_summary, workspace_models
from controlplane.relay import OutboxRelay
from controlplane.ssrf import parse_allow_list
from dataplane.http import Handler, decode_json, error_middleware, read_body, validate
from events.db import open_pool
from events.jetstream import connect, ensure_kv, ensure_stream
from schemas.errors import AuthenticationFailed, InvalidRequest
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


async def _body(request: web.Request, schema: type[c.T]) -> c.T:
    return validate(decode_json(await read_body(request, ADMIN_BODY_LIMIT)), schema)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


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
        result = await getattr(request.app[ADMIN].commands, name)(await _body(request, schema))
        return _json(result, 201)

    return handler


def _lister(kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        items = await request.app[ADMIN].commands.list(kind, request.query.get("workspace_id"))
        return _json({"object": "list", "data": items})

    return handler


def _getter(kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return _json(await request.app[ADMIN].commands.get(kind, request.match_info["id"]))

    return handler


async def revoke_key(request: web.Request) -> web.StreamResponse:
    return _json(await request.app[ADMIN].commands.revoke_virtual_key(request.match_info["id"]))


async def get_run(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    return _json(await run_summary(st.pool, request.match_info["run_id"], request.query.get("workspace_id")))


async def get_models(request: web.Request) -> web.StreamResponse:
    workspace = request.query.get("workspace_id")
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
    Route("POST", "/admin/v1/virtual-keys", "Create a virtual key; the plaintext `key` is returned only here",
          c.CreateVirtualKey, _cmd(c.CreateVirtualKey, "create_virtual_key"), 201),
    Route("GET", "/admin/v1/virtual-keys", "List virtual keys (?workspace_id=)", None, _lister("vk")),
    Route("POST", "/admin/v1/virtual-keys/{id}/revoke", "Revoke a virtual key fleet-wide", None, revoke_key),
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
    Route("GET", "/admin/v1/healthz", "Liveness of the admin API", None, healthz),
)


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
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.method.lower() + "_" + re.sub(r"[^A-Za-z0-9]+", "_", r.path.strip("/")).strip("_"),
            "responses": {
                str(r.status): {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
                "default": {"description": "Error", "content": {"application/json": {"schema": error_ref}}},
            },
        }
        params = [p.strip("{}") for p in r.path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                for p in params]
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
        nc = await connect(settings.nats_url, "alephant-controlplane")
        js = nc.jetstream()
        await ensure_stream(js, settings.stream, settings.subject_prefix, settings.stream_replicas)
        kv = await ensure_kv(js, settings.kv_bucket, settings.stream_replicas)
        pool = open_pool(settings.database_url)
        await pool.open(wait=True, timeout=30)
        relay = OutboxRelay(pool, js, kv, settings.stream)
        await relay.flush()
        changed = await relay.resync()
        log.info("kv_resynced", changed=changed)
        app[ADMIN] = AdminState(settings, pool, c.ConfigCommands(pool, keyring, relay, settings.subject_prefix,
                                                              ssrf_allow=parse_allow_list(settings.ssrf_allow)), relay)
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
