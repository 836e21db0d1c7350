"""openai SDK: embeddings (the SDK's default base64 and explicit float) and the models endpoints."""

from __future__ import annotations

import base64
import math
import struct

import openai
import pytest

from tests.contract.conftest import KINDS, Contract
from tests.contract.fakes import embedding_for

TEXTS = ["the quick brown fox", "jumps over the lazy dog"]


def _floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


async def test_mock_embeddings_default_base64_matches_float(contract: Contract) -> None:
    async with contract.openai() as client:
        raw = await client.embeddings.with_raw_response.create(model="mock/embed", input=TEXTS)
        as_float = await client.embeddings.create(model="mock/embed", input=TEXTS, encoding_format="float")
    wire = raw.http_response.json()
    assert all(isinstance(item["embedding"], str) for item in wire["data"]), "the SDK asked for base64 by default"
    decoded = raw.parse()
    assert [d.index for d in decoded.data] == [0, 1]
    for item, wire_item, flt in zip(decoded.data, wire["data"], as_float.data, strict=True):
        assert len(item.embedding) == 64
        assert item.embedding == _floats(wire_item["embedding"]) == flt.embedding
        assert math.isclose(math.sqrt(sum(v * v for v in item.embedding)), 1.0, rel_tol=1e-5)
    assert decoded.data[0].embedding != decoded.data[1].embedding
    assert decoded.usage.prompt_tokens > 0 and decoded.usage.total_tokens == decoded.usage.prompt_tokens
    assert decoded.model == "embed"


async def test_mock_embeddings_dimensions(contract: Contract) -> None:
    async with contract.openai() as client:
        result = await client.embeddings.create(model="mock/embed", input="one", dimensions=16)
    assert len(result.data) == 1 and len(result.data[0].embedding) == 16


@pytest.mark.parametrize("encoding", ["base64", "float", None])
async def test_openai_embeddings_through_the_gateway(contract: Contract, encoding: str | None) -> None:
    up = contract["openai"]
    before = up.seen()
    async with contract.openai() as client:
        if encoding is None:
            result = await client.embeddings.create(model="f-openai/text-embedding-3-small", input=TEXTS)
        else:
            result = await client.embeddings.create(model="f-openai/text-embedding-3-small", input=TEXTS,
                                                    encoding_format=encoding)  # type: ignore[arg-type]
    vectors = [d.embedding for d in result.data]
    if encoding == "base64":  # asked for explicitly, the SDK hands the strings back undecoded
        assert all(isinstance(v, str) for v in vectors)
        vectors = [_floats(v) for v in vectors]  # type: ignore[arg-type]
    assert vectors == [embedding_for(t, 8) for t in TEXTS]
    assert result.usage.prompt_tokens == sum(math.ceil(len(t) / 4) for t in TEXTS)
    sent = up.fake.requests[before:]
    assert [r.path for r in sent] == ["/v1/embeddings"]
    assert sent[0].body["model"] == "text-embedding-3-small"
    assert sent[0].body["encoding_format"] == (encoding or "base64")  # the SDK's default is base64
    assert sent[0].api_key_hint == up.api_key[-4:]


async def test_embeddings_refused_for_chat_only_provider(contract: Contract) -> None:
    async with contract.openai() as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model=contract["anthropic"].ref, input="x")
    assert info.value.code == "embeddings_not_supported"


async def test_models_list_and_retrieve(contract: Contract) -> None:
    async with contract.openai() as client:
        listed = [m async for m in await client.models.list()]
        ids = {m.id for m in listed}
        assert "mock/echo" in ids and "mock/embed" in ids
        for kind in KINDS:
            # Listed from the bundled catalog. Ollama has none; genai-prices prices Azure's gpt-4o-mini by
            # pattern but does not list it. Either way the provider is callable, which other tests show.
            if kind not in ("ollama", "azure"):
                assert contract[kind].ref in ids, kind
        assert all(m.object == "model" and m.owned_by for m in listed)
        for ref in ("mock/echo", contract["openai"].ref, contract["bedrock"].ref):
            model = await client.models.retrieve(ref)
            assert model.id == ref and model.object == "model"
            assert model.owned_by == ref.partition("/")[0]
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("f-openai/no-such-model")


def _f32(values: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


@pytest.mark.parametrize("kind", ["azure", "groq"])
@pytest.mark.parametrize("encoding", ["float", None])
async def test_embeddings_converted_from_floats(contract: Contract, kind: str, encoding: str | None) -> None:
    """These upstreams answer floats whatever was asked (the Azure fake always does; the gateway asks
    the OpenAI-compatible family for floats), so the SDK's default base64 is the gateway's doing."""
    up = contract[kind]
    model = f"{up.name}/text-embedding-3-small"
    async with contract.openai() as client:
        extra = {} if encoding is None else {"encoding_format": encoding}
        raw = await client.embeddings.with_raw_response.create(model=model, input=TEXTS, **extra)  # type: ignore[arg-type]
    wire = raw.http_response.json()["data"]
    assert all(isinstance(item["embedding"], str if encoding is None else list) for item in wire)
    vectors = [d.embedding for d in raw.parse().data]
    if kind == "azure":
        exact = [0.1, 0.2, 0.3]  # relayed as sent when floats were asked for; float32 through base64
        assert vectors == [exact if encoding == "float" else _f32(exact)] * len(TEXTS)
    else:
        assert vectors == [embedding_for(t, 8) for t in TEXTS]
    sent = up.fake.requests[-1]
    assert sent.path.split("?")[0].endswith("/embeddings")
    if kind == "groq":
        assert "encoding_format" not in sent.body
