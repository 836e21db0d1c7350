"""Stage: cache. After admission (limits and budgets apply to hits too) and before routing: a
model call whose answer is cached is answered from it (`dataplane.cache`), in the client's API,
and recorded as a `cache.hit` with what it would have cost; any other call that uses the cache
is marked for storing its answer (`store_answer`, called by the dispatch once it succeeded).

Only the model APIs (chat, responses, messages) are cached; every other endpoint passes through.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol, cast

from aiohttp import web

from dataplane.cache import Entry, cache_plan, exact_key
from dataplane.call import Call
from dataplane.pricing import price_call
from schemas.events import CacheHit, Usage
from schemas.ids import uuid7

CACHED_APIS = frozenset({"chat.completions", "openai.responses", "anthropic.messages"})


class Replays(Protocol):
    """An endpoint that can answer from a cached entry (the model APIs' `ModelCall`)."""

    async def replay(self, call: Call, entry: Entry) -> web.StreamResponse: ...


def _target_ref(call: Call) -> str:
    """What the answer depends on besides the request: the router and the requested model for a
    router's call (any of its targets may answer), else the resolved `provider/model`."""
    route = call.route
    if route is not None and route.router is not None:
        return f"router:{route.router.id}/{call.requested_model}"
    return call.model_ref


async def cache(call: Call) -> None:
    store = call.worker.cache
    if store is None or call.plan is None or call.endpoint.name not in CACHED_APIS:
        return
    snap, ws = call.snap, call.vk.workspace_id
    route = call.route
    plan = cache_plan(snap, ws, call.vk.id, route.router.id if route is not None and route.router else None,
                      call.request.headers)
    if plan is None:
        return
    if plan == "skip":
        call.cache = "skip"
        return
    assert not isinstance(plan, str)
    purge = snap.cache_purges.get((ws, plan.namespace))
    key = exact_key(ws, plan.namespace, purge.generation if purge is not None else 0, _target_ref(call),
                    call.plan.body)
    call.cache_plan, call.cache_key = plan, key
    if not plan.read:
        return
    entry = await store.get(key)
    if entry is not None:
        store.hits += 1
        await answer_from_cache(call, entry, "hit")
        return
    store.misses += 1


def saved_nanos(call: Call, entry: Entry) -> int:
    """What the cached answer would cost now: its usage at the current price of the provider and
    model that produced it (the cost it had when stored, if that provider is gone)."""
    provider = call.snap.providers.get((call.vk.workspace_id, entry.provider))
    if provider is None:
        return entry.cost_nanos
    return price_call(call.snap, provider.name, provider.type, entry.model, entry.usage,
                      workspace_id=call.vk.workspace_id).cost_nanos


async def answer_from_cache(call: Call, entry: Entry, kind: str, similarity: float | None = None) -> None:
    """Answer the call from `entry` (`kind` hit or semantic-hit): the success event is the
    `cache.hit`, the response the endpoint's replay."""
    call.cache, call.cache_similarity = kind, similarity
    ctx = call.ctx
    props = ctx.properties
    call.success_event = CacheHit(
        event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=call.vk.workspace_id,
        agent_id=ctx.agent_id, run_id=ctx.run_id, session_id=ctx.session_id, workflow_id=ctx.workflow_id,
        request_id=ctx.request_id, snapshot_revision=call.snap.revision, key_id=call.vk.id,
        department_id=call.department_id, member_id=call.member_id,
        properties={name.lower(): value for name, value in props} if props else {},
        provider=entry.provider, model=entry.model, saved_nanos=saved_nanos(call, entry),
        cache="semantic" if kind == "semantic-hit" else "exact", usage=entry.usage)
    call.response = await cast(Replays, call.endpoint).replay(call, entry)


def store_answer(call: Call, chat_body: bytes | None) -> None:
    """After a successful dispatch: keep its answer (a `chat.completion`) for the plan's TTL."""
    plan, store, target = call.cache_plan, call.worker.cache, call.target
    if plan is None or store is None or chat_body is None or target is None or call.status >= 400 or call.partial:
        return
    store.put(call.cache_key, Entry(body=chat_body, provider=target.provider.name, model=target.model,
                                    usage=call.usage or Usage(), cost_nanos=call.cost_nanos,
                                    stored_ms=int(time.time() * 1000)), plan.ttl_s)
