"""The MCP gateway (issue 16): `/mcp/{server}` (one upstream MCP server) and `/mcp` (every server
of the key's workspace, tools named `<server>__<tool>`), speaking MCP over Streamable HTTP.

Clients authenticate with their virtual key (`Authorization: Bearer`), and the `Alephant-*`
headers tie calls to agents, runs and sessions, as on `/v1`. Every request runs the staged
pipeline: authentication, agent context, then:

* `initialize`, `ping`, `tools/list`: ungoverned (nothing is spent) and not recorded. The
  gateway is stateless: it assigns no session id and answers every request with one JSON body.
  `tools/list` shows only the tools the server's config leaves on (`McpServer.tools[t].allowed`)
  and the key's policies allow (`tools_allow` / `tools_deny` over `<server>.<tool>`; a tool that
  needs an escalation is listed, a stripped one is not).
* `tools/call`: governed like a model call: the policy stage (tool allow and deny, time windows,
  escalation over the tool's price, `max_cost_usd`), limits, and a budget hold of the tool's
  price (`McpTool.price_nanos`), all before the upstream server sees anything. A refusal is a
  tool error result (`isError: true`) naming the rule; it is recorded like any refusal (the
  call's `llm.call` with its decision, and the `policy.decision`). A served call is a `tool.call`
  event: the tool's price is booked as tool spend on the caller's run when it succeeded, nothing
  when the tool failed. The client's `params._meta` is forwarded. A paid tool (x402's MCP
  transport: a PaymentRequired tool error result) is relayed as is, or paid from the agent's
  wallet when its server's `payments` is "pay" (`dataplane.mcp_payments`).

Upstream failures (down, slow, HTTP errors, protocol errors) answer a JSON-RPC error naming the
server (`dataplane.mcp_upstream`), recorded as a `tool.call` with status `error`. Bad input gets
JSON-RPC errors: -32700 (not JSON), -32600 (not a request; batches are not supported), -32601
(unknown method), -32602 (bad params: no tool name, arguments not an object or over
MAX_ARGUMENT_BYTES, an unknown server). GET (no server-initiated stream) is 405; DELETE (no
session to end) 204.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from typing import Any

import structlog
from aiohttp import web

from dataplane import mcp_payments
from dataplane.call import Call
from dataplane.lifecycle import bearer
from dataplane.mcp_upstream import McpClients, McpUpstreamError, list_tools, request
from dataplane.pipeline import run
from dataplane.stages.governance import on_path
from schemas.entities import Limit, McpServer, McpTool
from schemas.errors import GatewayError, InvalidRequest, NotFound, PermissionDenied
from schemas.events import ToolCall
from schemas.http import read_limited
from schemas.ids import uuid7
from schemas.policy import PolicyInput, decide

log = structlog.get_logger(__name__)

MCP_ROUTE = "/mcp"
MCP_SERVER_ROUTE = "/mcp/{server:[a-z0-9][a-z0-9_-]{0,63}}"
SEPARATOR = "__"  # aggregate tool names: <server>__<tool> (MCP clients such as Claude Code take no dots)
MAX_ARGUMENT_BYTES = 1024 * 1024
SERVER_INFO = {"name": "alephant-gateway", "version": "1"}
# What the gateway answers `initialize` with: the client's version when it is one of these.
PROTOCOLS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
UPSTREAM_ERROR = -32000  # the upstream MCP server failed (the `data.code` says how)

_MSG: web.RequestKey[dict[str, Any]] = web.RequestKey("mcp_message", dict)
_CLIENTS = McpClients()


def _answer(msg_id: Any, *, result: Any = None, error: dict[str, Any] | None = None, status: int = 200,
            call: Call | None = None) -> web.Response:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id}
    if error is not None:
        body["error"] = error
    else:
        body["result"] = result
    headers = {"Alephant-Request-Id": call.ctx.request_id} if call is not None else {}
    return web.Response(status=status, body=json.dumps(body, separators=(",", ":")).encode(),
                        content_type="application/json", headers=headers)


def _rpc_error(msg_id: Any, code: int, message: str, *, status: int = 200, data: Any = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return _answer(msg_id, error=error, status=status)


def _tool_error(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True}


def _servers(call: Call) -> dict[str, McpServer]:
    """The MCP servers of the caller's workspace by name."""
    ws = call.vk.workspace_id
    return {name: s for (w, name), s in call.snap.mcp_servers.items() if w == ws}


def _headers(call: Call, server: McpServer) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, enc in server.headers_enc.items():
        secret = call.worker.provider_key(enc)
        if secret is not None:
            out[name] = secret.reveal()
    return out


def _resolve(call: Call, name: str) -> tuple[McpServer, str]:
    """(server, upstream tool name) of a tool name as this endpoint shows it."""
    servers = _servers(call)
    fixed = call.request.match_info.get("server")
    if fixed is not None:
        if fixed not in servers:
            raise NotFound(f"This workspace has no MCP server named '{fixed}'.", code="mcp_server_not_found")
        return servers[fixed], name
    for server_name in sorted(servers, key=len, reverse=True):  # longest first: names may hold "__"
        if name.startswith(server_name + SEPARATOR) and len(name) > len(server_name) + len(SEPARATOR):
            return servers[server_name], name[len(server_name) + len(SEPARATOR):]
    raise InvalidRequest(f"No MCP server of this workspace offers a tool named '{name[:128]}' (aggregate tool names "
                         f"are <server>{SEPARATOR}<tool>).", param="params.name", code="unknown_tool")


def _visible(call: Call, server: McpServer, tool: str, now: dt.datetime) -> bool:
    """Whether a key may see `tool`: on in the server's config, and its policies allow it (or
    would escalate it) without stripping it."""
    conf = server.tool(tool)
    if not conf.allowed:
        return False
    policies = on_path(call).policies
    ws = call.snap.workspaces.get(call.vk.workspace_id)
    qualified = f"{server.name}.{tool}"
    verdict = decide(policies, call.vk, ws, PolicyInput(
        endpoint=call.request.path, model="", provider_type="", tools=(qualified,), max_tokens=0,
        est_cost_nanos=conf.hold_nanos(), prompt=""), now)
    return (verdict.allowed or verdict.outcome == "escalate") and qualified not in verdict.strip_tools


def price_of(conf: McpTool, result: dict[str, Any]) -> int:
    """A served call's cost: the price per call, plus the unit price times the units the result
    reports in `structuredContent[unit_field]` (a non-negative integer, at most `max_units`)."""
    units = 0
    if conf.unit_field:
        structured = result.get("structuredContent")
        value = structured.get(conf.unit_field) if isinstance(structured, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            units = min(value, conf.max_units)
    return conf.price_nanos + conf.unit_price_nanos * units


class _Endpoint:
    """What every MCP request shares in the pipeline."""

    name = "mcp"
    governed = False
    records_success = False

    def credential(self, request: web.Request) -> str:
        return bearer(request)

    async def intake(self, call: Call) -> None:
        call.requested_model = "mcp/" + call.request.match_info.get("server", "*")

    def plan(self, call: Call) -> None:
        call.max_tokens = 0
        call.input_bound = 0

    def set_max_tokens(self, call: Call, value: int) -> bool:
        return True  # no tokens

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return False  # a tool call cannot go out without its tool: refused instead


class McpMeta(_Endpoint):
    """`initialize`, `ping`, `tools/list`: nothing spent, nothing recorded."""

    async def dispatch(self, call: Call) -> web.StreamResponse:
        msg = call.request[_MSG]
        method, msg_id = msg["method"], msg.get("id")
        fixed = call.request.match_info.get("server")
        servers = _servers(call)
        if fixed is not None and fixed not in servers:
            raise NotFound(f"This workspace has no MCP server named '{fixed}'.", code="mcp_server_not_found")
        if method == "initialize":
            params = msg.get("params")
            asked = params.get("protocolVersion") if isinstance(params, dict) else None
            version = asked if asked in PROTOCOLS else PROTOCOLS[0]
            return _answer(msg_id, call=call, result={
                "protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": SERVER_INFO,
                "instructions": "Tools of the MCP servers this key may use, governed and priced by Alephant."})
        if method == "ping":
            return _answer(msg_id, result={}, call=call)
        return _answer(msg_id, result={"tools": await self._tools(call, servers, fixed)}, call=call)

    async def _tools(self, call: Call, servers: dict[str, McpServer], fixed: str | None) -> list[dict[str, Any]]:
        chosen = [servers[fixed]] if fixed is not None else [servers[n] for n in sorted(servers)]
        now = dt.datetime.now(dt.UTC)
        out: list[dict[str, Any]] = []
        for server in chosen:
            try:
                tools = await list_tools(_CLIENTS, call.worker.session, server, _headers(call, server))
            except McpUpstreamError as exc:
                if fixed is not None:
                    raise
                log.warning("mcp_list_failed", server=server.name, code=exc.code)
                continue  # the aggregate lists the servers that answer
            for tool in tools:
                if _visible(call, server, tool["name"], now):
                    out.append(tool if fixed is not None else {**tool, "name": server.name + SEPARATOR + tool["name"]})
        return out


class McpToolCall(_Endpoint):
    """`tools/call`: governed, priced, recorded (see the module docstring)."""

    governed = True

    async def intake(self, call: Call) -> None:
        params = call.request[_MSG].get("params")
        if not isinstance(params, dict) or not isinstance(params.get("name"), str) or not params["name"]:
            raise InvalidRequest("tools/call needs params.name, the tool's name.", param="params.name")
        arguments = params.get("arguments", {})
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise InvalidRequest("params.arguments must be an object.", param="params.arguments")
        if len(json.dumps(arguments, separators=(",", ":"))) > MAX_ARGUMENT_BYTES:
            raise InvalidRequest(f"params.arguments is over the {MAX_ARGUMENT_BYTES}-byte limit.",
                                 param="params.arguments", code="arguments_too_large")
        if not isinstance(params.get("_meta", {}), dict):
            raise InvalidRequest("params._meta must be an object.", param="params._meta")
        server, tool = _resolve(call, params["name"])
        call.request[_TOOL] = (server, tool, arguments)
        call.raw = call.request[_MSG]  # what the body archive keeps as the request
        call.requested_model = f"mcp/{server.name}"

    def plan(self, call: Call) -> None:
        super().plan(call)
        server, tool, _ = call.request[_TOOL]
        conf = server.tool(tool)
        if not conf.allowed:
            raise PermissionDenied(f"The tool '{server.name}.{tool}' is switched off for every key (MCP server "
                                   f"'{server.name}' config).", code="tool_disabled")
        call.tools = (f"{server.name}.{tool}",)
        call.fixed_cost_nanos = conf.hold_nanos()  # the most it may cost; settled at what it did
        if conf.calls_per_minute is not None or conf.max_concurrent is not None:
            # The tool's own limits, counted across the workspace's keys like any limit (Redis).
            ws = call.vk.workspace_id
            base = on_path(call)
            call.on_path = dataclasses.replace(base, limits=(*base.limits, Limit(
                id=f"tool:{server.name}.{tool}", workspace_id=ws, scope="workspace", scope_id=ws,
                rpm=conf.calls_per_minute, concurrency=conf.max_concurrent)))

    async def dispatch(self, call: Call) -> web.StreamResponse:
        server, tool, arguments = call.request[_TOOL]
        msg_id = call.request[_MSG].get("id")
        meta = call.request[_MSG]["params"].get("_meta")  # forwarded as is (progress, x402/payment, ...)
        params = {"name": tool, "arguments": arguments, **({"_meta": meta} if isinstance(meta, dict) else {})}
        started = time.perf_counter()

        async def send(p: dict[str, Any]) -> dict[str, Any]:
            return await request(_CLIENTS, call.worker.session, server, _headers(call, server), "tools/call", p)
        paid = None
        try:
            result = await send(params)
            document = mcp_payments.payment_required(result)
            if document is not None and server.payments == "pay" and mcp_payments.PAYMENT_META not in (meta or {}):
                paid = await mcp_payments.pay(call, server, tool, params, document, server.tool(tool).hold_nanos(),
                                              send)
                result = paid.result
        except McpUpstreamError as exc:
            call.status, call.error_code = exc.status, exc.code
            call.success_event = self._event(call, server, tool, "error", started, 0, exc.code)
            return _answer(msg_id, call=call, error={"code": UPSTREAM_ERROR, "message": exc.message,
                                                     "data": {"code": exc.code, "server": server.name}})
        failed = bool(result.get("isError"))
        call.cost_nanos = 0 if failed else price_of(server.tool(tool), result)
        error = None if not failed else "mcp_payment_refused" if paid is not None and paid.event is None else \
            "mcp_payment_required" if mcp_payments.payment_required(result) else "tool_error"
        call.success_event = self._event(call, server, tool, "error" if failed else "ok", started, call.cost_nanos,
                                         error)
        if paid is not None and paid.event is not None:  # the payment: its own spend, on the same run
            call.worker.events.emit(paid.event)
            call.cost_nanos += paid.nanos
        return _answer(msg_id, result=result, call=call)

    def _event(self, call: Call, server: McpServer, tool: str, status: str, started: float, cost: int,
               error_code: str | None) -> ToolCall:
        ctx = call.ctx
        return ToolCall(
            event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=call.vk.workspace_id,
            agent_id=ctx.agent_id, run_id=ctx.run_id, session_id=ctx.session_id, workflow_id=ctx.workflow_id,
            request_id=ctx.request_id, snapshot_revision=call.snap.revision, trace_id=call.trace_id,
            key_id=call.vk.id, department_id=call.department_id, member_id=call.member_id,
            server=server.name, tool=tool[:256], status=status, error_code=error_code, mcp_server_id=server.id,
            latency_ms=round((time.perf_counter() - started) * 1000, 3), cost_nanos=cost, body_key=call.archive_key())


_TOOL: web.RequestKey[tuple[McpServer, str, dict[str, Any]]] = web.RequestKey("mcp_tool", tuple)
_META = McpMeta()
_CALL = McpToolCall()
_METHODS: dict[str, McpMeta | McpToolCall] = {"initialize": _META, "ping": _META, "tools/list": _META,
                                               "tools/call": _CALL}


async def _message(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON-RPC message, or the error answer for a body that is not one."""
    from dataplane.state import WORKER

    try:
        raw = await read_limited(request, request.app[WORKER].settings.max_body_bytes)
    except GatewayError as err:
        return _rpc_error(None, INVALID_REQUEST, err.message, status=err.status)
    try:
        msg = json.loads(raw)
    except ValueError:
        return _rpc_error(None, PARSE_ERROR, "The body is not JSON.", status=400)
    if isinstance(msg, list):
        return _rpc_error(None, INVALID_REQUEST, "JSON-RPC batches are not supported; send one message per POST.",
                          status=400)
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
        return _rpc_error(None, INVALID_REQUEST, "Not a JSON-RPC 2.0 message (\"jsonrpc\": \"2.0\" is required).",
                          status=400)
    msg_id = msg.get("id")
    if ("id" in msg and not isinstance(msg_id, str | int)) or isinstance(msg_id, bool):
        return _rpc_error(None, INVALID_REQUEST, "A JSON-RPC id must be a string or an integer.", status=400)
    if "method" in msg and not isinstance(msg["method"], str):
        return _rpc_error(msg_id, INVALID_REQUEST, "\"method\" must be a string.", status=400)
    return msg


async def mcp(request: web.Request) -> web.StreamResponse:
    """The route handler of `/mcp` and `/mcp/{server}`."""
    if request.method == "DELETE":
        return web.Response(status=204)
    if request.method != "POST":
        return web.Response(status=405, headers={"Allow": "POST, DELETE"},
                            text="This MCP endpoint opens no server-initiated stream: POST JSON-RPC messages.")
    msg = await _message(request)
    if isinstance(msg, web.Response):
        return msg
    if "method" not in msg:
        return web.Response(status=202)  # a response to nothing we asked: accepted, ignored
    if "id" not in msg:
        return web.Response(status=202)  # a notification (initialized, cancelled, ...): nothing to answer
    msg_id, method = msg["id"], msg["method"]
    endpoint = _METHODS.get(method)
    if endpoint is None:
        return _rpc_error(msg_id, METHOD_NOT_FOUND, f"Method '{method[:100]}' is not offered by this MCP endpoint "
                          "(it serves tools: initialize, ping, tools/list, tools/call).")
    request[_MSG] = msg
    try:
        return await run(request, endpoint)
    except GatewayError as err:
        return _refusal(msg_id, err, endpoint is _CALL)


def _refusal(msg_id: Any, err: GatewayError, tool_call: bool) -> web.Response:
    """A request the pipeline refused: an authentication failure is HTTP 401 (the client must fix
    its key); bad params a -32602; a refused tool call a tool error result naming the rule."""
    if err.status == 401:
        return _rpc_error(msg_id, INVALID_REQUEST, err.message, status=401, data={"code": err.code})
    if err.status in (400, 404, 413, 422):
        return _rpc_error(msg_id, INVALID_PARAMS, err.message, data={"code": err.code, "param": err.param})
    if tool_call and err.status in (402, 403, 429):
        return _answer(msg_id, result=_tool_error(f"Refused by Alephant ({err.code}): {err.message}"))
    return _rpc_error(msg_id, INTERNAL_ERROR, err.message, data={"code": err.code})


__all__ = ["MCP_ROUTE", "MCP_SERVER_ROUTE", "mcp"]
