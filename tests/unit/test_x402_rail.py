"""The x402 rail: the 402 challenge, parsing payment headers, and real signed payments verified
and settled over HTTP by the fake facilitator (the SDK's facilitator over a fake USDC chain)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account
from multidict import CIMultiDict

from dataplane.payments import x402_rail as rail
from schemas.entities import PaidAmount, PaidEndpoint, PaidPrice, PaidRails, PaidServe, X402Rail
from schemas.errors import InvalidRequest
from tests.fakes.facilitator import BASE_SEPOLIA_USDC, FakeFacilitator, pay

PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
URL = "https://gw.example/paid/summarize/v1/run"


def endpoint(facilitator_url: str = "http://127.0.0.1:9", *, versions: tuple[int, ...] = (2, 1),
             amount: str = "10000", decimals: int = 6, network: str = "eip155:84532",
             pay_to: str = PAY_TO) -> PaidEndpoint:
    return PaidEndpoint(
        id="pe_1", workspace_id="ws_1", slug="summarize", serve=PaidServe(model="mock/echo"),
        price=PaidPrice(per_call=PaidAmount(amount=amount, asset=BASE_SEPOLIA_USDC, decimals=decimals)),
        rails=PaidRails(x402=X402Rail(network=network, pay_to=pay_to, facilitator_url=facilitator_url,
                                      versions=versions, max_timeout_s=60,
                                      extra={"name": "USDC", "version": "2"})),
        description="Summaries by the summarizer agent")


def b64(value: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def unb64(value: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.b64decode(value))
    return decoded


def tampered(headers: dict[str, str], change: Any) -> dict[str, str]:
    """The same payment header with ``change(payload)`` applied (the signature untouched)."""
    (name, value), = headers.items()
    payload = unb64(value)
    change(payload)
    return {name: b64(payload)}


@pytest.fixture(scope="module")
async def fac() -> AsyncIterator[FakeFacilitator]:
    async with FakeFacilitator() as fake:
        yield fake


@pytest.fixture(autouse=True)
def reset(fac: FakeFacilitator) -> None:
    fac.down = False
    fac.fail_settle = None


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# -- challenge -----------------------------------------------------------------------------------


def test_requirements_are_the_v2_shape_of_the_per_call_price() -> None:
    assert rail.requirements(endpoint()) == [{
        "scheme": "exact", "network": "eip155:84532", "amount": "10000", "asset": BASE_SEPOLIA_USDC,
        "payTo": PAY_TO, "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}}]


def test_challenge_carries_v2_header_and_problem_body_with_v1_members() -> None:
    headers, body = rail.challenge(endpoint(), URL, "payment required")
    assert headers["Cache-Control"] == "no-store"
    assert headers["Content-Type"] == "application/problem+json"
    required = unb64(headers["PAYMENT-REQUIRED"])
    assert required["x402Version"] == 2
    assert required["resource"]["url"] == URL
    assert required["accepts"] == rail.requirements(endpoint())
    problem = json.loads(body)
    assert problem["status"] == 402 and problem["title"] == "Payment Required"
    assert problem["type"].startswith("https://") and problem["detail"] == "payment required"
    assert problem["x402Version"] == 1
    (v1,) = problem["accepts"]
    assert v1["maxAmountRequired"] == "10000" and v1["resource"] == URL and v1["network"] == "base-sepolia"
    assert v1["payTo"] == PAY_TO and v1["asset"] == BASE_SEPOLIA_USDC and v1["mimeType"]
    assert v1["description"] == "Summaries by the summarizer agent"


def test_challenge_versions() -> None:
    headers, body = rail.challenge(endpoint(versions=(2,)), URL)
    assert "PAYMENT-REQUIRED" in headers
    assert "x402Version" not in json.loads(body) and "accepts" not in json.loads(body)
    headers, body = rail.challenge(endpoint(versions=(1,)), URL)
    assert "PAYMENT-REQUIRED" not in headers
    assert json.loads(body)["x402Version"] == 1
    # a chain x402 v1 has no name for: v2 only
    _, body = rail.challenge(endpoint(network="eip155:999999"), URL)
    assert "accepts" not in json.loads(body)


# -- parse ---------------------------------------------------------------------------------------


async def test_parse_v2_v1_and_none() -> None:
    account = Account.create()
    challenge = rail.challenge(endpoint(), URL)
    v2 = rail.parse(await pay(challenge, account, version=2))
    assert v2 is not None and v2.version == 2
    assert v2.payer == account.address and v2.amount == "10000"
    assert len(v2.nonce) == 66 and v2.valid_before > time.time()
    assert v2.payment_identifier is None
    v1 = rail.parse({"x-payment": (await pay(challenge, account, version=1))["X-PAYMENT"]})
    assert v1 is not None and v1.version == 1 and v1.payer == account.address
    assert rail.parse({"Authorization": "Bearer sk-x"}) is None
    assert rail.parse({}) is None


async def test_parse_reads_the_payment_identifier_extension() -> None:
    headers = await pay(rail.challenge(endpoint(), URL))
    extension = {"payment-identifier": {"info": {"required": False, "id": "pay_0123456789abcdef"}}}
    with_id = tampered(headers, lambda p: p.update(extensions=extension))
    parsed = rail.parse(with_id)
    assert parsed is not None and parsed.payment_identifier == "pay_0123456789abcdef"


async def test_parse_refuses_two_credentials() -> None:
    challenge = rail.challenge(endpoint(), URL)
    both = await pay(challenge, version=2) | await pay(challenge, version=1)
    with pytest.raises(InvalidRequest) as err:
        rail.parse(both)
    assert err.value.status == 400 and err.value.code == "ambiguous_payment"
    with pytest.raises(InvalidRequest) as err:
        rail.parse(await pay(challenge) | {"Authorization": "Payment id=abc"})
    assert err.value.code == "ambiguous_payment"
    twice = CIMultiDict([("PAYMENT-SIGNATURE", v) for v in ((await pay(challenge))["PAYMENT-SIGNATURE"],
                                                          (await pay(challenge))["PAYMENT-SIGNATURE"])])
    with pytest.raises(InvalidRequest) as err:
        rail.parse(twice)
    assert err.value.code == "ambiguous_payment"
    # an API key beside the payment is not a second credential
    assert rail.parse(await pay(challenge) | {"Authorization": "Bearer sk-alephant-x"}) is not None


@pytest.mark.parametrize("value", ["not base64!", b64({"x402Version": 2}), base64.b64encode(b"[1]").decode(),
                                   b64({"x402Version": 1, "payload": {}}), "e30", "A" * 20_000])
def test_parse_refuses_garbage(value: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        rail.parse({"PAYMENT-SIGNATURE": value})
    assert err.value.status == 400 and err.value.code == "invalid_payment"


async def test_parse_error_never_quotes_the_signature() -> None:
    headers = await pay(rail.challenge(endpoint(), URL))
    signature = unb64(headers["PAYMENT-SIGNATURE"])["payload"]["signature"]
    broken = tampered(headers, lambda p: p["payload"]["authorization"].pop("nonce"))
    with pytest.raises(InvalidRequest) as err:
        rail.parse(broken)
    assert signature not in err.value.message and signature[2:20] not in str(err.value)


# -- verify and settle over HTTP -----------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 1])
async def test_a_signed_payment_verifies_settles_and_cannot_be_replayed(
        fac: FakeFacilitator, session: aiohttp.ClientSession, version: int) -> None:
    ep = endpoint(fac.base_url)
    account = Account.create()
    before = fac.chain.balance(PAY_TO)
    parsed = rail.parse(await pay(rail.challenge(ep, URL), account, version=version))
    assert parsed is not None
    verdict = await rail.verify(session, ep, parsed, resource_url=URL)
    assert verdict == rail.Verdict(True, "", account.address)

    settled = await rail.settle(session, ep, parsed, resource_url=URL)
    assert settled.success and not settled.pending and settled.reason == ""
    assert settled.transaction.startswith("0x") and len(settled.transaction) == 66
    assert fac.settled[-1].tx == settled.transaction and fac.settled[-1].payer == account.address
    assert fac.chain.balance(PAY_TO) == before + 10_000
    assert fac.chain.balance(account.address) == fac.chain.default_balance - 10_000

    name, value = rail.payment_response_header(settled, version)
    assert name == ("PAYMENT-RESPONSE" if version == 2 else "X-PAYMENT-RESPONSE")
    response = unb64(value)
    assert response["success"] is True and response["transaction"] == settled.transaction
    assert response["payer"] == account.address

    # the same payload again: the chain's nonce is spent, the replay key is the same
    replay = rail.parse({"PAYMENT-SIGNATURE" if version == 2 else "X-PAYMENT": b64(parsed.payload)})
    assert replay is not None
    again = await rail.settle(session, ep, replay, resource_url=URL)
    assert not again.success and not again.pending
    assert again.reason == "invalid_exact_evm_nonce_already_used"
    assert rail.replay_key(replay, ep) == rail.replay_key(parsed, ep)
    assert fac.chain.balance(PAY_TO) == before + 10_000
    _, failed_value = rail.payment_response_header(again, version)
    assert unb64(failed_value)["success"] is False
    assert unb64(failed_value)["errorReason"] == "invalid_exact_evm_nonce_already_used"


async def test_replay_key_shape() -> None:
    account = Account.create()
    parsed = rail.parse(await pay(rail.challenge(endpoint(), URL), account))
    assert parsed is not None
    assert rail.replay_key(parsed, endpoint()) == (
        f"x402:84532:{BASE_SEPOLIA_USDC.lower()}:{account.address.lower()}:{parsed.nonce.lower()}")


async def test_verify_before_settle_passes_twice(fac: FakeFacilitator, session: aiohttp.ClientSession) -> None:
    """Why the caller must claim `replay_key` at verify: the chain only spends the nonce at settle."""
    ep = endpoint(fac.base_url)
    parsed = rail.parse(await pay(rail.challenge(ep, URL)))
    assert parsed is not None
    assert (await rail.verify(session, ep, parsed)).ok
    assert (await rail.verify(session, ep, parsed)).ok


async def test_tampered_amount_is_refused(fac: FakeFacilitator, session: aiohttp.ClientSession) -> None:
    ep = endpoint(fac.base_url)
    headers = await pay(rail.challenge(ep, URL))
    verifies = fac.verifies

    def lower_value(p: dict[str, Any]) -> None:
        p["payload"]["authorization"]["value"] = "1"

    parsed = rail.parse(tampered(headers, lower_value))
    assert parsed is not None
    assert await rail.verify(session, ep, parsed) == rail.Verdict(False, "amount_mismatch", parsed.payer)

    def lower_both(p: dict[str, Any]) -> None:  # the accepted requirements too
        lower_value(p)
        p["accepted"]["amount"] = "1"

    parsed = rail.parse(tampered(headers, lower_both))
    assert parsed is not None
    assert (await rail.verify(session, ep, parsed)).reason == "payment_mismatch"
    assert fac.verifies == verifies  # refused locally
    # a facilitator on its own refuses the changed value too (the signature no longer matches)
    cheaper = endpoint(fac.base_url, amount="1")
    parsed = rail.parse(tampered(headers, lower_both))
    assert parsed is not None
    assert (await rail.verify(session, cheaper, parsed)).reason == "invalid_exact_evm_payload_signature"


async def test_tampered_valid_before_is_refused(fac: FakeFacilitator, session: aiohttp.ClientSession) -> None:
    ep = endpoint(fac.base_url)
    headers = await pay(rail.challenge(ep, URL))

    def extend(p: dict[str, Any]) -> None:
        p["payload"]["authorization"]["validBefore"] = str(int(p["payload"]["authorization"]["validBefore"]) + 20)

    parsed = rail.parse(tampered(headers, extend))
    assert parsed is not None
    verdict = await rail.verify(session, ep, parsed)
    assert not verdict.ok and verdict.reason == "invalid_exact_evm_payload_signature"

    def far(p: dict[str, Any]) -> None:
        p["payload"]["authorization"]["validBefore"] = str(int(time.time()) + 86_400)

    parsed = rail.parse(tampered(headers, far))
    assert parsed is not None
    assert (await rail.verify(session, ep, parsed)).reason == "validity_too_long"

    def past(p: dict[str, Any]) -> None:
        p["payload"]["authorization"]["validBefore"] = str(int(time.time()) - 1)

    parsed = rail.parse(tampered(headers, past))
    assert parsed is not None
    assert (await rail.verify(session, ep, parsed)).reason == "authorization_expired"


async def test_wrong_pay_to_is_refused(fac: FakeFacilitator, session: aiohttp.ClientSession) -> None:
    ours = endpoint(fac.base_url)
    # a payment signed for another payee's 402 (valid signature, wrong recipient)
    elsewhere = endpoint(fac.base_url, pay_to="0x" + "11" * 20)
    parsed = rail.parse(await pay(rail.challenge(elsewhere, URL)))
    assert parsed is not None
    verifies = fac.verifies
    assert (await rail.verify(session, ours, parsed)).reason == "payment_mismatch"

    def claim_ours(p: dict[str, Any]) -> None:  # rewrites the accepted payTo but not the signed `to`
        p["accepted"]["payTo"] = PAY_TO

    forged = rail.parse(tampered({"PAYMENT-SIGNATURE": b64(parsed.payload)}, claim_ours))
    assert forged is not None
    assert (await rail.verify(session, ours, forged)).reason == "recipient_mismatch"
    assert fac.verifies == verifies
    assert (await rail.settle(session, elsewhere, parsed)).success  # it is good money for its own payee


async def test_other_accepted_requirements_are_refused_locally(fac: FakeFacilitator,
                                                         session: aiohttp.ClientSession) -> None:
    ep = endpoint(fac.base_url)
    headers = await pay(rail.challenge(ep, URL))
    for key, value in (("network", "eip155:8453"), ("asset", "0x" + "22" * 20), ("maxTimeoutSeconds", 86_400),
                       ("extra", {"name": "USD Coin", "version": "2"})):
        parsed = rail.parse(tampered(headers, lambda p, k=key, v=value: p["accepted"].__setitem__(k, v)))
        assert parsed is not None
        assert (await rail.verify(session, ep, parsed)).reason == "payment_mismatch"
    v1_only = endpoint(fac.base_url, versions=(1,))
    parsed = rail.parse(headers)
    assert parsed is not None
    assert (await rail.verify(session, v1_only, parsed)).reason == "unsupported_version"


async def test_settle_failure_is_reported(fac: FakeFacilitator, session: aiohttp.ClientSession) -> None:
    ep = endpoint(fac.base_url)
    parsed = rail.parse(await pay(rail.challenge(ep, URL)))
    assert parsed is not None
    fac.fail_settle = "insufficient_funds"
    settled = len(fac.settled)
    result = await rail.settle(session, ep, parsed)
    assert (result.success, result.reason, result.pending, result.transaction) == (
        False, "insufficient_funds", False, "")
    assert len(fac.settled) == settled
    fac.fail_settle = "settlement_pending"
    pending = await rail.settle(session, ep, parsed)
    assert pending.pending and not pending.success
    name, value = rail.payment_response_header(pending, 2)
    assert name == "PAYMENT-RESPONSE" and unb64(value)["errorReason"] == "settlement_pending"


async def test_facilitator_down_is_unavailable_quickly(fac: FakeFacilitator,
                                                       session: aiohttp.ClientSession) -> None:
    ep = endpoint(fac.base_url)
    parsed = rail.parse(await pay(rail.challenge(ep, URL)))
    assert parsed is not None
    fac.down = True
    started = time.monotonic()
    assert await rail.verify(session, ep, parsed) == rail.Verdict(False, "facilitator_unavailable", parsed.payer)
    settled = await rail.settle(session, ep, parsed)
    assert (settled.success, settled.reason, settled.pending) == (False, "facilitator_unavailable", False)
    # nothing listening at all
    gone = endpoint("http://127.0.0.1:9")
    assert (await rail.verify(session, gone, parsed)).reason == "facilitator_unavailable"
    assert time.monotonic() - started < 2


async def test_a_slow_facilitator_times_out(session: aiohttp.ClientSession) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"isValid": True})

    app = web.Application()
    app.router.add_post("/verify", slow)
    app.router.add_post("/settle", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        ep = endpoint(f"http://127.0.0.1:{port}")
        parsed = rail.parse(await pay(rail.challenge(ep, URL)))
        assert parsed is not None
        started = time.monotonic()
        verdict = await rail.verify(session, ep, parsed, timeout_s=0.2)
        assert verdict.reason == "facilitator_unavailable"
        settled = await rail.settle(session, ep, parsed, timeout_s=0.2)
        assert settled.reason == "facilitator_unavailable" and settled.pending  # may have broadcast
        assert time.monotonic() - started < 2
    finally:
        release.set()
        await runner.cleanup()


async def test_a_facilitator_answering_garbage_is_unavailable(session: aiohttp.ClientSession) -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>gateway error</html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/verify", garbage)
    app.router.add_post("/settle", garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        ep = endpoint(f"http://127.0.0.1:{runner.addresses[0][1]}")
        parsed = rail.parse(await pay(rail.challenge(ep, URL)))
        assert parsed is not None
        assert (await rail.verify(session, ep, parsed)).reason == "facilitator_unavailable"
        settled = await rail.settle(session, ep, parsed)
        assert (settled.success, settled.reason, settled.pending) == (False, "facilitator_unavailable", False)
    finally:
        await runner.cleanup()


async def test_pay_answers_a_real_402_response(fac: FakeFacilitator, session: aiohttp.ClientSession) -> None:
    """`pay` takes what a client sees: the 402's headers (a multidict) for v2, its body for v1."""
    ep = endpoint(fac.base_url)
    headers, body = rail.challenge(ep, URL)

    async def paywall(request: web.Request) -> web.Response:
        return web.Response(status=402, body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/paid", paywall)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with session.get(f"http://127.0.0.1:{runner.addresses[0][1]}/paid") as resp:
            assert resp.status == 402
            v2 = await pay(resp.headers)
            v1 = await pay(await resp.read(), version=1)
    finally:
        await runner.cleanup()
    for header in (v2, v1):
        parsed = rail.parse(header)
        assert parsed is not None and (await rail.verify(session, ep, parsed)).ok


async def test_supported_lists_both_versions(fac: FakeFacilitator, session: aiohttp.ClientSession) -> None:
    async with session.get(fac.base_url + "/supported") as resp:
        kinds = {(k["x402Version"], k["network"]) for k in (await resp.json())["kinds"]}
    assert kinds == {(2, "eip155:84532"), (1, "base-sepolia")}


# -- money ---------------------------------------------------------------------------------------


def test_amount_nanos() -> None:
    assert rail.amount_nanos(endpoint(amount="10000")) == 10_000_000  # 0.01 USDC = 1e7 nano-USD
    assert rail.amount_nanos(endpoint(amount="1", decimals=6)) == 1_000
    assert rail.amount_nanos(endpoint(amount="5", decimals=9)) == 5
    assert rail.amount_nanos(endpoint(amount="10000000000000000", decimals=18)) == 10_000_000  # 0.01 DAI
    assert rail.amount_nanos(endpoint(amount="1", decimals=0)) == 1_000_000_000


async def test_parsed_repr_leaves_the_signature_out() -> None:
    headers = await pay(rail.challenge(endpoint(), URL))
    parsed = rail.parse(headers)
    assert parsed is not None
    signature = parsed.payload["payload"]["signature"]
    assert signature[2:20] not in repr(parsed) and signature[2:20] not in str(parsed)
    assert parsed.payer in repr(parsed)
