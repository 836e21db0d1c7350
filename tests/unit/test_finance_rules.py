"""The finance projection's rules (`events.finance.finance_row`) for payments: revenue, outbound
spend, and refunds owed (a memo column of its own, not a cost), and payment memos with no money."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from events.finance import FACT_COLUMNS, finance_row
from schemas.events import PaymentEvent, PaymentInbound, PaymentOutbound

COLUMNS = [name for name, _ in FACT_COLUMNS]
NOW = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
ENVELOPE: dict[str, Any] = {"occurred_at": NOW, "workspace_id": "ws", "run_id": "run_1", "agent_id": "agent_1"}


def _fields(row: tuple[object, ...] | None) -> dict[str, object]:
    assert row is not None
    return dict(zip(COLUMNS, row, strict=True))


def test_a_refund_due_is_its_own_amount_on_the_endpoint() -> None:
    memo = PaymentEvent(event_id=uuid.uuid4(), **ENVELOPE, endpoint_id="paid_1", status="refund_due",
                        amount_nanos=7_000, rail="mpp")
    row = _fields(finance_row(memo))
    assert (row["kind"], row["refunds_due_nanos"], row["endpoint_id"], row["rail"]) == ("refund_due", 7_000,
                                                                                        "paid_1", "mpp")
    assert row["revenue_nanos"] == row["llm_cost_nanos"] == row["payments_out_nanos"] == 0


def test_other_payment_memos_carry_no_money() -> None:
    for status in ("challenge", "settled", "pending", "loss", "voided"):
        memo = PaymentEvent(event_id=uuid.uuid4(), **ENVELOPE, endpoint_id="paid_1", status=status,
                            amount_nanos=10_000)
        assert finance_row(memo) is None, status
    empty = PaymentEvent(event_id=uuid.uuid4(), **ENVELOPE, endpoint_id="paid_1", status="refund_due")
    assert finance_row(empty) is None


def test_revenue_and_outbound_payments() -> None:
    earned = _fields(finance_row(PaymentInbound(event_id=uuid.uuid4(), **ENVELOPE, payment_id="x402:1",
                                                amount_nanos=10_000_000, rail="x402", endpoint_id="paid_1")))
    assert (earned["kind"], earned["revenue_nanos"], earned["refunds_due_nanos"]) == ("revenue", 10_000_000, 0)
    spent = _fields(finance_row(PaymentOutbound(event_id=uuid.uuid4(), **ENVELOPE, payment_id="x402:2",
                                                amount_nanos=5_000, rail="x402", payee="0xabc")))
    assert (spent["kind"], spent["payments_out_nanos"], spent["vendor"]) == ("payment_out", 5_000, "0xabc")
