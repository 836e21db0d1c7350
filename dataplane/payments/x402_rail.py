"""The x402 payment rail for paid endpoints: challenge, parse, verify, settle (HTTP transport).

A thin adapter over the x402 wire format (plain JSON, spec v2 with v1 for legacy clients) and a
facilitator's HTTP API (``POST /verify``, ``POST /settle``). The SDK is not imported here: its
server middleware is FastAPI/Flask only and buffers the response, and the data plane needs only
the JSON shapes. The facilitator is reached through the caller's ``aiohttp.ClientSession``.

Pure functions: :func:`requirements`, :func:`challenge`, :func:`parse`, :func:`replay_key`,
:func:`payment_response_header`, :func:`amount_nanos`. IO: :func:`verify`, :func:`settle`; they
never raise for a facilitator failure, they answer a :class:`Verdict` / :class:`Settlement` whose
``reason`` says why (``facilitator_unavailable`` when it is down, errs or is too slow).

Replay: a facilitator's verify passes twice for one authorization until it is settled (the
EIP-3009 nonce is consumed on chain only at settle), so the caller claims :func:`replay_key`
atomically before serving. Nothing here logs, and no message quotes a payload's signature.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from dataplane.payments.prices import amount_nanos, per_call
from schemas.entities import PaidEndpoint, X402Rail
from schemas.errors import InvalidRequest

__all__ = ["FACILITATOR_UNAVAILABLE", "PAYMENT_REQUIRED_HEADER", "PAYMENT_RESPONSE_HEADER",
           "PAYMENT_SIGNATURE_HEADER", "X_PAYMENT_HEADER", "X_PAYMENT_RESPONSE_HEADER", "Parsed",
           "Settlement", "Verdict", "amount_nanos", "challenge", "parse", "payment_response_header",
           "replay_key", "requirements", "settle", "verify"]

PAYMENT_REQUIRED_HEADER: Final = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE_HEADER: Final = "PAYMENT-SIGNATURE"  # v2
PAYMENT_RESPONSE_HEADER: Final = "PAYMENT-RESPONSE"  # v2
X_PAYMENT_HEADER: Final = "X-PAYMENT"  # v1
X_PAYMENT_RESPONSE_HEADER: Final = "X-PAYMENT-RESPONSE"  # v1

FACILITATOR_UNAVAILABLE: Final = "facilitator_unavailable"
SETTLEMENT_PENDING: Final = "settlement_pending"  # the SDK facilitators' errorReason
PROBLEM_TYPE: Final = "https://alephant.dev/problems/payment-required"
PAYMENT_IDENTIFIER: Final = "payment-identifier"  # the v2 extension's key

# A payment header is a few hundred bytes of base64 JSON; anything far larger is not one.
_MAX_HEADER_CHARS: Final = 16_384
# The facilitator refuses an authorization expiring in under 6 s; refuse it here first.
_MIN_VALIDITY_S: Final = 6
# Clock skew allowed above `max_timeout_s` when capping validBefore: replay claims are kept until
# validBefore, so an authorization valid for days would pin a claim for days.
_VALIDITY_SLACK_S: Final = 30
_VERIFY_TIMEOUT_S: Final = 5.0
_SETTLE_TIMEOUT_S: Final = 30.0

# CAIP-2 chain ids to the legacy v1 network names (x402 v1 spells networks by name).
V1_NETWORKS: Final[dict[str, str]] = {
    "eip155:8453": "base", "eip155:84532": "base-sepolia", "eip155:1": "ethereum", "eip155:137": "polygon",
    "eip155:80002": "polygon-amoy", "eip155:43114": "avalanche", "eip155:43113": "avalanche-fuji",
    "eip155:2741": "abstract", "eip155:11124": "abstract-testnet", "eip155:4689": "iotex", "eip155:1329": "sei",
    "eip155:1328": "sei-testnet", "eip155:3338": "peaq", "eip155:1513": "story", "eip155:143": "monad",
    "eip155:10143": "monad-testnet", "eip155:42220": "celo",
}


@dataclass(frozen=True, slots=True)
class Parsed:
    """A decoded payment header: ``version`` (2: ``PAYMENT-SIGNATURE``, 1: ``X-PAYMENT``) and the
    ``payload`` (the JSON ``PaymentPayload``). The helpers read the EIP-3009 authorization, which
    :func:`parse` has checked is present with string fields."""

    version: int
    payload: dict[str, Any]

    def __repr__(self) -> str:  # the payload holds the signature: a credential, kept out of logs
        return f"Parsed(version={self.version}, payer={self.payer!r}, nonce={self.nonce!r})"

    @property
    def _authorization(self) -> dict[str, Any]:
        auth: dict[str, Any] = self.payload["payload"]["authorization"]
        return auth

    @property
    def payer(self) -> str:
        """The paying address (``authorization.from``), as sent."""
        return str(self._authorization["from"])

    @property
    def nonce(self) -> str:
        """The EIP-3009 nonce (32 bytes, hex), as sent."""
        return str(self._authorization["nonce"])

    @property
    def amount(self) -> str:
        """The authorized amount (``authorization.value``), atomic units."""
        return str(self._authorization["value"])

    @property
    def valid_before(self) -> int:
        """Unix seconds after which the authorization is void (0 when not an integer)."""
        try:
            return int(self._authorization["validBefore"])
        except ValueError:
            return 0

    @property
    def payment_identifier(self) -> str | None:
        """The v2 ``payment-identifier`` extension's ``info.id``, if any (the client's idempotency key)."""
        ext = (self.payload.get("extensions") or {}).get(PAYMENT_IDENTIFIER)
        info = ext.get("info") if isinstance(ext, dict) else None
        pid = info.get("id") if isinstance(info, dict) else None
        return pid if isinstance(pid, str) and pid else None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :func:`verify`. ``reason`` is ``""`` when ``ok``; otherwise a local reason
    (``unsupported_version``, ``payment_mismatch``, ``recipient_mismatch``, ``amount_mismatch``,
    ``authorization_expired``, ``validity_too_long``), the facilitator's ``invalidReason`` (e.g.
    ``invalid_exact_evm_payload_signature``) or ``facilitator_unavailable``. ``payer`` is the
    facilitator's answer when it gave one, else the payload's ``from``."""

    ok: bool
    reason: str
    payer: str


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of :func:`settle`. ``transaction`` is the tx hash (``""`` when nothing was sent).

    ``pending``: the outcome is unknown, not a failure: the facilitator broadcast but the receipt
    is unconfirmed (``settlement_pending``), or the call timed out or broke off after the request
    was sent. Keep the replay claim and reconcile; do not release it.
    """

    success: bool
    transaction: str
    reason: str
    pending: bool
    network: str = ""
    payer: str = ""
    amount: str = ""


def _rail(endpoint: PaidEndpoint) -> X402Rail:
    rail = endpoint.rails.x402
    if rail is None:
        raise ValueError(f"paid endpoint {endpoint.slug!r} has no x402 rail")
    return rail



def requirements(endpoint: PaidEndpoint) -> list[dict[str, Any]]:
    """The x402 v2 ``PaymentRequirements`` for the endpoint's per-call price (one entry).

    Raises ValueError when the endpoint has no x402 rail or no per-call price (a config error).
    """
    rail, price = _rail(endpoint), per_call(endpoint)
    return [{
        "scheme": rail.scheme,
        "network": rail.network,
        "amount": price.amount,
        "asset": price.asset,
        "payTo": rail.pay_to,
        "maxTimeoutSeconds": rail.max_timeout_s,
        "extra": dict(rail.extra),
    }]


def _requirements_v1(endpoint: PaidEndpoint, resource_url: str) -> list[dict[str, Any]]:
    """The v1 shape of :func:`requirements`; empty when the network has no v1 name."""
    network = V1_NETWORKS.get(_rail(endpoint).network)
    if network is None:
        return []
    return [{
        "scheme": req["scheme"],
        "network": network,
        "maxAmountRequired": req["amount"],
        "resource": resource_url,
        "description": endpoint.description,
        "mimeType": "application/json",
        "payTo": req["payTo"],
        "maxTimeoutSeconds": req["maxTimeoutSeconds"],
        "asset": req["asset"],
        "extra": req["extra"],
    } for req in requirements(endpoint)]


def _b64json(value: Any) -> str:
    return base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode("ascii")


def challenge(endpoint: PaidEndpoint, resource_url: str,
              error: str = "payment required") -> tuple[dict[str, str], bytes]:
    """The 402's headers and body for ``resource_url``.

    Headers: ``PAYMENT-REQUIRED`` (base64 JSON v2 ``PaymentRequired`` with ``resource.url``) when
    the rail accepts v2; ``Cache-Control: no-store``; ``Content-Type: application/problem+json``.
    Body: RFC 9457 ``{type, title, status: 402, detail}``, plus the v1 ``PaymentRequirementsResponse``
    members ``x402Version: 1`` and ``accepts`` when the rail accepts v1 (and the network has a v1
    name). ``error`` is the ``detail`` and the v2 ``error``: caller-facing text, never a secret.
    """
    rail = _rail(endpoint)
    headers = {"Cache-Control": "no-store", "Content-Type": "application/problem+json"}
    if 2 in rail.versions:
        resource: dict[str, str] = {"url": resource_url, "mimeType": "application/json"}
        if endpoint.description:
            resource["description"] = endpoint.description
        headers[PAYMENT_REQUIRED_HEADER] = _b64json({
            "x402Version": 2, "error": error, "resource": resource, "accepts": requirements(endpoint)})
    body: dict[str, Any] = {"type": PROBLEM_TYPE, "title": "Payment Required", "status": 402, "detail": error}
    if 1 in rail.versions:
        accepts = _requirements_v1(endpoint, resource_url)
        if accepts:
            body["x402Version"] = 1
            body["error"] = error
            body["accepts"] = accepts
    return headers, json.dumps(body, separators=(",", ":")).encode()


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_payment", param=None)


def _decode(raw: str, version: int, name: str) -> dict[str, Any]:
    if len(raw) > _MAX_HEADER_CHARS:
        raise _invalid(f"The {name} header is too large.")
    try:
        value = json.loads(base64.b64decode(raw.strip(), validate=True))
    except (binascii.Error, ValueError):
        raise _invalid(f"The {name} header is not base64-encoded JSON.") from None
    if not isinstance(value, dict):
        raise _invalid(f"The {name} header is not a payment payload object.")
    if value.get("x402Version") != version:
        raise _invalid(f"The {name} header must carry x402Version {version}.")
    inner = value.get("payload")
    auth = inner.get("authorization") if isinstance(inner, dict) else None
    if not isinstance(auth, dict) or not isinstance(inner, dict) or not isinstance(inner.get("signature"), str):
        raise _invalid(f"The {name} header lacks a signed EIP-3009 authorization.")
    for field in ("from", "to", "value", "validAfter", "validBefore", "nonce"):
        if not isinstance(auth.get(field), str):
            raise _invalid(f"The {name} header's authorization lacks '{field}'.")
    if version == 2 and not isinstance(value.get("accepted"), dict):
        raise _invalid(f"The {name} header lacks the accepted requirements.")
    if version == 1 and not (isinstance(value.get("scheme"), str) and isinstance(value.get("network"), str)):
        raise _invalid(f"The {name} header lacks scheme and network.")
    return value


def parse(headers: Mapping[str, str]) -> Parsed | None:
    """The payment a request carries: ``PAYMENT-SIGNATURE`` is v2, ``X-PAYMENT`` v1; None when neither.

    Raises InvalidRequest (400) ``ambiguous_payment`` when both (or one twice) are present, or one with
    an MPP credential (``Authorization: Payment ...``), and ``invalid_payment`` when the header is
    not base64 JSON of a ``PaymentPayload`` of its version with an EIP-3009 authorization.
    Header names are matched case-insensitively.
    """
    lower: dict[str, list[str]] = {}
    for name, value in headers.items():  # a multidict may repeat a name
        lower.setdefault(name.lower(), []).append(value)
    v2s, v1s = lower.get("payment-signature", []), lower.get("x-payment", [])
    if not v2s and not v1s:
        return None
    mpp = any(value.lstrip().lower().startswith("payment ")
              for name in ("authorization", "payment-authorization") for value in lower.get(name, []))
    if len(v2s) + len(v1s) > 1 or mpp:
        raise InvalidRequest("Send one payment credential: PAYMENT-SIGNATURE, X-PAYMENT or Authorization: Payment.",
                             code="ambiguous_payment")
    if v2s:
        return Parsed(2, _decode(v2s[0], 2, PAYMENT_SIGNATURE_HEADER))
    return Parsed(1, _decode(v1s[0], 1, X_PAYMENT_HEADER))


def _chain(network: str) -> str:
    return network.split(":", 1)[1] if ":" in network else network


def replay_key(parsed: Parsed, endpoint: PaidEndpoint) -> str:
    """The single-use token of the payment: ``x402:{chain}:{asset}:{from}:{nonce}`` (chain id from
    the rail's CAIP-2 network; asset, payer and nonce lower-cased). Equal for v1 and v2 forms of one
    authorization, as the chain's own nonce check is."""
    return (f"x402:{_chain(_rail(endpoint).network)}:{per_call(endpoint).asset.lower()}:"
            f"{parsed.payer.lower()}:{parsed.nonce.lower()}")


def _mismatch(parsed: Parsed, endpoint: PaidEndpoint, now: float) -> str:
    """A local reason to refuse the payment before calling the facilitator, or ``""``."""
    rail = _rail(endpoint)
    if parsed.version not in rail.versions:
        return "unsupported_version"
    ours = requirements(endpoint)[0]
    if parsed.version == 2:
        accepted = parsed.payload["accepted"]
        for key in ("scheme", "network", "amount"):
            if str(accepted.get(key)) != str(ours[key]):
                return "payment_mismatch"
        for key in ("asset", "payTo"):
            if str(accepted.get(key, "")).lower() != str(ours[key]).lower():
                return "payment_mismatch"
        # As the SDK's resource server matches: the timeout exactly, our `extra` a subset of theirs.
        theirs = accepted.get("extra")
        if (accepted.get("maxTimeoutSeconds") != ours["maxTimeoutSeconds"] or not isinstance(theirs, dict)
                or any(theirs.get(k) != v for k, v in ours["extra"].items())):
            return "payment_mismatch"
    elif (parsed.payload["scheme"] != ours["scheme"]
          or parsed.payload["network"] != V1_NETWORKS.get(rail.network)):
        return "payment_mismatch"
    auth = parsed.payload["payload"]["authorization"]
    if auth["to"].lower() != rail.pay_to.lower():
        return "recipient_mismatch"
    if parsed.amount != ours["amount"]:
        return "amount_mismatch"
    if parsed.valid_before < now + _MIN_VALIDITY_S:
        return "authorization_expired"
    if parsed.valid_before > now + rail.max_timeout_s + _VALIDITY_SLACK_S:
        return "validity_too_long"
    return ""


def _request_body(parsed: Parsed, endpoint: PaidEndpoint, resource_url: str) -> dict[str, Any]:
    reqs = requirements(endpoint) if parsed.version == 2 else _requirements_v1(endpoint, resource_url)
    return {"x402Version": parsed.version, "paymentPayload": parsed.payload, "paymentRequirements": reqs[0]}


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                timeout_s: float) -> dict[str, Any] | None:
    """POST ``body``; the JSON object answered with 200, None for any other status or body."""
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            return None
        try:
            value = await resp.json(content_type=None)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


def _url(endpoint: PaidEndpoint, path: str) -> str:
    return _rail(endpoint).facilitator_url.rstrip("/") + path


async def verify(session: aiohttp.ClientSession, endpoint: PaidEndpoint, parsed: Parsed, *,
                 resource_url: str = "", timeout_s: float = _VERIFY_TIMEOUT_S) -> Verdict:
    """Check the payment against the endpoint's requirements, then with the facilitator.

    Local refusals first (no IO): a version the rail does not take; v2 ``accepted`` requirements
    (or v1 scheme/network) that differ from ours (``payment_mismatch``: scheme, network, amount,
    asset, payTo, maxTimeoutSeconds exactly, our ``extra`` a subset, as the SDK's resource server
    matches them); an authorization to another payee or of another amount; a ``validBefore``
    already (nearly) past or further out than ``max_timeout_s``. Then POST ``/verify`` to the
    rail's facilitator with our requirements, bounded by ``timeout_s``. A facilitator that is
    down, errs, answers non-JSON or times out gives ``facilitator_unavailable``. Passing verify
    does not spend the payment: see the module docstring on replay.
    ``resource_url`` fills the v1 requirements' ``resource``.
    """
    reason = _mismatch(parsed, endpoint, time.time())
    if reason:
        return Verdict(False, reason, parsed.payer)
    try:
        answer = await _post(session, _url(endpoint, "/verify"), _request_body(parsed, endpoint, resource_url),
                             timeout_s)
    except (aiohttp.ClientError, TimeoutError):
        answer = None
    if answer is None or not isinstance(answer.get("isValid"), bool):
        return Verdict(False, FACILITATOR_UNAVAILABLE, parsed.payer)
    payer = str(answer.get("payer") or parsed.payer)
    if answer["isValid"]:
        return Verdict(True, "", payer)
    return Verdict(False, str(answer.get("invalidReason") or "invalid_payment"), payer)


async def settle(session: aiohttp.ClientSession, endpoint: PaidEndpoint, parsed: Parsed, *,
                 resource_url: str = "", timeout_s: float = _SETTLE_TIMEOUT_S) -> Settlement:
    """``POST {facilitator_url}/settle``: move the money on chain. Call once per verified payment.

    Never raises for the facilitator. ``success`` with the tx hash; otherwise ``reason`` is the
    facilitator's ``errorReason`` (e.g. ``invalid_exact_evm_nonce_already_used`` on a replay) or
    ``facilitator_unavailable``. ``pending`` when the facilitator answered ``settlement_pending``
    or the call timed out / broke off after sending (money may have moved); a refused connection
    or an error status is not pending (nothing was broadcast by this call).
    """
    network = _rail(endpoint).network
    pending = False
    try:
        answer = await _post(session, _url(endpoint, "/settle"), _request_body(parsed, endpoint, resource_url),
                             timeout_s)
    except (aiohttp.ClientConnectorError, aiohttp.ClientResponseError):
        answer = None
    except (aiohttp.ClientError, TimeoutError):
        answer, pending = None, True
    if answer is None or not isinstance(answer.get("success"), bool):
        return Settlement(False, "", FACILITATOR_UNAVAILABLE, pending, network, parsed.payer, parsed.amount)
    tx = str(answer.get("transaction") or "")
    payer = str(answer.get("payer") or parsed.payer)
    amount = str(answer.get("amount") or parsed.amount)
    if answer["success"]:
        return Settlement(True, tx, "", False, network, payer, amount)
    reason = str(answer.get("errorReason") or "settlement_failed")
    return Settlement(False, tx, reason, reason == SETTLEMENT_PENDING, network, payer, amount)


def payment_response_header(settlement: Settlement, version: int) -> tuple[str, str]:
    """(``PAYMENT-RESPONSE`` for v2 or ``X-PAYMENT-RESPONSE`` for v1, base64 JSON ``SettleResponse``).

    A failure carries its ``errorReason``; a pending settlement ``success: false`` with
    ``errorReason: settlement_pending`` and the tx hash when there is one."""
    body: dict[str, Any] = {"success": settlement.success, "transaction": settlement.transaction,
                            "network": settlement.network}
    if settlement.payer:
        body["payer"] = settlement.payer
    if settlement.pending:  # broadcast, or maybe: the SDK's word for "not known yet", not a failure
        body["errorReason"] = SETTLEMENT_PENDING
    elif not settlement.success:
        body["errorReason"] = settlement.reason or "settlement_failed"
    if version == 2 and settlement.amount:
        body["amount"] = settlement.amount
    if version == 1 and settlement.network in V1_NETWORKS:
        body["network"] = V1_NETWORKS[settlement.network]
    return (PAYMENT_RESPONSE_HEADER if version == 2 else X_PAYMENT_RESPONSE_HEADER), _b64json(body)

