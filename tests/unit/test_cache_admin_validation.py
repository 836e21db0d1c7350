"""Cache admin inputs (the checks that need no database), the purge's query and storage naming,
the CLI's bodies, and the routes in the OpenAPI document."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from controlplane import commands as c
from controlplane.app import openapi_document
from controlplane.cache_admin import (
    CACHE_SETTINGS,
    MAX_CACHE_TTL_S,
    PatchCacheSettings,
    SetCacheSettings,
    _older_generation,
    cache_settings_id,
    delete_qdrant_points,
    next_generation,
    purge_id,
    purge_target,
    redis_pattern,
)
from controlplane.inputs import given_fields
from controlplane.references import references
from deploy.admin_cli import add_admin_commands, cache_purge_path, cache_settings_body
from schemas.entities import CachePurge, CacheSettings
from schemas.errors import InvalidRequest

BASE: dict[str, Any] = {"workspace_id": "demo", "scope": "workspace", "scope_id": "demo", "mode": "exact"}


def _refused(raw: dict[str, Any], schema: type[Any] = SetCacheSettings) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        c.parse_command(raw, schema)
    assert info.value.status == 400
    return info.value


def test_a_minimal_body_takes_the_entity_defaults() -> None:
    cmd = c.parse_command(BASE, SetCacheSettings)
    entity = CacheSettings(id="x", workspace_id="demo", scope="workspace", scope_id="demo")
    assert (cmd.ttl_s, cmd.similarity, cmd.exclude_tools, cmd.exclude_temperature, cmd.namespace) == (
        entity.ttl_s, entity.similarity, entity.exclude_tools, entity.exclude_temperature, entity.namespace)


@pytest.mark.parametrize("raw", [
    BASE | {"ttl_s": 1}, BASE | {"ttl_s": MAX_CACHE_TTL_S}, BASE | {"similarity": 1}, BASE | {"similarity": 1e-9},
    BASE | {"mode": "off", "namespace": ""}, BASE | {"namespace": "a" * 64},
    BASE | {"mode": "semantic", "embedding_model": "openai/text-embedding-3-small"},
    BASE | {"scope": "key", "scope_id": "vk_123"}, BASE | {"scope": "router", "scope_id": "rtr_1"},
])
def test_edges_that_are_accepted(raw: dict[str, Any]) -> None:
    c.parse_command(raw, SetCacheSettings)


@pytest.mark.parametrize(("patch", "param", "code", "words"), [
    ({"mode": "fuzzy"}, "mode", "invalid_mode", ("Unknown cache mode 'fuzzy'", "exact, semantic, off")),
    ({"mode": ""}, "mode", "invalid_mode", ("''",)),
    ({"scope": "team"}, "scope", "invalid_scope", ("Unknown cache scope 'team'", "workspace, key, router")),
    ({"ttl_s": 0}, "ttl_s", "invalid_ttl", ("between 1 and 2592000", "got 0")),
    ({"ttl_s": -1}, "ttl_s", "invalid_ttl", ("got -1",)),
    ({"ttl_s": MAX_CACHE_TTL_S + 1}, "ttl_s", "invalid_ttl", ("30 days",)),
    ({"ttl_s": 10**300}, "ttl_s", "invalid_ttl", ("more than 18 digits",)),
    ({"ttl_s": True}, "ttl_s", None, ("int",)),
    ({"similarity": 0}, "similarity", "invalid_similarity", ("above 0 and at most 1",)),
    ({"similarity": 1.0001}, "similarity", "invalid_similarity", ("1.0001",)),
    ({"similarity": "high"}, "similarity", None, ("float",)),
    ({"scope_id": "other"}, "scope_id", "scope_mismatch", ("'demo'", "'other'")),
    ({"mode": "semantic"}, "embedding_model", "embedding_model_required", ("needs 'embedding_model'",)),
    ({"mode": "semantic", "embedding_model": "embed"}, "embedding_model", "invalid_model", ("'provider/model'",)),
    ({"embedding_model": "open ai/x"}, "embedding_model", "invalid_model", ("'provider/model'",)),
    ({"embedding_model": "openai/"}, "embedding_model", "invalid_model", ("'provider/model'",)),
    ({"namespace": "a:b"}, "namespace", None, ("namespace",)),
    ({"namespace": "-a"}, "namespace", None, ("namespace",)),
    ({"namespace": "a*"}, "namespace", None, ("namespace",)),
    ({"namespace": "n" * 65}, "namespace", None, ("namespace",)),
    ({"scope_id": "has space"}, "scope_id", None, ("scope_id",)),
    ({"workspace_id": "x\ny"}, "workspace_id", None, ("workspace_id",)),
])
def test_bad_bodies_name_their_field(patch: dict[str, Any], param: str, code: str | None,
                                     words: tuple[str, ...]) -> None:
    error = _refused(BASE | patch)
    assert (error.param, error.code) == (param, code), error.message
    for word in words:
        assert word in error.message, (word, error.message)


def test_the_patch_cannot_move_a_setting() -> None:
    for field in ("workspace_id", "scope", "scope_id"):
        assert f"`{field}`" in _refused({field: "x"}, PatchCacheSettings).message
    patch = c.parse_command({"ttl_s": 5, "embedding_model": None}, PatchCacheSettings)
    assert given_fields(patch) == {"ttl_s": 5, "embedding_model": None}


def test_one_id_per_workspace_scope_and_scope_id() -> None:
    one = cache_settings_id("demo", "key", "vk_1")
    assert one == cache_settings_id("demo", "key", "vk_1") and one.startswith("cache_") and len(one) <= 64
    assert len({one, cache_settings_id("demo", "router", "vk_1"), cache_settings_id("demo2", "key", "vk_1"),
                cache_settings_id("demo", "key", "vk_2")}) == 4
    cmd = c.parse_command(BASE | {"scope": "key", "scope_id": "vk_1"}, SetCacheSettings)
    assert CACHE_SETTINGS.new_id(cmd) == one and CACHE_SETTINGS.upsert
    entity = CacheSettings(id=one, workspace_id="demo", scope="key", scope_id="vk_1", mode="semantic", ttl_s=9,
                           embedding_model="mock/e", namespace="n")
    # What a PATCH is merged over parses back into the same setting.
    again = c.parse_command(CACHE_SETTINGS.fields(entity), SetCacheSettings)
    assert (again.mode, again.ttl_s, again.embedding_model, again.namespace) == ("semantic", 9, "mock/e", "n")


def test_references_of_a_setting() -> None:
    def refs(**kw: Any) -> list[tuple[str, str, str]]:
        entity = CacheSettings(id="x", workspace_id="demo", **kw)
        return [(r.kind, r.id, r.param) for r in references(entity)]

    assert refs(scope="workspace", scope_id="demo") == [("ws", "demo", "workspace_id")]
    assert refs(scope="key", scope_id="vk_1")[1:] == [("vk", "vk_1", "scope_id")]
    assert refs(scope="router", scope_id="rtr_1", embedding_model="mock/e")[1:] == [
        ("router", "rtr_1", "scope_id"), ("provider", "demo.mock", "embedding_model")]
    purge = CachePurge(id="p", workspace_id="demo", generation=1)
    assert [(r.kind, r.id) for r in references(purge)] == [("ws", "demo")]


# ---- purge --------------------------------------------------------------------------------------

def test_purge_query() -> None:
    assert purge_target("demo", None) == ("demo", "")
    assert purge_target("demo", "") == ("demo", "")
    assert purge_target("demo", "team-1") == ("demo", "team-1")
    for ws, ns, param in ((None, None, "workspace_id"), ("", "team", "workspace_id"), ("a b", None, "workspace_id"),
                          ("demo", "a:b", "namespace"), ("demo", "*", "namespace"), ("demo", "n" * 65, "namespace")):
        with pytest.raises(InvalidRequest) as info:
            purge_target(ws, ns)
        assert info.value.param == param and f"'{param}'" in info.value.message


def test_generations_strictly_increase() -> None:
    assert next_generation(None, 1_000) == 1_000
    assert next_generation(999, 1_000) == 1_000
    assert next_generation(1_000, 1_000) == 1_001
    assert next_generation(5_000, 1_000) == 5_001  # the clock stepped back


def test_storage_names() -> None:
    assert redis_pattern("demo", "") == "alc:demo:_:*"
    assert redis_pattern("demo", "team") == "alc:demo:team:*"
    assert purge_id("demo", "") == purge_id("demo", "") != purge_id("demo", "_")
    assert _older_generation(b"alc:demo:_:0:abc", 5) and _older_generation("alc:demo:_:4:abc", 5)
    assert not _older_generation(b"alc:demo:_:5:abc", 5) and not _older_generation(b"alc:demo:_:6:abc", 5)
    assert _older_generation(b"alc:demo:_:junk", 5)  # not of the layout: not a live entry either


# ---- CLI and OpenAPI ------------------------------------------------------------------------------

def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="alephant")
    parser.add_argument("--state-dir", default=".alephant")
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_cli_bodies() -> None:
    args = _cli("cache", "settings", "set", "-w", "acme", "--mode", "exact")
    assert cache_settings_body(args) == {"workspace_id": "acme", "scope": "workspace", "scope_id": "acme",
                                         "mode": "exact"}
    args = _cli("cache", "settings", "set", "-w", "acme", "--scope", "key", "--scope-id", "vk_1", "--mode",
                "semantic", "--embedding-model", "mock/e", "--similarity", "0.9", "--ttl-s", "60",
                "--no-exclude-tools", "--exclude-temperature", "--namespace", "n")
    assert cache_settings_body(args) == {
        "workspace_id": "acme", "scope": "key", "scope_id": "vk_1", "mode": "semantic", "ttl_s": 60,
        "similarity": 0.9, "embedding_model": "mock/e", "exclude_tools": False, "exclude_temperature": True,
        "namespace": "n"}
    with pytest.raises(SystemExit, match="--scope-id"):
        cache_settings_body(_cli("cache", "settings", "set", "--scope", "router", "--mode", "off"))
    assert cache_purge_path(_cli("cache", "purge", "-w", "acme")) == "/admin/v1/cache?workspace_id=acme"
    assert cache_purge_path(_cli("cache", "purge", "-w", "acme", "--namespace", "team")) == (
        "/admin/v1/cache?workspace_id=acme&namespace=team")


def test_openapi_lists_the_cache_routes() -> None:
    paths = openapi_document()["paths"]
    assert {"post", "get"} <= set(paths["/admin/v1/cache-settings"])
    assert {"get", "patch", "delete"} <= set(paths["/admin/v1/cache-settings/{id}"])
    purge = paths["/admin/v1/cache"]["delete"]
    assert "workspace_id" in purge["summary"] and "namespace" in purge["summary"]
    assert "202" in purge["responses"]
    assert "SetCacheSettings" in openapi_document()["components"]["schemas"]


# ---- Qdrant: the purge's filter against qdrant-client's in-process engine ------------------------

async def test_qdrant_points_of_the_namespace_and_older_generations_are_deleted() -> None:
    from qdrant_client import AsyncQdrantClient, models

    client = AsyncQdrantClient(location=":memory:")
    try:
        for name in ("alephant_cache_d2", "alephant_cache_d3", "unrelated"):
            dim = 3 if name.endswith("3") else 2
            await client.create_collection(name, vectors_config=models.VectorParams(size=dim,
                                                                                    distance=models.Distance.COSINE))
            points = [("demo", "", 5), ("demo", "", 10), ("demo", "team", 5), ("other", "", 5)]
            await client.upsert(name, points=[
                models.PointStruct(id=i, vector=[1.0] * dim, payload={
                    "workspace_id": ws, "namespace": ns, "partition": "p", "generation": gen,
                    "entry_key": f"alc:{ws}:{ns or '_'}:{gen}:k{i}", "expires_at_ms": 2**50})
                for i, (ws, ns, gen) in enumerate(points)])
        visited = await delete_qdrant_points(client, "demo", "", 10)
        assert visited == ["alephant_cache_d2", "alephant_cache_d3"]
        for name, left in (("alephant_cache_d2", [1, 2, 3]), ("alephant_cache_d3", [1, 2, 3]),
                           ("unrelated", [0, 1, 2, 3])):
            records, _ = await client.scroll(name, limit=10)
            assert sorted(int(r.id) for r in records) == left, name
    finally:
        await client.close()
