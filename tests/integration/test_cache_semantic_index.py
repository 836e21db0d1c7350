"""dataplane/cache_semantic.py's `SemanticIndex` on real Qdrant (qdrant-client's local mode, on disk
in a temporary directory), with vectors from the embeddings fake (tests/fakes/embedding_upstream.py):
hits and misses by similarity, the scope a hit must share, expiry and the sweep, slots, and
fail-open against a Qdrant server that is not there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from qdrant_client import QdrantClient, models

from dataplane.cache_semantic import SemanticIndex, embed_text, semantic_text
from dataplane.snapshot import SnapshotStore
from dataplane.state import WorkerState
from schemas.entities import Provider, VirtualKey, Workspace, kv_key
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot
from tests.fakes.embedding_upstream import EmbeddingUpstream
from tests.fakes.server import FakeServer
from tests.unit.conftest import Recorder

NOW = 1_700_000_000_000
HOUR_MS = 3_600_000
SCOPE: dict[str, Any] = {"workspace_id": "ws", "namespace": "", "partition": "emb/m|openai/gpt-4o", "generation": 0}
FAKE = EmbeddingUpstream()
QUESTION = "What is the capital of France?"
PARAPHRASE = "Tell me France's capital city, please."
UNRELATED = "How do I sort a list in Python?"


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SemanticIndex]:
    idx = SemanticIndex(root=tmp_path / "qdrant", timeout_s=2.0)  # generous: CI disks vary
    assert await idx.open()
    yield idx
    await idx.close()


async def store(idx: SemanticIndex, text: str, entry_key: str, **overrides: Any) -> None:
    fields = {**SCOPE, "expires_at_ms": NOW + HOUR_MS, **overrides}
    await idx.store(FAKE.vector(text), entry_key=entry_key, **fields)


async def lookup(idx: SemanticIndex, text: str, threshold: float = 0.95, now_ms: int = NOW,
                 **overrides: Any) -> tuple[str, float] | None:
    return await idx.lookup(FAKE.vector(text), threshold=threshold, now_ms=now_ms, **{**SCOPE, **overrides})


async def test_store_then_paraphrase_hits_unrelated_misses(index: SemanticIndex) -> None:
    assert await lookup(index, QUESTION) is None  # no collection yet: a miss, not a failure
    await store(index, QUESTION, "entry-1")
    await store(index, UNRELATED, "entry-2")
    exact = await lookup(index, QUESTION)
    assert exact is not None and exact[0] == "entry-1" and exact[1] == pytest.approx(1.0, abs=1e-4)
    near = await lookup(index, PARAPHRASE)
    assert near is not None and near[0] == "entry-1" and 0.95 <= near[1] < 1.0
    assert await lookup(index, "I forgot my password") is None
    assert await lookup(index, PARAPHRASE, threshold=0.9999) is None  # below the threshold
    assert index.failures == 0 and index.hits == 2 and index.misses == 3
    assert await index.count() == 2


async def test_restore_overwrites_the_entry(index: SemanticIndex) -> None:
    await store(index, QUESTION, "entry-1")
    await store(index, QUESTION, "entry-1", expires_at_ms=NOW - 1)  # re-stored, now expired
    assert await index.count() == 1
    assert await lookup(index, QUESTION) is None


@pytest.mark.parametrize("other", [{"workspace_id": "ws2"}, {"namespace": "team-a"},
                                   {"partition": "emb/m|openai/gpt-4o-mini"}, {"generation": 1_700_000_000_001}])
async def test_no_hit_across_scopes(index: SemanticIndex, other: dict[str, Any]) -> None:
    await store(index, QUESTION, "entry-1")
    assert await lookup(index, QUESTION, **other) is None
    await store(index, QUESTION, "entry-2", **other)
    hit = await lookup(index, QUESTION, **other)
    assert hit is not None and hit[0] == "entry-2"
    first = await lookup(index, QUESTION)
    assert first is not None and first[0] == "entry-1"


async def test_expired_entries_miss_and_sweep_removes_them(index: SemanticIndex) -> None:
    await store(index, QUESTION, "old", expires_at_ms=NOW + 10)
    await store(index, UNRELATED, "fresh", expires_at_ms=NOW + HOUR_MS)
    assert await lookup(index, QUESTION, now_ms=NOW + 9) is not None
    assert await lookup(index, QUESTION, now_ms=NOW + 10) is None  # expires_at_ms must be > now
    assert await index.sweep(NOW + 10)
    assert await index.count() == 1
    assert await lookup(index, UNRELATED, now_ms=NOW + 10) is not None
    assert await index.sweep(NOW + 2 * HOUR_MS) and await index.count() == 0


async def test_collections_per_dimension(index: SemanticIndex) -> None:
    await index.store(FAKE.vector(QUESTION, 8), entry_key="small", expires_at_ms=NOW + HOUR_MS, **SCOPE)
    await store(index, QUESTION, "big")
    small = await index.lookup(FAKE.vector(PARAPHRASE, 8), threshold=0.9, now_ms=NOW, **SCOPE)
    big = await lookup(index, PARAPHRASE)
    assert small is not None and big is not None and (small[0], big[0]) == ("small", "big")
    assert await index.count() == 2


async def test_local_mode_opens_lazily_in_the_background_and_keeps_its_slot(tmp_path: Path) -> None:
    root = tmp_path / "qdrant"
    idx = SemanticIndex(root=root, timeout_s=2.0)
    assert not idx.ready and not root.exists()  # built without touching the disk
    assert await lookup(idx, QUESTION) is None and idx.not_ready == 1  # starts the open, answers a miss
    assert await idx.open() and idx.local_path == root / "slot-0"
    other = SemanticIndex(root=root, timeout_s=2.0)  # another worker on the same state dir
    assert await other.open() and other.local_path == root / "slot-1"
    await store(idx, QUESTION, "entry-1")
    await other.close()
    await idx.close()
    assert await lookup(idx, QUESTION) is None  # closed: a miss
    again = SemanticIndex(root=root, timeout_s=2.0)  # a restarted worker takes slot-0 back
    try:
        assert await again.open() and again.local_path == root / "slot-0"
        hit = await lookup(again, PARAPHRASE)
        assert hit is not None and hit[0] == "entry-1"
    finally:
        await again.close()


async def test_local_mode_is_capped_until_a_sweep_frees_room(tmp_path: Path) -> None:
    idx = SemanticIndex(root=tmp_path, timeout_s=2.0, max_points=2)
    try:
        assert await idx.open()
        await store(idx, QUESTION, "a", expires_at_ms=NOW + 10)
        await store(idx, UNRELATED, "b")
        await store(idx, "I forgot my password", "c")  # full: not stored
        assert idx.skipped == 1 and await idx.count() == 2
        assert await lookup(idx, "I forgot my password") is None
        assert await idx.sweep(NOW + 10)  # frees "a"
        await store(idx, "I forgot my password", "c")
        hit = await lookup(idx, "forgot password", now_ms=NOW + 10)
        assert hit is not None and hit[0] == "c" and await idx.count() == 2
    finally:
        await idx.close()
    again = SemanticIndex(root=tmp_path, timeout_s=2.0, max_points=2)  # counts what it finds on open
    try:
        assert await again.open()
        await store(again, "Will it rain tomorrow?", "d")
        assert again.skipped == 1 and await again.count() == 2
    finally:
        await again.close()


async def test_local_deadline_is_a_miss_and_the_index_recovers(index: SemanticIndex) -> None:
    await store(index, UNRELATED, "warm")
    index.timeout_s = 1e-6  # nothing local can answer this fast
    await store(index, QUESTION, "late")
    assert await lookup(index, UNRELATED) is None
    assert index.failures == 2 and index.hits == 0
    index.timeout_s = 2.0
    await store(index, QUESTION, "again")
    hit = await lookup(index, PARAPHRASE)
    assert hit is not None and hit[0] in ("late", "again")  # "late" may have landed after its deadline
    warm = await lookup(index, UNRELATED)
    assert warm is not None and warm[0] == "warm"


async def test_run_sweeps_sweeps_periodically(index: SemanticIndex) -> None:
    await store(index, QUESTION, "old", expires_at_ms=NOW + 10)
    task = asyncio.create_task(index.run_sweeps(0.01, clock=lambda: (NOW + 10) / 1000))
    try:
        for _ in range(200):
            if await index.count() == 0:
                break
            await asyncio.sleep(0.01)
        assert await index.count() == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class QdrantRestShim(FakeServer):
    """The slice of Qdrant's REST API the index uses, answered by an in-memory local-mode client:
    the remote code path (AsyncQdrantClient over HTTP) end to end without a Qdrant server.
    Payload-index requests are recorded, not applied (local mode has no payload indexes)."""

    def __init__(self) -> None:
        self.host, self.port = "127.0.0.1", 0
        self.local = QdrantClient(":memory:")
        self.indexes: list[tuple[str, str, str]] = []
        self.delay_s = 0.0

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.sleep(self.delay_s)
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        parts = request.path.strip("/").split("/")
        result: Any
        if request.method == "GET" and parts == ["collections"]:
            result = self.local.get_collections().model_dump(mode="json")
        elif parts[-1] == "exists":
            result = {"exists": self.local.collection_exists(parts[1])}
        elif request.method == "PUT" and len(parts) == 2:
            made = models.CreateCollection(**body)
            result = self.local.create_collection(parts[1], vectors_config=made.vectors)
        elif parts[2:] == ["index"]:
            self.indexes.append((parts[1], body["field_name"], body["field_schema"]))
            result = {"operation_id": 0, "status": "completed"}
        elif request.method == "PUT" and parts[2:] == ["points"]:
            points = models.PointsList(**body).points
            result = self.local.upsert(parts[1], points=points).model_dump(mode="json")
        elif parts[2:] == ["points", "query"]:
            query = models.QueryRequest(**body)
            result = self.local.query_points(
                parts[1], query=query.query.nearest if isinstance(query.query, models.NearestQuery) else None,
                query_filter=query.filter, limit=query.limit or 10, score_threshold=query.score_threshold,
                with_payload=query.with_payload or False, with_vectors=False).model_dump(mode="json")
        elif parts[2:] == ["points", "delete"]:
            selector = models.FilterSelector(**body)
            result = self.local.delete(parts[1], points_selector=selector).model_dump(mode="json")
        elif parts[2:] == ["points", "count"]:
            counted = models.CountRequest(**body)
            result = self.local.count(parts[1], count_filter=counted.filter).model_dump(mode="json")
        else:
            return web.json_response({"status": {"error": f"not in the shim: {request.path}"}}, status=404)
        return web.json_response({"result": result, "status": "ok", "time": 0.0})


@pytest.fixture
async def shim() -> AsyncIterator[QdrantRestShim]:
    async with QdrantRestShim() as server:
        yield server
    server.local.close()


async def test_server_mode_over_rest(shim: QdrantRestShim) -> None:
    idx = SemanticIndex(url=f"http://{shim.host}:{shim.port}", timeout_s=2.0)
    try:
        assert idx.ready is False and await idx.open() and idx.local_path is None
        assert await lookup(idx, QUESTION) is None
        await store(idx, QUESTION, "entry-1")
        await store(idx, UNRELATED, "entry-2", expires_at_ms=NOW + 10)
        hit = await lookup(idx, PARAPHRASE)
        assert hit is not None and hit[0] == "entry-1" and 0.95 <= hit[1] < 1.0
        assert await lookup(idx, PARAPHRASE, namespace="other") is None
        assert sorted(f for _, f, _ in shim.indexes) == sorted(
            ["workspace_id", "namespace", "partition", "generation", "expires_at_ms"])
        assert {(f, t) for _, f, t in shim.indexes} >= {("workspace_id", "keyword"), ("generation", "integer")}
        assert await idx.count() == 2 and await idx.sweep(NOW + 10) and await idx.count() == 1
        assert idx.failures == 0
        shim.delay_s = 0.5  # a slow server: the deadline answers, a miss
        idx.timeout_s = 0.05
        started = time.monotonic()
        assert await lookup(idx, QUESTION) is None
        assert time.monotonic() - started < 0.3 and idx.failures == 1
    finally:
        await idx.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_server_fails_open_fast() -> None:
    idx = SemanticIndex(url=f"http://127.0.0.1:{closed_port()}", timeout_s=0.2)
    try:
        started = time.monotonic()
        assert await lookup(idx, QUESTION) is None
        await store(idx, QUESTION, "entry-1")
        assert await lookup(idx, QUESTION) is None
        assert time.monotonic() - started < 1.0
        assert idx.failures == 3
        # Three failures in a row open the breaker: calls are skipped without waiting.
        assert await lookup(idx, QUESTION) is None and idx.skipped == 1 and idx.failures == 3
        assert await idx.sweep(NOW) is False
    finally:
        await idx.close()


async def test_blackholed_server_is_bounded_by_the_timeout() -> None:
    # A server that accepts connections and never answers: the deadline, not the socket, ends it.
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1 << 16)
            await done.wait()
        finally:
            writer.close()  # no socket outlives the test (a later test would see its ResourceWarning)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    idx = SemanticIndex(url=f"http://127.0.0.1:{port}", timeout_s=0.1)
    try:
        started = time.monotonic()
        assert await lookup(idx, QUESTION) is None
        assert time.monotonic() - started < 1.0 and idx.failures == 1
    finally:
        await idx.close()
        done.set()
        server.close()
        await server.wait_closed()


async def test_from_settings_defaults_to_local_mode(tmp_path: Path) -> None:
    idx = SemanticIndex.from_settings(Settings(state_dir=str(tmp_path), cache_timeout_s=0.07))
    assert (idx.url, idx.root, idx.timeout_s) == ("", tmp_path / "qdrant", 0.07)
    remote = SemanticIndex.from_settings(Settings(qdrant_url="http://q:6333"))
    assert remote.url == "http://q:6333"
    await idx.close()
    await remote.close()


async def test_embedded_prompts_end_to_end(index: SemanticIndex) -> None:
    """The caller's path: a chat body -> semantic_text -> embed_text (the fake as an OpenAI
    provider) -> store; a paraphrased request finds it, an unrelated one does not."""
    secret = Secret("integration-secret-0123456789abcdef")
    keyring = KeyRing(secret)
    vk = VirtualKey(id="vk", workspace_id="ws", key_hash=keyring.hash_key("sk-alph-x"))
    async with EmbeddingUpstream() as fake, aiohttp.ClientSession() as session:
        entities: list[Any] = [Workspace(id="ws", name="ws"), vk,
                               Provider(id="ws.emb", workspace_id="ws", name="emb", type="openai",
                                        base_url=fake.base_url, api_key_enc=keyring.encrypt("sk-up"))]
        snap = Snapshot.build({kv_key(e): e for e in entities}, 1)
        worker = WorkerState(settings=Settings(secret_key=secret), keyring=keyring, store=SnapshotStore(),
                             events=Recorder(), session=session)

        async def vector(question: str) -> list[float]:
            body = {"model": "openai/gpt-4o", "messages": [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": question}]}
            return (await embed_text(worker, snap, vk, "emb/text-embedding-3-small", semantic_text(body))).vector

        await index.store(await vector(QUESTION), entry_key="answer-1", expires_at_ms=NOW + HOUR_MS, **SCOPE)
        hit = await index.lookup(await vector(PARAPHRASE), threshold=0.95, now_ms=NOW, **SCOPE)
        assert hit is not None and hit[0] == "answer-1"
        assert await index.lookup(await vector(UNRELATED), threshold=0.95, now_ms=NOW, **SCOPE) is None
        assert fake.calls == 3
