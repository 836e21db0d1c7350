"""The semantic cache fails open when Qdrant is unreachable (issue 11): a stack of its own whose
`ALEPHANT_QDRANT_URL` points at a port nothing listens on. Every call is still answered, as a
miss, within a bounded added latency; Redis (the exact cache) keeps working."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import aiohttp
import psycopg
import pytest

from deploy.stack import Stack
from tests.conftest import dedicated_stack, eventually


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"ALEPHANT_QDRANT_URL": f"http://127.0.0.1:{_closed_port()}"}
    with dedicated_stack(tmp_path_factory.mktemp("qdrant-down"), env) as s:
        yield s


async def test_qdrant_unreachable_every_call_is_a_miss_with_bounded_latency(
        stack: Stack, http: aiohttp.ClientSession) -> None:
    admin = stack.admin()
    key = admin.call("POST", "/admin/v1/virtual-keys", {"workspace_id": "demo"})
    admin.call("POST", "/admin/v1/cache-settings", {
        "workspace_id": "demo", "scope": "key", "scope_id": key["id"], "mode": "semantic", "ttl_s": 60,
        "similarity": 0.9, "embedding_model": "mock/embed"})

    async def call(text: str) -> tuple[int, str, float]:
        started = time.monotonic()
        async with http.post(f"{stack.origin}/v1/chat/completions", headers={"Authorization": f"Bearer {key['key']}"},
                             json={"model": "mock/echo", "messages": [{"role": "user", "content": text}]}) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Alephant-Cache", ""), time.monotonic() - started

    async def semantic_on() -> bool | None:  # the setting reached the worker: the exact cache answers a repeat
        await call("warm-up question")
        status, cache, _ = await call("warm-up question")
        return True if (status, cache) == (200, "hit") else None
    await eventually(semantic_on, timeout=10)
    results = [await call(f"a new question {os.urandom(4).hex()}") for _ in range(8)]
    assert all((status, cache) == (200, "miss") for status, cache, _ in results), results
    assert max(took for _, _, took in results) < 1.0, results  # one deadline at most, then the breaker

    async def embedded() -> int | None:  # the semantic path did run: each miss embedded its prompt
        async with await psycopg.AsyncConnection.connect(stack.child_env()["ALEPHANT_DATABASE_URL"]) as conn:
            cur = await conn.execute("SELECT count(*) FROM event_journal WHERE type = 'llm.call' "
                                     "AND body->>'ingress' = 'cache.embed'")
            row = await cur.fetchone()
        return row[0] if row is not None and row[0] >= len(results) else None
    await eventually(embedded, timeout=15)
