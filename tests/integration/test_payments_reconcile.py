"""Pending settlements of paid calls, reconciled (issue 12): a facilitator answering
`settlement_pending` leaves a served call with a `pending` memo and no revenue; an operator lists it
and resolves it once: settled books the revenue on the serving run (and a metered price's refund),
failed books a loss."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest_asyncio

from tests.conftest import Gateway, cli_json, eventually, run_cli
from tests.fakes.facilitator import BASE_SEPOLIA_USDC, FakeFacilitator, pay
from tests.integration.test_paid_endpoints import PAY_TO, _call, _challenge, _first, _journal


@pytest_asyncio.fixture(scope="module")
async def facilitator() -> AsyncIterator[FakeFacilitator]:
    async with FakeFacilitator() as fac:
        yield fac


def _endpoint(gateway: Gateway, facilitator: FakeFacilitator, price: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = gateway.admin.call("POST", "/admin/v1/paid-endpoints", {
        "workspace_id": "demo", "slug": f"pend-{os.urandom(3).hex()}", "serve": {"model": "mock/echo"},
        "price": price, "rails": {"x402": {"network": "eip155:84532", "pay_to": PAY_TO,
                                           "facilitator_url": facilitator.base_url,
                                           "extra": {"name": "USDC", "version": "2"}}}})
    return created


async def _pending_call(gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator,
                        endpoint: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A paid call whose settlement stays pending: its run id and its pending listing."""
    challenge = await _challenge(gateway, http, endpoint["slug"])
    facilitator.fail_settle = "settlement_pending"
    try:
        status, headers, body = await _call(gateway, http, endpoint["slug"], await pay(challenge))
    finally:
        facilitator.fail_settle = None
    assert status == 200, body  # served: the money may well have moved
    run_id = headers["Alephant-Run-Id"]

    async def listed() -> dict[str, Any] | None:
        rows = gateway.admin.call("GET", "/admin/v1/payments/pending?workspace_id=demo")["data"]
        return next((r for r in rows if r["run_id"] == run_id), None)
    return run_id, await eventually(listed, timeout=20)


async def test_a_pending_settlement_is_listed_then_resolved_once_as_revenue(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    endpoint = _endpoint(gateway, facilitator, {"per_call": {"amount": "10000", "asset": BASE_SEPOLIA_USDC}})
    run_id, pending = await _pending_call(gateway, http, facilitator, endpoint)
    assert (pending["endpoint_id"], pending["amount_nanos"], pending["refund_nanos"]) == (endpoint["id"],
                                                                                          10_000_000, 0)
    assert not await _journal(gateway, "payment.inbound", run_id=run_id)  # no revenue until it is resolved
    resolved = gateway.admin.call("POST", "/admin/v1/payments/resolve", {
        "workspace_id": "demo", "replay_key": pending["replay_key"], "outcome": "settled", "transaction": "0xabc"})
    assert resolved["outcome"] == "settled" and len(resolved["events"]) == 1
    revenue = await eventually(lambda: _first(_journal(gateway, "payment.inbound", run_id=run_id)), timeout=20)
    assert (revenue["amount_nanos"], revenue["endpoint_id"], revenue["payment_id"]) == (
        10_000_000, endpoint["id"], pending["replay_key"])
    assert revenue["event_id"] == resolved["events"][0]
    status, err = gateway.admin.request("POST", "/admin/v1/payments/resolve", {
        "workspace_id": "demo", "replay_key": pending["replay_key"], "outcome": "failed"})
    assert (status, err["error"]["code"]) == (409, "payment_already_resolved")
    rows = gateway.admin.call("GET", "/admin/v1/payments/pending?workspace_id=demo")["data"]
    assert pending["replay_key"] not in [r["replay_key"] for r in rows]


async def test_a_failed_one_is_a_loss_and_a_metered_one_books_its_refund(
        gateway: Gateway, http: aiohttp.ClientSession, facilitator: FakeFacilitator) -> None:
    endpoint = _endpoint(gateway, facilitator, {"per_call": {"amount": "10000", "asset": BASE_SEPOLIA_USDC}})
    run_id, pending = await _pending_call(gateway, http, facilitator, endpoint)
    listed = cli_json(gateway, "payments", "pending")["data"]
    assert pending["replay_key"] in [r["replay_key"] for r in listed]
    run_cli(gateway, "payments", "resolve", pending["replay_key"], "--failed")
    loss = await eventually(lambda: _first(_journal(gateway, "payment.event", run_id=run_id, status="loss")),
                            timeout=20)
    assert loss["amount_nanos"] == 10_000_000 and loss["replay_key"] == pending["replay_key"]
    assert not await _journal(gateway, "payment.inbound", run_id=run_id)

    metered = _endpoint(gateway, facilitator, {"per_token": {
        "asset": BASE_SEPOLIA_USDC, "input_per_mtok": "1000000", "output_per_mtok": "1000000", "max_amount": "100000"}})
    run_id, pending = await _pending_call(gateway, http, facilitator, metered)
    assert pending["amount_nanos"] > 0 and pending["amount_nanos"] + pending["refund_nanos"] == 100_000_000
    gateway.admin.call("POST", "/admin/v1/payments/resolve", {
        "workspace_id": "demo", "replay_key": pending["replay_key"], "outcome": "settled"})
    refund = await eventually(lambda: _first(_journal(gateway, "payment.event", run_id=run_id, status="refund_due")),
                              timeout=20)
    revenue = await eventually(lambda: _first(_journal(gateway, "payment.inbound", run_id=run_id)), timeout=20)
    assert (revenue["amount_nanos"], refund["amount_nanos"]) == (pending["amount_nanos"], pending["refund_nanos"])


async def test_bad_resolutions_get_clear_errors(gateway: Gateway) -> None:
    status, err = gateway.admin.request("POST", "/admin/v1/payments/resolve", {
        "workspace_id": "demo", "replay_key": "x402:84532:0xnone", "outcome": "settled"})
    assert (status, err["error"]["code"]) == (404, "pending_payment_not_found")
    status, err = gateway.admin.request("POST", "/admin/v1/payments/resolve", {
        "workspace_id": "demo", "replay_key": "x402:1", "outcome": "maybe"})
    assert status == 400 and err["error"]["param"] == "outcome"
    status, err = gateway.admin.request("GET", "/admin/v1/payments/pending")
    assert (status, err["error"]["code"]) == (400, "missing_workspace")
