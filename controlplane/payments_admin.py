"""Reconciling pending settlements of paid calls (issue 12).

A facilitator (x402) or relayer (MPP) may answer a settlement with "broadcast, not confirmed yet"
(`settlement_pending`). The data plane then serves the call, keeps the credential's claim (a
replay still fails) and records a `payment.event` `pending` memo carrying what the call earned
(`amount_nanos`) and, for a metered price or an undelivered stream, what it will owe back
(`refund_nanos`); no revenue is booked yet. Whoever can see the chain (an operator, or a job
reading the transaction by its hash) then resolves it here:

* `GET /admin/v1/payments/pending?workspace_id=` lists the pending memos not resolved yet;
* `POST /admin/v1/payments/resolve` `{workspace_id, replay_key, outcome: settled|failed,
  transaction?}`: `settled` books the revenue (`payment.inbound` on the serving run, the event id
  the data plane itself would have used, so it is booked once) and the refund owed (a
  `refund_due` memo); `failed` books a `loss` memo (served, not collected). The events go out
  through the config outbox, like re-pricing (`repricing.py`): written in one transaction,
  published by the relay. 404 `pending_payment_not_found` for an unknown key, 409
  `payment_already_resolved` once an outcome is recorded.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import msgspec
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from controlplane.inputs import Command, Ident
from controlplane.relay import OutboxWriter, enqueue_events
from schemas.errors import Conflict, NotFound
from schemas.events import (
    PaymentEvent,
    PaymentInbound,
    event_decoder,
    inbound_payment_event_id,
)
from schemas.money import nanos_to_decimal_str

MAX_PENDING = 1000
ReplayKey = Annotated[str, msgspec.Meta(min_length=1, max_length=400, pattern=r"^[\x21-\x7e]+$")]


class ResolvePayment(Command):
    """`replay_key`: the pending payment's credential id (as `GET /admin/v1/payments/pending` lists
    it); `outcome`: `settled` (it reached the chain) or `failed` (it never will); `transaction`:
    the settlement's transaction hash, when known."""

    workspace_id: Ident
    replay_key: ReplayKey
    outcome: Literal["settled", "failed"]
    transaction: Annotated[str, msgspec.Meta(max_length=200, pattern=r"^[\x20-\x7e]*$")] = ""


async def _pending(conn: psycopg.AsyncConnection[Any], workspace_id: str, replay_key: str | None,
                   limit: int) -> list[PaymentEvent]:
    """Pending memos of the workspace (one replay key's, or all) that no outcome resolved yet."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT body FROM event_journal WHERE workspace_id = %s AND type = 'payment.event' "
                          "AND body->>'status' = 'pending' AND (%s::text IS NULL OR body->>'replay_key' = %s) "
                          "ORDER BY occurred_at, event_id LIMIT %s",
                          (workspace_id, replay_key, replay_key, limit))
        memos = [event_decoder.decode(msgspec.json.encode(row["body"])) for row in await cur.fetchall()]
        pending = [m for m in memos if isinstance(m, PaymentEvent) and m.replay_key]
        if not pending:
            return []
        outcomes = [inbound_payment_event_id(m.replay_key, o) for m in pending for o in ("revenue", "loss")]
        await cur.execute("SELECT event_id FROM event_journal WHERE event_id = ANY(%s) UNION "
                          "SELECT event_id FROM config_outbox WHERE event_id = ANY(%s)", (outcomes, outcomes))
        done = {row["event_id"] for row in await cur.fetchall()}
    return [m for m in pending if not ({inbound_payment_event_id(m.replay_key, o) for o in ("revenue", "loss")}
                                       & done)]


def _view(memo: PaymentEvent) -> dict[str, Any]:
    return {"replay_key": memo.replay_key, "endpoint_id": memo.endpoint_id, "rail": memo.rail,
            "payer": memo.payer, "run_id": memo.run_id, "agent_id": memo.agent_id, "request_id": memo.request_id,
            "amount_usd": nanos_to_decimal_str(memo.amount_nanos), "amount_nanos": memo.amount_nanos,
            "refund_usd": nanos_to_decimal_str(memo.refund_nanos), "refund_nanos": memo.refund_nanos,
            "transaction": memo.transaction, "occurred_at": memo.occurred_at.isoformat()}


async def pending_payments(pool: AsyncConnectionPool[Any], workspace_id: str) -> dict[str, Any]:
    """`GET /admin/v1/payments/pending`: the workspace's unresolved pending settlements, oldest first."""
    async with pool.connection() as conn:
        pending = await _pending(conn, workspace_id, None, MAX_PENDING)
    return {"object": "list", "data": [_view(m) for m in pending], "has_more": len(pending) >= MAX_PENDING}


def resolution_events(memo: PaymentEvent, outcome: str, transaction: str, now: dt.datetime,
                      revision: int) -> list[PaymentInbound | PaymentEvent]:
    """The events a resolution books (see the module docstring), attributed as the memo was."""
    envelope: dict[str, Any] = {
        "occurred_at": now, "workspace_id": memo.workspace_id, "agent_id": memo.agent_id, "run_id": memo.run_id,
        "workflow_id": memo.workflow_id, "request_id": memo.request_id, "snapshot_revision": revision,
        "key_id": memo.key_id, "department_id": memo.department_id, "member_id": memo.member_id,
        "trace_id": memo.trace_id}
    tx = transaction or memo.transaction
    if outcome == "failed":
        return [PaymentEvent(event_id=inbound_payment_event_id(memo.replay_key, "loss"), **envelope,
                             endpoint_id=memo.endpoint_id, status="loss", rail=memo.rail, replay_key=memo.replay_key,
                             amount_nanos=memo.amount_nanos, payer=memo.payer, reason="settlement_failed (resolved)",
                             transaction=tx)]
    events: list[PaymentInbound | PaymentEvent] = []
    if memo.amount_nanos > 0:
        events.append(PaymentInbound(event_id=inbound_payment_event_id(memo.replay_key), **envelope,
                                     payment_id=memo.replay_key, amount_nanos=memo.amount_nanos, rail=memo.rail,
                                     endpoint_id=memo.endpoint_id, payer=memo.payer))
    if memo.refund_nanos > 0:
        events.append(PaymentEvent(event_id=inbound_payment_event_id(memo.replay_key, "refund"), **envelope,
                                   endpoint_id=memo.endpoint_id, status="refund_due", rail=memo.rail,
                                   replay_key=memo.replay_key, amount_nanos=memo.refund_nanos, payer=memo.payer,
                                   reason="resolved", transaction=tx))
    return events


class Resolver(OutboxWriter):
    """Resolves one pending settlement through the config outbox (see the module docstring)."""

    async def resolve(self, cmd: ResolvePayment,
                      on_commit: Callable[[psycopg.AsyncConnection[Any], dict[str, Any]], Awaitable[None]] | None
                      ) -> dict[str, Any]:
        async with self._pool.connection() as conn, conn.transaction():
            # One resolution at a time per payment: a concurrent one waits, then finds it resolved.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 12))", (cmd.replay_key,))
            pending = await _pending(conn, cmd.workspace_id, cmd.replay_key, 1)
            if not pending:
                await self._refuse_unknown(conn, cmd)
            memo = pending[0]
            events = resolution_events(memo, cmd.outcome, cmd.transaction, dt.datetime.now(dt.UTC),
                                       self._relay.last_revision)
            await enqueue_events(conn, events, self._prefix)
            body: dict[str, Any] = {"object": "payment.resolution", "outcome": cmd.outcome,
                                    **_view(memo), "events": [str(e.event_id) for e in events]}
            if on_commit is not None:
                await on_commit(conn, body | {"propagated": False})
        propagated = await self.propagated()
        return body | {"propagated": propagated}

    async def _refuse_unknown(self, conn: psycopg.AsyncConnection[Any], cmd: ResolvePayment) -> None:
        cur = await conn.execute("SELECT 1 FROM event_journal WHERE workspace_id = %s AND type = 'payment.event' "
                                 "AND body->>'status' = 'pending' AND body->>'replay_key' = %s LIMIT 1",
                                 (cmd.workspace_id, cmd.replay_key))
        if await cur.fetchone() is not None:
            raise Conflict("This payment's settlement was already resolved.", param="replay_key",
                           code="payment_already_resolved")
        raise NotFound(f"No pending settlement with this replay_key in workspace '{cmd.workspace_id}' (see GET "
                       "/admin/v1/payments/pending).", param="replay_key", code="pending_payment_not_found")
