"""A fake x402 facilitator over a fake chain, and a client that pays a 402, for tests.

:class:`FakeFacilitator` serves the facilitator HTTP API (``POST /verify``, ``POST /settle``,
``GET /supported``) with the x402 SDK's own in-process ``x402Facilitator`` and exact-EVM schemes
(v2 and v1). Their chain is :class:`FakeUsdc`, a signer that emulates one USDC-like token's
``transferWithAuthorization`` (EIP-3009): balances, used nonces, validity window, Transfer logs.
So verify does the SDK's real EIP-712 signature recovery; a replayed authorization fails at
settle (and at verify once settled) with ``invalid_exact_evm_nonce_already_used``, as on chain.

Knobs: ``down`` (answer every request 503), ``fail_settle`` (while set, settles fail with that
``errorReason`` and move nothing). Counters: ``verifies``, ``settles`` (requests that reached
the SDK), ``settled`` (the transfers made, in order). ``chain`` is the token, for balances.

:func:`pay` builds the payment header for a 402 with the SDK's client and an eth-account key.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from x402 import x402Client, x402Facilitator
from x402.mechanisms.evm.exact import ExactEvmClientScheme, ExactEvmFacilitatorScheme
from x402.mechanisms.evm.exact.v1 import ExactEvmSchemeV1Client, ExactEvmSchemeV1Facilitator
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.types import TransactionReceipt, TypedDataDomain, TypedDataField
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequiredV1, PaymentRequirementsV1

from dataplane.payments.mpp_rail import ChainSubmitter, SubmitRefused
from dataplane.payments.mpp_rail import Transfer as MppTransfer
from tests.fakes.server import FakeServer

# py_ecc (under eth-account) raises the interpreter's recursion limit to 100000 on import. The
# gateway's JSON depth guard relies on the default: a body nested deeper than the stack allows
# must raise RecursionError, not overflow the C stack. Tests share one interpreter (collection
# imports this module before any test runs), so the default is put back.
PYTHON_DEFAULT_RECURSION_LIMIT: Final = 1000
sys.setrecursionlimit(PYTHON_DEFAULT_RECURSION_LIMIT)

__all__ = ["BASE_SEPOLIA_USDC", "FakeFacilitator", "FakeUsdc", "Transfer", "pay"]

#: Circle's USDC on Base Sepolia: the asset the SDK knows for ``eip155:84532``.
BASE_SEPOLIA_USDC: Final = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
_TRANSFER_TOPIC: Final = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
_V1_NAMES: Final = {84532: "base-sepolia", 8453: "base"}


@dataclass(frozen=True, slots=True)
class Transfer:
    """One settled ``transferWithAuthorization``."""

    tx: str
    payer: str
    pay_to: str
    value: int
    nonce: str


def _address_topic(address: str) -> str:
    return "0x" + address.lower().removeprefix("0x").rjust(64, "0")


@dataclass
class FakeUsdc:
    """A ``FacilitatorEvmSigner`` over one EIP-3009 token at ``token`` on ``chain_id``.

    Every address holds ``default_balance`` until it pays (``balances`` overrides). Only the token
    has code, so payers are EOAs and signatures are checked by ecrecover. The contract's own
    checks run in ``read_contract`` (simulation) and ``write_contract`` (settlement); it trusts the
    signature the facilitator already recovered, as the SDK's verify-then-settle does.
    """

    token: str = BASE_SEPOLIA_USDC
    chain_id: int = 84532
    default_balance: int = 10**12
    balances: dict[str, int] = field(default_factory=dict)
    used_nonces: set[tuple[str, str]] = field(default_factory=set)
    receipts: dict[str, TransactionReceipt] = field(default_factory=dict)
    address: str = "0x00000000000000000000000000000000FAC11174"

    def balance(self, address: str) -> int:
        return self.balances.get(address.lower(), self.default_balance)

    def _check(self, args: tuple[Any, ...]) -> tuple[str, str, int, str]:
        from_address, to, value, valid_after, valid_before, nonce = args[:6]
        nonce_hex = "0x" + bytes(nonce).hex()
        now = int(time.time())
        if (from_address.lower(), nonce_hex) in self.used_nonces:
            raise RuntimeError("execution reverted: FiatTokenV2: authorization is used or canceled")
        if now <= int(valid_after):
            raise RuntimeError("execution reverted: FiatTokenV2: authorization is not yet valid")
        if now >= int(valid_before):
            raise RuntimeError("execution reverted: FiatTokenV2: authorization is expired")
        if self.balance(from_address) < int(value):
            raise RuntimeError("execution reverted: ERC20: transfer amount exceeds balance")
        return from_address, to, int(value), nonce_hex

    # -- FacilitatorEvmSigner ------------------------------------------------------------------

    def get_addresses(self) -> list[str]:
        return [self.address]

    def get_chain_id(self) -> int:
        return self.chain_id

    def get_code(self, address: str) -> bytes:
        return b"\x60\x80\x60\x40" if address.lower() == self.token.lower() else b""

    def get_balance(self, address: str, token_address: str) -> int:
        return self.balance(address)

    def read_contract(self, address: str, abi: list[dict[str, Any]], function_name: str, *args: Any) -> Any:
        if address.lower() != self.token.lower():
            raise RuntimeError(f"execution reverted: no contract at {address}")
        if function_name == "transferWithAuthorization":
            self._check(args)
            return None
        if function_name == "balanceOf":
            return self.balance(args[0])
        if function_name == "authorizationState":
            return (args[0].lower(), "0x" + bytes(args[1]).hex()) in self.used_nonces
        if function_name == "name":
            return "USDC"
        if function_name == "version":
            return "2"
        raise RuntimeError(f"execution reverted: {function_name} not emulated")

    def write_contract(self, address: str, abi: list[dict[str, Any]], function_name: str, *args: Any,
                       data_suffix: str | None = None) -> str:
        if address.lower() != self.token.lower() or function_name != "transferWithAuthorization":
            raise RuntimeError(f"execution reverted: {function_name} not emulated")
        from_address, to, value, nonce_hex = self._check(args)
        self.used_nonces.add((from_address.lower(), nonce_hex))
        self.balances[from_address.lower()] = self.balance(from_address) - value
        self.balances[to.lower()] = self.balance(to) + value
        tx = "0x" + secrets.token_hex(32)
        log = {"address": self.token, "topics": [_TRANSFER_TOPIC, _address_topic(from_address), _address_topic(to)],
               "data": "0x" + value.to_bytes(32, "big").hex()}
        self.receipts[tx] = TransactionReceipt(status=1, block_number=len(self.receipts) + 1, tx_hash=tx, logs=[log])
        return tx

    def send_transaction(self, to: str, data: bytes) -> str:
        raise RuntimeError("execution reverted: raw transactions not emulated")

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        return self.receipts[tx_hash]

    def verify_typed_data(self, address: str, domain: TypedDataDomain, types: dict[str, list[TypedDataField]],
                          primary_type: str, message: dict[str, Any], signature: bytes) -> bool:
        full = {"types": {name: [{"name": f.name, "type": f.type} for f in fs] for name, fs in types.items()},
                "primaryType": primary_type, "domain": vars(domain), "message": message}
        recovered: str = Account.recover_message(encode_typed_data(full_message=full), signature=signature)
        return recovered.lower() == address.lower()


class FakeFacilitator(FakeServer):
    """An x402 facilitator on ``host:port`` for ``network`` (CAIP-2), settling on :class:`FakeUsdc`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, network: str = "eip155:84532",
                 chain: FakeUsdc | None = None) -> None:
        self.host = host
        self.port = port
        self.network = network
        chain_id = int(network.split(":", 1)[1])
        self.chain = chain if chain is not None else FakeUsdc(chain_id=chain_id)
        self.down = False
        self.fail_settle: str | None = None
        self.verifies = 0
        self.settles = 0
        self.settled: list[Transfer] = []
        self._facilitator = x402Facilitator()
        self._facilitator.register([network], ExactEvmFacilitatorScheme(self.chain))
        if chain_id in _V1_NAMES:
            self._facilitator.register_v1([_V1_NAMES[chain_id]], ExactEvmSchemeV1Facilitator(self.chain))

    async def _mpp_submit(self, request: web.BaseRequest) -> web.StreamResponse:
        """The MPP relayer (`POST /mpp/submit`, `dataplane.payments.mpp_rail.HttpSubmitter`'s API): the
        signed EIP-3009 authorization submitted to the same fake chain the x402 facilitator settles on."""
        body = json.loads(await request.read())
        transfer = MppTransfer(chain_id=int(body["chainId"]), token=body["token"], payer=body["from"],
                               recipient=body["to"],
                               value=int(body["value"]), valid_after=int(body["validAfter"]),
                               valid_before=int(body["validBefore"]), nonce=bytes.fromhex(body["nonce"][2:]),
                               signature=bytes.fromhex(body["signature"][2:]))
        self.settles += 1
        if self.fail_settle is not None:
            return web.json_response({"error": self.fail_settle}, status=422)
        try:
            tx = await ChainSubmitter(self.chain)(transfer)
        except SubmitRefused as exc:
            return web.json_response({"error": exc.reason, "transaction": exc.transaction}, status=422)
        self.settled.append(Transfer(tx, transfer.payer, transfer.recipient, transfer.value,
                                     "0x" + transfer.nonce.hex()))
        return web.json_response({"transaction": tx})

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.down:
            return web.json_response({"error": "facilitator down"}, status=503)
        route = (request.method, request.path.rstrip("/"))
        if route == ("POST", "/mpp/submit"):
            return await self._mpp_submit(request)
        if route == ("GET", "/supported"):
            return web.json_response(self._facilitator.get_supported().model_dump(by_alias=True, exclude_none=True))
        if route not in (("POST", "/verify"), ("POST", "/settle")):
            return web.json_response({"error": "not found"}, status=404)
        try:
            body = json.loads(await request.read())
            if body["x402Version"] == 1:
                payload: PaymentPayload | PaymentPayloadV1 = PaymentPayloadV1.model_validate(body["paymentPayload"])
                reqs: PaymentRequirements | PaymentRequirementsV1 = PaymentRequirementsV1.model_validate(
                    body["paymentRequirements"])
            else:
                payload = PaymentPayload.model_validate(body["paymentPayload"])
                reqs = PaymentRequirements.model_validate(body["paymentRequirements"])
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"invalid request: {type(exc).__name__}"}, status=400)
        if route[1] == "/verify":
            self.verifies += 1
            verdict = await self._facilitator.verify(payload, reqs)
            return web.json_response(verdict.model_dump(by_alias=True, exclude_none=True))
        self.settles += 1
        if self.fail_settle is not None:
            return web.json_response({"success": False, "errorReason": self.fail_settle, "transaction": "",
                                      "network": str(reqs.network)})
        result = await self._facilitator.settle(payload, reqs)
        if result.success:
            auth = payload.payload["authorization"]
            self.settled.append(Transfer(result.transaction, auth["from"], auth["to"], int(auth["value"]),
                                         auth["nonce"]))
        return web.json_response(result.model_dump(by_alias=True, exclude_none=True))


def _payment_required(challenge: Any, version: int) -> PaymentRequired | PaymentRequiredV1:
    headers: Mapping[str, str] = {}
    body: Any = None
    if isinstance(challenge, tuple):
        headers, body = challenge
    elif isinstance(challenge, Mapping) and "accepts" not in challenge:
        headers = challenge
    else:
        body = challenge
    if version == 2:
        lower = {k.lower(): v for k, v in headers.items()}
        return PaymentRequired.model_validate_json(base64.b64decode(lower["payment-required"]))
    if isinstance(body, bytes | str):
        body = json.loads(body)
    return PaymentRequiredV1.model_validate({"x402Version": 1, "error": body.get("error"),
                                             "accepts": body["accepts"]})


async def pay(challenge: Any, account: LocalAccount | None = None, version: int = 2) -> dict[str, str]:
    """The payment header(s) answering a 402: ``{"PAYMENT-SIGNATURE": ...}`` (v2, from the
    ``PAYMENT-REQUIRED`` header) or ``{"X-PAYMENT": ...}`` (v1, from the body's ``accepts``).

    ``challenge`` is what :func:`dataplane.payments.x402_rail.challenge` returns (the
    ``(headers, body)`` tuple), the headers alone, or the body (bytes, text or parsed). Signs a real
    EIP-3009 authorization with ``account`` (a fresh key by default) through the SDK's client.
    """
    signer = EthAccountSigner(account if account is not None else Account.create())
    required = _payment_required(challenge, version)
    client = x402Client()
    client.set_spend_controls(False)
    for req in required.accepts:
        if version == 2:
            client.register(req.network, ExactEvmClientScheme(signer))
        else:
            client.register_v1(req.network, ExactEvmSchemeV1Client(signer))
    payload = await client.create_payment_payload(required)
    encoded = base64.b64encode(payload.model_dump_json(by_alias=True, exclude_none=True).encode()).decode()
    return {"PAYMENT-SIGNATURE" if version == 2 else "X-PAYMENT": encoded}
