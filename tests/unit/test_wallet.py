"""Outbound payments (`dataplane.payments.wallet`): the options a seller's 402 offers, the
wallet's policy over them (rails, schemes, the asset allowlist, the per-payment cap), and
credentials signed with the x402 and pympp client SDKs that our own inbound rails accept."""

from __future__ import annotations

import base64
import json
import time

import msgspec
import pytest
from eth_account import Account
from multidict import CIMultiDict

from dataplane.payments import mpp_rail, wallet, x402_rail
from schemas.entities import (
    MppRail,
    PaidAmount,
    PaidEndpoint,
    PaidPrice,
    PaidRails,
    PaidServe,
    Wallet,
    WalletAsset,
    X402Rail,
)
from tests.fakes.facilitator import BASE_SEPOLIA_USDC

PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
URL = "https://seller.example/paid/summarise"
SECRET = b"seller-secret-0123456789abcdef0123"
OTHER_TOKEN = "0x" + "cd" * 20


def seller(amount: str = "10000", *, x402: bool = True, mpp: bool = True, network: str = "eip155:84532",
           asset: str = BASE_SEPOLIA_USDC) -> PaidEndpoint:
    return PaidEndpoint(
        id="paid_1", workspace_id="seller", slug="summarise", serve=PaidServe(model="mock/echo"),
        price=PaidPrice(per_call=PaidAmount(amount=amount, asset=asset, decimals=6)),
        rails=PaidRails(
            x402=X402Rail(network=network, pay_to=PAY_TO, facilitator_url="http://127.0.0.1:1",
                          extra={"name": "USDC", "version": "2"}) if x402 else None,
            mpp=MppRail(realm="seller.example", recipient=PAY_TO, network=network,
                        relayer_url="http://127.0.0.1:1") if mpp else None))


def the_402(endpoint: PaidEndpoint) -> tuple[CIMultiDict[str], bytes]:
    """What the seller (our own paid endpoint's rails) answers an unpaid call with."""
    headers: CIMultiDict[str] = CIMultiDict()
    body = b'{"type": "about:blank", "status": 402}'
    if endpoint.rails.x402 is not None:
        x_headers, body = x402_rail.challenge(endpoint, URL, "payment required")
        headers.update(x_headers)
    if endpoint.rails.mpp is not None:
        for value in mpp_rail.challenge_headers(endpoint, URL, SECRET, time.time()):
            headers.add("WWW-Authenticate", value)
    return headers, body


def a_wallet(max_amount: str = "50000", *, asset: str = BASE_SEPOLIA_USDC, rails: tuple[str, ...] = ("x402", "mpp"),
             network: str = "eip155:84532") -> Wallet:
    return Wallet(id="wallet_1", workspace_id="buyer", name="ops", address="0x" + "11" * 20,
                  private_key_enc="unused", rails=rails,
                  assets=(WalletAsset(network=network, asset=asset, max_amount=max_amount, decimals=6),))


def test_every_rail_of_a_402_is_read_as_an_offer() -> None:
    found = wallet.offers(*the_402(seller()))
    assert [(o.rail, o.version, o.scheme) for o in found] == [("x402", 2, "exact"), ("x402", 1, "exact"),
                                                              ("mpp", 0, "evm")]
    assert {(o.network, o.asset.lower(), o.amount, o.pay_to.lower()) for o in found} == {
        ("eip155:84532", BASE_SEPOLIA_USDC.lower(), 10_000, PAY_TO.lower())}


def test_malformed_and_foreign_options_are_skipped_not_fatal() -> None:
    headers: CIMultiDict[str] = CIMultiDict({"PAYMENT-REQUIRED": "not base64!",
                                             "WWW-Authenticate": 'Bearer realm="x"'})
    headers.add("WWW-Authenticate", "Payment garbage")
    body = json.dumps({"x402Version": 1, "accepts": [{"scheme": "exact"}, "nonsense", {
        "scheme": "upto", "network": "solana", "maxAmountRequired": "5", "asset": "So1", "payTo": "abc"}]}).encode()
    found = wallet.offers(headers, body)
    assert [(o.scheme, o.network) for o in found] == [("upto", "solana")]
    refusal = wallet.choose(a_wallet(), found)
    assert isinstance(refusal, wallet.Refusal) and refusal.code == "egress_no_payable_offer"
    assert "upto 5 of So1 on solana" in refusal.message
    assert wallet.offers(CIMultiDict(), b"") == []


def test_the_policy_refuses_assets_off_the_allowlist_and_amounts_over_the_cap() -> None:
    found = wallet.offers(*the_402(seller("10000")))
    off_list = wallet.choose(a_wallet(asset=OTHER_TOKEN), found)
    assert isinstance(off_list, wallet.Refusal) and off_list.code == "egress_asset_not_allowed"
    other_chain = wallet.choose(a_wallet(network="eip155:8453"), found)
    assert isinstance(other_chain, wallet.Refusal) and other_chain.code == "egress_asset_not_allowed"
    over = wallet.choose(a_wallet("9999"), found)
    assert isinstance(over, wallet.Refusal) and over.code == "egress_payment_over_cap"
    assert "10000" in over.message and "9999" in over.message
    at_cap = wallet.choose(a_wallet("10000"), found)
    assert isinstance(at_cap, wallet.Choice) and at_cap.nanos == 10_000_000


def test_the_rails_a_wallet_pays_on_and_the_cheapest_offer_win() -> None:
    found = wallet.offers(*the_402(seller()))
    mpp_only = wallet.choose(a_wallet(rails=("mpp",)), found)
    assert isinstance(mpp_only, wallet.Choice) and mpp_only.offer.rail == "mpp"
    dear = wallet.offers(*the_402(seller("20000", mpp=False)))
    cheap = wallet.offers(*the_402(seller("15000", x402=False)))
    chosen = wallet.choose(a_wallet(), dear + cheap)
    assert isinstance(chosen, wallet.Choice) and (chosen.offer.rail, chosen.offer.amount) == ("mpp", 15_000)


def test_an_mpp_offer_of_a_token_with_no_known_eip712_domain_is_not_paid() -> None:
    found = wallet.offers(*the_402(seller(x402=False, asset=OTHER_TOKEN)))
    refusal = wallet.choose(a_wallet(asset=OTHER_TOKEN), found)
    assert isinstance(refusal, wallet.Refusal) and refusal.code == "egress_asset_not_allowed"
    named = msgspec.structs.replace(a_wallet(), assets=(WalletAsset(
        network="eip155:84532", asset=OTHER_TOKEN, max_amount="50000", domain_name="Other", domain_version="1"),))
    assert isinstance(wallet.choose(named, found), wallet.Choice)


def test_nanos_round_up_so_a_hold_is_never_below_the_payment() -> None:
    assert wallet.nanos(10_000, 6) == 10_000_000
    assert wallet.nanos(1, 18) == 1 and wallet.nanos(10**9, 18) == 1 and wallet.nanos(10**9 + 1, 18) == 2
    assert wallet.nanos(7, 0) == 7_000_000_000


@pytest.mark.parametrize("version", [2, 1])
async def test_a_signed_x402_payment_pays_the_offer_and_our_own_rail_reads_it(version: int) -> None:
    account = Account.create()
    found = [o for o in wallet.offers(*the_402(seller(mpp=False))) if o.version == version]
    choice = wallet.choose(a_wallet(), found)
    assert isinstance(choice, wallet.Choice)
    signed = await wallet.sign(choice, account)
    assert signed.header == ("PAYMENT-SIGNATURE" if version == 2 else "X-PAYMENT")
    parsed = x402_rail.parse({signed.header: signed.value})
    assert parsed is not None and parsed.version == version
    assert (parsed.payer.lower(), parsed.amount) == (account.address.lower(), "10000")
    assert parsed.payload["payload"]["authorization"]["to"].lower() == PAY_TO.lower()
    assert signed.payment_id == x402_rail.replay_key(parsed, seller())
    assert signed.value not in repr(signed)


async def test_a_signed_mpp_credential_is_accepted_by_our_own_mpp_rail() -> None:
    account = Account.create()
    endpoint = seller(x402=False)
    choice = wallet.choose(a_wallet(), wallet.offers(*the_402(endpoint)))
    assert isinstance(choice, wallet.Choice)
    signed = await wallet.sign(choice, account)
    assert signed.header == "Authorization" and signed.value.startswith("Payment ")
    parsed = mpp_rail.parse({signed.header: signed.value})
    assert parsed is not None
    verdict = mpp_rail.verify(parsed, endpoint, SECRET, time.time())
    assert verdict.ok, verdict.reason
    assert signed.payment_id == mpp_rail.replay_key(parsed)


def test_receipts_say_whether_the_seller_settled() -> None:
    def b64(value: dict[str, object]) -> str:
        return base64.b64encode(json.dumps(value).encode()).decode()
    assert wallet.settled({"PAYMENT-RESPONSE": b64({"success": True, "transaction": "0xabc"})}) == (True, "0xabc")
    assert wallet.settled({"X-PAYMENT-RESPONSE": b64({"success": False, "errorReason": "insufficient_funds"})}) \
        == (False, "insufficient_funds")
    done = x402_rail.Settlement(success=True, transaction="0xdef", reason="", pending=False)
    name, value = mpp_rail.receipt_header(done, "evm")
    assert wallet.settled({name: value}) == (True, "0xdef")
    assert wallet.settled({}) == (None, "")
