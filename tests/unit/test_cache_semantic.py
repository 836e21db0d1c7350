"""dataplane/cache_semantic.py: the text a request is embedded by, the embeddings fake's geometry,
and `embed_text` through the real adapters (the built-in mock, and the fake as an OpenAI provider)
with an in-memory snapshot. The index itself: tests/integration/test_cache_semantic_index.py."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from dataplane.cache_semantic import collection_name, embed_text, point_id, semantic_text
from dataplane.ingress.embeddings import base64_to_floats
from dataplane.providers.mock import embedding_vector
from dataplane.snapshot import SnapshotStore
from dataplane.state import WorkerState
from schemas.entities import ModelAlias, Provider, VirtualKey, Workspace, kv_key
from schemas.errors import GatewayError, InvalidRequest, NotFound
from schemas.events import Usage
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot
from tests.fakes.embedding_upstream import EmbeddingUpstream, cosine
from tests.unit.conftest import Recorder

# --- semantic_text --------------------------------------------------------------------------------


def test_semantic_text_puts_system_first_with_roles() -> None:
    body = {"model": "m", "messages": [
        {"role": "user", "content": "What is the capital   of France?\n"},
        {"role": "system", "content": "  You are terse. "},
        {"role": "assistant", "content": "Paris."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "And of Germany?"},
    ]}
    assert semantic_text(body) == ("system: You are terse.\ndeveloper: Answer in English.\n"
                                   "user: What is the capital of France?\nassistant: Paris.\nuser: And of Germany?")


def test_semantic_text_reads_parts_and_leaves_tools_out() -> None:
    body = {"model": "m", "temperature": 0.2,
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": " world "}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ]}
    assert semantic_text(body) == "user: hello world\ntool: 42"
    without_tools = {k: v for k, v in body.items() if k not in ("tools", "temperature")}
    assert semantic_text(without_tools) == semantic_text(body)


def test_semantic_text_marks_non_text_parts_by_content() -> None:
    def with_image(url: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": url}}]}]}

    a, b = semantic_text(with_image("https://x/1.png")), semantic_text(with_image("https://x/2.png"))
    assert a.startswith("user: describe [image_url ") and a != b
    assert a == semantic_text(with_image("https://x/1.png"))  # deterministic


@pytest.mark.parametrize("body", [{}, {"messages": "x"}, {"messages": [None, 3, {"role": "user", "content": ""}]}])
def test_semantic_text_of_odd_bodies_is_empty(body: dict[str, Any]) -> None:
    assert semantic_text(body) == ""


def test_semantic_text_whitespace_variants_are_equal() -> None:
    a = {"messages": [{"role": "user", "content": "tell me\tabout  Paris"}]}
    b = {"messages": [{"role": "user", "content": " tell me about\nParis "}]}
    assert semantic_text(a) == semantic_text(b)


def test_point_ids_are_stable_uuids_per_entry() -> None:
    assert point_id("k1") == point_id("k1") != point_id("k2")
    assert len(point_id("k1")) == 36 and collection_name(1536) == "alephant_cache_d1536"


# --- the fake's geometry --------------------------------------------------------------------------

PARAPHRASES = [
    ("What is the capital of France?", "Tell me France's capital city, please."),
    ("How do I sort a list in Python?", "python: what's the way to get a list sorted"),
    ("I want a refund for my order money", "Can you reimburse me? I'd like my money back."),
    ("Give me a recipe for spaghetti carbonara", "How do I cook carbonara pasta?"),
]
UNRELATED = [
    ("What is the capital of France?", "How do I sort a list in Python?"),
    ("What is the capital of France?", "I forgot my password"),
    ("Will it rain tomorrow?", "Where is my parcel delivery?"),
    ("What is the capital of France?", "zxq blorf wibble"),  # no topic: a hash vector
    ("qwerty uiop", "asdf ghjkl"),
]


@pytest.mark.parametrize(("a", "b"), PARAPHRASES)
def test_fake_paraphrases_are_near(a: str, b: str) -> None:
    fake = EmbeddingUpstream()
    assert fake.topics_of(a) == fake.topics_of(b) != []
    assert cosine(fake.vector(a), fake.vector(b)) > 0.95
    assert fake.vector(a) != fake.vector(b)  # near, not identical


@pytest.mark.parametrize(("a", "b"), UNRELATED)
def test_fake_unrelated_prompts_are_far(a: str, b: str) -> None:
    fake = EmbeddingUpstream()
    assert cosine(fake.vector(a), fake.vector(b)) < 0.5


def test_fake_vectors_are_deterministic_unit_vectors_of_any_dimension() -> None:
    fake = EmbeddingUpstream(dim=16)
    for text, dim in itertools.product(["capital of France", "nothing known here"], [None, 8, 300]):
        v = fake.vector(text, dim)
        assert len(v) == (dim or 16) and abs(sum(x * x for x in v) - 1) < 1e-9
        assert v == EmbeddingUpstream(dim=16).vector(text, dim)


def test_fake_shared_topic_is_halfway() -> None:
    fake = EmbeddingUpstream()
    assert 0.4 < cosine(fake.vector("capital of France"), fake.vector("weather in Paris")) < 0.6
    fake.add_topic("rust", ["rust", "cargo"])
    assert fake.topics_of("cargo build") == ["rust"]


@pytest.fixture
async def fake() -> AsyncIterator[EmbeddingUpstream]:
    async with EmbeddingUpstream() as upstream:
        yield upstream


async def test_fake_serves_openai_embeddings(fake: EmbeddingUpstream) -> None:
    url = f"{fake.base_url}/embeddings"
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-test-0001"}) as s:
        async with s.post(url, json={"model": "emb", "input": ["capital of France", "hi"]}) as r:
            assert r.status == 200
            body = await r.json()
        assert [d["index"] for d in body["data"]] == [0, 1] and body["model"] == "emb"
        assert body["data"][0]["embedding"] == pytest.approx(fake.vector("capital of France"))
        assert body["usage"] == {"prompt_tokens": 5 + 1, "total_tokens": 6}  # ceil(17/4) + 1
        async with s.post(url, json={
                "model": "emb", "input": "hi", "encoding_format": "base64", "dimensions": 8}) as r:
            b64 = (await r.json())["data"][0]["embedding"]
        assert base64_to_floats(b64) == pytest.approx(fake.vector("hi", 8), abs=1e-6)
        fake.fail_next(503)
        async with s.post(url, json={"model": "emb", "input": "hi"}) as r:
            assert r.status == 503 and "error" in await r.json()
        async with s.post(url, json={"model": "emb", "input": ""}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "input"
    async with aiohttp.ClientSession() as s, s.post(url, json={"model": "e", "input": "x"}) as r:
        assert r.status == 401
    assert fake.calls == 5 and fake.inputs == 3
    assert fake.requests[0].headers["authorization"] == "Bearer <redacted>" and fake.requests[0].api_key_hint == "0001"
    fake.clear()
    assert fake.calls == 0 and fake.requests == []


# --- embed_text -----------------------------------------------------------------------------------

SECRET = Secret("unit-test-master-secret-0123456789")
KEYRING = KeyRing(SECRET)
VK = VirtualKey(id="vk_1", workspace_id="ws", key_hash=KEYRING.hash_key("sk-alph-semantic-0000000000000000"))


def snapshot(fake: EmbeddingUpstream) -> Snapshot:
    entities: list[Any] = [
        Workspace(id="ws", name="ws"), VK,
        Provider(id="ws.mock", workspace_id="ws", name="mock", type="mock", options={"enabled": "true"}),
        Provider(id="ws.emb", workspace_id="ws", name="emb", type="openai", base_url=fake.base_url,
                 api_key_enc=KEYRING.encrypt("sk-upstream-emb1")),
        Provider(id="ws.ant", workspace_id="ws", name="ant", type="anthropic"),
        ModelAlias(id="a1", workspace_id="ws", alias="embedder", target="emb/text-embedding-3-small"),
    ]
    return Snapshot.build({kv_key(e): e for e in entities}, 3)


@pytest.fixture
async def worker() -> AsyncIterator[WorkerState]:
    async with aiohttp.ClientSession() as session:
        yield WorkerState(settings=Settings(secret_key=SECRET), keyring=KEYRING, store=SnapshotStore(),
                          events=Recorder(), session=session)


async def test_embed_text_through_an_openai_provider(worker: WorkerState, fake: EmbeddingUpstream) -> None:
    snap = snapshot(fake)
    got = await embed_text(worker, snap, VK, "emb/text-embedding-3-small", "What is the capital of France?")
    assert got.vector == pytest.approx(fake.vector("What is the capital of France?"))
    assert got.usage == Usage(input_tokens=8)  # ceil(30 / 4)
    assert (got.target.provider.name, got.target.model) == ("emb", "text-embedding-3-small")
    assert (got.key.key_id, got.key.source) == ("ws.emb", "workspace") and got.latency_ms > 0
    seen = fake.requests[-1]
    assert seen.body == {"model": "text-embedding-3-small", "input": "What is the capital of France?",
                         "encoding_format": "float"}
    assert seen.api_key_hint == "emb1"
    via_alias = await embed_text(worker, snap, VK, "embedder", "Tell me France's capital city")
    assert cosine(via_alias.vector, got.vector) > 0.95 and fake.calls == 2


async def test_embed_text_with_the_mock(worker: WorkerState, fake: EmbeddingUpstream) -> None:
    got = await embed_text(worker, snapshot(fake), VK, "mock/embed", "hello world")
    assert got.vector == embedding_vector(b"hello world", 64)
    assert got.usage == Usage(input_tokens=3) and got.key.source == "none"


async def test_embed_text_decodes_base64_answers(worker: WorkerState, fake: EmbeddingUpstream,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A provider that answers base64 whatever is asked (some OpenAI-compatible servers do).
    answer = fake._answer

    def base64_answer(body: Any) -> Any:
        return answer({**body, "encoding_format": "base64"})

    monkeypatch.setattr(fake, "_answer", base64_answer)
    got = await embed_text(worker, snapshot(fake), VK, "emb/e", "capital of France")
    assert got.vector == pytest.approx(fake.vector("capital of France"), abs=1e-6)


async def test_embed_text_failures_raise(worker: WorkerState, fake: EmbeddingUpstream) -> None:
    snap = snapshot(fake)
    with pytest.raises(NotFound):
        await embed_text(worker, snap, VK, "nope/e", "x")
    with pytest.raises(InvalidRequest) as info:
        await embed_text(worker, snap, VK, "ant/claude", "x")
    assert info.value.code == "embeddings_not_supported"
    fake.fail_next(500)
    with pytest.raises(GatewayError):
        await embed_text(worker, snap, VK, "emb/e", "x")
    fake.latency_ms = 500
    with pytest.raises(TimeoutError):
        await embed_text(worker, snap, VK, "emb/e", "x", timeout_s=0.05)


async def test_embed_text_rejects_an_unreadable_answer(worker: WorkerState, fake: EmbeddingUpstream,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def empty(body: Any) -> web.Response:
        return web.Response(body=msgspec.json.encode({"object": "list", "data": [], "usage": {}}),
                            content_type="application/json")

    monkeypatch.setattr(fake, "_answer", empty)
    with pytest.raises(GatewayError, match="cannot read"):
        await embed_text(worker, snapshot(fake), VK, "emb/e", "x")
