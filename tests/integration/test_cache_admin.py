"""The cache admin API and CLI on the real stack: cache settings created, replaced (one per
workspace, scope and scope id), listed, read, patched and deleted; every refused body names its
field and problem and writes nothing; the key, router and embedding provider a setting names are
checked (and a router or provider in use is not deleted); `DELETE /admin/v1/cache` sets a new,
strictly greater generation and deletes that workspace's and namespace's Redis keys, and only
those; with Redis paused and the Qdrant server unreachable (a dedicated stack) it still commits and
answers in bounded time, saying what it could not free."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from controlplane.cache_admin import MAX_CACHE_TTL_S, PURGE_STORAGE_BUDGET_S
from deploy.stack import Stack
from tests.conftest import AdminHttp as Admin
from tests.conftest import Gateway, cli_json, dedicated_stack, run_cli
from tests.integration.test_governance_e2e import applied
from tests.integration.test_routers_admin import _refused

A = "/admin/v1"


@dataclass(frozen=True)
class Ws:
    """A fresh workspace with a provider `mock` (type mock), a virtual key and a router."""

    id: str
    key_id: str
    router_id: str


async def _workspace(admin: Admin) -> Ws:
    ws_id = f"cache{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": ws_id, "name": "Cache"})
    await admin.ok("POST", f"{A}/providers", {"workspace_id": ws_id, "name": "mock", "type": "mock"})
    key = await admin.ok("POST", f"{A}/virtual-keys", {"workspace_id": ws_id})
    router = await admin.ok("POST", f"{A}/routers", {"workspace_id": ws_id, "name": "main",
                                                     "targets": [{"model": "mock/echo"}]})
    return Ws(ws_id, key["id"], router["id"])



@pytest_asyncio.fixture
async def ws(admin: Admin) -> Ws:
    return await _workspace(admin)


@pytest_asyncio.fixture
async def redis(gateway: Gateway) -> AsyncIterator[Redis]:
    client = Redis.from_url(gateway.stack.child_env()["ALEPHANT_REDIS_URL"])
    yield client
    await client.aclose()


def _setting(ws: Ws, **extra: Any) -> dict[str, Any]:
    return {"workspace_id": ws.id, "scope": "workspace", "scope_id": ws.id, "mode": "exact", "ttl_s": 600} | extra


_META = ("propagated", "revision", "snapshot_revision")


# ---- create, replace, list, get, patch, delete --------------------------------------------------

async def test_cache_settings_lifecycle(gateway: Gateway, admin: Admin, ws: Ws) -> None:
    created = await admin.ok("POST", f"{A}/cache-settings", _setting(ws))
    sid = created["id"]
    assert sid.startswith("cache_") and created["propagated"] is True
    assert isinstance(created["revision"], int) and created["revision"] == created["snapshot_revision"]
    assert {k: v for k, v in created.items() if k not in (*_META, "id")} == {
        "kind": "cache", "workspace_id": ws.id, "scope": "workspace", "scope_id": ws.id, "mode": "exact",
        "ttl_s": 600, "similarity": 0.95, "embedding_model": None, "exclude_tools": True,
        "exclude_temperature": False, "namespace": ""}

    # The same (workspace, scope, scope id) again: the same setting, replaced whole.
    replaced = await admin.ok("POST", f"{A}/cache-settings", _setting(ws, ttl_s=60, namespace="team-a",
                                                                      exclude_tools=False))
    assert replaced["id"] == sid and replaced["revision"] > created["revision"]
    assert (replaced["ttl_s"], replaced["namespace"], replaced["exclude_tools"]) == (60, "team-a", False)
    assert await admin.ok("GET", f"{A}/cache-settings/{sid}") == {k: v for k, v in replaced.items()
                                                                   if k not in _META}

    on_key = await admin.ok("POST", f"{A}/cache-settings", _setting(ws, scope="key", scope_id=ws.key_id, mode="off"))
    on_router = await admin.ok("POST", f"{A}/cache-settings", _setting(
        ws, scope="router", scope_id=ws.router_id, mode="semantic", embedding_model="mock/embed-1",
        similarity=0.9, exclude_temperature=True))
    assert len({sid, on_key["id"], on_router["id"]}) == 3
    assert (on_router["mode"], on_router["embedding_model"], on_router["similarity"]) == (
        "semantic", "mock/embed-1", 0.9)
    listed = await admin.ok("GET", f"{A}/cache-settings?workspace_id={ws.id}")
    assert [s["id"] for s in listed["data"]] == [sid, on_key["id"], on_router["id"]]

    patched = await admin.ok("PATCH", f"{A}/cache-settings/{sid}", {"mode": "semantic", "embedding_model":
                                                                    "mock/embed-2", "similarity": 1})
    assert (patched["mode"], patched["embedding_model"], patched["similarity"]) == ("semantic", "mock/embed-2", 1)
    assert (patched["ttl_s"], patched["namespace"]) == (60, "team-a")  # untouched
    await _refused(gateway, admin, "PATCH", f"{A}/cache-settings/{sid}", {"embedding_model": None}, 400,
                   "embedding_model", "embedding_model_required", "embedding_model")
    await _refused(gateway, admin, "PATCH", f"{A}/cache-settings/{sid}", {"ttl_s": 0}, 400, "ttl_s",
                   "invalid_ttl", "'ttl_s'", "got 0")
    # The scope names the setting: it is not patched (set another one instead). Unknown fields
    # are named in the message (schemas.http leaves `param` empty for them).
    await _refused(gateway, admin, "PATCH", f"{A}/cache-settings/{sid}", {"scope_id": ws.key_id}, 400,
                   None, None, "unknown field `scope_id`")
    await _refused(gateway, admin, "PATCH", f"{A}/cache-settings/{sid}", {}, 400, None, "empty_patch")
    await _refused(gateway, admin, "PATCH", f"{A}/cache-settings/cache_nope", {"ttl_s": 5}, 404, None,
                   "cache_setting_not_found")

    await applied(gateway, patched["revision"])  # every worker took it
    deleted = await admin.ok("DELETE", f"{A}/cache-settings/{sid}")
    assert deleted["deleted"] is True and deleted["id"] == sid
    got, body, _ = await admin.call("GET", f"{A}/cache-settings/{sid}")
    assert got == 404, body
    await _refused(gateway, admin, "DELETE", f"{A}/cache-settings/{sid}", None, 404, None, "cache_setting_not_found")
    # Set again after the delete: the same id comes back.
    assert (await admin.ok("POST", f"{A}/cache-settings", _setting(ws)))["id"] == sid


# ---- refusals ----------------------------------------------------------------------------------

Patch = Callable[[Ws, Ws], dict[str, Any]]
BAD_BODIES: list[tuple[str, Patch, int, str | None, str | None, tuple[str, ...]]] = [
    ("mode", lambda w, o: {"mode": "fuzzy"}, 400, "mode", "invalid_mode", ("'fuzzy'", "exact, semantic, off")),
    ("mode-type", lambda w, o: {"mode": 3}, 400, "mode", None, ("str",)),
    ("ttl-zero", lambda w, o: {"ttl_s": 0}, 400, "ttl_s", "invalid_ttl", ("'ttl_s'", "30 days", "got 0")),
    ("ttl-negative", lambda w, o: {"ttl_s": -60}, 400, "ttl_s", "invalid_ttl", ("'ttl_s'", "got -60")),
    ("ttl-huge", lambda w, o: {"ttl_s": MAX_CACHE_TTL_S + 1}, 400, "ttl_s", "invalid_ttl",
     ("'ttl_s'", str(MAX_CACHE_TTL_S + 1))),
    ("ttl-type", lambda w, o: {"ttl_s": "1h"}, 400, "ttl_s", None, ("int",)),
    ("similarity-zero", lambda w, o: {"similarity": 0}, 400, "similarity", "invalid_similarity",
     ("'similarity'", "above 0 and at most 1")),
    ("similarity-high", lambda w, o: {"similarity": 1.5}, 400, "similarity", "invalid_similarity", ("1.5",)),
    ("similarity-negative", lambda w, o: {"similarity": -0.2}, 400, "similarity", "invalid_similarity", ("-0.2",)),
    ("scope", lambda w, o: {"scope": "team"}, 400, "scope", "invalid_scope", ("'team'", "workspace, key, router")),
    ("workspace-scope-id", lambda w, o: {"scope_id": o.id}, 400, "scope_id", "scope_mismatch",
     ("'scope_id' is its workspace",)),
    ("key-missing", lambda w, o: {"scope": "key", "scope_id": "vk_ghost"}, 404, "scope_id", "virtual_key_not_found",
     ("vk_ghost",)),
    ("key-other", lambda w, o: {"scope": "key", "scope_id": o.key_id}, 400, "scope_id",
     "virtual_key_workspace_mismatch", ("another workspace",)),
    ("router-missing", lambda w, o: {"scope": "router", "scope_id": "rtr_ghost"}, 404, "scope_id",
     "router_not_found", ("rtr_ghost",)),
    ("router-other", lambda w, o: {"scope": "router", "scope_id": o.router_id}, 400, "scope_id",
     "router_workspace_mismatch", ("another workspace",)),
    ("key-is-not-a-router", lambda w, o: {"scope": "router", "scope_id": w.key_id}, 404, "scope_id",
     "router_not_found", ()),
    ("semantic-no-model", lambda w, o: {"mode": "semantic"}, 400, "embedding_model", "embedding_model_required",
     ("'embedding_model'", "semantic")),
    ("model-no-provider", lambda w, o: {"mode": "semantic", "embedding_model": "text-embedding-3-small"}, 400,
     "embedding_model", "invalid_model", ("'provider/model'",)),
    ("model-unknown-provider", lambda w, o: {"mode": "semantic", "embedding_model": "openai/text-embedding-3-small"},
     404, "embedding_model", "provider_not_found", ("no provider named 'openai'",)),
    ("namespace-colon", lambda w, o: {"namespace": "a:b"}, 400, "namespace", None, ("namespace",)),
    ("namespace-long", lambda w, o: {"namespace": "n" * 65}, 400, "namespace", None, ("namespace",)),
    ("workspace-missing", lambda w, o: {"workspace_id": "ghostws", "scope_id": "ghostws"}, 404, "workspace_id",
     "workspace_not_found", ("ghostws",)),
    ("unknown-field", lambda w, o: {"max_entries": 5}, 400, None, None, ("unknown field `max_entries`",)),
    ("mode-missing", lambda w, o: {"mode": None}, 400, "mode", None, ("mode",)),
]


@pytest.mark.parametrize(("name", "patch", "status", "param", "code", "words"), BAD_BODIES,
                         ids=[b[0] for b in BAD_BODIES])
async def test_bad_cache_settings_are_refused(gateway: Gateway, admin: Admin, ws: Ws, name: str, patch: Patch,
                                              status: int, param: str | None, code: str | None,
                                              words: tuple[str, ...]) -> None:
    other = await _workspace(admin)
    body = {k: v for k, v in (_setting(ws) | patch(ws, other)).items() if v is not None}
    await _refused(gateway, admin, "POST", f"{A}/cache-settings", body, status, param, code, *words)


async def test_a_router_or_provider_a_setting_names_is_not_deleted(gateway: Gateway, admin: Admin, ws: Ws) -> None:
    setting = await admin.ok("POST", f"{A}/cache-settings", _setting(
        ws, scope="router", scope_id=ws.router_id, mode="semantic", embedding_model="mock/embed"))
    await _refused(gateway, admin, "DELETE", f"{A}/routers/{ws.router_id}", None, 409, None, "still_referenced",
                   setting["id"])
    await admin.ok("DELETE", f"{A}/cache-settings/{setting['id']}")
    await admin.ok("DELETE", f"{A}/routers/{ws.router_id}")
    embed = await admin.ok("POST", f"{A}/cache-settings", _setting(ws, mode="semantic", embedding_model="mock/e"))
    await _refused(gateway, admin, "DELETE", f"{A}/providers/{ws.id}.mock", None, 409, None, "still_referenced",
                   embed["id"])
    await admin.ok("PATCH", f"{A}/cache-settings/{embed['id']}", {"mode": "exact", "embedding_model": None})
    await admin.ok("DELETE", f"{A}/providers/{ws.id}.mock")
    # A revoked key's setting stays (inert), as budgets on it do.
    on_key = await admin.ok("POST", f"{A}/cache-settings", _setting(ws, scope="key", scope_id=ws.key_id))
    await admin.ok("DELETE", f"{A}/virtual-keys/{ws.key_id}")
    assert (await admin.ok("GET", f"{A}/cache-settings/{on_key['id']}"))["scope_id"] == ws.key_id


# ---- purge -------------------------------------------------------------------------------------

async def test_purge_sets_a_new_generation_and_deletes_the_redis_keys(gateway: Gateway, admin: Admin, ws: Ws,
                                                                      redis: Redis) -> None:
    other = await _workspace(admin)
    mine = [f"alc:{ws.id}:_:0:abc", f"alc:{ws.id}:_:0:def", f"alc:{ws.id}:_:17:abc"]
    kept = [f"alc:{other.id}:_:0:abc", f"alc:{ws.id}:team:0:abc", f"alc:{ws.id}x:_:0:abc"]
    for key in mine + kept:
        await redis.set(key, b"cached answer")

    before_ms = int(time.time() * 1000)
    first = await admin.ok("DELETE", f"{A}/cache?workspace_id={ws.id}", status=200)
    assert (first["workspace_id"], first["namespace"], first["kind"]) == (ws.id, "", "cachepurge")
    assert first["generation"] >= before_ms - 5_000 and first["propagated"] is True
    assert first["revision"] == first["snapshot_revision"] and isinstance(first["revision"], int)
    assert (first["redis_keys_deleted"], first["redis_complete"], first["qdrant"]) == (3, True, "skipped")
    assert [await redis.exists(k) for k in mine] == [0, 0, 0]
    assert [await redis.exists(k) for k in kept] == [1, 1, 1]

    # A key a worker stored under the new generation survives a purge that raced it; a second
    # purge's generation is strictly greater and removes it.
    fresh = f"alc:{ws.id}:_:{first['generation']}:abc"
    await redis.set(fresh, b"new")
    second = await admin.ok("DELETE", f"{A}/cache?workspace_id={ws.id}&namespace=", status=200)
    assert second["generation"] > first["generation"] and second["id"] == first["id"]
    assert second["revision"] > first["revision"] and second["redis_keys_deleted"] == 1
    assert await redis.exists(fresh) == 0

    team = await admin.ok("DELETE", f"{A}/cache?workspace_id={ws.id}&namespace=team", status=200)
    assert team["namespace"] == "team" and team["id"] != first["id"] and team["redis_keys_deleted"] == 1
    assert [await redis.exists(k) for k in kept] == [1, 0, 1]

    purges = await admin.ok("GET", f"{A}/cache/purges?workspace_id={ws.id}")
    assert {(p["namespace"], p["generation"]) for p in purges["data"]} == {
        ("", second["generation"]), ("team", team["generation"])}
    await applied(gateway, team["revision"])  # every worker has the new generations
    for key in kept:
        await redis.delete(key)

    # Purges do not keep a workspace from being deleted.
    bare = f"cache{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": bare, "name": "Bare"})
    await admin.ok("DELETE", f"{A}/cache?workspace_id={bare}", status=200)
    await admin.ok("DELETE", f"{A}/workspaces/{bare}")


@pytest.mark.parametrize(("query", "status", "param", "code", "words"), [
    ("", 400, "workspace_id", "missing_parameter", ("'workspace_id' is required",)),
    ("?namespace=team", 400, "workspace_id", "missing_parameter", ("'workspace_id' is required",)),
    ("?workspace_id=a%20b", 400, "workspace_id", "invalid_parameter", ("'workspace_id'",)),
    ("?workspace_id=demo&namespace=a*", 400, "namespace", "invalid_parameter", ("'namespace'", "'a*'")),
    ("?workspace_id=demo&namespace=a:b", 400, "namespace", "invalid_parameter", ("'namespace'",)),
    ("?workspace_id=ghostws", 404, "workspace_id", "workspace_not_found", ("ghostws",)),
])
async def test_bad_purges_are_refused(gateway: Gateway, admin: Admin, query: str, status: int, param: str,
                                      code: str, words: tuple[str, ...]) -> None:
    await _refused(gateway, admin, "DELETE", f"{A}/cache{query}", None, status, param, code, *words)


# ---- the CLI -----------------------------------------------------------------------------------

async def test_cache_through_the_cli(gateway: Gateway, admin: Admin, ws: Ws, redis: Redis) -> None:
    def cli(*args: str) -> Any:
        return cli_json(gateway, *args)

    created = await asyncio.to_thread(cli, "cache", "settings", "set", "-w", ws.id, "--mode", "exact", "--ttl-s",
                                      "120", "--namespace", "team", "--no-exclude-tools")
    sid = created["id"]
    assert (created["scope"], created["scope_id"], created["ttl_s"], created["namespace"]) == (
        "workspace", ws.id, 120, "team")
    assert created["exclude_tools"] is False and created["exclude_temperature"] is False
    replaced = await asyncio.to_thread(cli, "cache", "settings", "set", "-w", ws.id, "--mode", "off")
    assert replaced["id"] == sid and replaced["mode"] == "off" and replaced["ttl_s"] == 3600
    on_key = await asyncio.to_thread(cli, "cache", "settings", "set", "-w", ws.id, "--scope", "key", "--scope-id",
                                     ws.key_id, "--mode", "semantic", "--embedding-model", "mock/embed",
                                     "--similarity", "0.8", "--exclude-temperature")
    assert (on_key["scope_id"], on_key["similarity"], on_key["exclude_temperature"]) == (ws.key_id, 0.8, True)

    listed = await asyncio.to_thread(cli, "cache", "settings", "list", "-w", ws.id)
    assert [s["id"] for s in listed["data"]] == [sid, on_key["id"]]
    assert (await asyncio.to_thread(cli, "cache", "settings", "show", on_key["id"]))["mode"] == "semantic"
    assert (await asyncio.to_thread(cli, "cache", "settings", "delete", on_key["id"]))["deleted"] is True

    bad = await asyncio.to_thread(run_cli, gateway, "cache", "settings", "set", "-w", ws.id, "--mode", "semantic",
                                  check=False)
    assert bad.returncode != 0 and "embedding_model" in bad.stderr
    bad = await asyncio.to_thread(run_cli, gateway, "cache", "settings", "set", "-w", ws.id, "--mode", "exact",
                                  "--ttl-s", "0", check=False)
    assert bad.returncode != 0 and "'ttl_s' must be between 1 and" in bad.stderr
    bad = await asyncio.to_thread(run_cli, gateway, "cache", "settings", "set", "-w", ws.id, "--scope", "router",
                                  "--mode", "exact", check=False)
    assert bad.returncode != 0 and "--scope-id" in bad.stderr
    bad = await asyncio.to_thread(run_cli, gateway, "cache", "settings", "set", "--mode", "fuzzy", check=False)
    assert bad.returncode == 2 and "fuzzy" in bad.stderr

    await redis.set(f"alc:{ws.id}:team:0:abc", b"x")
    purged = await asyncio.to_thread(cli, "cache", "purge", "--workspace", ws.id, "--namespace", "team")
    assert (purged["workspace_id"], purged["namespace"], purged["redis_keys_deleted"]) == (ws.id, "team", 1)
    again = await asyncio.to_thread(run_cli, gateway, "cache", "purge", "-w", ws.id, "--wait")
    assert "applied by" in again.stderr and "snapshot revision" in again.stderr
    refused = await asyncio.to_thread(run_cli, gateway, "cache", "purge", check=False)
    assert refused.returncode == 2 and "--workspace" in refused.stderr

    helped = await asyncio.to_thread(run_cli, gateway, "cache", "--help")
    assert "settings" in helped.stdout and "purge" in helped.stdout
    helped = await asyncio.to_thread(run_cli, gateway, "cache", "settings", "--help")
    for action in ("set", "list", "show", "delete"):
        assert action in helped.stdout


# ---- storage down: the purge still commits, and answers in bounded time --------------------------

@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A DEDICATED stack (its Redis is SIGSTOPped) whose Qdrant server refuses connections."""
    with dedicated_stack(tmp_path_factory.mktemp("cache-outage"), {"ALEPHANT_QDRANT_URL": "http://127.0.0.1:9"}) as s:
        yield s


async def test_a_purge_with_redis_and_qdrant_down_commits_and_says_so(outage_stack: Stack) -> None:
    admin = outage_stack.admin()
    first = await asyncio.to_thread(admin.call, "DELETE", f"{A}/cache?workspace_id=demo")
    assert (first["redis_complete"], first["qdrant"]) == (True, "failed")
    redis = outage_stack.services["redis"]
    redis.pause()
    try:
        started = time.monotonic()
        status, second = await asyncio.to_thread(admin.request, "DELETE", f"{A}/cache?workspace_id=demo")
        took = time.monotonic() - started
    finally:
        redis.resume()
    assert status == 200, second
    assert second["generation"] > first["generation"] and second["propagated"] is True
    assert (second["redis_keys_deleted"], second["redis_complete"], second["qdrant"]) == (0, False, "failed")
    assert took < 2 * PURGE_STORAGE_BUDGET_S + 3, took
    purges = await asyncio.to_thread(admin.call, "GET", f"{A}/cache/purges?workspace_id=demo")
    assert [p["generation"] for p in purges["data"]] == [second["generation"]]
