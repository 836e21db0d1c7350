"""Pure ledger rules: which double-entry transfers an event produces, and whether the journal
can store an event at all (`journal_rejection`).

Every transfer debits one account and credits another by the same positive integer amount in
nano-units, so per currency the sum of debits always equals the sum of credits. Transfer ids
are derived from `(event_id, leg)`, so re-deriving them is idempotent.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import msgspec

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


# -- what the journal can store ---------------------------------------------------------------
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
NUMERIC_38_LIMIT = 10**38
# Text that ends up in a btree key (journal index, run_usage key, ledger account ids) must stay
# well under Postgres's ~2.7 KB index-row limit, whatever the other key columns hold.
MAX_KEY_BYTES = 1024
_KEY_FIELDS = ("workspace_id", "agent_id", "run_id", "provider", "currency")
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


def _nul_path(value: object, path: str) -> str | None:
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _nul_path(k, f"{path}.<key>") or _nul_path(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _nul_path(v, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            found = _nul_path(getattr(value, name), f"{path}.{name}" if path else name)
            if found:
                return found
    return None


def journal_rejection(event: Event, raw: bytes) -> str | None:
    """Why `event` (decoded from `raw`) cannot be journalled, or None if it can.

    Pure and cheap on good events: the NUL walk runs only when `raw` holds a `\\u0000` escape
    (JSON cannot carry a NUL otherwise, and Postgres refuses it in text and jsonb). Checks:
    integers in bigint columns (snapshot_revision, token counts), the cost within numeric(38,0),
    and key strings within MAX_KEY_BYTES of UTF-8.
    """
    if b"\\u0000" in raw:
        where = _nul_path(event, "")
        if where is not None:
            return f"nul_in_string: {where}"
    if not BIGINT_MIN <= event.snapshot_revision <= BIGINT_MAX:
        return "out_of_range: snapshot_revision"
    for name in _KEY_FIELDS:
        value = getattr(event, name, None)
        if isinstance(value, str) and len(value) * 4 > MAX_KEY_BYTES and len(value.encode()) > MAX_KEY_BYTES:
            return f"key_too_long: {name}"
    if isinstance(event, LlmCall):
        for name in _USAGE_FIELDS:
            if not BIGINT_MIN <= getattr(event.usage, name) <= BIGINT_MAX:
                return f"out_of_range: usage.{name}"
        if not -NUMERIC_38_LIMIT < event.cost_nanos < NUMERIC_38_LIMIT:
            return "out_of_range: cost_nanos"
    return None
