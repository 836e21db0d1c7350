"""The admin API (its own listener, its own bearer token). Every mutating route is a command:
state + `config.*` event in one transaction, then the KV snapshot entry (see commands.py).

Mutating routes answer 201 (or 200) with `"propagated": true` once the change reached NATS, or
202 with `"propagated": false` when it is committed but NATS could not take it within
`ALEPHANT_ADMIN_PROPAGATION_WAIT_S`; the relay keeps retrying and workers apply it when NATS is
back. Either way the body carries the config `revision` (= `snapshot_revision`, null while not
propagated). Every POST, PATCH and DELETE accepts an `Idempotency-Key` header (see
idempotency.py). PATCH takes the fields to change and validates the result as a create; DELETE
of an entity others still reference is refused (409 `still_referenced`), never cascaded.

The route table below is also the source of the OpenAPI document at /admin/v1/openapi.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from nats.aio.client import Client as NATS
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from controlplane import (
    bodies_admin,
    cache_admin,
    console,
    finance,
    paid_admin,
    payments_admin,
    prompts,
    routers,
    timeline,
    wallets,
)
from controlplane import commands as c
from controlplane import governance as g
from controlplane import log_destinations as logdest
from controlplane import log_settings as logset
from controlplane import mcp_servers as mcp
from controlplane.bodies_retention import run_sweeper, sweep_once
from controlplane.budget_state import run_reconciler
from controlplane.dry_run import DecisionDryRun, DryRun, parse_dry_run
from controlplane.escalations import STATUSES, ApproveEscalation, Escalations, RejectEscalation
from controlplane.fleet import FLEET, FleetMonitor, get_fleet, router_health
from controlplane.idempotency import HEADER as IDEMPOTENCY_HEADER
from controlplane.idempotency import IdempotencyStore, Replay, check_key
from controlplane.metrics import METRICS, AdminMetrics, metrics_endpoint, metrics_middleware
from controlplane.provider_keys import PROVIDER_KEY
from controlplane.queries import ledger_balance, provider_catalog, run_summary, workspace_models
from controlplane.relay import OutboxRelay
from controlplane.repricing import Reprice, Repricer
from controlplane.ssrf import parse_allow_list
from events.db import open_pool
from events.jetstream import bus_auth, connect, ensure_kv, ensure_stream
from schemas.errors import AuthenticationFailed, Conflict, GatewayError, InvalidRequest, NotFound
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
    escalations: Escalations
    dry_run: DecisionDryRun
    # Budget counters live in Redis; the admin API only reads them (GET /budgets/{id}).
    redis: Redis | None = None
    # The control plane's NATS connection (the console's live tail subscribes to call events).
    nats: NATS | None = None


ADMIN: web.AppKey[AdminState] = web.AppKey("admin", AdminState)


def _auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/admin/v1/openapi.json", "/admin/v1/healthz", "/admin/v1/readyz", "/healthz", "/readyz",
                            "/metrics") or request.path == "/console" or request.path.startswith("/console/"):
            return await handler(request)  # the console signs its users in itself (console/auth.py)
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
    # A POST that changes nothing (the dry run): no Idempotency-Key, no 202.
    readonly: bool = False


Handler_ = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _body(request: web.Request, optional: bool = False) -> Any:
    """The decoded JSON body; `{}` for an optional body that was not sent."""
    if optional and not request.body_exists:
        return {}
    return decode_json(await read_body(request, ADMIN_BODY_LIMIT))


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


def _create(spec: c.KindSpec) -> Handler_:
    async def handler(request: web.Request) -> web.StreamResponse:
        raw = await _body(request)
        cmd = c.parse_command(raw, spec.create)
        commands = request.app[ADMIN].commands
        return await _command(request, raw, lambda hook: commands.create(spec, cmd, hook), 201)

    return handler


def _patcher(spec: c.KindSpec) -> Handler_:
    async def handler(request: web.Request) -> web.StreamResponse:
        ent_id = _param(request.match_info["id"], "id")
        raw = await _body(request)
        patch = c.parse_command(raw, spec.patch)
        commands = request.app[ADMIN].commands
        return await _command(request, raw, lambda hook: commands.patch(spec, ent_id, patch, hook), 200)

    return handler


def _deleter(spec: c.KindSpec) -> Handler_:
    async def handler(request: web.Request) -> web.StreamResponse:
        ent_id = _param(request.match_info["id"], "id")
        commands = request.app[ADMIN].commands
        return await _command(request, None, lambda hook: commands.delete(spec, ent_id, hook), 200)

    return handler


async def rotate_key(request: web.Request) -> web.StreamResponse:
    key_id = _param(request.match_info["id"], "id")
    raw = await _body(request, optional=True)
    cmd = c.parse_command(raw, c.RotateVirtualKey)
    commands = request.app[ADMIN].commands
    return await _command(request, raw, lambda hook: commands.rotate_virtual_key(key_id, cmd, hook), 201)


async def create_prompt(request: web.Request) -> web.StreamResponse:
    raw = await _body(request)
    cmd = c.parse_command(raw, prompts.CreatePrompt)
    commands = request.app[ADMIN].commands
    return await _command(request, raw, lambda hook: prompts.create_prompt(commands, cmd, hook), 201)


async def get_prompt_versions(request: web.Request) -> web.StreamResponse:
    name = _param(request.match_info["name"], "name")
    items = await prompts.prompt_versions(request.app[ADMIN].commands, name, _query(request, "workspace_id"))
    return _json({"object": "list", "data": items})


async def _load_by_id(request: web.Request, kind: str, what: str) -> Any:
    """The live entity of `kind` named by the path's `{id}`, or 404 `<what>_not_found`."""
    ent_id = _param(request.match_info["id"], "id")
    entity = await request.app[ADMIN].commands.load(kind, ent_id)
    if entity is None:
        raise NotFound(f"No {what.replace('_', ' ')} with id '{ent_id}'.", param="id", code=f"{what}_not_found")
    return entity


async def get_router_health(request: web.Request) -> web.StreamResponse:
    router = await _load_by_id(request, "router", "router")
    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    return _json(router_health(router, request.app[FLEET].live_beats(now), now))


async def purge_cache(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    ws, ns = cache_admin.purge_target(_query(request, "workspace_id"), _query(request, "namespace"))
    storage = cache_admin.Storage(st.redis, st.settings.qdrant_url)
    # The query is the command (the fingerprint's path has none), so an Idempotency-Key is bound to it.
    return await _command(request, {"workspace_id": ws, "namespace": ns},
                          lambda hook: cache_admin.purge(st.commands, storage, ws, ns, hook), 200)


async def get_budget(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    budget = await _load_by_id(request, "budget", "budget")
    usage = await g.budget_usage(st.redis, budget, dt.datetime.now(dt.UTC))
    return _json(c.public_view(budget) | usage)


async def get_paid_endpoint(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    endpoint = await _load_by_id(request, "paid", "paid_endpoint")
    return _json(c.public_view(endpoint) | await paid_admin.paid_revenue(st.pool, endpoint))


async def get_log_destination(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    dest = await _load_by_id(request, "logdest", "log_destination")
    return _json(c.public_view(dest) | await logdest.delivery_state(st.pool, dest.id))


async def list_log_dead_letters(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    dest = await _load_by_id(request, "logdest", "log_destination")
    return _json({"object": "list", "data": await logdest.dead_letters(st.pool, dest.id)})


async def sweep_bodies(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    if not st.settings.s3_url:
        raise Conflict("Body archival is off: ALEPHANT_S3_URL is not set, so there are no bodies to sweep.",
                       code="body_archive_off")
    try:
        result = await sweep_once(st.settings, st.pool)
    except Exception as exc:  # S3 unreachable or refusing: say so, as a 503 naming the cause
        raise GatewayError(f"The sweep could not finish ({type(exc).__name__}: {exc}); objects deleted before the "
                           "failure stay deleted. Retry later.", code="body_store_unavailable", status=503) from None
    return _json({"scanned": result.scanned, "deleted": result.deleted, "failed": result.failed})


async def get_body(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    request_id = _param(request.match_info["request_id"], "request_id")
    return _json(await bodies_admin.archived_body(st.pool, st.settings, request_id, _query(request, "workspace_id")))


async def list_escalations(request: web.Request) -> web.StreamResponse:
    status = _query(request, "status")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"'status' must be one of {', '.join(STATUSES)}.", param="status")
    items = await request.app[ADMIN].escalations.list(_query(request, "workspace_id"), status)
    return _json({"object": "list", "data": items})


async def get_escalation(request: web.Request) -> web.StreamResponse:
    return _json(await request.app[ADMIN].escalations.get(_param(request.match_info["id"], "id")))


async def approve_escalation(request: web.Request) -> web.StreamResponse:
    esc_id = _param(request.match_info["id"], "id")
    raw = await _body(request, optional=True)
    cmd = c.parse_command(raw, ApproveEscalation)
    escalations = request.app[ADMIN].escalations
    return await _command(request, raw, lambda hook: escalations.approve(esc_id, cmd, hook), 200)


async def reject_escalation(request: web.Request) -> web.StreamResponse:
    esc_id = _param(request.match_info["id"], "id")
    raw = await _body(request, optional=True)
    c.parse_command(raw, RejectEscalation)
    escalations = request.app[ADMIN].escalations
    return await _command(request, raw, lambda hook: escalations.reject(esc_id, hook), 200)


async def dry_run(request: web.Request) -> web.StreamResponse:
    cmd = parse_dry_run(await _body(request))
    return _json(await request.app[ADMIN].dry_run.run(cmd))


def _crud(path: str, spec: c.KindSpec, noun: str, *, create: bool = True, get: bool = True,
          delete_rule: str = "", delete: Handler_ | None = None) -> tuple[Route, ...]:
    """POST (create), GET list, GET one, PATCH, DELETE for one entity kind."""
    base = f"/admin/v1/{path}"
    routes = [Route("POST", base, f"Create a {noun}", spec.create, _create(spec), 201)] if create else []
    routes += [Route("GET", base, f"List {noun}s (?workspace_id=)", None, _lister(spec.kind))]
    if get:
        routes += [Route("GET", base + "/{id}", f"Get a {noun}", None, _getter(spec.kind))]
    routes += [
        Route("PATCH", base + "/{id}", f"Change a {noun}: the fields given, validated as on create; references "
              "are re-checked", spec.patch, _patcher(spec)),
        Route("DELETE", base + "/{id}", f"Delete a {noun}. {delete_rule}".strip(), None, delete or _deleter(spec)),
    ]
    return tuple(routes)


_REFUSED_IF_USED = "Refused (409 `still_referenced`) while {} point at it."


async def get_run(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    return _json(await run_summary(st.pool, _param(request.match_info["run_id"], "run_id"),
                                   _query(request, "workspace_id")))


def _timeline(kind: str) -> Handler_:
    """`GET /admin/v1/runs/{id}/timeline` and `GET /admin/v1/sessions/{id}` (controlplane/timeline.py)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        ident = _param(request.match_info["id"], f"{kind}_id")
        workspace, limit = timeline.parse_limit({k: _param(v, k) for k, v in request.query.items()})
        return _json(await timeline.timeline(request.app[ADMIN].pool, kind, ident, workspace, limit))

    return handler


def _finance(name: str) -> Handler_:
    """A finance read (`controlplane.finance.QUERIES`): JSON, or CSV with `?format=csv`."""
    query = finance.QUERIES[name]

    async def handler(request: web.Request) -> web.StreamResponse:
        st = request.app[ADMIN]
        params = {k: _param(v, k) for k, v in request.query.items()}
        as_csv = finance.output_format(params) == "csv"
        table = await query(st.pool, st.redis, params, dt.datetime.now(dt.UTC))
        if as_csv:
            return web.Response(text=table.to_csv(), content_type="text/csv",
                                headers={"Content-Disposition": f'attachment; filename="finance-{name}.csv"'})
        return _json(table.to_json())

    return handler


_FINANCE_WINDOW = ("?workspace_id=&from=&to= (ISO-8601, `to` exclusive; no offset = UTC); `format=csv` for CSV. "
                   "Money as `*_usd` decimal strings and `*_nanos` integers; cost = llm + tool + payments out, "
                   "margin = revenue - cost")


async def get_models(request: web.Request) -> web.StreamResponse:
    workspace = _query(request, "workspace_id")
    if not workspace:
        raise InvalidRequest("Pass ?workspace_id= to list the models its keys may call.", param="workspace_id")
    return _json(await workspace_models(request.app[ADMIN].pool, workspace))


async def get_catalog(request: web.Request) -> web.StreamResponse:
    return _json(provider_catalog())


async def get_balance(request: web.Request) -> web.StreamResponse:
    return _json(await ledger_balance(request.app[ADMIN].pool))


async def reprice(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    raw = await _body(request)
    cmd = c.parse_command(raw, Reprice)
    repricer = Repricer(st.pool, st.relay, st.settings.subject_prefix, st.settings.admin_propagation_wait_s)
    return await _command(request, raw, lambda hook: repricer.reprice(cmd, hook), 200)


async def pending_payments(request: web.Request) -> web.StreamResponse:
    workspace_id = _query(request, "workspace_id")
    if not workspace_id:
        raise InvalidRequest("Name the workspace: ?workspace_id=...", param="workspace_id", code="missing_workspace")
    return _json(await payments_admin.pending_payments(request.app[ADMIN].pool, workspace_id))


async def resolve_payment(request: web.Request) -> web.StreamResponse:
    st = request.app[ADMIN]
    raw = await _body(request)
    cmd = c.parse_command(raw, payments_admin.ResolvePayment)
    resolver = payments_admin.Resolver(st.pool, st.relay, st.settings.subject_prefix,
                                       st.settings.admin_propagation_wait_s)
    return await _command(request, raw, lambda hook: resolver.resolve(cmd, hook), 200)


async def healthz(request: web.Request) -> web.StreamResponse:
    relay = request.app[ADMIN].relay
    return _json({"ok": True, "snapshot_revision": relay.last_revision, "leader": relay.leading})


async def readyz(request: web.Request) -> web.StreamResponse:
    """200 while the relay reaches Postgres (it leads, or it can tell that another instance does)."""
    relay = request.app[ADMIN].relay
    ready = relay.postgres_ok
    return _json({"ready": ready, "leader": relay.leading}, 200 if ready else 503)


ROUTES: tuple[Route, ...] = (
    *_crud("workspaces", c.WORKSPACE, "workspace", delete_rule="Refused (409 `still_referenced`) while anything "
           "of the workspace is live (agents, keys, providers, ...): delete those first."),
    *_crud("departments", g.DEPARTMENT, "department",
           delete_rule=_REFUSED_IF_USED.format("members, agents, keys, budgets, limits or policies")),
    *_crud("members", g.MEMBER, "member",
           delete_rule=_REFUSED_IF_USED.format("agents, keys, budgets, limits or policies")),
    *_crud("agents", c.AGENT, "agent", delete_rule=_REFUSED_IF_USED.format("keys, budgets, limits or policies")),
    *_crud("providers", c.PROVIDER, "provider", delete_rule=_REFUSED_IF_USED.format("model aliases or routers")),
    *_crud("provider-keys", PROVIDER_KEY, "provider key: with `workspace_id`, a BYO key for its provider named "
           "`provider`; without, an operator master key for the provider type `provider`, serving every workspace "
           "without a key of its own (list master keys with ?workspace_id=_operator)"),
    Route("POST", "/admin/v1/virtual-keys", "Create a virtual key; the plaintext `key` is returned only here (and to a "
          "retry with the same Idempotency-Key)",
          c.CreateVirtualKey, _cmd(c.CreateVirtualKey, "create_virtual_key"), 201),
    *_crud("virtual-keys", c.VIRTUAL_KEY, "virtual key", create=False,
           delete_rule="Same as revoke: never refused; budgets, limits and policies on the key stay, inert.",
           delete=revoke_key),
    Route("POST", "/admin/v1/virtual-keys/{id}/revoke",
          "Revoke a virtual key fleet-wide (202: revoked, workers not yet told)", None, revoke_key),
    Route("POST", "/admin/v1/virtual-keys/{id}/rotate", "Mint a replacement key with the same bindings (plaintext "
          "`key` returned only here); the old key keeps working for `overlap_s` (default 3600)",
          c.RotateVirtualKey, rotate_key, 201),
    *_crud("model-aliases", c.ALIAS, "model alias"),
    *_crud("prices", c.PRICE, "price override (nano-USD per million tokens; `scope` platform, workspace "
           "(`workspace_id`) or provider_key (`provider_key_id`); `discount_pct`; `per_request_usd`)"),
    *_crud("budgets", g.BUDGET, "budget (`limit_usd` a decimal string)", get=False),
    Route("GET", "/admin/v1/budgets/{id}", "Get a budget with its current period's `spent_usd`, `held_usd` and "
          "`remaining_usd` from Redis (null, with `budget_store: unavailable`, when Redis is unreachable)",
          None, get_budget),
    *_crud("limits", g.LIMIT, "limit"),
    # The body's fields are described by CreateRouter's docstring in the OpenAPI schema.
    *_crud("routers", routers.ROUTER, "router",
           delete_rule=_REFUSED_IF_USED.format("virtual keys or agents (`router_id`)")),
    Route("GET", "/admin/v1/routers/{id}/health", "Per target of the router (its own and its rules'), the health "
          "each live data-plane worker reports: in flight, successes, failures, latency EWMAs, ejection and "
          "cool-down, with a summary", None, get_router_health),
    *_crud("policies", g.POLICY, "policy"),
    # The body's fields are described by SetCacheSettings' docstring in the OpenAPI schema.
    *_crud("cache-settings", cache_admin.CACHE_SETTINGS, "cache setting"),
    Route("DELETE", "/admin/v1/cache", "Purge the response cache of `workspace_id` (required) in `namespace` "
          "(omitted or empty: the default namespace): a new cache generation, so no worker serves an older entry "
          "once it applies the answer's `revision`; then the Redis keys (and a Qdrant server's points) are freed "
          "best effort. Answers `generation`, `redis_keys_deleted`, `redis_complete` and `qdrant`",
          None, purge_cache),
    Route("GET", "/admin/v1/cache/purges", "Cache purges (?workspace_id=): the current `generation` per "
          "(workspace, namespace)", None, _lister("cachepurge")),
    # The body's fields are described by CreatePaidEndpoint's docstring in the OpenAPI schema.
    *_crud("paid-endpoints", paid_admin.PAID_ENDPOINT, "paid endpoint (sold per call at /paid/{slug}/... over "
           "x402: `serve` a `backend_url` or a `model`, `price.per_call` in the asset's atomic units, `rails.x402`)",
           get=False),
    Route("GET", "/admin/v1/payments/pending", "Pending settlements of paid calls not resolved yet (?workspace_id=, "
          "required): `replay_key`, `endpoint_id`, `run_id`, `amount_usd` (earned once settled), `refund_usd` (owed "
          "back once settled), `transaction`", None, pending_payments),
    Route("POST", "/admin/v1/payments/resolve", "Resolve a pending settlement: `settled` books its revenue (and the "
          "refund it owes), `failed` a loss; once (409 `payment_already_resolved` after)",
          payments_admin.ResolvePayment, resolve_payment),
    Route("GET", "/admin/v1/paid-endpoints/{id}", "Get a paid endpoint with the revenue recorded for it: "
          "`revenue_usd` (decimal string), `revenue_nanos` and `calls` (paid calls)", None, get_paid_endpoint),
    # The body's fields are described by CreateWallet's docstring in the OpenAPI schema.
    *_crud("wallets", wallets.WALLET, "wallet (pays x402/MPP endpoints an agent calls through /egress: an EVM key, "
           "allow-listed assets with per-payment caps)"),
    # The body's fields are described by CreateLogDestination's docstring in the OpenAPI schema.
    *_crud("log-destinations", logdest.LOG_DESTINATION, "log destination (the event stream delivered, at least "
           "once, to a `webhook`, an `otlp` collector or an `s3` prefix; filtered by `workspace_id` and "
           "`event_types`; the `secret` is never shown)", get=False),
    Route("GET", "/admin/v1/log-destinations/{id}", "Get a log destination with its delivery state: `delivered`, "
          "`failed` (failed attempts), `dead_lettered` (events given up on), `last_error`, `last_error_at`, "
          "`last_delivered_at`", None, get_log_destination),
    Route("GET", "/admin/v1/log-destinations/{id}/dead-letters", "The destination's dead-lettered events, newest "
          "first (at most 100): the event, `attempts`, `reason`, `dead_lettered_at`", None, list_log_dead_letters),
    # The body's fields are described by CreateMcpServer's docstring in the OpenAPI schema.
    *_crud("mcp-servers", mcp.MCP_SERVER, "MCP server (an upstream Streamable HTTP MCP server the workspace's keys "
           "reach at /mcp/{name} and /mcp: `url` SSRF-checked, `headers` stored encrypted and shown by name only, "
           "`tools` priced per call in `price_usd` or denied with `allowed: false`; names unique in the workspace, "
           "409 `name_taken`)"),
    # The body's fields are described by SetLogSettings's docstring in the OpenAPI schema.
    *_crud("log-settings", logset.LOG_SETTINGS, "log setting (per workspace or virtual key: `bodies` none | request "
           "| both archived to S3 redacted by `redact_paths` and `redact_patterns`, kept `retention_days`; one per "
           "scope, 409 `already_exists`)"),
    # Not a config command: no Idempotency-Key (a sweep is idempotent), no 202.
    Route("POST", "/admin/v1/bodies/sweep", "Delete archived request bodies past their workspace's retention now "
          "(the control plane also does it every ALEPHANT_BODY_SWEEP_INTERVAL_S): answers `scanned`, `deleted` "
          "and `failed` (left for the next sweep); 409 `body_archive_off` without ALEPHANT_S3_URL", None,
          sweep_bodies, readonly=True),
    Route("GET", "/admin/v1/requests/{request_id}/body", "One call's archived, redacted bodies (?workspace_id=): "
          "`key` (the object), `request`, `response` and the call's ids, read from the archive bucket; 404 "
          "`request_not_found`, `body_not_archived` (metadata only), `body_not_found` (past its retention)", None,
          get_body),
    Route("POST", "/admin/v1/prompts", "Create a prompt template version: version 1 of a new `name`, the next "
          "version of an existing one (`messages` with `{{variable}}` placeholders, optional `model` and `params`)",
          prompts.CreatePrompt, create_prompt, 201),
    Route("GET", "/admin/v1/prompts", "List prompt template versions (?workspace_id=)", None, _lister("prompt")),
    Route("GET", "/admin/v1/prompts/{name}", "Every version of the prompt template `name` (?workspace_id=), "
          "oldest first", None, get_prompt_versions),
    Route("GET", "/admin/v1/escalations", "Escalations, newest first, at most 500 (?workspace_id=&status="
          "pending|approved|rejected); `used` tells whether an approved one's retry happened", None, list_escalations),
    Route("GET", "/admin/v1/escalations/{id}", "Get an escalation", None, get_escalation),
    Route("POST", "/admin/v1/escalations/{id}/approve", "Approve a pending escalation: the key may retry once with "
          "`Alephant-Escalation-Id` within `ttl_s` (default 900); 409 if it is not pending", ApproveEscalation,
          approve_escalation),
    Route("POST", "/admin/v1/escalations/{id}/reject", "Reject a pending escalation; 409 if it is not pending",
          RejectEscalation, reject_escalation),
    Route("POST", "/admin/v1/decisions/dry-run", "What the policy stage would decide for a request (no call is "
          "made; the cost estimate is `est_cost_usd` or 0)", DryRun, dry_run, readonly=True),
    Route("GET", "/admin/v1/models", "Models a workspace's keys may call (?workspace_id=), with context windows",
          None, get_models),
    Route("GET", "/admin/v1/catalog", "Provider types this gateway supports and the models it knows for each",
          None, get_catalog),
    Route("GET", "/admin/v1/runs/{run_id}", "Cost, revenue, margin and usage of one agent run (?workspace_id=): "
          "`cost_usd` is the total (llm + tool + payments out), with each part, `revenue_usd`, `margin_usd`, "
          "`cache_savings_usd`, `estimated_cost_usd`, `agents` and `outcome`", None, get_run),
    Route("GET", "/admin/v1/runs/{id}/timeline", "Every event of one agent run in time order (?workspace_id=, "
          f"?limit= default {timeline.DEFAULT_LIMIT}, at most {timeline.MAX_LIMIT}; `truncated`): model calls, tool "
          "spend, policy decisions, cache hits, payments, each with `type`, `occurred_at`, `request_id`, `cost_usd`, "
          "`trace_id` (and `body_key`, the archived bodies, on model calls); `totals` equal the run's finance view",
          None, _timeline("run")),
    Route("GET", "/admin/v1/sessions/{id}", "Every event of one session in time order, as a run's timeline "
          "(?workspace_id=, ?limit=), with the session's finance `totals`", None, _timeline("session")),
    Route("GET", "/admin/v1/finance/summary", "Totals grouped by `group_by` (agent | run | workflow | member | "
          "department | workspace | provider | model | property:<name>), per `interval` (hour | day | month) if "
          f"given, at most `limit` rows (default 1000; `has_more`). {_FINANCE_WINDOW}", None, _finance("summary")),
    Route("GET", "/admin/v1/finance/top", "The top `limit` (default 10) of `by` (run | agent | workflow) by "
          f"`metric` (cost | revenue | margin), `order=desc` (default) or asc. {_FINANCE_WINDOW}", None,
          _finance("top")),
    Route("GET", "/admin/v1/finance/spikes", "Runs costing more than `factor` (default 3) times their agent's "
          "baseline: the median cost of the agent's other runs in the window, given at least `min_runs` (default "
          f"5) of them. {_FINANCE_WINDOW}", None, _finance("spikes")),
    Route("GET", "/admin/v1/finance/unpriced", "Tokens and calls no price covered (not re-priced since), per "
          f"provider and model. {_FINANCE_WINDOW}", None, _finance("unpriced")),
    Route("GET", "/admin/v1/finance/budgets", "Each budget (?workspace_id=) with its current period's spent, held, "
          "remaining and `used_pct` from the budget store; `format=csv` for CSV", None, _finance("budgets")),
    Route("GET", "/admin/v1/ledger/balance", "Debits and credits per currency", None, get_balance),
    Route("POST", "/admin/v1/finance/reprice", "Price the calls recorded as unpriced for `provider`/`model` (`*`: "
          "every model; optionally one `workspace_id`) with today's prices: one `llm.repriced` event per call "
          "(idempotent; a call is re-priced once). Answers `repriced`, `cost_usd`, `still_unpriced` and `more` "
          "(true: call again)", Reprice, reprice),
    Route("GET", "/admin/v1/fleet", "Data-plane workers heard in the last 30 s and the config revision each applied",
          None, get_fleet),
    Route("GET", "/admin/v1/healthz", "Liveness of the admin API: `snapshot_revision`, and `leader` (this control "
          "plane relays the config outbox; one instance does at a time)", None, healthz),
    Route("GET", "/admin/v1/readyz", "Readiness: 200 while the control plane reaches Postgres, else 503", None,
          readyz),
)


_PROPAGATED = "Committed and relayed to the workers' config bucket: `propagated: true`, `snapshot_revision` set."
_NOT_PROPAGATED = ("Committed, but NATS did not take it in time: `propagated: false`, `snapshot_revision: null`. "
                   "The change is durable and the control plane keeps relaying it; workers apply it when NATS is "
                   "back. Do not retry it as if it had failed.")
_IDEMPOTENCY_DOC = ("Makes the POST, PATCH or DELETE safe to retry for 24 h: the same key with the same request "
                    "returns the first response (status and body, a created key's plaintext included) with "
                    "`Idempotent-Replayed: true`; with a different request, 422 `idempotency_key_mismatch`; "
                    "while the first is in flight, 409 `idempotency_key_in_use`.")


_API_DOC = ("Every change answers with the config `revision` it was published at (`revision`, also "
            "`snapshot_revision`; null while `propagated` is false). Money is given as decimal USD strings "
            "(`limit_usd`, `max_cost_usd`, ...), stored as integer nano-USD.")


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
        if r.method != "GET" and not r.readonly:
            op["responses"]["202"] = {"description": _NOT_PROPAGATED, **ok}
            op["responses"]["409"] = {"description": "idempotency_key_in_use (or the entity already exists, or "
                                                      "is still referenced, or the escalation is not pending)",
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
        "info": {"title": "Alephant Gateway admin API", "version": "1", "description": _API_DOC},
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
        # Leads the relay if no other control plane does (then flushes and resyncs the bucket first).
        relay = OutboxRelay(pool, js, kv, settings.stream, settings.database_url,
                            stall_s=max(10.0, 5 * settings.heartbeat_interval_s))
        await relay.try_lead()
        commands = c.ConfigCommands(pool, keyring, relay, settings.subject_prefix,
                                    ssrf_allow=parse_allow_list(settings.ssrf_allow),
                                    propagation_wait_s=settings.admin_propagation_wait_s)
        app[FLEET] = FleetMonitor(lambda: relay.last_revision)
        await app[FLEET].subscribe(nc, settings.subject_prefix)  # ends with nc.drain() below
        # Lazy: nothing connects until a budget is read, so the control plane starts without Redis;
        # short timeouts, so an unreachable Redis makes GET /budgets/{id} degrade, not hang.
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
        app[METRICS].revision = lambda: relay.last_revision
        app[ADMIN] = AdminState(settings, pool, commands, relay, IdempotencyStore(pool, keyring),
                                Escalations(commands, redis), DecisionDryRun(commands), redis, nc)
        tasks = [asyncio.create_task(relay.run(settings.heartbeat_interval_s), name="outbox-relay"),
                 # Redis is not the record of truth: raise budget spend to the ledger's after a loss.
                 asyncio.create_task(run_reconciler(redis, pool, settings.reconcile_interval_s),
                                     name="budget-reconciler")]
        if settings.s3_url and settings.body_sweep_interval_s > 0:  # archived bodies past their retention
            tasks.append(asyncio.create_task(run_sweeper(settings, pool), name="body-sweeper"))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await relay.close()  # hands the lead over at once
        await redis.aclose()
        await pool.close()
        await nc.drain()

    return ctx


def build_admin_app(settings: Settings) -> web.Application:
    if not settings.admin_token:
        raise ValueError("ALEPHANT_ADMIN_TOKEN must be set for the control plane")
    metrics = AdminMetrics()
    app = web.Application(middlewares=[metrics_middleware(metrics), error_middleware, console.middleware(),
                                       _auth_middleware(settings.admin_token.reveal())],
                          client_max_size=ADMIN_BODY_LIMIT)
    app[METRICS] = metrics
    app.cleanup_ctx.append(_resources(settings))
    app.router.add_get("/metrics", metrics_endpoint)  # no token: counts and the revision only
    app.router.add_get("/admin/v1/openapi.json", openapi)
    # The probe paths every process serves (no token).
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    console.install(app, lambda app_: app_[ADMIN].pool)
    return app
