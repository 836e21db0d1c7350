"""Re-pricing: calls recorded as unpriced, priced once a price exists (issue 9).

A call with no known price is journalled with cost 0 and `priced: false`, and the ledger parks its
tokens in `suspense:<ws>:unpriced:<provider>/<model>` (`events.ledger`). `Repricer.reprice` finds
the unpriced `llm.call`s of one provider and model (optionally one workspace) in `event_journal`
that nothing has re-priced yet, prices each with the current config by the data plane's own
function (`schemas.pricing.price_call`, in the call's own workspace and with its own provider key,
so a scoped price applies only where it applies), and writes one `llm.repriced` per priced call to
the config outbox in one transaction. The relay publishes them; the projector reverses the
suspense posting and posts the cost to the agent's `llm_cost` account.

Idempotent: the event id is uuid5(original event id, price id), so publishing twice books once; a
call that any `llm.repriced` already names (journalled, or still in the outbox) is skipped, so a
later, different price never prices it twice; one re-pricing runs at a time (a transaction-scoped
advisory lock), so two concurrent requests cannot both price one call. Calls still without a price
are counted (`still_unpriced`) and left in suspense. Bounded: at most MAX_REPRICED events and
MAX_SCANNED journal rows per request; `more: true` says to call again.

Re-pricing is explicit (`POST /admin/v1/finance/reprice`, `alephant ledger reprice`): setting a
price does not trigger it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg

from controlplane.commands import CommitHook
from controlplane.inputs import Command, Ident, ModelId
from controlplane.relay import OutboxWriter, enqueue_events
from events.ledger import call_tokens
from schemas.entities import ConfigEntity, PriceOverride, kv_key
from schemas.events import LlmCall, LlmRepriced
from schemas.money import nanos_to_decimal_str
from schemas.pricing import ANY_MODEL, PriceIndex, bounded_usage, price_call
from schemas.snapshot import Snapshot

MAX_REPRICED = 5_000  # events per request (the relay publishes them one by one after the commit)
MAX_SCANNED = 50_000  # journal rows read per request
PAGE = 1_000
# One re-pricing at a time, fleet-wide (pg_advisory_xact_lock key).
_LOCK_KEY = 0x616C_6570_7270_6331  # "aleprpc1"

_call_decoder = msgspec.json.Decoder(LlmCall)


class Reprice(Command):
    """`provider` is the provider name calls were made to (as in `provider/model`); `model` the
    model ("*": every model of the provider); `workspace_id` limits it to one workspace's calls
    (omitted: every workspace's)."""

    provider: Ident
    model: ModelId
    workspace_id: Ident | None = None


def repriced_event(call: LlmCall, index: PriceIndex, provider_type: str, *, now: dt.datetime,
                   revision: int = 0) -> LlmRepriced | None:
    """The `llm.repriced` that prices the unpriced `call` with the prices of `index`, or None when
    it is still unpriced (or there is nothing to book: no tokens parked and no cost). Pure.

    Carries the call's attribution (envelope ids, department, member), `original_occurred_at`
    and `tokens` = `events.ledger.call_tokens(usage)`, exactly what its suspense posting parked."""
    usage = bounded_usage(call.usage) or call.usage
    price = price_call(index, call.provider, provider_type, call.model, usage, workspace_id=call.workspace_id,
                       provider_key_id=call.provider_key_id, success=call.status < 400)
    tokens = call_tokens(call.usage)
    if not price.priced or (tokens == 0 and price.cost_nanos == 0):
        return None
    price_id = price.price_id or f"catalog:{price.catalog_version}"
    return LlmRepriced(
        event_id=uuid.uuid5(call.event_id, price_id), occurred_at=now, workspace_id=call.workspace_id,
        agent_id=call.agent_id, run_id=call.run_id, session_id=call.session_id, workflow_id=call.workflow_id,
        request_id=call.request_id, snapshot_revision=revision, original_event_id=call.event_id,
        provider=call.provider, model=call.model, tokens=tokens, cost_nanos=price.cost_nanos,
        currency=call.currency, price_id=price_id, price_scope=price.scope, department_id=call.department_id,
        member_id=call.member_id, original_occurred_at=call.occurred_at,
    )


@dataclass(frozen=True, slots=True)
class _Page:
    calls: list[LlmCall]
    last: tuple[dt.datetime, uuid.UUID] | None


class Repricer(OutboxWriter):
    """Re-prices unpriced calls through the config outbox (see the module docstring)."""

    async def reprice(self, cmd: Reprice, on_commit: CommitHook | None = None) -> dict[str, Any]:
        """Price what can be priced now; returns `{repriced, cost_usd, cost_nanos, still_unpriced,
        more, propagated}`. `propagated` is false when the events are committed but NATS did not
        take them within the wait (the relay keeps retrying; do not repeat the request for that).
        `on_commit` runs inside the transaction with the body (see `CommitHook`)."""
        now = dt.datetime.now(dt.UTC)
        events: list[LlmRepriced] = []
        still_unpriced = scanned = 0
        more = False
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            index = await _price_index(conn)
            types = await _provider_types(conn, cmd.provider)
            after: tuple[dt.datetime, uuid.UUID] | None = None
            while True:
                page = await self._unpriced_page(conn, cmd, after)
                for call in page.calls:
                    event = repriced_event(call, index, types.get(call.workspace_id, ""), now=now,
                                           revision=self._relay.last_revision)
                    if event is None:
                        still_unpriced += 1
                    else:
                        events.append(event)
                scanned += len(page.calls)
                if page.last is None or len(page.calls) < PAGE:
                    break
                if len(events) >= MAX_REPRICED or scanned >= MAX_SCANNED:
                    more = True
                    break
                after = page.last
            await enqueue_events(conn, events, self._prefix)
            total = sum(e.cost_nanos for e in events)
            body: dict[str, Any] = {
                "object": "finance.reprice", "provider": cmd.provider, "model": cmd.model,
                "workspace_id": cmd.workspace_id, "repriced": len(events), "cost_usd": nanos_to_decimal_str(total),
                "cost_nanos": total, "still_unpriced": still_unpriced, "more": more}
            if on_commit is not None:
                await on_commit(conn, body | {"propagated": False})
        propagated = True if not events else await self.propagated()
        return body | {"propagated": propagated}

    async def _unpriced_page(self, conn: psycopg.AsyncConnection[Any], cmd: Reprice,
                             after: tuple[dt.datetime, uuid.UUID] | None) -> _Page:
        """The next PAGE unpriced calls (by time, then id) after `after` that no `llm.repriced`
        names, in the journal or in the outbox (published or not: it may not be journalled yet)."""
        ws = cmd.workspace_id
        subjects = f"{self._prefix}.{ws}.llm.repriced" if ws else f"{self._prefix}.%.llm.repriced"
        cur = await conn.execute(
            """
            WITH done AS (
                SELECT (body->>'original_event_id')::uuid AS id FROM event_journal
                WHERE type = 'llm.repriced' AND (%(ws)s::text IS NULL OR workspace_id = %(ws)s)
                UNION
                SELECT (convert_from(event, 'UTF8')::jsonb->>'original_event_id')::uuid FROM config_outbox
                WHERE subject LIKE %(subjects)s
            )
            SELECT j.body::text FROM event_journal j
            WHERE j.type = 'llm.call' AND (%(ws)s::text IS NULL OR j.workspace_id = %(ws)s)
              AND j.body->>'provider' = %(provider)s AND (%(model)s = %(any)s OR j.body->>'model' = %(model)s)
              AND j.body->>'priced' = 'false'
              AND (%(after_at)s::timestamptz IS NULL
                   OR (j.occurred_at, j.event_id) > (%(after_at)s::timestamptz, %(after_id)s::uuid))
              AND NOT EXISTS (SELECT 1 FROM done WHERE done.id = j.event_id)
            ORDER BY j.occurred_at, j.event_id
            LIMIT %(page)s
            """,
            {"ws": ws, "subjects": subjects, "provider": cmd.provider, "model": cmd.model, "any": ANY_MODEL,
             "after_at": after[0] if after else None, "after_id": after[1] if after else None, "page": PAGE},
        )
        calls = [_call_decoder.decode(row[0]) for row in await cur.fetchall()]
        return _Page(calls, (calls[-1].occurred_at, calls[-1].event_id) if calls else None)


async def _price_index(conn: psycopg.AsyncConnection[Any]) -> Snapshot:
    """Every live price override, indexed as a worker's snapshot indexes them."""
    cur = await conn.execute("SELECT body FROM config_entity WHERE kind = 'price' AND deleted_at IS NULL")
    prices: Mapping[str, ConfigEntity] = {
        kv_key(p): p for p in (msgspec.convert(dict(row[0]) | {"kind": "price"}, PriceOverride)
                               for row in await cur.fetchall())}
    return Snapshot.build(prices, 0)


async def _provider_types(conn: psycopg.AsyncConnection[Any], name: str) -> dict[str, str]:
    """Workspace -> the type of its live provider named `name` (for built-in and catalog prices;
    a deleted provider's calls are priced by overrides alone)."""
    cur = await conn.execute("SELECT workspace_id, body->>'type' FROM config_entity WHERE kind = 'provider' "
                             "AND deleted_at IS NULL AND body->>'name' = %s", (name,))
    return {ws: ptype for ws, ptype in await cur.fetchall()}
