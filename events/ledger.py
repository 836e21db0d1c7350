"""Pure ledger rules: which double-entry transfers an event produces.

Every transfer debits one account and credits another by the same positive integer amount in
nano-units, so per currency the sum of debits always equals the sum of credits. Transfer ids
are derived from `(event_id, leg)`, so re-deriving them is idempotent.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from schemas.events import Event, LlmCall

UNATTRIBUTED_AGENT = "unattributed"


@dataclass(frozen=True, slots=True)
class Transfer:
    id: uuid.UUID
    leg: int
    debit: str
    credit: str
    amount: int
    currency: str
    code: str


def agent_cost_account(workspace_id: str, agent_id: str | None) -> str:
    return f"agent:{workspace_id}:{agent_id or UNATTRIBUTED_AGENT}:llm_cost"


def provider_payable_account(workspace_id: str, provider: str) -> str:
    return f"provider:{workspace_id}:{provider}:payable"


def transfer_id(event_id: uuid.UUID, leg: int) -> uuid.UUID:
    return uuid.uuid5(event_id, f"leg:{leg}")


def transfers_for(event: Event) -> list[Transfer]:
    """The transfers an event posts. Zero-cost calls post nothing (amounts must be positive)."""
    if isinstance(event, LlmCall) and event.cost_nanos > 0:
        return [
            Transfer(
                id=transfer_id(event.event_id, 0),
                leg=0,
                debit=agent_cost_account(event.workspace_id, event.agent_id),
                credit=provider_payable_account(event.workspace_id, event.provider),
                amount=event.cost_nanos,
                currency=event.currency,
                code="llm_cost",
            )
        ]
    return []
