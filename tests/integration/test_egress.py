"""Outbound payments through `/egress`, end to end (issue 12): an agent of the demo workspace
calls a paid endpoint (the gateway's own `/paid/{slug}`, over both rails, settled by the fake
facilitator on its fake USDC chain) through the egress; the gateway pays from the workspace's
wallet within the wallet's policy and the agent's budget, and books `payment.outbound` on the
agent's run, beside the seller's `payment.inbound`."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import psycopg
import pytest_asyncio
from aiohttp import web
from eth_account import Account

from tests.conftest import Gateway, eventually
from tests.fakes.facilitator import BASE_SEPOLIA_USDC, FakeFacilitator
from tests.integration.test_paid_endpoints import PAY_TO, backend

CHAT = {"messages": [{"role": "user", "content": "Summarise: agents pay agents."}]}


@pytest_asyncio.fixture(scope="module")
async def facilitator() -> AsyncIterator[FakeFacilitator]:
    async with FakeFacilitator() as fac:
        yield fac


def _seller(gateway: Gateway, facilitator: FakeFacilitator, amount: str = "10000", *, x402: bool = True,
            mpp: bool = True) -> dict[str, Any]:
    slug = f"sell-{os.urandom(3).hex()}"
    rails: dict[str, Any] = {}
    if x402:
        rails["x402"] = {"network": "eip155:84532", "pay_to": PAY_TO, "facilitator_url": facilitator.base_url,
                         "extra": {"name": "USDC", "version": "2"}}
    if mpp:
        rails["mpp"] = {"realm": "seller.test", "recipient": PAY_TO, "network": "eip155:84532",
                        "relayer_url": facilitator.base_url + "/mpp"}
    created: dict[str, Any] = gateway.admin.call("POST", "/admin/v1/paid-endpoints", {
        "workspace_id": "demo", "slug": slug, "serve": {"model": "mock/echo"}, "rails": rails,
        "price": {"per_call": {"amount": amount, "asset": BASE_SEPOLIA_USDC, "decimals": 6}}})
    return created


def _buyer(gateway: Gateway, max_amount: str = "50000", budget_usd: str | None = None,
           **wallet: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A new agent with a key of its own (and a budget) and a wallet open to it alone: (key, wallet,
    private key). The wallet is written last: once a worker sees it, it sees the rest."""
    agent = gateway.admin.call("POST", "/admin/v1/agents", {"workspace_id": "demo",
                                                            "name": f"buyer-{os.urandom(3).hex()}"})
    key = gateway.create_key(agent_id=agent["id"])
    if budget_usd is not None:
        gateway.admin.call("POST", "/admin/v1/budgets", {"workspace_id": "demo", "scope": "agent",
                                                         "scope_id": agent["id"], "period": "month",
                                                         "limit_usd": budget_usd})
    private_key = "0x" + os.urandom(32).hex()
    created = gateway.admin.call("POST", "/admin/v1/wallets", {
        "workspace_id": "demo", "name": f"w-{os.urandom(3).hex()}", "private_key": private_key,
        "agent_ids": [agent["id"]], "assets": [{"network": "eip155:84532", "asset": BASE_SEPOLIA_USDC,
                                                "max_amount": max_amount, "decimals": 6}], **wallet})
    return key, created, private_key


def _paid_url(gateway: Gateway, slug: str) -> str:
    return f"{gateway.base_url.removesuffix('/v1')}/paid/{slug}"


async def _egress(gateway: Gateway, http: aiohttp.ClientSession, key: dict[str, Any], url: str, *,
                  body: Any = CHAT, headers: dict[str, str] | None = None,
                  path: str = "") -> tuple[int, dict[str, str], bytes]:
    target = f"{gateway.base_url.removesuffix('/v1')}/egress" + (path or f"?url={quote(url, safe='')}")
    async with http.post(target, json=body, headers={"Authorization": f"Bearer {key['key']}", **(headers or {})}) \
            as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def _live(gateway: Gateway, http: aiohttp.ClientSession, key: dict[str, Any], url: str,
                **kw: Any) -> tuple[int, dict[str, str], bytes]:
    """The first answer once the new wallet and seller reached the worker (not 403 no-wallet / 404)."""
    async def ready() -> tuple[int, dict[str, str], bytes] | None:
        answer = await _egress(gateway, http, key, url, **kw)
        code = json.loads(answer[2]).get("error", {}).get("code") if answer[0] >= 400 and answer[2][:1] == b"{" \
            else None
        return None if code in ("egress_no_wallet", "paid_endpoint_not_found", "egress_alias_not_found") else answer
    return await eventually(ready)


async def _journal(gateway: Gateway, kind: str, **where: str) -> list[dict[str, Any]]:
    sql = "SELECT body FROM event_journal WHERE type = %s" + "".join(f" AND body->>'{k}' = %s" for k in where)
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute(sql, (kind, *where.values()))
        return [dict(row[0]) for row in await cur.fetchall()]


async def _one(gateway: Gateway, kind: str, **where: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        rows = await _journal(gateway, kind, **where)
        return rows[0] if rows else None
    return await eventually(found, timeout=20)


async def test_an_agent_pays_a_paid_endpoint_through_the_egress_and_both_sides_are_booked(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    seller = _seller(gateway, facilitator)
    key, wallet, private_key = _buyer(gateway)
    assert wallet["address"].lower() == Account.from_key(private_key).address.lower()
    run = f"run_buy_{os.urandom(4).hex()}"
    settles, balance = facilitator.settles, facilitator.chain.balance(wallet["address"])
    status, headers, body = await _live(gateway, http, key, _paid_url(gateway, seller["slug"]),
                                        headers={"Alephant-Run-Id": run})
    assert status == 200, body
    assert headers["Alephant-Payment"] == "paid" and "PAYMENT-RESPONSE" in headers
    assert json.loads(body)["choices"][0]["message"]["content"]
    assert facilitator.settles == settles + 1
    assert facilitator.chain.balance(wallet["address"]) == balance - 10_000  # the wallet paid, on chain
    spend = await _one(gateway, "payment.outbound", run_id=run)
    assert (spend["amount_nanos"], spend["rail"], spend["wallet_id"], spend["amount_atomic"]) == \
        (10_000_000, "x402", wallet["id"], "10000")
    assert spend["payee"].lower() == PAY_TO.lower() and spend["agent_id"] == key["agent_id"]
    assert spend["payment_id"] == headers["Alephant-Payment-Id"]
    revenue = await _one(gateway, "payment.inbound", payment_id=spend["payment_id"])
    assert revenue["amount_nanos"] == spend["amount_nanos"] and revenue["endpoint_id"] == seller["id"]

    async def run_summary() -> dict[str, Any] | None:  # the buyer's run shows the payment as spend
        status, found = gateway.admin.request("GET", f"/admin/v1/runs/{run}?workspace_id=demo")
        return found if status == 200 and int(found.get("payments_out_nanos", 0)) == 10_000_000 else None
    await eventually(run_summary, timeout=20)
    for row in await _journal(gateway, "payment.outbound", run_id=run):  # the key is never in an event
        assert private_key[2:] not in json.dumps(row)


async def test_an_mpp_only_seller_is_paid_over_mpp(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    seller = _seller(gateway, facilitator, x402=False)
    key, wallet, _ = _buyer(gateway)
    run = f"run_mpp_{os.urandom(4).hex()}"
    status, headers, body = await _live(gateway, http, key, _paid_url(gateway, seller["slug"]),
                                        headers={"Alephant-Run-Id": run})
    assert status == 200, body
    assert headers["Alephant-Payment"] == "paid" and "Payment-Receipt" in headers
    spend = await _one(gateway, "payment.outbound", run_id=run)
    assert (spend["rail"], spend["amount_nanos"], spend["wallet_id"]) == ("mpp", 10_000_000, wallet["id"])


async def test_a_payment_over_the_cap_or_the_budget_is_refused_before_signing(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    seller = _seller(gateway, facilitator, "20000")
    key, _, _ = _buyer(gateway, max_amount="10000")
    verifies, settles = facilitator.verifies, facilitator.settles
    status, _, body = await _live(gateway, http, key, _paid_url(gateway, seller["slug"]))
    error = json.loads(body)["error"]
    assert (status, error["code"], error["type"]) == (403, "egress_payment_over_cap", "permission_error"), body
    assert "20000" in error["message"] and "10000" in error["message"]
    assert (facilitator.verifies, facilitator.settles) == (verifies, settles)  # no credential reached the seller

    key, _, _ = _buyer(gateway, budget_usd="0.015")  # a cap that allows $0.02, a budget that does not
    status, _, body = await _live(gateway, http, key, _paid_url(gateway, seller["slug"]))
    assert (status, json.loads(body)["error"]["code"]) == (429, "budget_exceeded"), body
    assert (facilitator.verifies, facilitator.settles) == (verifies, settles)
    assert not await _journal(gateway, "payment.outbound", agent_id=key["agent_id"])


async def test_an_asset_off_the_allowlist_is_refused_and_a_free_answer_is_relayed_as_is(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    seller = _seller(gateway, facilitator)
    key, _, _ = _buyer(gateway, assets=[{"network": "eip155:8453", "asset": BASE_SEPOLIA_USDC,
                                         "max_amount": "50000", "decimals": 6}])
    status, _, body = await _live(gateway, http, key, _paid_url(gateway, seller["slug"]))
    assert (status, json.loads(body)["error"]["code"]) == (403, "egress_asset_not_allowed"), body

    seen: list[dict[str, str]] = []

    async def free(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"ok": True, "path": request.path, "query": request.query_string},
                                 headers={"X-Seller": "1"})
    async with backend(free) as base:
        status, headers, body = await _live(gateway, http, key, base + "/tool?q=1",
                                            headers={"Alephant-Run-Id": "run_free", "X-Trace": "t"})
        assert status == 200 and json.loads(body) == {"ok": True, "path": "/agent/tool", "query": "q=1"}
        assert headers["X-Seller"] == "1" and "Alephant-Payment" not in headers
        forwarded = {k.lower(): v for k, v in seen[-1].items()}
        assert forwarded["x-trace"] == "t"  # the caller's own headers go through ...
        assert "authorization" not in forwarded and "alephant-run-id" not in forwarded  # ... not its gateway key


async def test_aliases_and_bad_input_get_clear_errors(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    async def free(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})
    async with backend(free) as base:
        alias = f"svc{os.urandom(3).hex()}"
        key, _, _ = _buyer(gateway, aliases={alias: base})
        status, _, body = await _live(gateway, http, key, "", path=f"/{alias}/v1/do")
        assert status == 200 and json.loads(body) == {"path": "/agent/v1/do"}
    status, _, body = await _egress(gateway, http, key, "", path="/nope/x")
    assert (status, json.loads(body)["error"]["code"]) == (404, "egress_alias_not_found")
    for url in ("", "ftp://example.com/x", "http://user:pw@example.com/", "not a url"):
        status, _, body = await _egress(gateway, http, key, url, path="" if url else "?")
        error = json.loads(body)["error"]
        assert (status, error["code"], error["param"]) == (400, "invalid_url", "url"), (url, body)
    status, _, body = await _egress(gateway, http, key, "http://169.254.169.254/latest/meta-data")
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_address_refused"
    async with http.get(f"{gateway.base_url.removesuffix('/v1')}/egress?url=http://example.com") as resp:
        assert resp.status == 401  # a virtual key is required
