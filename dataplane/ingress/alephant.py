"""`/v1/alephant/*`: what an agent reports besides its model calls, authenticated with its virtual
key and run through the same pipeline (auth, agent context, policy, limits, budgets, one event).

`POST /v1/alephant/spend` (`SpendEndpoint`): tool or external API spend. Body
`{"amount_usd": "0.25", "vendor": "serpapi", "tool"?, "run_id"?, "description"?, "currency"?}`.
* `amount_usd` is a decimal string of US dollars, more than 0, at most 9 decimals and at most
  `MAX_SPEND_USD`; a JSON number is refused (money is never a float). Only "USD" is accepted.
* The run is the body's `run_id` or the `Alephant-Run-Id` header; both given and different is
  400 `run_id_mismatch`. Agent, session, workflow and `Alephant-Property-*` come from the headers.
* Governed like a model call, with the amount as its exact cost (`Call.fixed_cost_nanos`): the
  budgets on the key's path hold exactly the amount (0 tokens) and settle it on success; a refused
  or failed spend releases its hold. Policies see the amount as the cost estimate (so
  `max_cost_usd` and `escalate_over_usd` apply) and the path as the endpoint (`endpoints_allow`).
* `Idempotency-Key` is required (400 `missing_idempotency_key`; 1-255 visible ASCII characters).
  Per (workspace, key, Idempotency-Key), for 24 h (`dataplane.idempotency`): the same request
  again gets the first answer with `Idempotent-Replayed: true` and books nothing; another request
  is 422 `idempotency_key_mismatch`; any request while the first is in flight is 409
  `idempotency_key_in_use`. A spend refused or failed before its event releases the key.
* Answer 201 `{"id": "spend_<hex>", "object": "alephant.spend", "amount_usd", "currency",
  "vendor", "tool", "run_id", "agent_id", "workspace_id", "created_at"}` (`created_at` in unix
  seconds), and one `tool.spend` event whose id is `spend_event_id(workspace, key, Idempotency-Key)`.
  That id is what keeps a replay from booking twice when Redis is unreachable (the records are
  then skipped and the journal drops the duplicate event); mismatch and in-flight detection
  need Redis.

`POST /v1/alephant/runs/{run_id}/complete` (`RunCompleteEndpoint`): body `{"outcome": "succeeded" |
"failed", "metadata"?: {str: str}}`; answers 200 `{"run_id", "outcome", "object":
"alephant.run.outcome"}` and emits `run.completed`. Not governed (it spends nothing); policies
still apply. The same run rule holds between the path and the header.

Refusals of both are recorded like any endpoint's: an `llm.call` with the status and code
(ingress "alephant.spend" / "alephant.run.complete").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web

from dataplane.call import Call
from dataplane.decisions import MAX_HEADER_ID_LEN
from dataplane.edge import MAX_PROPERTIES, MAX_PROPERTY_NAME_LEN, MAX_PROPERTY_VALUE_BYTES, check_text
from dataplane.lifecycle import bearer, read_object
from dataplane.pipeline import emit_once
from schemas.errors import Conflict, InvalidRequest, InvalidValue
from schemas.events import RunCompleted, ToolSpend
from schemas.http import validate
from schemas.ids import uuid7
from schemas.money import decimal_to_nanos, nanos_to_decimal_str

IDEMPOTENCY_KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_SPEND_USD = 10**6
MAX_VENDOR_LEN = 128
MAX_TOOL_LEN = 128
MAX_DESCRIPTION_LEN = 1000
OUTCOMES = ("succeeded", "failed")
# `spend_event_id`'s namespace: fixed forever, or replays across a release would book twice.
SPEND_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "alephant:tool.spend")

_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # what the admin API's Idempotency-Key accepts
_AMOUNT_RE = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
_encoder = msgspec.json.Encoder()
_canonical = msgspec.json.Encoder(order="sorted")


# -- pure parts ------------------------------------------------------------------------------------


def idempotency_key_of(headers: Any) -> str:
    """The request's Idempotency-Key: 400 `missing_idempotency_key` without one, 400
    `invalid_idempotency_key` unless 1-255 visible ASCII characters."""
    value = headers.get(IDEMPOTENCY_KEY)
    if not value:
        raise InvalidRequest(f"This endpoint moves money: send an '{IDEMPOTENCY_KEY}' header (a unique value per "
                             "spend, reused only to retry it).", param=IDEMPOTENCY_KEY, code="missing_idempotency_key")
    if not _KEY_RE.match(value):
        raise InvalidRequest(f"'{IDEMPOTENCY_KEY}' must be 1-255 visible ASCII characters.", param=IDEMPOTENCY_KEY,
                             code="invalid_idempotency_key")
    return str(value)


def parse_amount(value: Any) -> int:
    """`amount_usd` in nano-USD, exactly: a decimal string ("0.25"), more than 0, at most 9
    decimals and at most `MAX_SPEND_USD`; else 400 `invalid_amount` (param `amount_usd`)."""
    def bad(why: str) -> InvalidRequest:
        return InvalidRequest(f"'amount_usd' {why}", param="amount_usd", code="invalid_amount")

    if value is None:
        raise bad('is required: the amount spent, as a decimal string of US dollars such as "0.25".')
    if not isinstance(value, str):
        raise bad('must be a decimal string such as "0.25", not a JSON number or another type: money is '
                  "never a float.")
    if len(value) > 40 or not _AMOUNT_RE.match(value):
        raise bad('must be a decimal string of US dollars such as "0.25" (digits and one optional point).')
    if value.startswith("-"):
        raise bad("must be more than 0 (a spend cannot be negative).")
    if len(value.partition(".")[2]) > 9:
        raise bad("has more than 9 decimals (amounts are exact to the nano-dollar).")
    nanos = decimal_to_nanos(Decimal(value))
    if nanos == 0:
        raise bad("must be more than 0.")
    if nanos > MAX_SPEND_USD * 10**9:
        raise bad(f"must be at most {MAX_SPEND_USD} per spend.")
    return nanos


def run_of(header_run: str | None, body_run: str | None, param: str = "run_id") -> str | None:
    """The request's run: the header's or the body's (or path's); 400 `run_id_mismatch` when
    both are given and differ."""
    if header_run and body_run and header_run != body_run:
        raise InvalidRequest(f"'{param}' and the Alephant-Run-Id header name different runs; send one, or the "
                             "same in both.", param=param, code="run_id_mismatch")
    return body_run or header_run


def spend_event_id(workspace_id: str, key_id: str, idempotency_key: str) -> uuid.UUID:
    """The `tool.spend` event id of a spend: the same for every retry with the same key."""
    return uuid.uuid5(SPEND_ID_NAMESPACE, f"{workspace_id}:{key_id}:{idempotency_key}")


class SpendBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    amount_usd: Any = None  # checked by `parse_amount`, for its own messages
    vendor: str
    tool: str = ""
    run_id: str | None = None
    description: str = ""
    currency: str = "USD"


@dataclass(frozen=True, slots=True)
class SpendRequest:
    amount_nanos: int
    vendor: str
    tool: str
    run_id: str | None
    description: str
    currency: str


def parse_spend(raw: Any) -> SpendRequest:
    """The validated spend body, or a 400 naming the field in `param` (InvalidValue for a string
    that fails the edge checks: too long, or not printable)."""
    body = validate(raw, SpendBody)
    amount = parse_amount(body.amount_usd)
    if not body.vendor.strip():
        raise InvalidRequest("'vendor' is required: who was paid (for example 'serpapi').", param="vendor")
    if body.currency != "USD":
        raise InvalidRequest("'currency' must be 'USD' (the only currency budgets are kept in).", param="currency",
                             code="unsupported_currency")
    return SpendRequest(
        amount_nanos=amount, vendor=check_text(body.vendor, "vendor", MAX_VENDOR_LEN),
        tool=check_text(body.tool, "tool", MAX_TOOL_LEN),
        run_id=check_text(body.run_id, "run_id", MAX_HEADER_ID_LEN) if body.run_id else None,
        description=check_text(body.description, "description", MAX_DESCRIPTION_LEN), currency=body.currency)


class RunOutcomeBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    outcome: Any = None  # checked by `parse_outcome`, for its own message
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


def parse_outcome(raw: Any) -> RunOutcomeBody:
    """The validated run-outcome body: `outcome` one of `OUTCOMES`; `metadata` at most
    `MAX_PROPERTIES` printable entries, names up to 64 characters, values up to 1024 bytes."""
    body = validate(raw, RunOutcomeBody)
    if body.outcome not in OUTCOMES:
        raise InvalidRequest(f"'outcome' must be one of {', '.join(OUTCOMES)}.", param="outcome",
                             code="invalid_outcome")
    if len(body.metadata) > MAX_PROPERTIES:
        raise InvalidRequest(f"'metadata' can hold at most {MAX_PROPERTIES} entries.", param="metadata")
    for name, value in body.metadata.items():
        if not name:
            raise InvalidRequest("'metadata' names cannot be empty.", param="metadata")
        check_text(name, "metadata", MAX_PROPERTY_NAME_LEN)
        check_text(value, f"metadata.{name}", MAX_PROPERTY_VALUE_BYTES)
        if len(value.encode()) > MAX_PROPERTY_VALUE_BYTES:
            raise InvalidValue(f"'metadata.{name}' is longer than the {MAX_PROPERTY_VALUE_BYTES}-byte limit.",
                               param=f"metadata.{name}")
    return body


def properties_of(call: Call) -> dict[str, str]:
    """The request's `Alephant-Property-*` headers, names lower-cased (as `llm.call` records them)."""
    return {name.lower(): value for name, value in call.ctx.properties}


# -- POST /v1/alephant/spend -----------------------------------------------------------------------


@dataclass(slots=True)
class PendingSpend:
    """A spend between intake and dispatch: what was asked and the idempotency claim it holds
    (`token` "" when the store was unavailable)."""

    spend: SpendRequest
    idempotency_key: str
    event_id: uuid.UUID
    token: str = ""


_PENDING: web.RequestKey[PendingSpend] = web.RequestKey("alephant_spend", PendingSpend)


class SpendAnswer(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "alephant.spend"
    amount_usd: str
    currency: str
    vendor: str
    tool: str | None
    run_id: str | None
    agent_id: str | None
    workspace_id: str
    created_at: int


def _fingerprint(call: Call, spend: SpendRequest) -> str:
    """A keyed hash of what the spend books: the normalized body and its attribution (the run as
    resolved, whether the body or the header named it)."""
    ctx = call.ctx
    booked = {**dataclasses.asdict(spend), "run_id": ctx.run_id}
    canonical = _canonical.encode(["POST /v1/alephant/spend", booked, ctx.agent_id, ctx.session_id,
                                   ctx.workflow_id, sorted(properties_of(call).items())])
    return call.worker.keyring.hash_key(canonical.decode())


def _release_unless_booked(call: Call, pending: PendingSpend) -> None:
    # Runs in `finish` before its emit: emitted here means the spend's own event went out.
    if not call.emitted:
        call.worker.idempotency.release(call.vk.workspace_id, call.vk.id, pending.idempotency_key, pending.token)


class SpendEndpoint:
    """`POST /v1/alephant/spend` as a pipeline endpoint (see the module docstring)."""

    name = "alephant.spend"
    governed = True
    records_success = True

    def credential(self, request: web.Request) -> str:
        return bearer(request)

    async def intake(self, call: Call) -> None:
        """Read and validate the spend, then claim its Idempotency-Key: before policy and budgets,
        so a retry of a spend that went through is answered as it was even once the budget it
        used is exhausted."""
        key = idempotency_key_of(call.request.headers)
        await read_object(call)
        spend = parse_spend(call.raw)
        call.ctx = dataclasses.replace(call.ctx, run_id=run_of(call.ctx.run_id, spend.run_id))
        vk = call.vk
        pending = PendingSpend(spend, key, spend_event_id(vk.workspace_id, vk.id, key))
        call.request[_PENDING] = pending
        claim = await call.worker.idempotency.claim(vk.workspace_id, vk.id, key, _fingerprint(call, spend))
        if claim.outcome == "claimed":
            pending.token = claim.token
            call.held.callback(_release_unless_booked, call, pending)
        elif claim.outcome == "replay":
            call.status = claim.status
            call.emitted = True  # nothing to record: the first request recorded the spend
            call.response = web.Response(status=claim.status, body=claim.body, content_type="application/json",
                                         headers={REPLAYED: "true", "Alephant-Request-Id": call.ctx.request_id})
        elif claim.outcome == "mismatch":
            raise InvalidRequest(f"This {IDEMPOTENCY_KEY} was already used with a different spend; use a new key for "
                                 "a new spend.", param=IDEMPOTENCY_KEY, code="idempotency_key_mismatch", status=422)
        elif claim.outcome == "in_flight":
            raise Conflict(f"A spend with this {IDEMPOTENCY_KEY} is still in progress; retry later.",
                           param=IDEMPOTENCY_KEY, code="idempotency_key_in_use")
        # "unavailable": go on without a record; the event id still makes a replay book once.

    def plan(self, call: Call) -> None:
        call.fixed_cost_nanos = call.request[_PENDING].spend.amount_nanos
        call.max_tokens = 0  # no tokens: nothing for a max_tokens cap to clamp
        call.input_bound = 0

    def set_max_tokens(self, call: Call, value: int) -> bool:
        return True  # no tokens to cap

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return True  # offers no tools to a model

    async def dispatch(self, call: Call) -> web.StreamResponse:
        """Record the spend (spooled before anyone sees it accepted), then its answer for replays."""
        pending = call.request[_PENDING]
        spend, vk, ctx = pending.spend, call.vk, call.ctx
        now = dt.datetime.now(dt.UTC)
        spend_id = "spend_" + pending.event_id.hex
        body = _encoder.encode(SpendAnswer(
            id=spend_id, amount_usd=nanos_to_decimal_str(spend.amount_nanos), currency=spend.currency,
            vendor=spend.vendor, tool=spend.tool or None, run_id=ctx.run_id, agent_id=ctx.agent_id,
            workspace_id=vk.workspace_id, created_at=int(now.timestamp())))
        call.status, call.cost_nanos = 201, spend.amount_nanos
        call.success_event = ToolSpend(
            event_id=pending.event_id, occurred_at=now, workspace_id=vk.workspace_id, agent_id=ctx.agent_id,
            run_id=ctx.run_id, session_id=ctx.session_id, workflow_id=ctx.workflow_id, request_id=ctx.request_id,
            snapshot_revision=call.snap.revision, key_id=vk.id, department_id=call.department_id,
            member_id=call.member_id, properties=properties_of(call), spend_id=spend_id,
            amount_nanos=spend.amount_nanos, currency=spend.currency, vendor=spend.vendor, tool=spend.tool,
            description=spend.description)
        emit_once(call)
        if pending.token:
            # False (the lease lapsed, or Redis went away): the key frees itself at the lease's end,
            # and a retry after that books the same event id again, which the journal drops.
            await call.worker.idempotency.complete(vk.workspace_id, vk.id, pending.idempotency_key, pending.token,
                                                   201, body)
        return web.Response(status=201, body=body, content_type="application/json",
                            headers={"Alephant-Request-Id": ctx.request_id, **call.extra_headers})


# -- POST /v1/alephant/runs/{run_id}/complete ------------------------------------------------------


class RunOutcomeAnswer(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    outcome: str
    object: str = "alephant.run.outcome"


_OUTCOME: web.RequestKey[RunOutcomeBody] = web.RequestKey("alephant_run_outcome", RunOutcomeBody)


class RunCompleteEndpoint:
    """`POST /v1/alephant/runs/{run_id}/complete` as a pipeline endpoint (see the module docstring)."""

    name = "alephant.run.complete"
    governed = False
    records_success = True

    def credential(self, request: web.Request) -> str:
        return bearer(request)

    async def intake(self, call: Call) -> None:
        run_id = check_text(call.request.match_info["run_id"], "run_id", MAX_HEADER_ID_LEN)
        call.ctx = dataclasses.replace(call.ctx, run_id=run_of(call.ctx.run_id, run_id))
        await read_object(call)
        call.request[_OUTCOME] = parse_outcome(call.raw)

    def plan(self, call: Call) -> None:
        call.max_tokens = 0

    def set_max_tokens(self, call: Call, value: int) -> bool:
        return True

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return True

    async def dispatch(self, call: Call) -> web.StreamResponse:
        body, ctx, vk = call.request[_OUTCOME], call.ctx, call.vk
        assert ctx.run_id is not None  # the path names it
        call.success_event = RunCompleted(
            event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=vk.workspace_id,
            agent_id=ctx.agent_id, run_id=ctx.run_id, session_id=ctx.session_id, workflow_id=ctx.workflow_id,
            request_id=ctx.request_id, snapshot_revision=call.snap.revision, key_id=vk.id, outcome=body.outcome,
            metadata=body.metadata)
        return web.Response(body=_encoder.encode(RunOutcomeAnswer(run_id=ctx.run_id, outcome=body.outcome)),
                            content_type="application/json", headers={"Alephant-Request-Id": ctx.request_id})
