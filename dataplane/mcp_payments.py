"""Paid MCP tools over x402's MCP transport (issue 16 item 4, the outbound side of issue 12).

A paid upstream tool answers `tools/call` with a tool error result (`isError: true`) whose
`structuredContent` is an x402 v2 `PaymentRequired` (`x402Version`, `accepts`, `error`,
`resource`; `content[0].text` is the same object as JSON, read when `structuredContent` is
missing). The payment travels in the retried request's `params._meta["x402/payment"]` (the
`PaymentPayload` object, not base64) and the seller's receipt in the result's
`_meta["x402/payment-response"]` (a `SettlementResponse`). Per MCP server
(`McpServer.payments`):

* `pass` (default): the gateway relays the PaymentRequired result unchanged; a client that retries
  with its own `_meta["x402/payment"]` has it forwarded as is (`McpToolCall.dispatch`).
* `pay`: :func:`pay` pays it as `/egress` pays a 402 (`dataplane.ingress.egress`), from the
  workspace's wallet open to the caller's agent (the `Alephant-Wallet` header may name one): the
  wallet's policy picks an x402 `exact` offer (`wallet.choose`: rails, asset allowlist,
  per-payment cap), the price is decided against the policies and reserved against the budgets
  with the tool's own hold (`governance.policy`, `governance.reserve`), and only then signed. The
  tool is called once more with the payment. A result whose receipt says it settled, or a
  non-error result without a receipt, is paid: a `payment.outbound` on the caller's run (its
  event id derived from the payment id, so one payment is one ledger entry) and the amount in the
  call's cost. Otherwise the seller refused it: its result is relayed and nothing is booked.
  A refusal before signing (no wallet, no payable offer, an asset off the allowlist, over the cap,
  a policy, a budget) raises, and the MCP endpoint answers it as a tool error result naming the
  rule; no credential leaves the gateway.

A client that brought its own payment is never paid for again (its `x402/payment` is forwarded,
and a PaymentRequired answer to it is relayed).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

from dataplane.call import Call
from dataplane.payments import wallet as payments
from dataplane.payments.outbound import outbound_event, payer
from dataplane.stages import governance
from schemas.entities import McpServer
from schemas.errors import PermissionDenied
from schemas.events import PaymentOutbound

__all__ = ["PAYMENT_META", "RESPONSE_META", "McpPaymentRefused", "Paid", "pay", "payment_required"]

log = structlog.get_logger(__name__)

PAYMENT_META: Final = "x402/payment"
RESPONSE_META: Final = "x402/payment-response"
_MAX_TEXT: Final = 256 * 1024

Send = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class McpPaymentRefused(PermissionDenied):
    """The gateway will not pay a tool's PaymentRequired (the wallet's policy, or no wallet), before signing."""

    default_code = "mcp_payment_refused"


@dataclass(frozen=True, slots=True)
class Paid:
    """What :func:`pay` got: the upstream's answer to the paid retry, and the payment's price in
    nano-USD when it was made (0 when the seller refused it; `event` is then None)."""

    result: dict[str, Any]
    nanos: int
    event: PaymentOutbound | None


def payment_required(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The x402 v2 `PaymentRequired` a tool error result carries (`structuredContent`, else
    `content[0].text`), or None."""
    if result.get("isError") is not True:
        return None
    document: Any = result.get("structuredContent")
    if not isinstance(document, dict):
        content = result.get("content")
        first = content[0] if isinstance(content, list) and content else None
        text = first.get("text") if isinstance(first, dict) else None
        document = None
        if isinstance(text, str) and len(text) <= _MAX_TEXT:
            try:
                document = json.loads(text)
            except ValueError:
                return None
    if isinstance(document, dict) and document.get("x402Version") == 2 and isinstance(document.get("accepts"), list):
        return document
    return None


def offers(document: Mapping[str, Any]) -> list[payments.Offer]:
    """The payment options of a `PaymentRequired` (malformed ones skipped, as on egress)."""
    return [o for req in document["accepts"][:32] if (o := payments._x402_offer(req, 2, document)) is not None]


def settled(result: Mapping[str, Any]) -> tuple[bool | None, str]:
    """What the result's `_meta["x402/payment-response"]` says: (True, tx), (False, reason), or
    (None, "") without one."""
    meta = result.get("_meta")
    receipt = meta.get(RESPONSE_META) if isinstance(meta, dict) else None
    if not isinstance(receipt, dict):
        return None, ""
    if receipt.get("success") is True:
        return True, str(receipt.get("transaction") or "")
    return False, str(receipt.get("errorReason") or "refused")


async def pay(call: Call, server: McpServer, tool: str, params: dict[str, Any], document: Mapping[str, Any],
              hold_nanos: int, send: Send) -> Paid:
    """Pay the tool's `PaymentRequired` (`document`) and call it once more with `params` plus the
    payment (see the module docstring). `hold_nanos` is the tool's own budget hold, reserved again
    with the payment's price; `send` calls the tool with the given params."""
    wallet = payer(call, lambda message: McpPaymentRefused(message, code="egress_no_wallet"))
    choice = payments.choose(wallet, offers(document))
    if isinstance(choice, payments.Refusal):
        raise McpPaymentRefused(choice.message.replace("The endpoint", f"Tool '{server.name}.{tool}'", 1),
                                code=choice.code)
    # Decided and reserved before signing: a payment over a policy or a budget is never made.
    call.fixed_cost_nanos = hold_nanos + choice.nanos
    await governance.policy(call)
    await governance.reserve(call, hold_nanos + choice.nanos)
    secret = call.worker.provider_key(wallet.private_key_enc)
    assert secret is not None
    try:
        signed = await payments.sign(choice, payments.account_of(secret.reveal()))
    except (ValueError, TypeError, KeyError) as exc:  # an offer the SDK will not sign (e.g. a malformed `extra`)
        raise McpPaymentRefused(f"Tool '{server.name}.{tool}' asks for {choice.offer.describe()}, which the gateway "
                                f"cannot sign ({type(exc).__name__}).", code="mcp_payment_unsignable") from None
    payload = json.loads(base64.b64decode(signed.value))
    meta = params.get("_meta")
    retry = {**params, "_meta": {**(meta if isinstance(meta, dict) else {}), PAYMENT_META: payload}}
    result = await send(retry)
    ok, detail = settled(result)
    if ok is False or (ok is None and result.get("isError") is True):
        log.info("mcp_payment_refused", server=server.name, tool=tool[:128], reason=detail[:100])
        return Paid(result, 0, None)
    return Paid(result, choice.nanos, outbound_event(call, wallet, choice, signed, detail,
                                                           resource=f"mcp://{server.name}/{tool}"))

