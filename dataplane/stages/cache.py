"""Stages: cache key (after the policy, before admission) and cache (after admission, before
routing). A model call whose answer is cached is answered from it (`dataplane.cache`), in the
client's API, and recorded as a `cache.hit` with what it would have cost; any other call that
uses the cache stores its answer (`store_answer`, called by the dispatch once it succeeded).

Only the model APIs (chat, responses, messages) are cached; every other endpoint passes through.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol, cast

import structlog
from aiohttp import web

from dataplane.cache import Entry, cache_plan, exact_key
from dataplane.cache_semantic import Embedded, embed_text, semantic_text
from dataplane.call import Call
from dataplane.decisions import Target
from dataplane.pricing import price_call
from schemas.entities import CacheSettings
from schemas.events import CacheHit, LlmCall, Usage
from schemas.ids import uuid7

log = structlog.get_logger(__name__)

EMBED_TIMEOUT_S = 2.0  # the semantic lookup's embedding call; past it the call goes on as a miss
EMBED_INGRESS = "cache.embed"  # the `ingress` of the embedding call's own llm.call

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


async def cache_key(call: Call) -> None:
    """After the policy (its clamps are part of the request), before admission (a budget's
    injected `max_tokens` varies with what is left, and must not split the cache): which cache
    plan applies and the request's key."""
    if call.worker.cache is None or call.plan is None or call.endpoint.name not in CACHED_APIS:
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
    call.cache_generation = purge.generation if purge is not None else 0
    call.cache_key = exact_key(ws, plan.namespace, call.cache_generation, _target_ref(call), call.plan.body)
    call.cache_plan = plan
    if plan.mode == "semantic":
        call.cache_partition = _partition(call)
        call.cache_text = semantic_text(call.plan.body)


async def cache(call: Call) -> None:
    """After admission (limits and budgets apply to hits too): answer from the cache when the key
    (or, for a semantic setting, a similar prompt) has an answer."""
    plan, store = call.cache_plan, call.worker.cache
    if plan is None or store is None or not plan.read:
        return
    entry = await store.get(call.cache_key)
    if entry is not None:
        await answer_from_cache(call, entry, "hit")
    elif plan.mode == "semantic" and plan.settings is not None and _semantic_applies(call, plan.settings):
        await _semantic(call, plan.settings, plan.namespace, call.cache_generation)
    store.outcomes[(call.vk.workspace_id, call.cache)] += 1


def _semantic_applies(call: Call, settings: CacheSettings) -> bool:
    if not settings.embedding_model or call.worker.semantic is None or call.plan is None:
        return False
    if settings.exclude_tools and call.tools:
        return False
    temperature = call.plan.body.get("temperature")
    return not (settings.exclude_temperature and temperature not in (None, 0))


def _partition(call: Call) -> str:
    """What a semantic hit must share besides a similar prompt: the target and every request field
    but the messages (tools, sampling, limits)."""
    assert call.plan is not None
    rest = {k: v for k, v in call.plan.body.items() if k != "messages"}
    return exact_key("", "", 0, _target_ref(call), rest).rsplit(":", 1)[1]


async def _semantic(call: Call, settings: CacheSettings, namespace: str, generation: int) -> None:
    """After an exact miss: embed the prompt (booked as its own `llm.call`), look for the nearest
    earlier prompt; a hit replays its answer, a miss keeps the vector to store with the answer."""
    index, store = call.worker.semantic, call.worker.cache
    assert index is not None and store is not None and call.plan is not None and settings.embedding_model
    try:
        embedded = await embed_text(call.worker, call.snap, call.vk, settings.embedding_model,
                                     call.cache_text, timeout_s=EMBED_TIMEOUT_S)
    except Exception as exc:  # any failure of the embedding call is a miss (fail-open)
        index.failures += 1
        log.info("semantic_cache_embed_failed", error=type(exc).__name__, model=settings.embedding_model)
        return
    booked = _embedding_event(call, embedded)
    call.worker.events.emit(booked)
    call.side_cost_nanos += booked.cost_nanos  # budgets see the embedding's spend too (stages.governance.settle)
    found = await index.lookup(embedded.vector, workspace_id=call.vk.workspace_id, namespace=namespace,
                               partition=call.cache_partition, generation=generation, threshold=settings.similarity,
                               now_ms=int(time.time() * 1000))
    if found is not None:
        entry = await store.get(found[0])
        if entry is not None:
            await answer_from_cache(call, entry, "semantic-hit", similarity=found[1])
            return
    call.cache_vector = embedded.vector


def _embedding_event(call: Call, embedded: Embedded) -> LlmCall:
    """The semantic lookup's embedding call, booked like any call (its own event, priced)."""
    ctx, target = call.ctx, embedded.target
    priced = price_call(call.snap, target.provider.name, target.provider.type, target.model, embedded.usage,
                        workspace_id=call.vk.workspace_id, provider_key_id=embedded.key.key_id)
    return LlmCall(
        event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=call.vk.workspace_id,
        agent_id=ctx.agent_id, run_id=ctx.run_id, session_id=ctx.session_id, workflow_id=ctx.workflow_id,
        request_id=ctx.request_id, snapshot_revision=call.snap.revision, provider=target.provider.name,
        model=target.model, ingress=EMBED_INGRESS, stream=False, status=200, usage=embedded.usage,
        cost_nanos=priced.cost_nanos, priced=priced.priced, key_id=call.vk.id,
        latency_ms=round(embedded.latency_ms, 3), department_id=call.department_id, member_id=call.member_id,
        endpoint=call.request.path, provider_key_id=embedded.key.key_id, provider_key_source=embedded.key.source,
        price_source=priced.source, price_id=priced.price_id, price_scope=priced.scope,
        catalog_version=priced.catalog_version)


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
    producer = call.snap.providers.get((call.vk.workspace_id, entry.provider))
    if producer is not None:  # Alephant-Provider names who produced the cached answer
        call.target = Target(provider=producer, model=entry.model)
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
    now_ms = int(time.time() * 1000)
    stored = store.put(call.cache_key, Entry(body=chat_body, provider=target.provider.name, model=target.model,
                                             usage=call.usage or Usage(), cost_nanos=call.cost_nanos,
                                             stored_ms=now_ms, expires_ms=now_ms + plan.ttl_s * 1000), plan.ttl_s)
    index, vector = call.worker.semantic, call.cache_vector
    if stored and index is not None and vector is not None:
        store.spawn(index.store(vector, workspace_id=call.vk.workspace_id, namespace=plan.namespace,
                                partition=call.cache_partition, generation=call.cache_generation,
                                entry_key=call.cache_key, expires_at_ms=now_ms + plan.ttl_s * 1000))
