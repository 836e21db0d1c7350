"""What every outbound payment the gateway makes shares, whichever path pays (`/egress`, a paid
MCP tool): the wallet that pays for the caller, and the `payment.outbound` event that books it.

The event id is derived from the payment id (OUTBOUND_NAMESPACE), so one payment is one ledger
entry however often it is recorded."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Final

from dataplane.call import Call
from dataplane.payments.wallet import Choice, Signed
from schemas.entities import Wallet
from schemas.errors import GatewayError
from schemas.events import PaymentOutbound

OUTBOUND_NAMESPACE: Final = uuid.UUID("7c1e4f0a-2d5b-4c8e-9f3a-6b1d0e2c4a58")
WALLET_HEADER: Final = "Alephant-Wallet"


def payer(call: Call, refused: Callable[[str], GatewayError], alias: str | None = None) -> Wallet:
    """The wallet that pays for the caller: the one the `Alephant-Wallet` header names (by name or
    id), else the one owning `alias`, else the workspace's first open to the caller's agent
    (`agent_ids` empty: open to every key). `refused(message)` is raised (code
    `egress_no_wallet`) when none may."""
    agent = call.ctx.agent_id
    usable = [w for w in call.snap.wallets.get(call.vk.workspace_id, ())
              if not w.agent_ids or (agent is not None and agent in w.agent_ids)]
    named = call.request.headers.get(WALLET_HEADER)
    if named:
        found = next((w for w in usable if named in (w.name, w.id)), None)
        if found is None:
            raise refused(f"No wallet '{named[:64]}' this agent may pay from.")
        return found
    found = next((w for w in usable if alias in w.aliases), None) if alias else None
    if found is None and usable:
        found = usable[0]
    if found is None:
        raise refused("The endpoint asks to be paid and no wallet of this workspace is open to this agent.")
    return found


def outbound_event(call: Call, wallet: Wallet, choice: Choice, signed: Signed, transaction: str,
                   resource: str) -> PaymentOutbound:
    """The `payment.outbound` of a payment made for `call` (the spend, on the caller's run)."""
    ctx, offer = call.ctx, choice.offer
    return PaymentOutbound(
        event_id=uuid.uuid5(OUTBOUND_NAMESPACE, signed.payment_id), occurred_at=dt.datetime.now(dt.UTC),
        workspace_id=call.vk.workspace_id, agent_id=ctx.agent_id, run_id=ctx.run_id, session_id=ctx.session_id,
        workflow_id=ctx.workflow_id, request_id=ctx.request_id, snapshot_revision=call.snap.revision,
        key_id=call.vk.id, department_id=call.department_id, member_id=call.member_id,
        payment_id=signed.payment_id, amount_nanos=choice.nanos, rail=offer.rail, payee=offer.pay_to,
        resource=resource[:500], wallet_id=wallet.id, asset=offer.asset, network=offer.network,
        amount_atomic=str(offer.amount), transaction=transaction[:200])
