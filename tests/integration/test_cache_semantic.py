"""The semantic cache end to end (issue 11): a key whose cache setting is `semantic`, the scripted
embedding fake (paraphrases near, unrelated prompts far) as provider `emb`, the fake chat upstream
as `sfake`, and the worker's Qdrant in local mode. The index opens on first use, in the
background, so the first tests ask until it is ready."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import psycopg
import pytest_asyncio

from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.embedding_upstream import EmbeddingUpstream
from tests.fakes.upstream import FakeUpstream

CHAT = "sfake/gpt-4o-mini"
EMBED = "emb/text-embedding-3-small"


@dataclass
class Semantic:
    gateway: Gateway
    emb: EmbeddingUpstream
    chat: FakeUpstream
    keys: dict[str, str]  # workspace -> plaintext virtual key with a semantic cache setting
    settings: dict[str, str]  # workspace -> cache setting id


def _workspace(gateway: Gateway, ws: str, emb: EmbeddingUpstream, chat: FakeUpstream,
               similarity: float) -> tuple[str, str]:
    if ws != "demo":
        gateway.admin.call("POST", "/admin/v1/workspaces", {"id": ws, "name": ws})
    for name, fake in (("emb", emb), ("sfake", chat)):
        gateway.admin.call("POST", "/admin/v1/providers", {
            "workspace_id": ws, "name": name, "type": "openai", "base_url": fake.base_url,
            "api_key": f"sk-{name}-upstream-0123456789"})
    key = gateway.create_key(ws)
    setting = gateway.admin.call("POST", "/admin/v1/cache-settings", {
        "workspace_id": ws, "scope": "key", "scope_id": key["id"], "mode": "semantic", "ttl_s": 600,
        "similarity": similarity, "embedding_model": EMBED})
    return key["key"], setting["id"]


@pytest_asyncio.fixture(scope="module")
async def sem(gateway: Gateway) -> AsyncIterator[Semantic]:
    async with EmbeddingUpstream() as emb, FakeUpstream() as chat:
        other = f"semws{os.urandom(3).hex()}"
        demo_key, demo_setting = _workspace(gateway, "demo", emb, chat, 0.9)
        other_key, other_setting = _workspace(gateway, other, emb, chat, 0.9)
        yield Semantic(gateway, emb, chat, {"demo": demo_key, "other": other_key},
                       {"demo": demo_setting, "other": other_setting})


async def ask(s: Semantic, http: aiohttp.ClientSession, text: str, ws: str = "demo",
              **extra: Any) -> tuple[dict[str, str], Any]:
    body = {"model": CHAT, "messages": [{"role": "user", "content": text}], "max_tokens": 32, **extra}
    async with http.post(s.gateway.base_url + "/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {s.keys[ws]}"}) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return dict(resp.headers), data


async def _semantic_hit(s: Semantic, http: aiohttp.ClientSession, template: str) -> dict[str, str]:
    """Ask fresh paraphrases (no exact hit possible) until one is a semantic hit: the index opens
    in the background on first use, and answers stored before it was ready are only exact."""
    n = iter(range(10_000))

    async def hit() -> dict[str, str] | None:
        headers, _ = await ask(s, http, template.format(next(n)))
        return headers if headers["Alephant-Cache"] == "semantic-hit" else None
    return await eventually(hit, timeout=30, interval=0.2)


async def test_a_paraphrase_is_a_semantic_hit_and_its_embedding_is_booked(
        sem: Semantic, http: aiohttp.ClientSession) -> None:
    headers = await _semantic_hit(sem, http, "What is the capital of France? (take {})")
    assert float(headers["Alephant-Cache-Similarity"]) >= 0.9
    chat_calls = sem.chat.chat_attempts
    headers, data = await ask(sem, http, "Tell me the capital city of France, please")
    assert headers["Alephant-Cache"] == "semantic-hit" and sem.chat.chat_attempts == chat_calls
    assert data["usage"]["total_tokens"] == 0
    embed_call = await eventually(lambda: journal_event(sem.gateway.database_url, headers["Alephant-Request-Id"]))
    assert (embed_call["ingress"], embed_call["provider"], embed_call["model"]) == (
        "cache.embed", "emb", "text-embedding-3-small")
    assert embed_call["usage"]["input_tokens"] > 0


async def test_an_unrelated_prompt_misses_and_there_are_no_cross_workspace_hits(
        sem: Semantic, http: aiohttp.ClientSession) -> None:
    await _semantic_hit(sem, http, "What is the weather like in Paris today? ({})")
    headers, _ = await ask(sem, http, "How do I reset my account password?")
    assert headers["Alephant-Cache"] == "miss"
    # The other workspace has the same providers, setting and questions, and its own cache.
    headers, _ = await ask(sem, http, "What is the weather like in Paris today? (again)", ws="other")
    assert headers["Alephant-Cache"] == "miss"


async def test_the_threshold_is_respected_and_tools_are_excluded(
        sem: Semantic, http: aiohttp.ClientSession) -> None:
    await _semantic_hit(sem, http, "How do I sort a list in Python? ({})")
    sem.gateway.admin.call("PATCH", f"/admin/v1/cache-settings/{sem.settings['demo']}", {"similarity": 0.99999})

    async def strict() -> bool | None:
        headers, _ = await ask(sem, http, f"Sorting a Python list: how? {os.urandom(3).hex()}")
        return True if headers["Alephant-Cache"] == "miss" else None
    await eventually(strict, timeout=5)  # the near paraphrase is below the new threshold
    sem.gateway.admin.call("PATCH", f"/admin/v1/cache-settings/{sem.settings['demo']}", {"similarity": 0.9})
    calls = sem.emb.calls
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    headers, _ = await ask(sem, http, "How do I sort a list in Python? (with tools)", tools=[tool])
    assert headers["Alephant-Cache"] == "miss" and sem.emb.calls == calls  # not even embedded


async def test_the_embedding_spend_is_settled_against_the_keys_budget(
        sem: Semantic, http: aiohttp.ClientSession) -> None:
    gateway = sem.gateway
    gateway.admin.call("POST", "/admin/v1/prices", {"provider": "emb", "model": "text-embedding-3-small",
                                                    "input_per_mtok_nanos": 10**12, "output_per_mtok_nanos": 0})
    key = gateway.create_key()  # a key of its own, so only this test's calls count against its budget
    gateway.admin.call("POST", "/admin/v1/cache-settings", {
        "workspace_id": "demo", "scope": "key", "scope_id": key["id"], "mode": "semantic", "ttl_s": 600,
        "similarity": 0.9, "embedding_model": EMBED})
    budget = gateway.admin.call("POST", "/admin/v1/budgets", {"workspace_id": "demo", "scope": "key",
                                                              "scope_id": key["id"], "period": "month",
                                                              "limit_usd": "50"})
    sem.keys["budgeted"] = key["key"]
    seen: list[str] = []

    async def embed_cost(request_id: str) -> int | None:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute("SELECT (body->>'cost_nanos')::bigint FROM event_journal WHERE type = 'llm.call' "
                                     "AND body->>'request_id' = %s AND body->>'ingress' = 'cache.embed'", (request_id,))
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def embedded() -> bool | None:  # the setting and budget reached the worker: the prompt was embedded
        headers, _ = await ask(sem, http, f"What is the capital of Germany? {os.urandom(3).hex()}", ws="budgeted")
        seen.append(headers["Alephant-Request-Id"])
        for rid in seen:  # journalled a moment later; the first calls may predate the setting
            if await embed_cost(rid) is not None:
                return True
        return None
    await eventually(embedded, timeout=15, interval=0.5)

    async def settled() -> bool | None:
        costs = [await embed_cost(rid) for rid in seen]
        state = gateway.admin.call("GET", f"/admin/v1/budgets/{budget['id']}")
        spent = int(Decimal(state["spent_usd"]) * 10**9)
        total = sum(c or 0 for c in costs)
        return True if total > 0 and spent >= total else None
    await eventually(settled, timeout=15)
