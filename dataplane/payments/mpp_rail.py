"""The MPP payment rail for paid endpoints: the ``Payment`` HTTP auth scheme, ``evm`` ``charge``.

Machine Payments Protocol (``draft-ryan-httpauth-payment``, ``draft-evm-charge``): a 402 carries
``WWW-Authenticate: Payment id=…, realm=…, method="evm", intent="charge", request=…, expires=…,
opaque=…``; the client answers ``Authorization: Payment <base64url JSON credential>`` (or
``Payment-Authorization``) echoing the challenge, with an EIP-3009 ``authorization`` payload whose
nonce is ``keccak256(JSON [challenge id, realm])``; the server submits the transfer and answers
``Payment-Receipt``. Wire-compatible with ``pympp`` 0.16 (``mpp.methods.evm``), which is not
imported here: its server is a framework-neutral handler that settles before serving, and the
data plane verifies, serves, then settles.

Challenge binding is stateless: ``id = base64url(HMAC-SHA256(secret,
realm|method|intent|request_b64|expires|digest|opaque_b64))`` as pympp computes it (``secret`` is
the per-gateway key; pympp's ``secret_key`` string is its UTF-8). ``opaque`` binds the endpoint's
slug, so a challenge of one endpoint does not pay another.

Pure functions: :func:`challenge_headers`, :func:`parse`, :func:`replay_key`, :func:`verify`,
:func:`receipt_header`, :func:`amount_nanos`. IO: :func:`settle`, through a :data:`Submitter`
(the thing that sends ``transferWithAuthorization`` and answers the tx hash). :class:`ChainSubmitter`
adapts an x402 ``FacilitatorEvmSigner``-like chain object (``read_contract``/``write_contract``/
``wait_for_transaction_receipt``; the tests' ``FakeUsdc``). Production settlement over an RPC
signer is NOT wired yet: plug a submitter holding a funded key (gas) when it is.

Replay: the credential is single-use through its EIP-3009 nonce (bound to the challenge id); the
caller claims :func:`replay_key` atomically before serving, as for x402, and the chain refuses a
second ``transferWithAuthorization``. Verification recovers the EIP-712 signer with eth-account,
imported on first use with the interpreter's recursion limit put back (py_ecc raises it on import,
and the gateway's JSON depth guard relies on the default). Nothing here logs, and no message
quotes a credential.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import aiohttp

from dataplane.payments.prices import amount_nanos, per_call
from dataplane.payments.x402_rail import Settlement, Verdict
from schemas.entities import PaidAmount
from schemas.errors import InvalidRequest
from schemas.evm import import_keeping_recursion_limit

__all__ = ["AUTHORIZATION_HEADER", "PAYMENT_AUTHORIZATION_HEADER", "PAYMENT_RECEIPT_HEADER", "SUPPORTED_METHODS",
           "WWW_AUTHENTICATE_HEADER", "ChainSubmitter", "EndpointLike", "MppParsed", "MppRailLike", "Settlement",
           "SubmitRefused", "Submitter", "Transfer", "Verdict", "amount_nanos", "challenge_hash", "challenge_headers",
           "expected_request", "parse", "receipt_header", "replay_key", "settle", "verify"]

WWW_AUTHENTICATE_HEADER: Final = "WWW-Authenticate"
AUTHORIZATION_HEADER: Final = "Authorization"
PAYMENT_AUTHORIZATION_HEADER: Final = "Payment-Authorization"  # pympp's requires_auth: Authorization stays the API key
PAYMENT_RECEIPT_HEADER: Final = "Payment-Receipt"

SUPPORTED_METHODS: Final = ("evm",)
INTENT: Final = "charge"
CREDENTIAL_TYPE: Final = "authorization"  # EIP-3009, the only evm charge credential handled here
SETTLEMENT_UNKNOWN: Final = "settlement_unknown"

# A credential echoes its challenge (the request alone may be 16 KiB): pympp and mppx allow 64 KiB.
_MAX_HEADER_CHARS: Final = 65_536
# Clock skew allowed on validBefore past the challenge's own (HMAC-bound) expiry.
_VALIDITY_SLACK_S: Final = 30
_ADDRESS_RE: Final = re.compile(r"0x[0-9a-fA-F]{40}")
_HASH_RE: Final = re.compile(r"0x[0-9a-fA-F]{64}")
_SIGNATURE_RE: Final = re.compile(r"0x[0-9a-fA-F]{130}")
_ATOMIC_RE: Final = re.compile(r"[0-9]{1,78}")
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_UINT256_MAX: Final = 2**256 - 1
_AUTH_FIELDS: Final = (("from", _ADDRESS_RE), ("to", _ADDRESS_RE), ("nonce", _HASH_RE), ("signature", _SIGNATURE_RE),
                       ("value", _ATOMIC_RE), ("validAfter", _ATOMIC_RE), ("validBefore", _ATOMIC_RE))
_AUTHORIZATION_TYPES: Final = {"TransferWithAuthorization": [
    {"name": "from", "type": "address"}, {"name": "to", "type": "address"}, {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"}, {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"}]}
# USDC's (FiatTokenV2) v, r, s overload, as the x402 facilitators call it.
_TRANSFER_WITH_AUTHORIZATION_ABI: Final[list[dict[str, Any]]] = [{
    "inputs": [{"name": "from", "type": "address"}, {"name": "to", "type": "address"},
               {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
               {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"},
               {"name": "v", "type": "uint8"}, {"name": "r", "type": "bytes32"}, {"name": "s", "type": "bytes32"}],
    "name": "transferWithAuthorization", "outputs": [], "stateMutability": "nonpayable", "type": "function"}]


# -- config shapes (the lead's `MppRail` on `PaidRails.mpp`; any object with these attributes) --

class MppRailLike(Protocol):
    @property
    def realm(self) -> str: ...
    @property
    def recipient(self) -> str: ...
    @property
    def network(self) -> str: ...  # CAIP-2, "eip155:84532"
    @property
    def methods(self) -> tuple[str, ...]: ...
    @property
    def challenge_ttl_s(self) -> int: ...


class _RailsLike(Protocol):
    @property
    def mpp(self) -> MppRailLike | None: ...


class _PriceLike(Protocol):
    @property
    def per_call(self) -> PaidAmount | None: ...


class EndpointLike(Protocol):
    @property
    def slug(self) -> str: ...
    @property
    def price(self) -> _PriceLike: ...
    @property
    def rails(self) -> _RailsLike: ...


def _rail(endpoint: EndpointLike) -> MppRailLike:
    rail = endpoint.rails.mpp
    if rail is None:
        raise ValueError(f"paid endpoint {endpoint.slug!r} has no mpp rail")
    return rail



def _chain_id(network: str) -> int:
    namespace, _, reference = network.partition(":")
    if namespace != "eip155" or not reference.isdigit():
        raise ValueError(f"mpp evm rail network {network!r} is not an eip155 CAIP-2 id")
    return int(reference)


# -- encoding --------------------------------------------------------------------------------

def _jcs(value: Any) -> bytes:
    """RFC 8785 canonical JSON for the values used here (objects with ASCII keys, strings,
    integers, lists): sorted keys, no whitespace, UTF-8, json's minimal escapes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64url_json(raw: str, what: str) -> Any:
    if not _B64URL_RE.fullmatch(raw):
        raise _invalid(f"The {what} is not base64url-encoded JSON.")
    try:
        return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        raise _invalid(f"The {what} is not base64url-encoded JSON.") from None


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _timestamp(value: str) -> float | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


def _challenge_id(secret: bytes, realm: str, method: str, intent: str, request_b64: str, expires: str,
                  digest: str, opaque_b64: str) -> str:
    text = "|".join((realm, method, intent, request_b64, expires, digest, opaque_b64))
    return _b64url(hmac.new(secret, text.encode(), hashlib.sha256).digest())


def _quoted(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("a Payment challenge parameter may not contain CR or LF")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- challenge -------------------------------------------------------------------------------

def expected_request(endpoint: EndpointLike, method: str = "evm") -> dict[str, Any]:
    """The ``charge`` request we ask for: ``{amount, currency, recipient, methodDetails: {chainId,
    credentialTypes: ["authorization"], decimals}}`` (pympp's ``evm/charge`` wire request; amount
    in the asset's atomic units). Raises ValueError for a method not in :data:`SUPPORTED_METHODS`."""
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"mpp method {method!r} is not supported")
    rail, price = _rail(endpoint), per_call(endpoint)
    return {"amount": price.amount, "currency": price.asset, "recipient": rail.recipient,
            "methodDetails": {"chainId": _chain_id(rail.network), "credentialTypes": [CREDENTIAL_TYPE],
                              "decimals": price.decimals}}


def _opaque(endpoint: EndpointLike) -> dict[str, str]:
    return {"slug": endpoint.slug}


def challenge_headers(endpoint: EndpointLike, resource_url: str, secret: bytes, now: float) -> list[str]:
    """The ``WWW-Authenticate`` values of a 402, one per rail method this module implements
    (``evm``; others configured are skipped). Each is ``Payment id, realm, method, intent="charge",
    request (base64url JCS of :func:`expected_request`), expires (now + ``challenge_ttl_s``,
    RFC 3339), opaque (base64url JCS ``{"slug"}``)`` with ``id`` the HMAC binding (module
    docstring). ``resource_url`` is not bound (the slug is: sub-paths of one endpoint share a price).
    The caller adds ``Cache-Control: no-store``. Raises ValueError on a config error."""
    del resource_url  # the slug is bound instead; kept for the x402 rail's call shape
    rail = _rail(endpoint)
    expires = _rfc3339(now + rail.challenge_ttl_s)
    opaque_b64 = _b64url(_jcs(_opaque(endpoint)))
    values = []
    for method in rail.methods:
        if method not in SUPPORTED_METHODS:
            continue
        request_b64 = _b64url(_jcs(expected_request(endpoint, method)))
        cid = _challenge_id(secret, rail.realm, method, INTENT, request_b64, expires, "", opaque_b64)
        values.append("Payment " + ", ".join(
            f"{k}={_quoted(v)}" for k, v in (("id", cid), ("realm", rail.realm), ("method", method),
                                             ("intent", INTENT), ("request", request_b64), ("expires", expires),
                                             ("opaque", opaque_b64))))
    return values


# -- parse -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MppParsed:
    """A decoded ``Payment`` credential: the echoed ``challenge`` (string fields: id, realm,
    method, intent, request (base64url), expires/digest/opaque when sent), its decoded ``request``,
    the evm ``payload`` (an EIP-3009 authorization, fields checked by :func:`parse`), the optional
    ``source`` DID, and the ``header`` that carried it."""

    challenge: dict[str, str]
    request: dict[str, Any]
    payload: dict[str, str]
    source: str | None
    header: str

    def __repr__(self) -> str:  # the payload holds the signature: a credential, kept out of logs
        return f"MppParsed(method={self.method!r}, payer={self.payer!r}, nonce={self.nonce!r})"

    @property
    def method(self) -> str:
        return self.challenge["method"]

    @property
    def challenge_id(self) -> str:
        return self.challenge["id"]

    @property
    def payer(self) -> str:
        """The paying address (``payload.from``), as sent."""
        return self.payload["from"]

    @property
    def nonce(self) -> str:
        """The EIP-3009 nonce (32 bytes hex), as sent."""
        return self.payload["nonce"]

    @property
    def amount(self) -> str:
        """The authorized amount (``payload.value``), atomic units."""
        return self.payload["value"]


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_payment", param=None)


def _decode(raw: str, name: str) -> MppParsed:
    if len(raw) > _MAX_HEADER_CHARS:
        raise _invalid(f"The {name} header is too large.")
    value = _b64url_json(raw.strip()[len("payment "):].strip(), f"{name} Payment credential")
    if not isinstance(value, dict):
        raise _invalid(f"The {name} Payment credential is not an object.")
    echo, payload, source = value.get("challenge"), value.get("payload"), value.get("source")
    if not isinstance(echo, dict) or not isinstance(payload, dict):
        raise _invalid(f"The {name} Payment credential lacks its challenge or payload.")
    for key in ("id", "realm", "method", "intent", "request"):
        if not isinstance(echo.get(key), str) or not echo[key]:
            raise _invalid(f"The {name} Payment credential's challenge lacks '{key}'.")
    challenge = {k: v for k, v in echo.items() if isinstance(v, str)
                 and k in ("id", "realm", "method", "intent", "request", "expires", "digest", "opaque")}
    if challenge["method"] not in SUPPORTED_METHODS or challenge["intent"] != INTENT:
        raise _invalid(f"The {name} Payment credential is not for a method and intent accepted here "
                       f"({', '.join(SUPPORTED_METHODS)} {INTENT}).")
    request = _b64url_json(challenge["request"], f"{name} Payment credential's challenge request")
    details = request.get("methodDetails") if isinstance(request, dict) else None
    if (not isinstance(details, dict) or isinstance(details.get("chainId"), bool)
            or not isinstance(details.get("chainId"), int) or not isinstance(request.get("currency"), str)):
        raise _invalid(f"The {name} Payment credential's challenge request is not an evm charge.")
    if payload.get("type") != CREDENTIAL_TYPE:
        raise _invalid(f"The {name} Payment credential's payload is not an EIP-3009 authorization.")
    for field, pattern in _AUTH_FIELDS:
        if not isinstance(payload.get(field), str) or not pattern.fullmatch(payload[field]):
            raise _invalid(f"The {name} Payment credential's authorization has a malformed '{field}'.")
    if any(int(payload[field]) > _UINT256_MAX for field in ("value", "validAfter", "validBefore")):
        raise _invalid(f"The {name} Payment credential's authorization is out of range.")
    if source is not None and not isinstance(source, str):
        raise _invalid(f"The {name} Payment credential's source is not a string.")
    fields = {field: payload[field] for field, _ in _AUTH_FIELDS}
    return MppParsed(challenge, request, fields, source or None, name)


def parse(headers: Mapping[str, str]) -> MppParsed | None:
    """The ``Payment`` credential a request carries in ``Authorization`` or
    ``Payment-Authorization`` (scheme ``Payment``, case-insensitive); None when there is none
    (another scheme, e.g. ``Bearer``, is not ours).

    Raises InvalidRequest (400) ``ambiguous_payment`` when two credentials are present (both
    headers, one twice, or an x402 ``PAYMENT-SIGNATURE``/``X-PAYMENT`` too) and ``invalid_payment``
    when it is not base64url JSON of ``{challenge, payload, source?}`` for ``evm`` ``charge``
    with a well-formed EIP-3009 authorization. Messages never quote the credential.
    """
    lower: dict[str, list[str]] = {}
    for name, value in headers.items():  # a multidict may repeat a name
        lower.setdefault(name.lower(), []).append(value)
    found = [(canonical, value) for canonical in (AUTHORIZATION_HEADER, PAYMENT_AUTHORIZATION_HEADER)
             for value in lower.get(canonical.lower(), []) if value.lstrip().lower().startswith("payment ")]
    if not found:
        return None
    if len(found) > 1 or lower.get("payment-signature") or lower.get("x-payment"):
        raise InvalidRequest("Send one payment credential: PAYMENT-SIGNATURE, X-PAYMENT or Authorization: Payment.",
                             code="ambiguous_payment")
    name, raw = found[0]
    return _decode(raw, name)


def replay_key(parsed: MppParsed) -> str:
    """The single-use token: ``mpp:evm:{chainId}:{currency}:{from}:{nonce}`` (from the echoed
    request, which :func:`verify` checks is ours; currency, payer and nonce lower-cased), the
    chain's own nonce key of the EIP-3009 transfer."""
    request = parsed.request
    return (f"mpp:{parsed.method}:{request['methodDetails']['chainId']}:{str(request['currency']).lower()}:"
            f"{parsed.payer.lower()}:{parsed.nonce.lower()}")


# -- verify ----------------------------------------------------------------------------------

def _eth() -> tuple[Any, Any, Any]:
    """eth-account's ``Account``, ``encode_typed_data`` and eth-utils' ``keccak``, imported on first
    use; py_ecc (under eth-account) raises the recursion limit on import: it is put back."""
    account = import_keeping_recursion_limit("eth_account").Account
    messages = import_keeping_recursion_limit("eth_account.messages")
    return account, messages.encode_typed_data, import_keeping_recursion_limit("eth_utils.crypto").keccak


def challenge_hash(challenge_id: str, realm: str) -> str:
    """The EIP-3009 nonce an evm charge credential must carry: ``keccak256(JSON [id, realm])``
    (compact JSON, as pympp and mppx sign it), 0x-prefixed lower-case hex."""
    keccak = _eth()[2]
    encoded = json.dumps([challenge_id, realm], separators=(",", ":"), ensure_ascii=False)
    return "0x" + bytes(keccak(text=encoded)).hex()


def _recover(payload: Mapping[str, str], chain_id: int, asset: str, domain_name: str, domain_version: str) -> str:
    account, encode_typed_data, _ = _eth()
    signable = encode_typed_data(
        domain_data={"name": domain_name, "version": domain_version, "chainId": chain_id,
                     "verifyingContract": asset},
        message_types=_AUTHORIZATION_TYPES,
        message_data={"from": payload["from"], "to": payload["to"], "value": int(payload["value"]),
                      "validAfter": int(payload["validAfter"]), "validBefore": int(payload["validBefore"]),
                      "nonce": bytes.fromhex(payload["nonce"][2:])})
    return str(account.recover_message(signable, signature=payload["signature"]))


def _refusal(parsed: MppParsed, endpoint: EndpointLike, secret: bytes, now: float,
             domain_name: str, domain_version: str) -> str:
    rail = _rail(endpoint)
    echo = parsed.challenge
    if parsed.method not in rail.methods:
        return "unsupported_method"
    cid = _challenge_id(secret, echo["realm"], echo["method"], echo["intent"], echo["request"],
                        echo.get("expires", ""), echo.get("digest", ""), echo.get("opaque", ""))
    if not hmac.compare_digest(cid.encode(), echo["id"].encode()):
        return "challenge_invalid"  # forged, or a parameter changed after we issued it
    if echo["realm"] != rail.realm or echo.get("opaque", "") != _b64url(_jcs(_opaque(endpoint))):
        return "challenge_mismatch"  # ours, but for another realm (key shared) or endpoint
    expires = _timestamp(echo.get("expires", ""))
    if expires is None or expires <= now:
        return "challenge_expired"
    ours = expected_request(endpoint, parsed.method)
    theirs = parsed.request
    if str(theirs.get("currency", "")).lower() != ours["currency"].lower() or theirs.get(
            "methodDetails", {}).get("chainId") != ours["methodDetails"]["chainId"]:
        return "payment_mismatch"
    if str(theirs.get("recipient", "")).lower() != ours["recipient"].lower():
        return "recipient_mismatch"
    if theirs.get("amount") != ours["amount"]:
        return "amount_mismatch"  # the price changed since the challenge
    auth = parsed.payload
    if auth["to"].lower() != rail.recipient.lower():
        return "recipient_mismatch"
    if auth["value"] != ours["amount"]:
        return "amount_mismatch"
    if auth["nonce"].lower() != challenge_hash(echo["id"], echo["realm"]):
        return "challenge_mismatch"  # the authorization is not bound to this challenge
    if int(auth["validAfter"]) > now:
        return "authorization_not_yet_valid"
    if int(auth["validBefore"]) <= now:
        return "authorization_expired"
    if int(auth["validBefore"]) > expires + _VALIDITY_SLACK_S:
        return "validity_too_long"
    try:
        signer = _recover(auth, ours["methodDetails"]["chainId"], ours["currency"], domain_name, domain_version)
    except Exception:  # eth-account raises several types for a bad signature; none is quoted
        return "invalid_signature"
    if signer.lower() != auth["from"].lower():
        return "invalid_signature"
    if parsed.source is not None and parsed.source.lower() != (
            f"did:pkh:eip155:{ours['methodDetails']['chainId']}:{auth['from']}").lower():
        return "source_mismatch"
    return ""


def verify(parsed: MppParsed, endpoint: EndpointLike, secret: bytes, now: float, *,
           domain_name: str = "USDC", domain_version: str = "2") -> Verdict:
    """Check a credential against the endpoint, with no IO (stateless, so not single-use: claim
    :func:`replay_key` before serving). In order: the method is on the rail (``unsupported_method``);
    the challenge ``id`` is our HMAC of the echoed parameters (``challenge_invalid``), for our realm
    and this endpoint (``challenge_mismatch``), not expired at ``now`` (``challenge_expired``); the
    echoed request's currency and chain are ours (``payment_mismatch``), recipient
    (``recipient_mismatch``) and amount (``amount_mismatch``, e.g. after a price change); the
    authorization pays our recipient our amount, carries the challenge's nonce
    (``challenge_mismatch``), is valid now (``authorization_not_yet_valid``,
    ``authorization_expired``) and not past the challenge's expiry (``validity_too_long``); its
    EIP-712 signature under the token's domain (``{name: domain_name, version: domain_version,
    chainId, verifyingContract: asset}``) recovers to ``from`` (``invalid_signature``); a ``source``
    DID names that payer (``source_mismatch``). Raises ValueError on a config error only."""
    reason = _refusal(parsed, endpoint, secret, now, domain_name, domain_version)
    return Verdict(not reason, reason, parsed.payer)


# -- settle ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Transfer:
    """A verified EIP-3009 ``transferWithAuthorization`` to submit on ``chain_id``'s ``token``."""

    chain_id: int
    token: str
    payer: str
    recipient: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signature: bytes

    def __repr__(self) -> str:  # the signature is spendable until submitted
        return f"Transfer(chain_id={self.chain_id}, payer={self.payer!r}, value={self.value})"


class SubmitRefused(Exception):
    """The chain refused the transfer and nothing moved: ``reason`` (snake_case), with the tx hash
    when a transaction was mined and reverted."""

    def __init__(self, reason: str, transaction: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.transaction = transaction


Submitter = Callable[[Transfer], Awaitable[str]]
"""Submits a transfer and answers its tx hash once it succeeded on chain. Raises
:class:`SubmitRefused` when nothing moved; any other exception means the outcome is unknown."""


def _revert_reason(message: str) -> str:
    lowered = message.lower()
    for needle, reason in (("authorization is used", "nonce_already_used"), ("is expired", "authorization_expired"),
                           ("not yet valid", "authorization_not_yet_valid"), ("exceeds balance", "insufficient_funds")):
        if needle in lowered:
            return reason
    return "transaction_reverted" if "revert" in lowered else "chain_unavailable"


class ChainSubmitter:
    """A :data:`Submitter` over a chain object with the x402 ``FacilitatorEvmSigner`` calls
    (``read_contract`` to simulate, ``write_contract`` to send, ``wait_for_transaction_receipt``),
    e.g. the tests' ``FakeUsdc``. Its calls are blocking, so they run in a thread. A failed
    simulation is a refusal (nothing sent); a failure after ``write_contract`` was called is an
    unknown outcome (raised as is)."""

    def __init__(self, chain: Any) -> None:
        self.chain = chain

    def _submit(self, transfer: Transfer) -> str:
        v = transfer.signature[64] + (27 if transfer.signature[64] in (0, 1) else 0)
        args = (transfer.payer, transfer.recipient, transfer.value, transfer.valid_after, transfer.valid_before,
                transfer.nonce, v, transfer.signature[:32], transfer.signature[32:64])
        try:
            self.chain.read_contract(transfer.token, _TRANSFER_WITH_AUTHORIZATION_ABI, "transferWithAuthorization",
                                     *args)
        except Exception as exc:
            raise SubmitRefused(_revert_reason(str(exc))) from None
        tx = str(self.chain.write_contract(transfer.token, _TRANSFER_WITH_AUTHORIZATION_ABI,
                                           "transferWithAuthorization", *args))
        receipt = self.chain.wait_for_transaction_receipt(tx)
        if getattr(receipt, "status", None) != 1:
            raise SubmitRefused("transaction_reverted", tx)
        return tx

    async def __call__(self, transfer: Transfer) -> str:
        return await asyncio.to_thread(self._submit, transfer)


class HttpSubmitter:
    """A :data:`Submitter` over a relayer's HTTP API (the rail's `relayer_url`): `POST {url}/submit`
    with the authorization's fields (`chainId`, `token`, `from`, `to`, `value`, `validAfter`,
    `validBefore`, `nonce` and `signature` as 0x hex) answers 200 `{"transaction"}` once the
    transfer succeeded, or 409/422 `{"error": <reason>}` when nothing moved (a refusal); anything
    else (5xx, a timeout, a broken connection) is an unknown outcome."""

    def __init__(self, session: aiohttp.ClientSession, url: str, timeout_s: float = 30.0) -> None:
        self.session, self.url, self.timeout_s = session, url.rstrip("/") + "/submit", timeout_s

    async def __call__(self, transfer: Transfer) -> str:
        body = {"chainId": transfer.chain_id, "token": transfer.token, "from": transfer.payer,
                "to": transfer.recipient, "value": str(transfer.value), "validAfter": str(transfer.valid_after),
                "validBefore": str(transfer.valid_before), "nonce": "0x" + transfer.nonce.hex(),
                "signature": "0x" + transfer.signature.hex()}
        async with self.session.post(self.url, json=body, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                     allow_redirects=False) as resp:
            answer = await resp.json(content_type=None)
            if resp.status in (409, 422):
                raise SubmitRefused(str(answer.get("error") or "refused")[:100], str(answer.get("transaction", "")))
            if resp.status != 200 or not isinstance(answer.get("transaction"), str):
                raise RuntimeError(f"relayer answered {resp.status}")
            return str(answer["transaction"])


async def settle(submitter: Submitter, parsed: MppParsed, endpoint: EndpointLike) -> Settlement:
    """Submit the verified authorization through ``submitter``. Call once per verified, claimed
    credential. Never raises for the chain: ``success`` with the tx hash; a refusal
    (:class:`SubmitRefused`, e.g. ``nonce_already_used`` on a replay) is a failure, not pending;
    any other error is ``pending`` with ``settlement_unknown`` (money may have moved: keep the
    replay claim and reconcile). ``network`` is the rail's CAIP-2 id."""
    rail, price = _rail(endpoint), per_call(endpoint)
    auth = parsed.payload
    transfer = Transfer(chain_id=_chain_id(rail.network), token=price.asset, payer=auth["from"],
                        recipient=auth["to"], value=int(auth["value"]), valid_after=int(auth["validAfter"]),
                        valid_before=int(auth["validBefore"]), nonce=bytes.fromhex(auth["nonce"][2:]),
                        signature=bytes.fromhex(auth["signature"][2:]))
    try:
        tx = await submitter(transfer)
    except SubmitRefused as exc:
        return Settlement(False, exc.transaction, exc.reason, False, rail.network, parsed.payer, parsed.amount)
    except Exception:  # the submitter's failure after it may have broadcast: unknown, not failed
        return Settlement(False, "", SETTLEMENT_UNKNOWN, True, rail.network, parsed.payer, parsed.amount)
    return Settlement(True, tx, "", False, rail.network, parsed.payer, parsed.amount)


def receipt_header(settlement: Settlement, method: str, now: float | None = None) -> tuple[str, str]:
    """(``Payment-Receipt``, base64url JSON ``{status: "success", method, timestamp (RFC 3339),
    reference (the tx hash)}``), as pympp formats it. Only for a successful settlement (the spec
    sends receipts on 2xx only): raises ValueError otherwise. The caller adds
    ``Cache-Control: private``. ``now`` (Unix seconds) defaults to the clock."""
    if not settlement.success:
        raise ValueError("a Payment-Receipt is only sent for a successful settlement")
    body = {"status": "success", "method": method, "timestamp": _rfc3339(time.time() if now is None else now),
            "reference": settlement.transaction}
    return PAYMENT_RECEIPT_HEADER, _b64url(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())

