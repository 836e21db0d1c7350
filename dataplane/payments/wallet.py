"""Outbound payments: what an external endpoint's 402 asks for, whether a wallet may pay it, and
the signed credential that pays it (issue 12, the egress side; `dataplane.ingress.egress` runs it).

1. :func:`offers` reads every payment option a 402 carries: x402 v2 (the ``PAYMENT-REQUIRED``
   header, base64 JSON ``accepts``), x402 v1 (the body's ``accepts``) and MPP
   (``WWW-Authenticate: Payment`` challenges; the ``evm`` ``charge`` intent). Malformed options
   are skipped, not fatal: a seller may offer rails we do not speak beside one we do.
2. :func:`choose` applies the wallet's policy, before anything is signed: the rails it pays on,
   the scheme (x402 ``exact``; MPP ``evm`` with an EIP-3009 ``authorization``), the asset
   allowlist (network and token), then the per-payment cap. The cheapest option within policy
   wins; otherwise a :class:`Refusal` names why (``egress_no_payable_offer``,
   ``egress_asset_not_allowed``, ``egress_payment_over_cap``).
3. :func:`sign` makes the credential with the protocols' own client SDKs: x402's ``x402Client``
   with its EVM ``exact`` scheme (v2 ``PAYMENT-SIGNATURE`` or v1 ``X-PAYMENT``) and pympp's
   ``evm`` charge client (``Authorization: Payment``). Both import eth-account, whose py_ecc
   raises the interpreter's recursion limit on import: it is put back (the gateway's JSON depth
   guard relies on the default), and nothing is imported until a payment is signed.
4. :func:`settled` reads the seller's receipt (``PAYMENT-RESPONSE``, ``X-PAYMENT-RESPONSE``,
   ``Payment-Receipt``).

Amounts are atomic integers of the asset; :func:`nanos` turns them into ledger nano-USD (assets
are USD stablecoins), rounding up, so a budget hold is never below what is paid. The wallet's key
is decrypted only to sign and never leaves this module: no message, log or event quotes it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from dataplane.payments import mpp_rail, x402_rail
from schemas.entities import Wallet, WalletAsset
from schemas.evm import import_keeping_recursion_limit

__all__ = ["Choice", "Offer", "Refusal", "choose", "nanos", "offers", "settled", "sign"]

_MAX_OFFERS: Final = 32
_MAX_HEADER_CHARS: Final = 65_536
_NETWORK_OF_V1_NAME: Final = {name: caip for caip, name in x402_rail.V1_NETWORKS.items()}
# EIP-712 domains of tokens MPP challenges name without one: pympp's known assets, by (chain, token).
_KNOWN_DOMAINS: dict[tuple[int, str], tuple[str, str]] | None = None


@dataclass(frozen=True, slots=True)
class Offer:
    """One way a 402 says it can be paid. ``rail`` x402 (``version`` 2 or 1) or mpp (``version``
    0); ``scheme`` is x402's scheme or MPP's method; ``network`` is CAIP-2; ``amount`` atomic
    units of ``asset``; ``pay_to`` the recipient. ``raw`` is the option as sent (the x402
    requirement object, or the MPP ``WWW-Authenticate`` value) and ``document`` the x402
    ``PaymentRequired`` it came from."""

    rail: str
    version: int
    scheme: str
    network: str
    asset: str
    amount: int
    pay_to: str
    raw: Any
    document: Mapping[str, Any] | None = None
    intent: str = ""
    credential_types: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.rail} {self.scheme} {self.amount} of {self.asset} on {self.network}"


@dataclass(frozen=True, slots=True)
class Choice:
    """The option a wallet pays: the offer, the allow-listed asset it pays with, and its price in
    nano-USD (rounded up)."""

    offer: Offer
    asset: WalletAsset
    nanos: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the wallet pays none of the offers (`code`, and a message that names what was asked)."""

    code: str
    message: str


def nanos(amount: int, decimals: int) -> int:
    """Atomic units of a USD stablecoin with `decimals` as nano-USD, rounded up."""
    if decimals <= 9:
        return int(amount * 10 ** (9 - decimals))
    scale: int = 10 ** (decimals - 9)
    return -(-amount // scale)


# -- offers ------------------------------------------------------------------------------------

def _atomic(value: Any) -> int | None:
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    return int(text) if text.isdigit() and len(text) <= 78 else None


def _x402_offer(req: Any, version: int, document: Mapping[str, Any]) -> Offer | None:
    if not isinstance(req, dict):
        return None
    amount = _atomic(req.get("amount") if version == 2 else req.get("maxAmountRequired"))
    network = req.get("network")
    if version == 1 and isinstance(network, str):
        network = _NETWORK_OF_V1_NAME.get(network, network)
    fields = (req.get("scheme"), network, req.get("asset"), req.get("payTo"))
    if amount is None or not all(isinstance(f, str) and f for f in fields):
        return None
    scheme, network, asset, pay_to = (str(f) for f in fields)
    return Offer(rail="x402", version=version, scheme=scheme, network=network, asset=asset, amount=amount,
                 pay_to=pay_to, raw=req, document=document)


def _b64json(raw: str) -> Any:
    if len(raw) > _MAX_HEADER_CHARS:
        return None
    try:
        return json.loads(base64.b64decode(raw.strip() + "=" * (-len(raw.strip()) % 4), validate=True))
    except (binascii.Error, ValueError):
        return None


def _x402_offers(headers: Mapping[str, str], body: bytes) -> list[Offer]:
    found: list[Offer] = []
    required = headers.get(x402_rail.PAYMENT_REQUIRED_HEADER)
    document = _b64json(required) if required else None
    if isinstance(document, dict) and document.get("x402Version") == 2 and isinstance(document.get("accepts"), list):
        found += [o for req in document["accepts"][:_MAX_OFFERS] if (o := _x402_offer(req, 2, document))]
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("x402Version") == 1 and isinstance(parsed.get("accepts"), list):
        found += [o for req in parsed["accepts"][:_MAX_OFFERS] if (o := _x402_offer(req, 1, parsed))]
    return found


def _mpp_offer(value: str) -> Offer | None:
    if not value.lstrip().lower().startswith("payment ") or len(value) > _MAX_HEADER_CHARS:
        return None
    challenge, parse_error = _mpp()[0], _mpp()[3]
    try:
        parsed = challenge.from_www_authenticate(value)
    except (parse_error, ValueError, TypeError, KeyError):
        return None
    request: dict[str, Any] = parsed.request if isinstance(parsed.request, dict) else {}
    raw_details = request.get("methodDetails")
    details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
    amount, chain = _atomic(request.get("amount")), details.get("chainId")
    asset, pay_to = request.get("currency"), request.get("recipient")
    if amount is None or not isinstance(chain, int) or not isinstance(asset, str) or not isinstance(pay_to, str):
        return None
    types = details.get("credentialTypes")
    return Offer(rail="mpp", version=0, scheme=str(parsed.method), network=f"eip155:{chain}", asset=asset,
                 amount=amount, pay_to=pay_to, raw=value, intent=str(parsed.intent),
                 credential_types=tuple(t for t in types if isinstance(t, str)) if isinstance(types, list) else ())


def offers(headers: Any, body: bytes) -> list[Offer]:
    """Every payment option a 402 answer carries (`headers`: a multidict or a mapping)."""
    found = _x402_offers(headers, body)
    values = headers.getall(mpp_rail.WWW_AUTHENTICATE_HEADER, []) if hasattr(headers, "getall") else \
        [v for k, v in headers.items() if k.lower() == "www-authenticate"]
    for value in values[:_MAX_OFFERS]:
        if (offer := _mpp_offer(value)) is not None:
            found.append(offer)
    return found


# -- policy ------------------------------------------------------------------------------------

def _payable(offer: Offer) -> bool:
    if offer.rail == "x402":
        return offer.scheme == "exact" and offer.network.startswith("eip155:")
    return offer.scheme in mpp_rail.SUPPORTED_METHODS and offer.intent == mpp_rail.INTENT \
        and mpp_rail.CREDENTIAL_TYPE in offer.credential_types


def _allowed(wallet: Wallet, offer: Offer) -> WalletAsset | None:
    for asset in wallet.assets:
        if asset.network == offer.network and asset.asset.lower() == offer.asset.lower():
            if offer.rail == "mpp" and _domain(asset) is None:
                return None  # the token's EIP-712 domain is unknown: an MPP authorization cannot be signed
            return asset
    return None


def choose(wallet: Wallet, found: list[Offer]) -> Choice | Refusal:
    """The cheapest offer `wallet` may pay (see the module docstring), or why it pays none."""
    payable = [o for o in found if o.rail in wallet.rails and _payable(o)]
    if not payable:
        asked = "; ".join(o.describe() for o in found[:4]) or "no payment option the gateway can read"
        return Refusal("egress_no_payable_offer", f"The endpoint asks for a payment wallet '{wallet.name}' cannot "
                       f"make (it pays x402 exact and MPP evm charges on {', '.join(wallet.rails)}): {asked}.")
    allowed = [(o, a) for o in payable if (a := _allowed(wallet, o)) is not None]
    if not allowed:
        asked = "; ".join(o.describe() for o in payable[:4])
        return Refusal("egress_asset_not_allowed", f"The endpoint asks for assets wallet '{wallet.name}' does not "
                       f"allow: {asked}.")
    within = [Choice(o, a, nanos(o.amount, a.decimals)) for o, a in allowed if o.amount <= int(a.max_amount)]
    if not within:
        o, a = allowed[0]
        return Refusal("egress_payment_over_cap", f"The endpoint asks {o.amount} of {o.asset} on {o.network}; wallet "
                       f"'{wallet.name}' pays at most {a.max_amount} per payment.")
    return min(within, key=lambda c: c.nanos)


# -- signing -----------------------------------------------------------------------------------

def _mpp() -> tuple[Any, Any, Any, type[Exception]]:
    """pympp's ``Challenge``, evm client ``charge``, ``CredentialParams`` and ``ParseError``,
    imported on first use (see the module docstring)."""
    mpp, parsing = import_keeping_recursion_limit("mpp"), import_keeping_recursion_limit("mpp._parsing")
    client = import_keeping_recursion_limit("mpp.methods.evm.client")
    runtime = import_keeping_recursion_limit("mpp.runtime")
    return mpp.Challenge, client.charge, runtime.CredentialParams, parsing.ParseError


def _domain(asset: WalletAsset) -> tuple[str, str] | None:
    if asset.domain_name and asset.domain_version:
        return asset.domain_name, asset.domain_version
    global _KNOWN_DOMAINS
    if _KNOWN_DOMAINS is None:
        known = import_keeping_recursion_limit("mpp.methods.evm.assets")
        _KNOWN_DOMAINS = {(a.chain_id, a.address.lower()): (a.name, a.version)
                          for a in vars(known).values() if isinstance(a, known.EvmAsset)}
    chain = asset.network.split(":", 1)[1]
    return _KNOWN_DOMAINS.get((int(chain), asset.asset.lower())) if chain.isdigit() else None


def account_of(private_key: str) -> Any:
    """The eth-account signer of a decrypted wallet key."""
    return import_keeping_recursion_limit("eth_account").Account.from_key(private_key)


async def _sign_x402(offer: Offer, account: Any) -> tuple[str, str]:
    x402 = import_keeping_recursion_limit("x402")
    exact = import_keeping_recursion_limit("x402.mechanisms.evm.exact")
    exact_v1 = import_keeping_recursion_limit("x402.mechanisms.evm.exact.v1")
    signers = import_keeping_recursion_limit("x402.mechanisms.evm.signers")
    schemas_v2 = import_keeping_recursion_limit("x402.schemas")
    schemas_v1 = import_keeping_recursion_limit("x402.schemas.v1")
    signer = signers.EthAccountSigner(account)
    client = x402.x402Client()
    client.set_spend_controls(False)  # the wallet's policy already chose this one option (`choose`)
    document = dict(offer.document or {}) | {"accepts": [offer.raw]}
    if offer.version == 2:
        client.register(offer.network, exact.ExactEvmClientScheme(signer))
        payload: Any = await client.create_payment_payload(schemas_v2.PaymentRequired.model_validate(document))
        header = x402_rail.PAYMENT_SIGNATURE_HEADER
    else:
        client.register_v1(str(offer.raw["network"]), exact_v1.ExactEvmSchemeV1Client(signer))
        payload = await client.create_payment_payload(schemas_v1.PaymentRequiredV1.model_validate(document))
        header = x402_rail.X_PAYMENT_HEADER
    encoded = base64.b64encode(payload.model_dump_json(by_alias=True, exclude_none=True).encode()).decode()
    return header, encoded


async def _sign_mpp(choice: Choice, account: Any) -> tuple[str, str]:
    challenge, charge, params, _ = _mpp()
    domain = _domain(choice.asset)
    assert domain is not None  # `choose` kept only assets with a known domain
    offer = choice.offer
    method = charge(currency=offer.asset, account=account, chain_id=int(offer.network.split(":", 1)[1]),
                    decimals=choice.asset.decimals, authorization={"name": domain[0], "version": domain[1]})
    credential = await method.create_credential(params(challenge=challenge.from_www_authenticate(offer.raw)))
    return mpp_rail.AUTHORIZATION_HEADER, str(credential)


@dataclass(frozen=True, slots=True)
class Signed:
    """A credential: the header that carries it, its value, and its single-use id on the rail
    (``x402:{chain}:{asset}:{from}:{nonce}`` or MPP's replay key), which is the payment's id."""

    header: str
    value: str
    payment_id: str

    def __repr__(self) -> str:  # the value is a bearer credential until it is settled
        return f"Signed(header={self.header!r}, payment_id={self.payment_id!r})"


async def sign(choice: Choice, account: Any) -> Signed:
    """The credential paying `choice` from `account` (the wallet's decrypted signer)."""
    offer = choice.offer
    if offer.rail == "x402":
        header, value = await _sign_x402(offer, account)
        parsed = x402_rail.parse({header: value})
        assert parsed is not None
        chain = offer.network.split(":", 1)[1]
        return Signed(header, value, f"x402:{chain}:{offer.asset.lower()}:{parsed.payer.lower()}:"
                                     f"{parsed.nonce.lower()}")
    header, value = await _sign_mpp(choice, account)
    mpp = mpp_rail.parse({header: value})
    assert mpp is not None
    return Signed(header, value, mpp_rail.replay_key(mpp))


def settled(headers: Mapping[str, str]) -> tuple[bool | None, str]:
    """What the seller's receipt says: (True, tx) settled; (False, reason) refused; (None, "")
    no receipt. x402's ``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE`` (base64 JSON
    ``SettleResponse``) or MPP's ``Payment-Receipt`` (base64url JSON with ``status``)."""
    for name in (x402_rail.PAYMENT_RESPONSE_HEADER, x402_rail.X_PAYMENT_RESPONSE_HEADER):
        raw = headers.get(name)
        if raw:
            body = _b64json(raw)
            if isinstance(body, dict):
                ok = body.get("success") is True
                return ok, str(body.get("transaction") or "") if ok else str(body.get("errorReason") or "refused")
    raw = headers.get(mpp_rail.PAYMENT_RECEIPT_HEADER)
    if raw:
        body = _b64json(raw.replace("-", "+").replace("_", "/"))
        if isinstance(body, dict):
            ok = body.get("status") == "success"
            return ok, str(body.get("reference") or "") if ok else str(body.get("status") or "refused")
    return None, ""
