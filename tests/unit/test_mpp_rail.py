"""The MPP rail (``Payment`` auth scheme, evm charge): challenges a pympp client parses and
answers, real EIP-3009 credentials signed by pympp's evm client verified offline, settled on the
fake USDC chain, refused when replayed, tampered, expired, forged or malformed."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from mpp import Challenge, Credential, Receipt
from mpp._canonical import canonical_b64url
from mpp.methods.evm.client import charge as evm_client_charge
from mpp.methods.evm.intents import ChargeIntent
from mpp.runtime import CredentialParams

from dataplane.payments import mpp_rail as rail
from dataplane.payments.x402_rail import Settlement
from schemas.entities import PaidAmount, PaidPrice
from schemas.errors import InvalidRequest
from tests.fakes.facilitator import BASE_SEPOLIA_USDC, FakeUsdc

PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
OTHER = "0x742d35Cc6634c0532925a3b844bC9e7595F8fE00"
URL = "https://gw.example/paid/summarize/v1/run"
SECRET = b"gateway-mpp-secret-0123456789abcdef"
REALM = "gw.example"


@dataclass(frozen=True, slots=True)
class MppRail:  # the lead's `PaidRails.mpp` shape, until it lands in schemas.entities
    realm: str
    recipient: str
    network: str
    methods: tuple[str, ...] = ("evm",)
    challenge_ttl_s: int = 300


@dataclass(frozen=True, slots=True)
class Rails:
    mpp: MppRail | None


@dataclass(frozen=True, slots=True)
class Endpoint:
    slug: str
    price: PaidPrice
    rails: Rails


def endpoint(*, amount: str = "10000", recipient: str = PAY_TO, slug: str = "summarize",
             methods: tuple[str, ...] = ("evm",), realm: str = REALM) -> Endpoint:
    return Endpoint(slug=slug, price=PaidPrice(per_call=PaidAmount(amount=amount, asset=BASE_SEPOLIA_USDC)),
                    rails=Rails(MppRail(realm=realm, recipient=recipient, network="eip155:84532", methods=methods)))


async def credential(header: str, account: LocalAccount) -> str:
    """What pympp's evm charge client sends for the challenge header ``header``."""
    method = evm_client_charge(currency=BASE_SEPOLIA_USDC, account=account, chain_id=84532, decimals=6,
                               authorization={"name": "USDC", "version": "2"})
    assert method.can_handle_challenge is not None and method.can_handle_challenge(
        Challenge.from_www_authenticate(header))
    return await method.create_credential(CredentialParams(challenge=Challenge.from_www_authenticate(header)))


def unb64url(value: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    return decoded


def b64url(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def tampered(authorization: str, change: Any) -> str:
    """The same credential with ``change(credential_json)`` applied (the signature untouched)."""
    body = unb64url(authorization.removeprefix("Payment "))
    change(body)
    return "Payment " + b64url(body)


async def paid(ep: Endpoint | None = None, now: float | None = None) -> tuple[str, LocalAccount, float]:
    now = time.time() if now is None else now
    header, = rail.challenge_headers(ep or endpoint(), URL, SECRET, now)
    account: LocalAccount = Account.create()
    return await credential(header, account), account, now


def test_challenge_is_what_pympp_parses_and_binds() -> None:
    now = time.time()
    headers = rail.challenge_headers(endpoint(methods=("evm", "tempo")), URL, SECRET, now)
    assert len(headers) == 1  # tempo is not implemented here: not offered
    challenge = Challenge.from_www_authenticate(headers[0])
    assert (challenge.method, challenge.intent, challenge.realm) == ("evm", "charge", REALM)
    assert challenge.request == {"amount": "10000", "currency": BASE_SEPOLIA_USDC, "recipient": PAY_TO,
                                 "methodDetails": {"chainId": 84532, "credentialTypes": ["authorization"],
                                                   "decimals": 6}}
    assert challenge.request_b64 == canonical_b64url(challenge.request)  # JCS, as RFC 8785 encodes it
    assert challenge.opaque == {"slug": "summarize"}
    assert challenge.expires is not None
    expires = rail._timestamp(challenge.expires)
    assert expires is not None and abs(expires - (now + 300)) < 0.01
    # pympp's own stateless check accepts the id: the same HMAC binding
    assert challenge.verify(SECRET.decode(), REALM)
    assert not Challenge.from_www_authenticate(rail.challenge_headers(endpoint(), URL, b"other", now)[0]).verify(
        SECRET.decode(), REALM)


async def test_pympp_credential_verifies_settles_and_is_single_use() -> None:
    ep = endpoint()
    authorization, account, now = await paid(ep)
    parsed = rail.parse({"Authorization": authorization, "X-Api-Key": "sk-1"})
    assert parsed is not None and parsed.header == "Authorization"
    assert "signature" not in repr(parsed) and parsed.payload["signature"] not in repr(parsed)
    assert rail.verify(parsed, ep, SECRET, now + 1) == rail.Verdict(True, "", account.address)
    # pympp's own server-side evm charge check accepts the same credential for our request
    pympp_credential = Credential.from_authorization(authorization)
    assert pympp_credential.challenge.id == parsed.challenge_id
    intent = ChargeIntent(name="USDC", version="2", settle=lambda _: "0x00")
    validation = await intent.validate(pympp_credential, rail.expected_request(ep))
    assert validation.payer == account.address
    key = rail.replay_key(parsed)
    assert key == (f"mpp:evm:84532:{BASE_SEPOLIA_USDC.lower()}:{account.address.lower()}:"
                   f"{rail.challenge_hash(parsed.challenge_id, REALM)}")
    assert rail.replay_key(rail.parse({"payment-authorization": authorization}) or parsed) == key

    chain = FakeUsdc()
    before_payer, before_payee = chain.balance(account.address), chain.balance(PAY_TO)
    settlement = await rail.settle(rail.ChainSubmitter(chain), parsed, ep)
    assert settlement.success and not settlement.pending and settlement.transaction.startswith("0x")
    assert (settlement.network, settlement.payer, settlement.amount) == ("eip155:84532", account.address, "10000")
    assert chain.balance(account.address) == before_payer - 10000
    assert chain.balance(PAY_TO) == before_payee + 10000

    name, value = rail.receipt_header(settlement, parsed.method, now=now)
    receipt = Receipt.from_payment_receipt(value)
    assert name == "Payment-Receipt"
    assert (receipt.status, receipt.method, receipt.reference) == ("success", "evm", settlement.transaction)
    assert abs(receipt.timestamp.timestamp() - now) < 0.01

    # The same credential again: stateless verify still passes (the caller's claim on the replay
    # key stops it), and the chain refuses a second transfer; nothing moves.
    again = rail.parse({"Authorization": authorization})
    assert again is not None and rail.replay_key(again) == key
    second = await rail.settle(rail.ChainSubmitter(chain), again, ep)
    assert second == Settlement(False, "", "nonce_already_used", False, "eip155:84532", account.address, "10000")
    assert chain.balance(PAY_TO) == before_payee + 10000
    with pytest.raises(ValueError):
        rail.receipt_header(second, "evm")


async def test_payment_authorization_header_is_accepted() -> None:
    ep = endpoint()
    authorization, _, now = await paid(ep)
    parsed = rail.parse({"Authorization": "Bearer sk-virtual-key", "Payment-Authorization": authorization})
    assert parsed is not None and parsed.header == "Payment-Authorization"
    assert rail.verify(parsed, ep, SECRET, now).ok


def _verdict(authorization: str, ep: Endpoint, now: float, secret: bytes = SECRET) -> str:
    parsed = rail.parse({"Authorization": authorization})
    assert parsed is not None
    verdict = rail.verify(parsed, ep, secret, now)
    assert not verdict.ok
    return verdict.reason


async def test_tampered_forged_expired_and_foreign_credentials_are_refused() -> None:
    ep = endpoint()
    authorization, _, now = await paid(ep)

    def echo_amount(body: dict[str, Any]) -> None:  # a cheaper price in the echoed challenge
        request = unb64url(body["challenge"]["request"])
        request["amount"] = "1"
        body["challenge"]["request"] = canonical_b64url(request)

    def value(body: dict[str, Any]) -> None:
        body["payload"]["value"] = "1"

    def to(body: dict[str, Any]) -> None:
        body["payload"]["to"] = OTHER

    def payer(body: dict[str, Any]) -> None:
        body["payload"]["from"] = OTHER

    def expires(body: dict[str, Any]) -> None:  # stretch the challenge's life
        body["challenge"]["expires"] = "2099-01-01T00:00:00.000Z"

    def source(body: dict[str, Any]) -> None:
        body["source"] = f"did:pkh:eip155:84532:{OTHER}"

    assert _verdict(tampered(authorization, echo_amount), ep, now) == "challenge_invalid"
    assert _verdict(tampered(authorization, expires), ep, now) == "challenge_invalid"
    assert _verdict(tampered(authorization, value), ep, now) == "amount_mismatch"
    assert _verdict(tampered(authorization, to), ep, now) == "recipient_mismatch"
    assert _verdict(tampered(authorization, payer), ep, now) == "invalid_signature"
    assert _verdict(tampered(authorization, source), ep, now) == "source_mismatch"
    # a challenge issued under another key (forged id), or verified after it expired
    assert _verdict(authorization, ep, now, secret=b"another-gateway") == "challenge_invalid"
    assert _verdict(authorization, ep, now + 301) == "challenge_expired"
    # our own challenge, but the endpoint changed since: its price, its payee, or another endpoint
    assert _verdict(authorization, endpoint(amount="20000"), now) == "amount_mismatch"
    assert _verdict(authorization, endpoint(recipient=OTHER), now) == "recipient_mismatch"
    assert _verdict(authorization, endpoint(slug="translate"), now) == "challenge_mismatch"
    assert _verdict(authorization, endpoint(realm="other.example"), now) == "challenge_mismatch"


async def test_authorization_not_bound_to_the_challenge_is_refused() -> None:
    """An EIP-3009 authorization signed with eth-account directly, for our terms but with a nonce
    of its own: valid signature, yet not the challenge's (it could be replayed across challenges)."""
    ep = endpoint()
    authorization, _, now = await paid(ep)
    body = unb64url(authorization.removeprefix("Payment "))
    account: LocalAccount = Account.create()
    message = {"from": account.address, "to": PAY_TO, "value": 10000, "validAfter": 0,
               "validBefore": int(now) + 300, "nonce": b"\x07" * 32}
    signed = account.sign_typed_data(
        domain_data={"name": "USDC", "version": "2", "chainId": 84532, "verifyingContract": BASE_SEPOLIA_USDC},
        message_types={"TransferWithAuthorization": [
            {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
            {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
            {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}]},
        message_data=message)
    body["payload"] = {"type": "authorization", "from": account.address, "to": PAY_TO, "value": "10000",
                       "validAfter": "0", "validBefore": str(int(now) + 300), "nonce": "0x" + "07" * 32,
                       "signature": "0x" + signed.signature.hex().removeprefix("0x")}
    body.pop("source", None)
    assert _verdict("Payment " + b64url(body), ep, now) == "challenge_mismatch"
    # the same authorization with the challenge's nonce verifies: the signature check is real
    bound_nonce = rail.challenge_hash(body["challenge"]["id"], REALM)
    signed = account.sign_typed_data(
        domain_data={"name": "USDC", "version": "2", "chainId": 84532, "verifyingContract": BASE_SEPOLIA_USDC},
        message_types={"TransferWithAuthorization": [
            {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
            {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
            {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}]},
        message_data={**message, "nonce": bytes.fromhex(bound_nonce[2:])})
    body["payload"] |= {"nonce": bound_nonce, "signature": "0x" + signed.signature.hex().removeprefix("0x")}
    parsed = rail.parse({"Authorization": "Payment " + b64url(body)})
    assert parsed is not None and rail.verify(parsed, ep, SECRET, now).ok
    # ...and signed for another token (EIP-712 domain) it does not
    parsed = rail.parse({"Authorization": "Payment " + b64url(body)})
    assert parsed is not None
    other_token = Endpoint(slug=ep.slug, price=PaidPrice(per_call=PaidAmount(amount="10000", asset=OTHER)),
                           rails=ep.rails)
    header, = rail.challenge_headers(other_token, URL, SECRET, now)
    assert rail.verify(parsed, other_token, SECRET, now).reason == "payment_mismatch"
    assert header  # the other token's challenge is well-formed


@pytest.mark.parametrize("value", [
    "Payment !!!not-base64!!!",
    "Payment " + base64.urlsafe_b64encode(b"[1,2]").decode(),
    "Payment " + base64.urlsafe_b64encode(b"not json").decode(),
    "Payment " + b64url({"payload": {}}),
    "Payment " + b64url({"challenge": {"id": "x"}, "payload": {}}),
    "Payment " + "A" * 70_000,
])
def test_malformed_credential_is_a_400(value: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        rail.parse({"Authorization": value})
    assert err.value.status == 400 and err.value.code == "invalid_payment"
    assert value.removeprefix("Payment ")[:40] not in str(err.value)


async def test_credential_with_bad_fields_or_method_is_a_400() -> None:
    authorization, _, _ = await paid()

    def signature(body: dict[str, Any]) -> None:
        body["payload"]["signature"] = "0x1234"

    def kind(body: dict[str, Any]) -> None:
        body["payload"]["type"] = "transaction"

    def tempo(body: dict[str, Any]) -> None:
        body["challenge"]["method"] = "tempo"

    def request(body: dict[str, Any]) -> None:
        body["challenge"]["request"] = b64url({"amount": "1"})

    for change in (signature, kind, tempo, request):
        bad = tampered(authorization, change)
        with pytest.raises(InvalidRequest) as err:
            rail.parse({"Authorization": bad})
        assert err.value.code == "invalid_payment", change.__name__
        secret_part = unb64url(authorization.removeprefix("Payment "))["payload"]["signature"]
        assert secret_part not in str(err.value)


async def test_no_or_ambiguous_credentials() -> None:
    authorization, _, _ = await paid()
    assert rail.parse({}) is None
    assert rail.parse({"Authorization": "Bearer sk-1"}) is None
    for headers in ({"Authorization": authorization, "Payment-Authorization": authorization},
                    {"Authorization": authorization, "PAYMENT-SIGNATURE": "eyJ9"},
                    {"Payment-Authorization": authorization, "X-PAYMENT": "eyJ9"}):
        with pytest.raises(InvalidRequest) as err:
            rail.parse(headers)
        assert err.value.status == 400 and err.value.code == "ambiguous_payment"


async def test_settle_failure_modes() -> None:
    ep = endpoint()
    authorization, account, _ = await paid(ep)
    parsed = rail.parse({"Authorization": authorization})
    assert parsed is not None

    async def unknown(transfer: rail.Transfer) -> str:
        assert (transfer.payer, transfer.recipient, transfer.value) == (account.address, PAY_TO, 10000)
        assert "signature" not in repr(transfer)
        raise TimeoutError("rpc read timed out after broadcast")

    async def refused(transfer: rail.Transfer) -> str:
        raise rail.SubmitRefused("insufficient_funds")

    pending = await rail.settle(unknown, parsed, ep)
    assert (pending.success, pending.pending, pending.reason) == (False, True, "settlement_unknown")
    failed = await rail.settle(refused, parsed, ep)
    assert (failed.success, failed.pending, failed.reason) == (False, False, "insufficient_funds")
    poor = FakeUsdc(balances={account.address.lower(): 5})
    broke = await rail.settle(rail.ChainSubmitter(poor), parsed, ep)
    assert (broke.success, broke.pending, broke.reason) == (False, False, "insufficient_funds")
    assert poor.balance(PAY_TO) == poor.default_balance


def test_amount_nanos() -> None:
    assert rail.amount_nanos(endpoint(amount="10000")) == 10_000_000


def test_data_plane_import_and_verify_keep_the_recursion_limit() -> None:
    """Importing the rail does not import eth-account; the first verification imports it and puts
    back the interpreter's recursion limit that py_ecc raises (the JSON depth guard needs it)."""
    code = ("import sys; from dataplane.payments import mpp_rail as m; "
            "assert 'eth_account' not in sys.modules; assert sys.getrecursionlimit() == 1000; "
            "m.challenge_hash('id', 'realm'); assert 'eth_account' in sys.modules; "
            "print(sys.getrecursionlimit())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "1000"
