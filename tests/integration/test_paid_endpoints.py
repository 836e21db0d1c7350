"""Paid endpoints over x402, end to end (issue 12): the real stack, the fake facilitator (the x402
SDK's own facilitator over a fake EIP-3009 USDC chain, real signature recovery), payments signed
locally with eth-account, and the built-in `mock/echo` model or a fake backend serving the call."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import psycopg
import pytest_asyncio
from aiohttp import web
from eth_account import Account
from mpp import Challenge
from mpp.methods.evm.client import charge as evm_client_charge
from mpp.runtime import CredentialParams

from tests.conftest import Gateway, cli_json, eventually
from tests.fakes.facilitator import BASE_SEPOLIA_USDC, FakeFacilitator, pay
from tests.fakes.upstream import FakeUpstream

PAY_TO = "0x" + "ab" * 20
CHAT = {"messages": [{"role": "user", "content": "Summarize: paid endpoints earn revenue."}]}


@pytest_asyncio.fixture(scope="module")
async def facilitator() -> AsyncIterator[FakeFacilitator]:
    async with FakeFacilitator() as fac:
        yield fac


def _create(gateway: Gateway, facilitator: FakeFacilitator, serve: dict[str, str], **extra: Any) -> dict[str, Any]:
    slug = f"cap-{os.urandom(3).hex()}"
    agent = gateway.admin.call("POST", "/admin/v1/agents", {"workspace_id": "demo", "name": slug})
    created: dict[str, Any] = gateway.admin.call("POST", "/admin/v1/paid-endpoints", {
        "workspace_id": "demo", "slug": slug, "serve": serve, "agent_id": agent["id"],
        "price": {"per_call": {"amount": "10000", "asset": BASE_SEPOLIA_USDC, "decimals": 6}},
        "rails": {"x402": {"network": "eip155:84532", "pay_to": PAY_TO, "facilitator_url": facilitator.base_url,
                           "extra": {"name": "USDC", "version": "2"}, **extra}}})
    return created


async def _call(gateway: Gateway, http: aiohttp.ClientSession, slug: str, headers: dict[str, str] | None = None,
                body: Any = CHAT, tail: str = "") -> tuple[int, dict[str, str], bytes]:
    url = f"{gateway.base_url.removesuffix('/v1')}/paid/{slug}{tail}"
    async with http.post(url, json=body, headers=headers or {}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def _challenge(gateway: Gateway, http: aiohttp.ClientSession, slug: str) -> tuple[dict[str, str], bytes]:
    async def live() -> tuple[dict[str, str], bytes] | None:
        status, headers, body = await _call(gateway, http, slug)
        return (headers, body) if status == 402 else None
    return await eventually(live)


@contextlib.asynccontextmanager
async def backend(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """An operator's agent service on a free loopback port, answering every path with `handler`;
    yields its base URL (`.../agent`)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/agent"
    finally:
        await runner.cleanup()


async def _journal(gateway: Gateway, kind: str, **where: str) -> list[dict[str, Any]]:
    sql = "SELECT body FROM event_journal WHERE type = %s" + "".join(f" AND body->>'{k}' = %s" for k in where)
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute(sql, (kind, *where.values()))
        return [dict(row[0]) for row in await cur.fetchall()]


async def test_an_unpaid_call_gets_one_402_with_every_rail(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    endpoint = _create(gateway, facilitator, {"model": "mock/echo"})
    headers, body = await _challenge(gateway, http, endpoint["slug"])
    assert headers["Cache-Control"] == "no-store" and headers["Content-Type"].startswith("application/problem+json")
    assert "PAYMENT-REQUIRED" in headers
    problem = json.loads(body)
    assert problem["status"] == 402 and problem["x402Version"] == 1 and problem["accepts"][0]["payTo"] == PAY_TO
    status, _, _ = await _call(gateway, http, "no-such-endpoint")
    assert status == 404


async def test_the_happy_path_serves_settles_and_books_revenue_on_the_serving_run(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    endpoint = _create(gateway, facilitator, {"model": "mock/echo"})
    challenge = await _challenge(gateway, http, endpoint["slug"])
    settled = facilitator.settles
    payer = Account.create()
    status, headers, body = await _call(gateway, http, endpoint["slug"], await pay(challenge, payer))
    assert status == 200, body
    assert "PAYMENT-RESPONSE" in headers and facilitator.settles == settled + 1
    assert json.loads(body)["choices"][0]["message"]["content"]
    run_id = headers["Alephant-Run-Id"]
    revenue = await eventually(lambda: _first(_journal(gateway, "payment.inbound", run_id=run_id)))
    assert (revenue["endpoint_id"], revenue["amount_nanos"], revenue["rail"]) == (endpoint["id"], 10_000_000, "x402")
    assert revenue["payer"].lower() == payer.address.lower()
    assert revenue["agent_id"] == endpoint["agent_id"]
    cost = await eventually(lambda: _first(_journal(gateway, "llm.call", run_id=run_id)))
    assert cost["ingress"] == "paid" and cost["agent_id"] == endpoint["agent_id"]  # model cost on the same run

    async def run_margin() -> dict[str, Any] | None:  # did the paid call earn more than it cost?
        status, run = gateway.admin.request("GET", f"/admin/v1/runs/{run_id}?workspace_id=demo")
        return run if status == 200 and run.get("revenue_usd") == "0.01" else None
    run = await eventually(run_margin)
    assert Decimal(run["margin_usd"]) == Decimal(run["revenue_usd"]) - Decimal(run["cost_usd"])
    assert Decimal(run["cost_usd"]) == Decimal(cost["cost_nanos"]) / 10**9
    # The endpoint's own books: revenue, the cost of the runs that served it, and the margin.
    books = gateway.admin.call("GET", f"/admin/v1/paid-endpoints/{endpoint['id']}")
    assert (books["calls"], books["revenue_nanos"], books["cost_nanos"]) == (1, 10_000_000, cost["cost_nanos"])
    assert books["margin_nanos"] == 10_000_000 - cost["cost_nanos"]


async def _first(rows: Any) -> dict[str, Any] | None:
    found = await rows
    return found[0] if found else None


async def test_a_replayed_payment_is_refused_and_a_concurrent_duplicate_delivers_once(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    endpoint = _create(gateway, facilitator, {"model": "mock/echo"})
    challenge = await _challenge(gateway, http, endpoint["slug"])
    payment = await pay(challenge)
    first, _, _ = await _call(gateway, http, endpoint["slug"], payment)
    assert first == 200
    status, _, body = await _call(gateway, http, endpoint["slug"], payment)
    assert status == 402 and b"already used" in body
    # The same fresh credential sent twice at once: one delivery and one settlement.
    payment = await pay(challenge)
    settles = facilitator.settles
    results = await asyncio.gather(*(_call(gateway, http, endpoint["slug"], payment) for _ in range(4)))
    statuses = sorted(s for s, _, _ in results)
    assert statuses.count(200) == 1 and set(statuses) <= {200, 402, 409}, statuses
    assert facilitator.settles == settles + 1


async def test_tampered_or_misdirected_payments_are_refused(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    endpoint = _create(gateway, facilitator, {"model": "mock/echo"})
    other = _create(gateway, facilitator, {"model": "mock/echo"}, pay_to="0x" + "cd" * 20)
    challenge = await _challenge(gateway, http, endpoint["slug"])
    other_challenge = await _challenge(gateway, http, other["slug"])
    # A payment made out to another payee is not this endpoint's.
    status, _, body = await _call(gateway, http, endpoint["slug"], await pay(other_challenge))
    assert status == 402 and b"payment refused" in body
    settles = facilitator.settles
    both = {**await pay(challenge), "X-PAYMENT": "e30="}
    status, _, body = await _call(gateway, http, endpoint["slug"], both)
    assert status == 400 and b"ambiguous_payment" in body
    assert facilitator.settles == settles


async def test_a_serving_failure_is_never_settled(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": "agent crashed"}, status=500)
    async with backend(broken) as url:
        endpoint = _create(gateway, facilitator, {"backend_url": url})
        challenge = await _challenge(gateway, http, endpoint["slug"])
        settles = facilitator.settles
        payment = await pay(challenge)
        status, headers, _ = await _call(gateway, http, endpoint["slug"], payment)
        assert status == 500 and "PAYMENT-RESPONSE" not in headers
        assert facilitator.settles == settles
        voided = await eventually(lambda: _first(_journal(gateway, "payment.event", endpoint_id=endpoint["id"],
                                                          status="voided")))
        assert voided["reason"] == "served 500"


async def test_a_backend_gets_the_run_and_request_ids_and_a_settlement_failure_is_a_loss(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    seen: list[dict[str, str]] = []

    async def agent(request: web.Request) -> web.Response:
        seen.append({"path": request.path, "run": request.headers.get("Alephant-Run-Id", ""),
                     "req": request.headers.get("Alephant-Request-Id", "")})
        return web.json_response({"answer": 42})
    async with backend(agent) as url:
        endpoint = _create(gateway, facilitator, {"backend_url": url})
        challenge = await _challenge(gateway, http, endpoint["slug"])
        status, headers, body = await _call(gateway, http, endpoint["slug"], await pay(challenge), tail="/ask")
        assert status == 200 and json.loads(body) == {"answer": 42}
        assert seen[-1]["path"] == "/agent/ask" and seen[-1]["run"] == headers["Alephant-Run-Id"]
        assert seen[-1]["req"] == headers["Alephant-Request-Id"]
        facilitator.fail_settle = "insufficient_funds"
        try:
            status, headers, body = await _call(gateway, http, endpoint["slug"], await pay(challenge))
        finally:
            facilitator.fail_settle = None
        assert status == 402 and "PAYMENT-RESPONSE" in headers and b"settlement failed" in body
        loss = await eventually(lambda: _first(_journal(gateway, "payment.event", endpoint_id=endpoint["id"],
                                                        status="loss")))
        assert loss["amount_nanos"] == 10_000_000 and loss["reason"] == "insufficient_funds"


def with_payment_identifier(payment: dict[str, str], pid: str) -> dict[str, str]:
    """The v2 payment with the `payment-identifier` extension (outside the signed authorization)."""
    payload = json.loads(base64.b64decode(payment["PAYMENT-SIGNATURE"]))
    payload["extensions"] = {**(payload.get("extensions") or {}), "payment-identifier": {"info": {"id": pid}}}
    return {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(payload).encode()).decode()}


async def test_a_payment_identifier_retry_returns_the_first_answer_and_a_different_payload_is_409(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    endpoint = _create(gateway, facilitator, {"model": "mock/echo"})
    challenge = await _challenge(gateway, http, endpoint["slug"])
    pid = f"order-{os.urandom(4).hex()}"
    payment = with_payment_identifier(await pay(challenge), pid)
    status, _, first = await _call(gateway, http, endpoint["slug"], payment)
    assert status == 200
    settles = facilitator.settles
    status, headers, again = await _call(gateway, http, endpoint["slug"], payment)
    assert (status, again, headers.get("Alephant-Payment")) == (200, first, "replayed")
    assert facilitator.settles == settles  # answered from the record: not served or charged twice
    other = with_payment_identifier(await pay(challenge), pid)
    status, _, body = await _call(gateway, http, endpoint["slug"], other)
    assert status == 409 and b"payment_identifier_mismatch" in body


async def test_done_when_a_backend_agent_is_paid_and_its_runs_margin_is_revenue_less_its_own_costs(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    """An operator's agent service behind /paid/{slug}: for each paid call it makes its own model
    call and reports a tool spend through the gateway, on the run the gateway gave it. The run's
    revenue, cost and margin in `alephant finance summary --group-by run` match a brute-force
    recomputation from the journal, and the ledger's revenue equals what the facilitator settled."""
    async def agent(request: web.Request) -> web.Response:
        run = request.headers["Alephant-Run-Id"]
        auth = {"Authorization": f"Bearer {gateway.demo_key}", "Alephant-Run-Id": run}
        async with http.post(gateway.base_url + "/chat/completions", headers=auth, json={
                "model": "mock/echo", "messages": [{"role": "user", "content": "summarise this"}]}) as resp:
            summary = (await resp.json())["choices"][0]["message"]["content"]
        async with http.post(gateway.base_url + "/alephant/spend", json={
                "amount_usd": "0.002", "vendor": "search-api", "tool": "web_search"},
                headers={**auth, "Idempotency-Key": f"spend-{run}"}) as resp:
            assert resp.status == 201, await resp.text()
        return web.json_response({"summary": summary})

    async with backend(agent) as url:
        endpoint = _create(gateway, facilitator, {"backend_url": url})
        challenge = await _challenge(gateway, http, endpoint["slug"])
        settled_before = len(facilitator.settled)
        runs = []
        for _ in range(2):
            status, headers, body = await _call(gateway, http, endpoint["slug"], await pay(challenge),
                                                tail="/summarise")
            assert status == 200 and json.loads(body)["summary"], body
            runs.append(headers["Alephant-Run-Id"])
    settled = facilitator.settled[settled_before:]
    assert len(settled) == 2

    async def ledger_revenue() -> int | None:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute("SELECT coalesce(sum(amount), 0), count(*) FROM ledger_transfer "
                                     "WHERE code = 'payment_inbound' AND run_id = ANY(%s)", (runs,))
            row = await cur.fetchone()
        return int(row[0]) if row is not None and row[1] == 2 else None
    assert await eventually(ledger_revenue) == sum(t.value for t in settled) * 1000  # 6-decimal atomic -> nano

    async def brute_force(run: str) -> tuple[int, int, int]:
        llm = sum(e["cost_nanos"] for e in await _journal(gateway, "llm.call", run_id=run))
        tool = sum(e["amount_nanos"] for e in await _journal(gateway, "tool.spend", run_id=run))
        revenue = sum(e["amount_nanos"] for e in await _journal(gateway, "payment.inbound", run_id=run))
        return revenue, llm, tool

    for run in runs:
        async def row(run: str = run) -> dict[str, Any] | None:
            rows = cli_json(gateway, "finance", "summary", "--group-by", "run", "--workspace", "demo",
                            "--format", "json")["data"]
            found = next((r for r in rows if r["run_id"] == run), None)
            return found if found is not None and int(found["tool_cost_nanos"]) > 0 else None
        summary = await eventually(row, timeout=20)
        revenue, llm, tool = await brute_force(run)
        assert (revenue, llm > 0, tool) == (10_000_000, True, 2_000_000)
        assert int(summary["revenue_nanos"]) == revenue
        assert int(summary["llm_cost_nanos"]) == llm and int(summary["tool_cost_nanos"]) == tool
        assert int(summary["margin_nanos"]) == revenue - llm - tool


async def test_a_pympp_client_and_an_x402_client_each_pay_the_same_endpoint(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    slug = f"both-{os.urandom(3).hex()}"
    endpoint = gateway.admin.call("POST", "/admin/v1/paid-endpoints", {
        "workspace_id": "demo", "slug": slug, "serve": {"model": "mock/echo"},
        "price": {"per_call": {"amount": "10000", "asset": BASE_SEPOLIA_USDC, "decimals": 6}},
        "rails": {"x402": {"network": "eip155:84532", "pay_to": PAY_TO, "facilitator_url": facilitator.base_url,
                           "extra": {"name": "USDC", "version": "2"}},
                  "mpp": {"realm": "gateway.test", "recipient": PAY_TO, "network": "eip155:84532",
                          "relayer_url": facilitator.base_url + "/mpp"}}})
    challenge = await _challenge(gateway, http, slug)
    # One 402 carries both rails.
    status, raw_headers = await _raw_challenge(gateway, http, slug)
    mpp_challenges = raw_headers.getall("WWW-Authenticate", [])
    assert status == 402 and len(mpp_challenges) == 1 and mpp_challenges[0].startswith("Payment ")
    assert "PAYMENT-REQUIRED" in raw_headers

    method = evm_client_charge(currency=BASE_SEPOLIA_USDC, account=Account.create(), chain_id=84532, decimals=6,
                               authorization={"name": "USDC", "version": "2"})
    credential = await method.create_credential(
        CredentialParams(challenge=Challenge.from_www_authenticate(mpp_challenges[0])))
    settles = facilitator.settles
    status, headers, body = await _call(gateway, http, slug, {"Authorization": credential})
    assert status == 200, body
    assert "Payment-Receipt" in headers and headers["Cache-Control"] == "private"
    assert facilitator.settles == settles + 1
    mpp_run = headers["Alephant-Run-Id"]
    status, _, body = await _call(gateway, http, slug, {"Authorization": credential})
    assert status == 402 and b"already used" in body  # single use
    status, headers, _ = await _call(gateway, http, slug, await pay(challenge))  # and the x402 client too
    assert status == 200 and "PAYMENT-RESPONSE" in headers
    revenue = await eventually(lambda: _first(_journal(gateway, "payment.inbound", run_id=mpp_run)))
    assert (revenue["rail"], revenue["endpoint_id"], revenue["amount_nanos"]) == ("mpp", endpoint["id"], 10_000_000)


async def _raw_challenge(gateway: Gateway, http: aiohttp.ClientSession, slug: str) -> tuple[int, Any]:
    async with http.post(f"{gateway.base_url.removesuffix('/v1')}/paid/{slug}", json=CHAT) as resp:
        await resp.read()
        return resp.status, resp.headers


async def test_a_streamed_paid_call_settles_upfront_and_books_revenue_on_delivery(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    endpoint = _create(gateway, facilitator, {"model": "mock/echo"})
    challenge = await _challenge(gateway, http, endpoint["slug"])
    settles = facilitator.settles
    status, headers, body = await _call(gateway, http, endpoint["slug"], await pay(challenge),
                                        body={**CHAT, "stream": True})
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/event-stream") and body.rstrip().endswith(b"data: [DONE]")
    assert "PAYMENT-RESPONSE" in headers and facilitator.settles == settles + 1  # settled before the stream
    run_id = headers["Alephant-Run-Id"]
    memo = await eventually(lambda: _first(_journal(gateway, "payment.event", run_id=run_id, status="settled")))
    revenue = await eventually(lambda: _first(_journal(gateway, "payment.inbound", run_id=run_id)))
    assert memo["amount_nanos"] == revenue["amount_nanos"] == 10_000_000
    assert not await _journal(gateway, "payment.event", run_id=run_id, status="refund_due")


async def test_a_streamed_paid_call_that_fails_owes_a_refund_and_books_no_revenue(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator,
        fake_provider: str, fake_upstream: FakeUpstream) -> None:
    endpoint = _create(gateway, facilitator, {"model": f"{fake_provider}/gpt-4o-mini"})
    challenge = await _challenge(gateway, http, endpoint["slug"])
    fake_upstream.fail_next(400)  # not retryable: the call fails after the payment settled
    status, headers, body = await _call(gateway, http, endpoint["slug"], await pay(challenge),
                                        body={**CHAT, "stream": True})
    assert status == 400, body
    request_id = headers["Alephant-Request-Id"]
    refund = await eventually(lambda: _first(_journal(gateway, "payment.event", request_id=request_id,
                                                      status="refund_due")))
    assert refund["amount_nanos"] == 10_000_000 and refund["endpoint_id"] == endpoint["id"]
    assert await _journal(gateway, "payment.event", request_id=request_id, status="settled")
    assert not await _journal(gateway, "payment.inbound", request_id=request_id)


async def test_a_per_token_price_earns_the_metered_charge_and_owes_back_the_rest(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    slug = f"meter-{os.urandom(3).hex()}"
    endpoint = gateway.admin.call("POST", "/admin/v1/paid-endpoints", {
        "workspace_id": "demo", "slug": slug, "serve": {"model": "mock/echo"},
        "price": {"per_token": {"asset": BASE_SEPOLIA_USDC, "decimals": 6, "input_per_mtok": "1000000",
                                "output_per_mtok": "2500000", "max_amount": "100000"}},
        "rails": {"x402": {"network": "eip155:84532", "pay_to": PAY_TO, "facilitator_url": facilitator.base_url,
                           "extra": {"name": "USDC", "version": "2"}}}})
    challenge = await _challenge(gateway, http, slug)
    asked = json.loads(base64.b64decode(challenge[0]["PAYMENT-REQUIRED"]))["accepts"][0]["amount"]
    assert asked == "100000"  # the caller authorizes the maximum
    payer = Account.create()
    status, headers, body = await _call(gateway, http, slug, await pay(challenge, payer))
    assert status == 200, body
    assert facilitator.settled[-1].value == 100_000  # settled whole ...
    run_id = headers["Alephant-Run-Id"]
    call = await eventually(lambda: _first(_journal(gateway, "llm.call", run_id=run_id)))
    usage = call["usage"]
    charge = -(-(usage["input_tokens"] * 1_000_000 + usage["output_tokens"] * 2_500_000) // 1_000_000)
    assert 0 < charge < 100_000
    revenue = await eventually(lambda: _first(_journal(gateway, "payment.inbound", run_id=run_id)))
    refund = await eventually(lambda: _first(_journal(gateway, "payment.event", run_id=run_id, status="refund_due")))
    assert revenue["amount_nanos"] == charge * 1_000  # ... earns the metered charge ...
    assert refund["amount_nanos"] == (100_000 - charge) * 1_000 and refund["reason"] == "metered"  # ... owes the rest

    async def books() -> dict[str, Any] | None:  # the endpoint's books show both
        got = gateway.admin.call("GET", f"/admin/v1/paid-endpoints/{endpoint['id']}")
        return got if got["refunds_due_nanos"] == refund["amount_nanos"] and got["calls"] == 1 else None
    got = await eventually(books, timeout=20)
    assert got["revenue_nanos"] == revenue["amount_nanos"]
