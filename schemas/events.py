"""The event log's envelope: one frozen, keyword-only tagged union keyed by `type`.

Every event carries its identity (`event_id`, a UUIDv7 that is also the `Nats-Msg-Id` and the
journal's unique key), the agent context, and the snapshot revision it was decided under.
New fields always get defaults; readers ignore unknown fields.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import msgspec


class _Envelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    event_id: uuid.UUID
    occurred_at: dt.datetime
    workspace_id: str
    agent_id: str | None = None
    run_id: str | None = None
    session_id: str | None = None
    workflow_id: str | None = None
    request_id: str | None = None
    snapshot_revision: int = 0
    # The W3C trace id (32 hex) of the request that caused the event, when it was traced: a ledger
    # row leads to its trace.
    trace_id: str | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts, normalized: `input_tokens` includes cached reads and cache writes;
    `output_tokens` includes reasoning tokens (OpenAI's convention)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


class Attempt(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One upstream attempt of a call: the target (`provider/model`), the credential id, the
    status it ended with (the provider's own on an error answer; 0: no answer, e.g. a timeout or
    refused connection; 200: it served), the time it took, and why it ended (an error code;
    "" when it served). `retryable`: the error allowed another attempt."""

    target: str
    provider_key_id: str | None = None
    status: int = 0
    latency_ms: float = 0.0
    reason: str = ""
    retryable: bool = False


class LlmCall(_Envelope, frozen=True, kw_only=True, tag="llm.call"):
    """One client request to a model, whatever its outcome. `cost_nanos` is integer nano-USD."""

    provider: str
    model: str
    ingress: str = "chat.completions"
    stream: bool = False
    status: int = 200
    error_code: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_nanos: int = 0
    currency: str = "USD"
    priced: bool = True
    key_id: str | None = None
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    cache: str = "miss"
    partial: bool = False
    # Usage was not reported by the provider (client disconnect, upstream cut, idle timeout) and
    # was estimated with a tokenizer from the request and the relayed output.
    usage_estimated: bool = False
    # Values the gateway refused or clamped before recording them (e.g. "usage_clamped"), so
    # finance can find calls whose reported numbers were impossible.
    anomalies: tuple[str, ...] = ()
    department_id: str | None = None
    member_id: str | None = None
    # The budget hold reserved before the call (0 when no budget is on its path) and the
    # governance outcome: "allow", or the refusal's code (e.g. "budget_exceeded").
    hold_nanos: int = 0
    decision: str = "allow"
    # The route (e.g. "/v1/chat/completions") the call came in on.
    endpoint: str = ""
    # The upstream credential used (a ProviderKey id, or the provider's id for its inline key) and
    # where it came from: key | workspace | operator | none. Never the secret.
    provider_key_id: str | None = None
    provider_key_source: str = "none"
    # `Alephant-Property-<name>` headers (names lower-cased), for finance group-bys.
    properties: dict[str, str] = msgspec.field(default_factory=dict)
    # The price that priced the call, so it can be re-priced: `price_source` is override |
    # builtin | catalog | unpriced; `price_id` the PriceOverride id (override, builtin);
    # `price_scope` platform | workspace | provider_key (override); `catalog_version` the
    # genai-prices version (catalog).
    price_source: str = ""
    price_id: str | None = None
    price_scope: str = ""
    catalog_version: str = ""
    # The prompt template the request rendered: its name (stable across versions, unique in the
    # workspace) and version; None without one.
    prompt_id: str | None = None
    prompt_version: int | None = None
    # The router that chose the targets (its id; None: a direct `provider/model`), the rule that
    # picked the target set ("" : the router's own targets), and every upstream attempt in order:
    # the last one that served is the call's `provider`/`model`. Empty: no upstream was called.
    router_id: str | None = None
    router_rule: str = ""
    attempts: tuple[Attempt, ...] = ()
    # The archived request/response bodies (the object key in the body archive's bucket, see
    # `dataplane.bodies`); None when the call's log settings keep metadata only.
    body_key: str | None = None


class PolicyDecision(_Envelope, frozen=True, kw_only=True, tag="policy.decision"):
    """A governance decision other than a plain allow (allows are counted, not emitted):
    `outcome` is deny | throttle | escalate | clamp | strip; `rule` names the rule (e.g.
    "policy:<id>.models_deny"), `scope`/`scope_id` where it is attached."""

    key_id: str | None = None
    outcome: str
    code: str
    rule: str
    scope: str = ""
    scope_id: str = ""
    message: str = ""
    endpoint: str = ""
    model: str = ""
    escalation_id: str | None = None


class BudgetAlert(_Envelope, frozen=True, kw_only=True, tag="budget.alert"):
    """A budget crossed `threshold_pct` of its limit in the period starting `period_start`
    (once per budget, threshold and period: the event id is derived from those three)."""

    budget_id: str
    scope: str
    scope_id: str
    threshold_pct: int
    period_start: str
    limit_nanos: int
    spent_nanos: int


class AuthRefusals(_Envelope, frozen=True, kw_only=True, tag="auth.refusals"):
    """Requests refused with an unknown or malformed key, aggregated per worker and interval so
    a key-guessing flood cannot flood the stream. `workspace_id` is "_unknown"."""

    count: int
    window_start_ms: int
    window_end_ms: int
    codes: dict[str, int] = msgspec.field(default_factory=dict)
    endpoints: dict[str, int] = msgspec.field(default_factory=dict)


class _Money(_Envelope, frozen=True, kw_only=True):
    """Who an amount is attributed to, beyond the envelope's agent, run and workflow."""

    key_id: str | None = None
    department_id: str | None = None
    member_id: str | None = None
    properties: dict[str, str] = msgspec.field(default_factory=dict)


class ToolSpend(_Money, frozen=True, kw_only=True, tag="tool.spend"):
    """Tool or external API spend an agent reported (`POST /v1/alephant/spend`), admitted against
    the budgets on its key's path. `spend_id` is the answer's `id`; the event id is derived from
    the workspace and the Idempotency-Key, so a replay is the same event."""

    spend_id: str
    amount_nanos: int
    currency: str = "USD"
    vendor: str
    tool: str = ""
    description: str = ""


class ToolCall(_Money, frozen=True, kw_only=True, tag="tool.call"):
    """A tool called through the gateway's MCP endpoint (issue 16): `server` (the MCP server's name),
    `tool`, `status` ok | error | refused, `latency_ms`, `cost_nanos` (integer nano-USD, the tool's
    price; 0 unless status is ok), `error_code` when not ok."""

    server: str
    tool: str
    status: str = "ok"
    latency_ms: float = 0.0
    cost_nanos: int = 0
    currency: str = "USD"
    mcp_server_id: str = ""
    error_code: str | None = None
    # The archived arguments and result (the body archive's object and line), when the workspace's
    # log settings keep bodies; as on `llm.call`.
    body_key: str | None = None


class _Payment(_Money, frozen=True, kw_only=True):
    """A payment over a rail (x402, MPP, ...): its id on the rail and its amount."""

    payment_id: str
    amount_nanos: int
    currency: str = "USD"
    rail: str


class PaymentOutbound(_Payment, frozen=True, kw_only=True, tag="payment.outbound"):
    """A payment made on an agent's behalf to `payee` for `resource` (the egress URL, without its
    query), from `wallet_id`: `amount_atomic` of `asset` on `network`, `amount_nanos` in the
    ledger; `transaction` is the seller's settlement reference when its receipt gave one."""

    payee: str = ""
    resource: str = ""
    wallet_id: str = ""
    asset: str = ""
    network: str = ""
    amount_atomic: str = ""
    transaction: str = ""


class PaymentInbound(_Payment, frozen=True, kw_only=True, tag="payment.inbound"):
    """Revenue: a paid endpoint was paid by `payer`; attributed to the agent/run that served it."""

    endpoint_id: str
    payer: str = ""


class PaymentEvent(_Money, frozen=True, kw_only=True, tag="payment.event"):
    """A step of an inbound payment that is not revenue itself (a memo for audit, not a money
    movement; the revenue is the `payment.inbound` of a settled payment): `status` challenge |
    rejected | verified | voided (served nothing, never settled) | pending (settlement broadcast,
    unconfirmed) | loss (served, but settlement failed: `amount_nanos` was not collected) |
    replayed (a retry answered from the first call's record) | settled (a streamed call's upfront
    settlement, before serving) | refund_due (a streamed call settled upfront whose answer failed
    or was cut off: `amount_nanos` is owed back to the payer, and no revenue was booked). `replay_key` identifies the
    credential on its rail; `reason` is the rail's or facilitator's code."""

    endpoint_id: str
    status: str
    rail: str = "x402"
    replay_key: str = ""
    amount_nanos: int = 0
    currency: str = "USD"
    payer: str = ""
    reason: str = ""
    transaction: str = ""
    # A pending settlement of a metered price: what it will owe back to the payer once settled.
    refund_nanos: int = 0


class CacheHit(_Money, frozen=True, kw_only=True, tag="cache.hit"):
    """A call answered from the cache: `saved_nanos` is what it would have cost (a memo for
    finance, not a money movement)."""

    provider: str
    model: str
    saved_nanos: int
    currency: str = "USD"
    cache: str = "exact"
    usage: Usage = msgspec.field(default_factory=Usage)


class RunCompleted(_Envelope, frozen=True, kw_only=True, tag="run.completed"):
    """`POST /v1/alephant/runs/{id}/complete`: the run's outcome, for outcome analytics."""

    key_id: str | None = None
    outcome: str  # succeeded | failed
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class LlmRepriced(_Envelope, frozen=True, kw_only=True, tag="llm.repriced"):
    """An unpriced `llm.call` (`original_event_id`) priced later, when a price was added: moves
    its `tokens` out of the unpriced suspense account and posts `cost_nanos`. The event id is
    derived from the original event and the price, so re-pricing twice books once. Carries the
    original call's attribution (envelope, provider, model)."""

    original_event_id: uuid.UUID
    provider: str
    model: str
    tokens: int
    cost_nanos: int
    currency: str = "USD"
    price_id: str
    price_scope: str = ""
    department_id: str | None = None
    member_id: str | None = None
    original_occurred_at: dt.datetime | None = None


class ConfigChanged(_Envelope, frozen=True, kw_only=True, tag="config.changed"):
    """An admin command changed config state. `data` never contains secrets."""

    entity: str
    entity_id: str
    op: str
    actor: str = "admin"
    data: dict[str, Any] = msgspec.field(default_factory=dict)


Event = (LlmCall | ConfigChanged | PolicyDecision | BudgetAlert | AuthRefusals | ToolSpend | PaymentOutbound
         | PaymentInbound | PaymentEvent | CacheHit | RunCompleted | LlmRepriced | ToolCall)

event_encoder = msgspec.json.Encoder()
event_decoder = msgspec.json.Decoder(Event)


def event_type(event: Event) -> str:
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


_INBOUND_PAYMENT_NAMESPACE = uuid.UUID("2b8f6f8e-4f43-4b7e-9a0e-5d2c1e7a9b31")


def inbound_payment_event_id(replay_key: str, outcome: str = "revenue") -> uuid.UUID:
    """The event id of a paid call's settled revenue (`outcome` "revenue", the `payment.inbound`)
    or of another final outcome of its payment (e.g. "loss"), derived from the credential's replay
    key: the data plane and an admin resolving a pending settlement book it once, whoever is first."""
    name = replay_key if outcome == "revenue" else f"{replay_key}#{outcome}"
    return uuid.uuid5(_INBOUND_PAYMENT_NAMESPACE, name)


def subject_for(event: Event, prefix: str) -> str:
    """`<prefix>.<workspace>.<type>` (prefix `events` by default): the subject an event goes to."""
    return f"{prefix}.{event.workspace_id}.{event_type(event)}"
