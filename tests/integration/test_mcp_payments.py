"""Paid MCP tools over x402's MCP transport, end to end (issue 16 item 4, issue 12's outbound
side): the official SDK client calls, through the gateway's `/mcp/{name}`, a tool of a paid MCP
server. That server (`PaidMcpServer`, below: plain aiohttp speaking the handshake-era protocol,
initialize -> tools/list -> tools/call) answers an unpaid call with a tool error result carrying an
x402 v2 `PaymentRequired` in `structuredContent`, and a call paying in `_meta["x402/payment"]` by
verifying and settling the payload with the fake facilitator on its fake USDC chain (as the
gateway's own paid endpoints do in tests/integration/test_egress.py), answering with its
`SettlementResponse` in `_meta["x402/payment-response"]`.

Each test has a workspace of its own (tests/integration/test_mcp_gateway.py's `Org`): an agent, its
key, the paid server registered as `paid` with `payments` "pay" or "pass", and in "pay" a wallet
open to the agent alone."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import psycopg
import pytest_asyncio
from aiohttp import web

from tests.conftest import Gateway, eventually
from tests.fakes.facilitator import BASE_SEPOLIA_USDC, FakeFacilitator, pay
from tests.fakes.mcp_server import mcp_client
from tests.integration.test_mcp_gateway import Org, journal, text

PAY_TO = "0x" + "cd" * 20
PRICE = "10000"  # atomic USDC (6 decimals): $0.01


class PaidMcpServer:
    """A paid MCP server on a free loopback port: tool `premium(q)` costs PRICE of USDC per call,
    tool `free(q)` nothing. `calls` are the `tools/call` params it received; `refuse_settle`
    makes it answer a paid call with a failed settlement (isError, `success: false`)."""

    def __init__(self, facilitator: FakeFacilitator) -> None:
        self.facilitator = facilitator
        self.calls: list[dict[str, Any]] = []
        self.refuse_settle = False
        self.url = ""
        self._runner: web.AppRunner | None = None

    def paid_calls(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if "x402/payment" in (c.get("_meta") or {})]

    def required(self, error: str = "Payment required to call premium") -> dict[str, Any]:
        return {"x402Version": 2, "error": error,
                "resource": {"url": "mcp://tool/premium", "description": "A premium answer",
                             "mimeType": "application/json"},
                "accepts": [{"scheme": "exact", "network": "eip155:84532", "amount": PRICE,
                             "asset": BASE_SEPOLIA_USDC, "payTo": PAY_TO, "maxTimeoutSeconds": 60,
                             "extra": {"name": "USDC", "version": "2"}}]}

    def _payment_error(self, error: str, receipt: dict[str, Any] | None = None) -> dict[str, Any]:
        document = self.required(error)
        result: dict[str, Any] = {"isError": True, "structuredContent": document,
                                  "content": [{"type": "text", "text": json.dumps(document)}]}
        if receipt is not None:
            result["_meta"] = {"x402/payment-response": receipt}
        return result

    async def _facilitate(self, route: str, payload: Any) -> dict[str, Any]:
        body = {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": self.required()["accepts"][0]}
        async with aiohttp.ClientSession() as http, http.post(self.facilitator.base_url + route, json=body) as resp:
            answer: dict[str, Any] = await resp.json()
            return answer

    async def _call(self, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(params)
        q = str((params.get("arguments") or {}).get("q", ""))
        if params.get("name") == "free":
            return {"content": [{"type": "text", "text": f"free answer for {q}"}], "isError": False}
        payload = (params.get("_meta") or {}).get("x402/payment")
        if payload is None:
            return self._payment_error("Payment required to call premium")
        verdict = await self._facilitate("/verify", payload)
        if not verdict.get("isValid"):
            return self._payment_error(f"Payment invalid: {verdict.get('invalidReason')}")
        if self.refuse_settle:
            return self._payment_error("Settlement failed", {"success": False, "errorReason": "insufficient_funds",
                                                             "transaction": "", "network": "eip155:84532"})
        receipt = await self._facilitate("/settle", payload)
        if not receipt.get("success"):
            return self._payment_error("Settlement failed", receipt)
        return {"content": [{"type": "text", "text": f"premium answer for {q}"}], "isError": False,
                "_meta": {"x402/payment-response": receipt}}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return web.Response(status=405)
        msg = await request.json()
        method, params = msg.get("method"), msg.get("params") or {}
        if "id" not in msg:
            return web.Response(status=202)  # notifications/initialized
        if method == "initialize":
            result: dict[str, Any] = {"protocolVersion": params.get("protocolVersion", "2025-11-25"),
                                      "capabilities": {"tools": {}}, "serverInfo": {"name": "paid", "version": "1"}}
        elif method == "tools/list":
            schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
            result = {"tools": [{"name": "premium", "description": "A paid answer.", "inputSchema": schema},
                                {"name": "free", "description": "A free answer.", "inputSchema": schema}]}
        elif method == "tools/call":
            result = await self._call(params)
        else:
            return web.json_response({"jsonrpc": "2.0", "id": msg["id"],
                                      "error": {"code": -32601, "message": f"Method not found: {method}"}})
        return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result})

    async def __aenter__(self) -> PaidMcpServer:
        app = web.Application()
        app.router.add_route("*", "/mcp", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/mcp"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest_asyncio.fixture(scope="module")
async def facilitator() -> AsyncIterator[FakeFacilitator]:
    async with FakeFacilitator() as fac:
        yield fac


@pytest_asyncio.fixture
async def seller(facilitator: FakeFacilitator) -> AsyncIterator[PaidMcpServer]:
    async with PaidMcpServer(facilitator) as srv:
        yield srv


async def paid_org(gateway: Gateway, seller: PaidMcpServer, payments: str = "pay", *, max_amount: str = "50000",
                   budget_usd: str | None = None, wallet: bool = True, **wallet_fields: Any) -> Org:
    tag = os.urandom(4).hex()
    ws, agent = f"mcpp{tag}", f"agent-{tag}"
    org = Org(gateway, ws, agent, "", "paid")
    org.admin("POST", "/admin/v1/workspaces", {"id": ws, "name": "MCP payments test"})
    org.create("agents", id=agent, name="Tool buyer")
    org.create("mcp-servers", name="paid", url=seller.url, payments=payments)
    if budget_usd is not None:
        org.create("budgets", scope="agent", scope_id=agent, period="month", limit_usd=budget_usd)
    if wallet:
        org.create("wallets", name=f"w-{tag}", private_key="0x" + os.urandom(32).hex(), agent_ids=[agent],
                   **({"assets": [{"network": "eip155:84532", "asset": BASE_SEPOLIA_USDC, "max_amount": max_amount,
                                   "decimals": 6}]} | wallet_fields))
    org.key = org.create("virtual-keys", name="buyer", agent_id=agent)["key"]
    await org.synced()
    return org


async def test_pay_mode_pays_the_tool_once_and_books_the_payment_on_the_run(
        gateway: Gateway, seller: PaidMcpServer, facilitator: FakeFacilitator) -> None:
    org = await paid_org(gateway, seller, budget_usd="1.00")
    address = org.admin("GET", f"/admin/v1/wallets?workspace_id={org.ws}")["data"][0]["address"]
    balance, settles = facilitator.chain.balance(address), facilitator.settles
    run = f"run-paid-{org.ws}"
    async with mcp_client(org.url("paid"), org.headers(run=run)) as client:
        result = await client.call_tool("premium", {"q": "weather"})
    assert not result.is_error, text(result)
    assert text(result) == "premium answer for weather"
    assert result.meta and result.meta["x402/payment-response"]["success"] is True
    assert len(seller.calls) == 2 and len(seller.paid_calls()) == 1  # one unpaid call, exactly one paid retry
    paid = seller.paid_calls()[0]
    assert paid["name"] == "premium" and paid["arguments"] == {"q": "weather"}
    assert paid["_meta"]["x402/payment"]["accepted"]["amount"] == PRICE  # the payload object, not base64
    assert facilitator.settles == settles + 1
    assert facilitator.chain.balance(address) == balance - int(PRICE)  # the wallet paid, on chain

    async def spend_of() -> list[dict[str, Any]] | None:
        return await journal(gateway, "payment.outbound", "run_id", run) or None
    spend = (await eventually(spend_of, timeout=20))[0]
    assert (spend["amount_nanos"], spend["rail"], spend["amount_atomic"], spend["agent_id"]) == \
        (10_000_000, "x402", PRICE, org.agent)
    assert spend["payee"].lower() == PAY_TO.lower() and spend["resource"] == "mcp://paid/premium"
    assert spend["transaction"] == result.meta["x402/payment-response"]["transaction"]
    calls = await eventually(lambda: _rows(journal(gateway, "tool.call", "run_id", run)), timeout=20)
    assert [(c["tool"], c["status"], c["cost_nanos"]) for c in calls] == [("premium", "ok", 0)]

    async def booked() -> list[tuple[int, str, str]] | None:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute("SELECT amount, debit_account_id, credit_account_id FROM ledger_transfer "
                                     "WHERE run_id = %s AND workspace_id = %s", (run, org.ws))
            rows = [(int(a), d, c) for a, d, c in await cur.fetchall()]
        return rows or None
    rows = await eventually(booked, timeout=20)
    assert len(rows) == 1 and rows[0][0] == 10_000_000 and rows[0][1] == f"agent:{org.ws}:{org.agent}:payments_out"

    async def run_summary() -> dict[str, Any] | None:
        status, found = await asyncio.to_thread(gateway.admin.request, "GET",
                                                f"/admin/v1/runs/{run}?workspace_id={org.ws}")
        return found if status == 200 and int(found.get("payments_out_nanos", 0)) == 10_000_000 else None
    await eventually(run_summary, timeout=20)
    budget = org.admin("GET", f"/admin/v1/budgets?workspace_id={org.ws}")["data"][0]

    async def settled() -> dict[str, Any] | None:  # the hold settled at the payment's price
        usage: dict[str, Any] = await asyncio.to_thread(org.admin, "GET", f"/admin/v1/budgets/{budget['id']}")
        return usage if (usage["spent_usd"], usage["held_usd"]) == ("0.01", "0") else None
    await eventually(settled, timeout=20)


async def _rows(rows: Any) -> Any:
    found = await rows
    return found or None


async def test_pay_mode_reserves_the_payment_against_budgets_before_signing(
        gateway: Gateway, seller: PaidMcpServer, facilitator: FakeFacilitator) -> None:
    org = await paid_org(gateway, seller, budget_usd="0.005")  # the cap allows $0.01, the budget does not
    verifies = facilitator.verifies
    async with mcp_client(org.url("paid"), org.headers(run=f"run-budget-{org.ws}")) as client:
        refused = await client.call_tool("premium", {"q": "too dear"})
        free = await client.call_tool("free", {"q": "still"})
    assert refused.is_error and "budget_exceeded" in text(refused), text(refused)
    assert len(seller.calls) == 2 and not seller.paid_calls()  # the unpaid call and the free one: no paid retry
    assert facilitator.verifies == verifies
    assert text(free) == "free answer for still"
    assert not await journal(gateway, "payment.outbound", "workspace_id", org.ws)


async def test_a_refused_settlement_is_relayed_and_costs_nothing(
        gateway: Gateway, seller: PaidMcpServer) -> None:
    org = await paid_org(gateway, seller)
    seller.refuse_settle = True
    run = f"run-refused-{org.ws}"
    async with mcp_client(org.url("paid"), org.headers(run=run)) as client:
        result = await client.call_tool("premium", {"q": "x"})
    assert result.is_error and result.structured_content["error"] == "Settlement failed"
    assert result.meta and result.meta["x402/payment-response"]["success"] is False
    assert len(seller.paid_calls()) == 1
    calls = await eventually(lambda: _rows(journal(gateway, "tool.call", "run_id", run)), timeout=20)
    assert [(c["status"], c["cost_nanos"], c["error_code"]) for c in calls] == [("error", 0, "mcp_payment_refused")]
    assert not await journal(gateway, "payment.outbound", "run_id", run)


async def test_pass_mode_relays_the_payment_required_unchanged_and_forwards_a_client_payment(
        gateway: Gateway, seller: PaidMcpServer, facilitator: FakeFacilitator) -> None:
    org = await paid_org(gateway, seller, "pass")
    run = f"run-pass-{org.ws}"
    settles = facilitator.settles
    async with mcp_client(org.url("paid"), org.headers(run=run)) as client:
        result = await client.call_tool("premium", {"q": "x"})
        assert result.is_error and result.structured_content == seller.required()
        assert json.loads(text(result)) == seller.required()
        assert not seller.paid_calls() and facilitator.settles == settles  # the gateway paid nothing
        # The client pays itself: its `_meta["x402/payment"]` reaches the server as is.
        header = await pay({"PAYMENT-REQUIRED": base64.b64encode(json.dumps(seller.required()).encode()).decode()})
        payload = json.loads(base64.b64decode(header["PAYMENT-SIGNATURE"]))
        paid = await client.call_tool("premium", {"q": "y"}, meta=cast(Any, {"x402/payment": payload, "trace": "t1"}))
    assert not paid.is_error and text(paid) == "premium answer for y", text(paid)
    assert seller.paid_calls()[-1]["_meta"] == {"x402/payment": payload, "trace": "t1"}
    assert facilitator.settles == settles + 1
    assert not await journal(gateway, "payment.outbound", "run_id", run)


async def test_wallet_policy_refusals_are_tool_errors_naming_the_reason(
        gateway: Gateway, seller: PaidMcpServer, facilitator: FakeFacilitator) -> None:
    verifies = facilitator.verifies
    over = await paid_org(gateway, seller, max_amount="5000")
    async with mcp_client(over.url("paid"), over.headers()) as client:
        refused = await client.call_tool("premium", {"q": "x"})
    assert refused.is_error and "egress_payment_over_cap" in text(refused), text(refused)
    assert PRICE in text(refused) and "5000" in text(refused)

    off_list = await paid_org(gateway, seller, assets=[{"network": "eip155:8453", "asset": BASE_SEPOLIA_USDC,
                                                        "max_amount": "50000", "decimals": 6}])
    async with mcp_client(off_list.url("paid"), off_list.headers()) as client:
        refused = await client.call_tool("premium", {"q": "x"})
    assert refused.is_error and "egress_asset_not_allowed" in text(refused), text(refused)

    no_wallet = await paid_org(gateway, seller, wallet=False)
    async with mcp_client(no_wallet.url("paid"), no_wallet.headers()) as client:
        refused = await client.call_tool("premium", {"q": "x"})
    assert refused.is_error and "egress_no_wallet" in text(refused), text(refused)
    assert not seller.paid_calls() and facilitator.verifies == verifies  # nothing was signed or sent


async def test_the_admin_api_validates_and_shows_payments(gateway: Gateway, seller: PaidMcpServer) -> None:
    org = await paid_org(gateway, seller, "pass", wallet=False)
    server = org.admin("GET", f"/admin/v1/mcp-servers?workspace_id={org.ws}")["data"][0]
    assert server["payments"] == "pass"
    patched = org.admin("PATCH", f"/admin/v1/mcp-servers/{server['id']}", {"payments": "pay"})
    assert patched["payments"] == "pay" and patched["url"] == seller.url
    status, body = gateway.admin.request("POST", "/admin/v1/mcp-servers", {
        "workspace_id": org.ws, "name": "bad", "url": seller.url, "payments": "sometimes"})
    assert status == 400 and "payments" in json.dumps(body), body
