"""dataplane/ingress/embeddings.py: validation, float <-> base64, and the handler end to end.

The handler runs in a real aiohttp app with an in-memory snapshot, a recording publisher, the
built-in mock provider and a scripted upstream on 127.0.0.1.
"""

from __future__ import annotations

import array
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dataplane.ingress.embeddings import (
    Embeddings,
    base64_to_floats,
    check_input,
    floats_to_base64,
    parse_request,
    reformat,
)
from dataplane.pipeline import run
from dataplane.providers import registry
from dataplane.providers.base import UpstreamCall
from dataplane.providers.mock import EMBEDDING_DIMENSIONS, MockProvider, embedding_vector
from dataplane.providers.openai import OpenAIProvider
from dataplane.snapshot import SnapshotStore
from dataplane.state import WORKER, WorkerState
from schemas.entities import PriceOverride, Provider, VirtualKey, Workspace, kv_key
from schemas.errors import InvalidRequest, UpstreamError
from schemas.events import LlmCall, Usage
from schemas.http import error_middleware
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot
from tests.fakes.compat_upstream import ScriptedUpstream

VK_PLAIN = "sk-alph-test-embeddings-key-000000000000000"
SECRET = Secret("unit-test-master-secret-0123456789")

# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [0]])
def test_valid_inputs(value: Any) -> None:
    check_input(value)


@pytest.mark.parametrize(("value", "fragment"), [
    ("", "empty string"),
    ([], "empty array"),
    (["a", ""], "non-empty string"),
    (["a", 1], "array of strings"),
    ([1, -1], "token ids"),
    ([True, 1], "token"),
    ([[1], []], "token-id arrays"),
    ([[1], ["a"]], "token-id arrays"),
    ([1.5], "token"),
    ([{"text": "a"}], "array"),
    (["x"] * 2049, "at most 2048"),
])
def test_invalid_inputs(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_input(value)
    assert info.value.param == "input" and fragment in info.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m"}, "input"),
    ({"input": "x"}, "model"),
    ({"model": "m", "input": 5}, "input"),
    ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": "m", "input": "x", "dimensions": "8"}, "dimensions"),
])
def test_request_schema_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(body)
    assert info.value.param == param


def test_request_tolerates_unknown_fields() -> None:
    typed = parse_request({"model": "m", "input": ["a"], "encoding_format": "base64", "dimensions": 8, "extra": 1})
    assert typed.encoding_format == "base64" and typed.dimensions == 8


# --- float <-> base64 ---------------------------------------------------------------------------

VECTOR = [0.5, -0.25, 1.0, 3.0517578125e-05]  # exactly representable in float32
B64 = base64.b64encode(array.array("f", VECTOR).tobytes()).decode()


def test_base64_is_little_endian_float32_like_the_sdk() -> None:
    assert floats_to_base64(VECTOR) == B64
    assert base64_to_floats(B64) == VECTOR
    # The SDK's own decoder (openai/lib/_parsing/_embeddings.py) reads it back identically.
    assert array.array("f", base64.b64decode(floats_to_base64(VECTOR))).tolist() == VECTOR
    with pytest.raises(ValueError):
        base64_to_floats(base64.b64encode(b"abc").decode())


def body_with(*vectors: Any) -> bytes:
    return msgspec.json.encode({"object": "list", "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1},
                                "data": [{"object": "embedding", "index": i, "embedding": v}
                                         for i, v in enumerate(vectors)]})


def test_reformat_relays_matching_bodies_byte_exact() -> None:
    floats, b64 = body_with(VECTOR), body_with(B64)
    assert reformat(floats, "float") is floats
    assert reformat(b64, "base64") is b64


def test_reformat_converts_both_ways() -> None:
    to_b64 = msgspec.json.decode(reformat(body_with(VECTOR, VECTOR), "base64"))
    assert [d["embedding"] for d in to_b64["data"]] == [B64, B64]
    assert to_b64["usage"] == {"prompt_tokens": 1, "total_tokens": 1}
    to_float = msgspec.json.decode(reformat(body_with(B64), "float"))
    assert to_float["data"][0]["embedding"] == VECTOR


@pytest.mark.parametrize("bad", [b"not json", b'{"data": 1}', body_with(5), body_with("@@@")])
def test_reformat_rejects_malformed_answers(bad: bytes) -> None:
    with pytest.raises(UpstreamError):
        reformat(bad, "float")


# --- the mock provider --------------------------------------------------------------------------


async def test_mock_embeddings_are_deterministic_unit_vectors() -> None:
    provider = Provider(id="ws.mock", workspace_id="ws", name="mock", type="mock", options={"enabled": "true"})

    async def embed(**body: Any) -> dict[str, Any]:
        call = UpstreamCall(provider=provider, model="embed", body={"model": "embed", **body}, api_key=None,
                            session=None, timeout_s=1)  # type: ignore[arg-type]
        resp = await MockProvider().embed(call)
        out: dict[str, Any] = msgspec.json.decode(resp.body)
        assert resp.usage == Usage(input_tokens=out["usage"]["prompt_tokens"])
        return out

    one = await embed(input="hello world")
    assert one == await embed(input="hello world")
    vec = one["data"][0]["embedding"]
    assert len(vec) == EMBEDDING_DIMENSIONS and abs(sum(v * v for v in vec) - 1) < 1e-5
    assert one["usage"]["prompt_tokens"] == 3
    many = await embed(input=["a", "b"], dimensions=8, encoding_format="base64")
    assert [d["index"] for d in many["data"]] == [0, 1]
    assert base64_to_floats(many["data"][0]["embedding"]) == embedding_vector(b"a", 8)
    tokens = await embed(input=[[1, 2, 3], [4]])
    assert tokens["usage"]["prompt_tokens"] == 4
    assert (await embed(input=[5, 6]))["usage"]["prompt_tokens"] == 2


# --- the handler --------------------------------------------------------------------------------


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[LlmCall] = []

    def emit(self, event: LlmCall) -> None:
        self.events.append(event)


@pytest.fixture
async def up() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream() as upstream:
        yield upstream


@pytest.fixture
async def gateway(up: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], RecordingPublisher]]:
    monkeypatch.setitem(registry.ADAPTERS, "mistral", OpenAIProvider("mistral"))
    monkeypatch.setitem(registry.ADAPTERS, "anthropic", object())  # an adapter without `embed`
    keyring = KeyRing(SECRET)
    entities: list[Any] = [
        Workspace(id="ws", name="ws"),
        VirtualKey(id="vk_1", workspace_id="ws", key_hash=keyring.hash_key(VK_PLAIN)),
        Provider(id="ws.mock", workspace_id="ws", name="mock", type="mock", options={"enabled": "true"}),
        Provider(id="ws.oai", workspace_id="ws", name="oai", type="openai", base_url=up.base_url,
                 api_key_enc=keyring.encrypt("sk-upstream")),
        Provider(id="ws.mis", workspace_id="ws", name="mis", type="mistral", base_url=up.base_url),
        Provider(id="ws.ant", workspace_id="ws", name="ant", type="anthropic"),
        PriceOverride(id="p1", provider="oai", model="text-embedding-3-small", input_per_mtok_nanos=20_000_000),
    ]
    store = SnapshotStore()
    store.swap(Snapshot.build({kv_key(e): e for e in entities}, 7))
    store.ready.set()
    publisher = RecordingPublisher()
    async with aiohttp.ClientSession() as session:
        app = web.Application(middlewares=[error_middleware])
        app[WORKER] = WorkerState(settings=Settings(secret_key=SECRET), keyring=keyring, store=store,
                                  events=publisher, session=session)
        endpoint = Embeddings()

        async def embeddings(request: web.Request) -> web.StreamResponse:
            return await run(request, endpoint)

        app.router.add_post("/v1/embeddings", embeddings)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            yield client, publisher


AUTH = {"Authorization": f"Bearer {VK_PLAIN}"}


async def test_mock_through_the_handler_emits_an_llm_call(gateway: Any) -> None:
    client, publisher = gateway
    resp = await client.post("/v1/embeddings", json={"model": "mock/embed", "input": ["hi", "there"]}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert len(body["data"]) == 2 and isinstance(body["data"][0]["embedding"], list)
    assert resp.headers["Alephant-Provider"] == "mock"
    event = publisher.events[-1]
    assert (event.ingress, event.provider, event.model, event.status, event.stream) == \
        ("embeddings", "mock", "embed", 200, False)
    assert event.usage.input_tokens == body["usage"]["prompt_tokens"] == 3  # "hi" 1 + "there" 2
    assert event.snapshot_revision == 7


async def test_float_upstream_converted_for_a_base64_client(gateway: Any, up: ScriptedUpstream) -> None:
    client, _ = gateway
    up.reply(body={"object": "list", "model": "mistral-embed", "usage": {"prompt_tokens": 2, "total_tokens": 2},
                   "data": [{"object": "embedding", "index": 0, "embedding": VECTOR}]})
    resp = await client.post("/v1/embeddings", headers=AUTH,
                             json={"model": "mis/mistral-embed", "input": "hi", "encoding_format": "base64"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"][0]["embedding"] == B64
    assert up.requests[-1].body == {"model": "mistral-embed", "input": "hi"}


async def test_base64_upstream_relayed_byte_exact_and_priced(gateway: Any, up: ScriptedUpstream) -> None:
    client, publisher = gateway
    raw = body_with(B64).replace(b'"prompt_tokens":1', b'"prompt_tokens":50')
    up.reply(body=raw)
    resp = await client.post("/v1/embeddings", headers=AUTH, json={
        "model": "oai/text-embedding-3-small", "input": "hi", "encoding_format": "base64", "user": "u1"})
    assert await resp.read() == raw
    assert up.requests[-1].body == {"model": "text-embedding-3-small", "input": "hi", "encoding_format": "base64",
                                    "user": "u1"}
    assert up.requests[-1].headers["authorization"] == "Bearer sk-upstream"
    assert resp.headers["Alephant-Cost-Usd"] == "0.000001"  # 50 tokens x $0.02/MTok
    assert publisher.events[-1].cost_nanos == 1000 and publisher.events[-1].priced


async def test_base64_upstream_converted_for_a_float_client(gateway: Any, up: ScriptedUpstream) -> None:
    client, _ = gateway
    up.reply(body=body_with(B64))
    resp = await client.post("/v1/embeddings", headers=AUTH, json={"model": "oai/text-embedding-3-small",
                                                                   "input": "hi"})
    assert (await resp.json())["data"][0]["embedding"] == VECTOR


async def test_the_openai_sdk_default_base64_round_trip(gateway: Any) -> None:
    client, _ = gateway
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=VK_PLAIN, max_retries=0)
    try:
        resp = await sdk.embeddings.create(model="mock/embed", input="hello world")
        explicit = await sdk.embeddings.create(model="mock/embed", input="hello world", encoding_format="float")
    finally:
        await sdk.close()
    assert resp.data[0].embedding == explicit.data[0].embedding == embedding_vector(b"hello world", 64)


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"model": "mock/embed", "input": ""}, 400, "input", None),
    ({"model": "mock/embed", "input": [1, "a"]}, 400, "input", None),
    ({"model": "mock/embed"}, 400, "input", None),
    ({"model": "mock/embed", "input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"model": "nope/embed", "input": "x"}, 404, "model", "model_not_found"),
    ({"model": "ant/claude", "input": "x"}, 400, "model", "embeddings_not_supported"),
])
async def test_errors_are_openai_shaped_and_recorded(gateway: Any, body: dict[str, Any], status: int,
                                                     param: str, code: str | None) -> None:
    client, publisher = gateway
    before = len(publisher.events)
    resp = await client.post("/v1/embeddings", json=body, headers=AUTH)
    assert resp.status == status
    err = (await resp.json())["error"]
    assert err["param"] == param
    if code:
        assert err["code"] == code
    assert len(publisher.events) == before + 1
    assert publisher.events[-1].status == status and publisher.events[-1].ingress == "embeddings"


async def test_upstream_failure_is_mapped(gateway: Any, up: ScriptedUpstream) -> None:
    client, publisher = gateway
    up.reply(status=429, body={"error": {"message": "slow down", "type": "rate_limit"}}, headers={"Retry-After": "2"})
    resp = await client.post("/v1/embeddings", headers=AUTH, json={"model": "oai/text-embedding-3-small",
                                                                   "input": "hi"})
    assert resp.status == 429 and resp.headers["Retry-After"] == "2"
    assert publisher.events[-1].error_code == "upstream_rate_limited"


async def test_unauthenticated_requests_are_rejected(gateway: Any) -> None:
    client, _ = gateway
    resp = await client.post("/v1/embeddings", json={"model": "mock/embed", "input": "x"})
    assert resp.status == 401
