"""Pure ledger rules: which double-entry transfers an event produces, and whether the journal
can store an event at all (`journal_rejection`).

Every transfer debits one account and credits another by the same positive integer amount in
nano-units, so per currency the sum of debits always equals the sum of credits. Transfer ids
are derived from `(event_id, leg)`, so re-deriving them is idempotent.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import msgspec

from schemas.events import Event, LlmCall, LlmRepriced, PaymentInbound, PaymentOutbound, ToolCall, ToolSpend, Usage

UNATTRIBUTED_AGENT = "unattributed"
# The unit of an unpriced call's suspense postings: its tokens, kept apart from money by currency
# (per currency, debits equal credits).
TOKENS = "TOKENS"


@dataclass(frozen=True, slots=True)
class Transfer:
    id: uuid.UUID
    leg: int
    debit: str
    credit: str
    amount: int
    currency: str
    code: str


MAX_PART_BYTES = 200


def bounded(value: str) -> str:
    """`value`, or when longer than MAX_PART_BYTES of UTF-8 its first 100 characters, `~` and 16
    hex digits of its SHA-256: distinct values stay distinct, and an id or key column built from
    it stays far under Postgres's index-row limit (a model name is whatever the client sent)."""
    if len(value) * 4 <= MAX_PART_BYTES or len(value.encode()) <= MAX_PART_BYTES:
        return value
    return f"{value[:100]}~{hashlib.sha256(value.encode()).hexdigest()[:16]}"


# Accounts are `<owner kind>:<workspace>:<owner id>:<purpose>`. The agent is the cost centre (its
# run, workflow, session, department and member are on every transfer row); the counterparty is
# the provider, tool vendor, payment rail or paid endpoint.
def agent_account(workspace_id: str, agent_id: str | None, purpose: str) -> str:
    return f"agent:{workspace_id}:{agent_id or UNATTRIBUTED_AGENT}:{purpose}"


def agent_cost_account(workspace_id: str, agent_id: str | None) -> str:
    return agent_account(workspace_id, agent_id, "llm_cost")


def provider_payable_account(workspace_id: str, provider: str) -> str:
    return f"provider:{workspace_id}:{provider}:payable"


def vendor_payable_account(workspace_id: str, vendor: str) -> str:
    return f"vendor:{workspace_id}:{bounded(vendor)}:payable"


def mcp_vendor(server: str) -> str:
    """The vendor a tool called through the gateway's MCP endpoint is booked to: `mcp:<server>`."""
    return f"mcp:{server}"


def rail_account(workspace_id: str, rail: str, purpose: str) -> str:
    return f"rail:{workspace_id}:{bounded(rail)}:{purpose}"


def endpoint_revenue_account(workspace_id: str, endpoint_id: str) -> str:
    return f"endpoint:{workspace_id}:{bounded(endpoint_id)}:revenue"


def unpriced_suspense_account(workspace_id: str, provider: str, model: str) -> str:
    return f"suspense:{workspace_id}:unpriced:{bounded(provider)}/{bounded(model)}"


def transfer_id(event_id: uuid.UUID, leg: int) -> uuid.UUID:
    return uuid.uuid5(event_id, f"leg:{leg}")


def call_tokens(usage: Usage) -> int:
    """The tokens an unpriced call parks in suspense: input plus output (cache and reasoning
    tokens are already inside those two)."""
    return max(0, usage.input_tokens) + max(0, usage.output_tokens)


def _one(event_id: uuid.UUID, debit: str, credit: str, amount: int, currency: str, code: str,
         leg: int = 0) -> Transfer:
    return Transfer(transfer_id(event_id, leg), leg, debit, credit, amount, currency, code)


def transfers_for(event: Event) -> list[Transfer]:
    """The transfers an event posts (amounts are positive: a zero amount posts nothing).

    * `llm.call` priced: agent `llm_cost` <- provider `payable`, the cost. Unpriced (no known
      price) and with tokens: the tokens (currency TOKENS) from the agent's `unpriced_usage` to the
      suspense account of its provider and model, so its usage shows in a balance.
    * `llm.repriced`: that suspense posting reversed (leg 0) and the cost posted (leg 1).
    * `tool.spend`: agent `tool_cost` <- vendor `payable`. `tool.call` (the gateway's MCP endpoint)
      with a price: the same accounts, vendor `mcp:<server>`, code `tool_call`; an unpriced,
      failed or refused call (cost 0) posts nothing. `payment.outbound`: agent
      `payments_out` <- rail `payable`. `payment.inbound`: rail `receivable` <- endpoint `revenue`.
    * `cache.hit` is a memo (the finance projection records it), not a money movement.
    """
    ws, eid = event.workspace_id, event.event_id
    if isinstance(event, LlmCall):
        if event.cost_nanos > 0:
            return [_one(eid, agent_cost_account(ws, event.agent_id), provider_payable_account(ws, event.provider),
                         event.cost_nanos, event.currency, "llm_cost")]
        tokens = call_tokens(event.usage)
        if not event.priced and tokens > 0:
            return [_one(eid, unpriced_suspense_account(ws, event.provider, event.model),
                         agent_account(ws, event.agent_id, "unpriced_usage"), tokens, TOKENS, "llm_unpriced")]
        return []
    if isinstance(event, LlmRepriced):
        out = []
        if event.tokens > 0:
            out.append(_one(eid, agent_account(ws, event.agent_id, "unpriced_usage"),
                            unpriced_suspense_account(ws, event.provider, event.model), event.tokens, TOKENS,
                            "llm_unpriced_reversal", 0))
        if event.cost_nanos > 0:
            out.append(_one(eid, agent_cost_account(ws, event.agent_id), provider_payable_account(ws, event.provider),
                            event.cost_nanos, event.currency, "llm_cost_repriced", 1))
        return out
    if isinstance(event, ToolSpend) and event.amount_nanos > 0:
        return [_one(eid, agent_account(ws, event.agent_id, "tool_cost"), vendor_payable_account(ws, event.vendor),
                     event.amount_nanos, event.currency, "tool_spend")]
    if isinstance(event, ToolCall) and event.cost_nanos > 0:
        return [_one(eid, agent_account(ws, event.agent_id, "tool_cost"),
                     vendor_payable_account(ws, mcp_vendor(event.server)), event.cost_nanos, event.currency,
                     "tool_call")]
    if isinstance(event, PaymentOutbound) and event.amount_nanos > 0:
        return [_one(eid, agent_account(ws, event.agent_id, "payments_out"), rail_account(ws, event.rail, "payable"),
                     event.amount_nanos, event.currency, "payment_outbound")]
    if isinstance(event, PaymentInbound) and event.amount_nanos > 0:
        return [_one(eid, rail_account(ws, event.rail, "receivable"), endpoint_revenue_account(ws, event.endpoint_id),
                     event.amount_nanos, event.currency, "payment_inbound")]
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
    for name in ("amount_nanos", "saved_nanos", "tokens"):
        value = getattr(event, name, None)
        if isinstance(value, int) and not 0 <= value < NUMERIC_38_LIMIT:
            return f"out_of_range: {name}"
    if isinstance(event, LlmRepriced | ToolCall) and not 0 <= event.cost_nanos < NUMERIC_38_LIMIT:
        return "out_of_range: cost_nanos"
    if isinstance(event, LlmCall):
        for name in _USAGE_FIELDS:
            if not BIGINT_MIN <= getattr(event.usage, name) <= BIGINT_MAX:
                return f"out_of_range: usage.{name}"
        if not -NUMERIC_38_LIMIT < event.cost_nanos < NUMERIC_38_LIMIT:
            return "out_of_range: cost_nanos"
    return None
