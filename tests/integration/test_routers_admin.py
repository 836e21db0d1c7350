"""The routers admin API and CLI on the real stack: create, list, get, PATCH and DELETE; every
refused body names its field and problem and writes nothing; router names unique per workspace;
`router_id` bindings on virtual keys and agents (checked like `department_id`, and a router in use
cannot be deleted); a provider a router targets cannot be deleted; and
`GET /admin/v1/routers/{id}/health` showing a call made through `/router/{id}/v1/...`."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import pytest_asyncio

from tests.conftest import AdminHttp as Admin
from tests.conftest import Gateway, cli_json, eventually, run_cli
from tests.integration.test_governance_e2e import applied

A = "/admin/v1"



@pytest_asyncio.fixture
async def ws(admin: Admin) -> str:
    """A fresh workspace per test with two providers, `mock` and `alt` (both of type mock)."""
    ws_id = f"rtr{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": ws_id, "name": "Routers"})
    for name in ("mock", "alt"):
        await admin.ok("POST", f"{A}/providers", {"workspace_id": ws_id, "name": name, "type": "mock"})
    return ws_id


async def _counts(gateway: Gateway) -> tuple[int, int]:
    """(config_entity rows, config_outbox rows): a refused command must change neither."""
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT (SELECT count(*) FROM config_entity), (SELECT count(*) FROM config_outbox)")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def _refused(gateway: Gateway, admin: Admin, method: str, path: str, body: Any, status: int, param: str | None,
                   code: str | None, *words: str) -> dict[str, Any]:
    before = await _counts(gateway)
    got, data, _ = await admin.call(method, path, body)
    assert got == status, (path, body, got, data)
    error: dict[str, Any] = data["error"]
    assert (error["param"], error["code"]) == (param, code), error
    for word in words:
        assert word in error["message"], (word, error)
    assert await _counts(gateway) == before
    return error


def _router(ws: str, name: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"workspace_id": ws, "name": name or f"r-{secrets.token_hex(3)}", "targets": [{"model": "mock/echo"}]} \
        | extra


# ---- create, list, get, patch, delete ----------------------------------------------------------

async def test_router_lifecycle(admin: Admin, ws: str) -> None:
    created = await admin.ok("POST", f"{A}/routers", _router(
        ws, "main", strategy="weighted",
        targets=[{"model": "mock/echo", "weight": 3}, {"model": "alt/*", "weight": 1, "models": {"a": "b"}}],
        rules=[{"name": "tools", "when": {"tools": True, "model": ["gpt-*"], "properties": {"tier": "gold"}},
                "targets": [{"model": "alt/echo"}], "strategy": "latency"}],
        retry={"retries": 2}, timeouts={"first_byte_s": 5, "total_s": 60}, health={"consecutive_failures": 3}))
    rid = created["id"]
    assert rid.startswith("rtr_") and created["propagated"] is True
    assert isinstance(created["revision"], int) and created["revision"] == created["snapshot_revision"]
    assert (created["workspace_id"], created["name"], created["strategy"]) == (ws, "main", "weighted")
    assert created["targets"] == [
        {"model": "mock/echo", "weight": 3, "provider_key_id": None, "models": {}},
        {"model": "alt/*", "weight": 1, "provider_key_id": None, "models": {"a": "b"}}]
    rule = created["rules"][0]
    assert (rule["name"], rule["strategy"], rule["when"]["tools"], rule["when"]["properties"]) == (
        "tools", "latency", True, {"tier": "gold"})
    # Defaults are shown with the values given.
    assert created["retry"] == {"retries": 2, "backoff_ms": 50, "max_backoff_ms": 1000, "budget_percent": 20,
                                "min_retries": 3}
    assert created["timeouts"] == {"connect_s": None, "first_byte_s": 5, "total_s": 60, "idle_s": None}
    assert created["health"]["consecutive_failures"] == 3 and created["health"]["max_ejected_percent"] == 50

    assert await admin.ok("GET", f"{A}/routers/{rid}") == {k: v for k, v in created.items()
                                                             if k not in ("propagated", "revision",
                                                                          "snapshot_revision")}
    listed = await admin.ok("GET", f"{A}/routers?workspace_id={ws}")
    assert [r["id"] for r in listed["data"]] == [rid]

    patched = await admin.ok("PATCH", f"{A}/routers/{rid}", {"name": "main2", "strategy": "cost",
                                                            "targets": [{"model": "alt/echo"}]})
    assert (patched["name"], patched["strategy"], [t["model"] for t in patched["targets"]]) == (
        "main2", "cost", ["alt/echo"])
    assert patched["rules"] == created["rules"] and patched["retry"] == created["retry"]  # untouched
    assert patched["revision"] > created["revision"]
    unruled = await admin.ok("PATCH", f"{A}/routers/{rid}", {"rules": [], "timeouts": {}})
    assert unruled["rules"] == [] and unruled["timeouts"]["total_s"] is None and unruled["name"] == "main2"

    await _refused_patch_workspace(admin, rid)
    deleted = await admin.ok("DELETE", f"{A}/routers/{rid}")
    assert deleted["deleted"] is True and deleted["id"] == rid
    got, body, _ = await admin.call("GET", f"{A}/routers/{rid}")
    assert got == 404, body
    assert (await admin.ok("GET", f"{A}/routers?workspace_id={ws}"))["data"] == []


async def _refused_patch_workspace(admin: Admin, rid: str) -> None:
    got, body, _ = await admin.call("PATCH", f"{A}/routers/{rid}", {"workspace_id": "elsewhere"})
    assert got == 400 and "workspace_id" in body["error"]["message"], body


# ---- refusals ----------------------------------------------------------------------------------

TARGET = {"model": "mock/echo"}
BAD_BODIES: list[tuple[dict[str, Any], int, str, str | None, tuple[str, ...]]] = [
    ({"targets": []}, 400, "targets", "router_no_targets", ("at least one target",)),
    ({"targets": [TARGET, {"model": "echo"}]}, 400, "targets[1].model", "invalid_model", ("'provider/model'", "echo")),
    ({"targets": [TARGET, {"model": "nope/echo"}]}, 404, "targets[1].model", "provider_not_found", ("'nope'",)),
    ({"targets": [{"model": "mock/echo", "weight": -2}]}, 400, "targets[0].weight", "invalid_weight",
     ("between 0 and", "-2")),
    ({"strategy": "weighted", "targets": [{"model": "mock/echo", "weight": 0}, {"model": "alt/echo", "weight": 0}]},
     400, "targets", "weights_sum_to_zero", ("sum to zero",)),
    ({"strategy": "random"}, 400, "strategy", None, ("random", "strategy")),
    ({"targets": [{"model": f"mock/m{i}"} for i in range(17)]}, 400, "targets", "too_many_targets", ("at most 16",)),
    ({"rules": [{"targets": [TARGET]}] * 33}, 400, "rules", "too_many_rules", ("at most 32",)),
    ({"rules": [{"when": {"tools": True}}]}, 400, "rules[0].targets", "router_no_targets", ("at least one target",)),
    ({"rules": [{"targets": [TARGET]}, {"targets": [{"model": "ghost/x"}]}]}, 404, "rules[1].targets[0].model",
     "provider_not_found", ("'ghost'",)),
    ({"retry": {"retries": 9}}, 400, "retry.retries", None, ("<= 5",)),
    ({"retry": {"budget_percent": 101}}, 400, "retry.budget_percent", None, ("<= 100",)),
    ({"timeouts": {"total_s": 0}}, 400, "timeouts.total_s", None, ("> 0",)),
    ({"timeouts": {"idle_s": 7200}}, 400, "timeouts.idle_s", None, ("<= 3600",)),
    ({"health": {"consecutive_failures": 0}}, 400, "health.consecutive_failures", None, (">= 1",)),
    ({"health": {"max_ejected_percent": 120}}, 400, "health.max_ejected_percent", None, ("<= 100",)),
    ({"targets": [{"model": "mock/echo", "provider_key_id": "pkey_missing"}]}, 404, "targets[0].provider_key_id",
     "provider_key_not_found", ("pkey_missing",)),
    ({"name": "has space"}, 400, "name", None, ("name",)),
]


@pytest.mark.parametrize(("patch", "status", "param", "code", "words"), BAD_BODIES,
                         ids=[f"{p}-{c}" for _, _, p, c, _ in BAD_BODIES])
async def test_bad_router_bodies_are_refused(gateway: Gateway, admin: Admin, ws: str, patch: dict[str, Any],
                                             status: int, param: str, code: str | None, words: tuple[str, ...]) -> None:
    await _refused(gateway, admin, "POST", f"{A}/routers", _router(ws) | patch, status, param, code, *words)


async def test_patch_is_validated_as_a_create(gateway: Gateway, admin: Admin, ws: str) -> None:
    rid = (await admin.ok("POST", f"{A}/routers", _router(ws)))["id"]
    await _refused(gateway, admin, "PATCH", f"{A}/routers/{rid}", {"targets": [{"model": "gone/x"}]}, 404,
                   "targets[0].model", "provider_not_found", "'gone'")
    await _refused(gateway, admin, "PATCH", f"{A}/routers/{rid}", {"strategy": "weighted", "targets": [
        {"model": "mock/echo", "weight": 0}]}, 400, "targets", "weights_sum_to_zero", "sum to zero")
    await _refused(gateway, admin, "PATCH", f"{A}/routers/{rid}", {}, 400, None, "empty_patch")
    await _refused(gateway, admin, "PATCH", f"{A}/routers/rtr_nope", {"name": "x"}, 404, None, "router_not_found")
    await _refused(gateway, admin, "DELETE", f"{A}/routers/rtr_nope", None, 404, None, "router_not_found")
    got, body, _ = await admin.call("GET", f"{A}/routers/rtr_nope/health")
    assert got == 404 and body["error"]["code"] == "router_not_found", body


async def test_pinned_provider_keys_must_be_of_the_targets_provider(gateway: Gateway, admin: Admin, ws: str) -> None:
    alt_key = await admin.ok("POST", f"{A}/provider-keys", {"workspace_id": ws, "provider": "alt", "api_key": "k-1"})
    other = f"rtr{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": other, "name": "Other"})
    await admin.ok("POST", f"{A}/providers", {"workspace_id": other, "name": "mock", "type": "mock"})
    theirs = await admin.ok("POST", f"{A}/provider-keys", {"workspace_id": other, "provider": "mock",
                                                           "api_key": "k-2"})
    master = await admin.ok("POST", f"{A}/provider-keys", {"provider": "groq", "api_key": "k-3",
                                                           "name": "routers-test"})
    try:
        await _refused(gateway, admin, "POST", f"{A}/routers", _router(ws, targets=[
            {"model": "mock/echo", "provider_key_id": alt_key["id"]}]), 400, "targets[0].provider_key_id",
            "provider_key_mismatch", alt_key["id"], "'alt'", "'mock'")
        await _refused(gateway, admin, "POST", f"{A}/routers", _router(ws, targets=[TARGET], rules=[
            {"targets": [{"model": "mock/echo", "provider_key_id": theirs["id"]}]}]), 400,
            "rules[0].targets[0].provider_key_id", "provider_key_mismatch", "another workspace")
        await _refused(gateway, admin, "POST", f"{A}/routers", _router(ws, targets=[
            {"model": "mock/echo", "provider_key_id": master["id"]}]), 400, "targets[0].provider_key_id",
            "provider_key_mismatch", "'groq'")
        pinned = await admin.ok("POST", f"{A}/routers", _router(ws, targets=[
            {"model": "alt/echo", "provider_key_id": alt_key["id"]}]))
        assert pinned["targets"][0]["provider_key_id"] == alt_key["id"]
        await admin.ok("POST", f"{A}/providers", {"workspace_id": ws, "name": "fast", "type": "groq"})
        on_master = await admin.ok("POST", f"{A}/routers", _router(ws, targets=[
            {"model": "fast/llama-3.1-8b-instant", "provider_key_id": master["id"]}]))
        await admin.ok("DELETE", f"{A}/routers/{on_master['id']}")
    finally:
        await admin.ok("DELETE", f"{A}/provider-keys/{master['id']}")


async def test_names_are_unique_per_workspace(gateway: Gateway, admin: Admin, ws: str) -> None:
    first = await admin.ok("POST", f"{A}/routers", _router(ws, "main"))
    error = await _refused(gateway, admin, "POST", f"{A}/routers", _router(ws, "main"), 409, "name",
                           "router_name_taken", "'main'", first["id"])
    assert error["type"]
    second = await admin.ok("POST", f"{A}/routers", _router(ws, "backup"))
    await _refused(gateway, admin, "PATCH", f"{A}/routers/{second['id']}", {"name": "main"}, 409, "name",
                   "router_name_taken", "'main'")
    # Saving a router under its own name is no conflict; another workspace may use the name.
    await admin.ok("PATCH", f"{A}/routers/{first['id']}", {"name": "main", "strategy": "latency"})
    other = f"rtr{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": other, "name": "Other"})
    await admin.ok("POST", f"{A}/providers", {"workspace_id": other, "name": "mock", "type": "mock"})
    await admin.ok("POST", f"{A}/routers", _router(other, "main"))
    # A deleted router's name is free again.
    await admin.ok("DELETE", f"{A}/routers/{first['id']}")
    await admin.ok("POST", f"{A}/routers", _router(ws, "main"))


# ---- bindings on keys and agents ---------------------------------------------------------------

async def test_keys_and_agents_bind_routers_of_their_workspace(gateway: Gateway, admin: Admin, ws: str) -> None:
    router = await admin.ok("POST", f"{A}/routers", _router(ws))
    rid = router["id"]
    other = f"rtr{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": other, "name": "Other"})
    await admin.ok("POST", f"{A}/providers", {"workspace_id": other, "name": "mock", "type": "mock"})
    theirs = await admin.ok("POST", f"{A}/routers", _router(other))

    await _refused(gateway, admin, "POST", f"{A}/virtual-keys", {"workspace_id": ws, "router_id": "rtr_ghost"},
                   404, "router_id", "router_not_found", "rtr_ghost")
    await _refused(gateway, admin, "POST", f"{A}/virtual-keys", {"workspace_id": ws, "router_id": theirs["id"]},
                   400, "router_id", "router_workspace_mismatch", theirs["id"])
    await _refused(gateway, admin, "POST", f"{A}/agents", {"workspace_id": ws, "name": "a", "router_id": "rtr_x"},
                   404, "router_id", "router_not_found")
    await _refused(gateway, admin, "POST", f"{A}/agents", {"workspace_id": ws, "name": "a",
                                                           "router_id": theirs["id"]},
                   400, "router_id", "router_workspace_mismatch")

    key = await admin.ok("POST", f"{A}/virtual-keys", {"workspace_id": ws, "router_id": rid})
    assert key["router_id"] == rid
    agent = await admin.ok("POST", f"{A}/agents", {"workspace_id": ws, "name": "bot"})
    await _refused(gateway, admin, "PATCH", f"{A}/agents/{agent['id']}", {"router_id": theirs["id"]}, 400,
                   "router_id", "router_workspace_mismatch")
    bound = await admin.ok("PATCH", f"{A}/agents/{agent['id']}", {"router_id": rid})
    assert bound["router_id"] == rid and bound["name"] == "bot"

    # In use: the delete is refused naming the users, until both unbind.
    error = await _refused(gateway, admin, "DELETE", f"{A}/routers/{rid}", None, 409, None, "still_referenced",
                           key["id"], agent["id"])
    assert error["type"]
    unbound = await admin.ok("PATCH", f"{A}/virtual-keys/{key['id']}", {"router_id": None})
    assert unbound["router_id"] is None
    await _refused(gateway, admin, "DELETE", f"{A}/routers/{rid}", None, 409, None, "still_referenced", agent["id"])
    await admin.ok("PATCH", f"{A}/agents/{agent['id']}", {"router_id": None})
    await admin.ok("DELETE", f"{A}/routers/{rid}")


async def test_a_provider_a_router_targets_is_not_deleted(gateway: Gateway, admin: Admin, ws: str) -> None:
    router = await admin.ok("POST", f"{A}/routers", _router(ws, targets=[TARGET], rules=[
        {"targets": [{"model": "alt/*"}]}]))
    for provider in ("mock", "alt"):
        await _refused(gateway, admin, "DELETE", f"{A}/providers/{ws}.{provider}", None, 409, None,
                       "still_referenced", router["id"])
    await admin.ok("DELETE", f"{A}/routers/{router['id']}")
    await admin.ok("DELETE", f"{A}/providers/{ws}.alt")


# ---- health through a real call ----------------------------------------------------------------

async def test_health_shows_a_call_made_through_the_router(gateway: Gateway, admin: Admin,
                                                            http: aiohttp.ClientSession) -> None:
    name = f"health-{secrets.token_hex(3)}"
    router = await admin.ok("POST", f"{A}/routers", _router("demo", name, targets=[{"model": "mock/echo"}]))
    rid = router["id"]
    try:
        await applied(gateway, router["revision"])
        empty = await admin.ok("GET", f"{A}/routers/{rid}/health")
        assert (empty["router_id"], empty["name"], empty["strategy"]) == (rid, name, "fallback")
        assert empty["workers"] >= 1 and [t["model"] for t in empty["targets"]] == ["mock/echo"]

        headers = {"Authorization": f"Bearer {gateway.demo_key}"}
        body = {"messages": [{"role": "user", "content": "through the router"}]}
        origin = gateway.base_url.removesuffix("/v1")  # the base URL is the OpenAI one, .../v1
        async with http.post(f"{origin}/router/{rid}/v1/chat/completions", json=body | {"model": "echo"},
                             headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["choices"][0]["message"]["content"] == "through the router"
        async with http.post(f"{gateway.base_url}/chat/completions", json=body | {"model": f"router/{name}"},
                             headers=headers) as resp:
            assert resp.status == 200, await resp.text()

        async def seen() -> dict[str, Any] | None:
            report = await admin.ok("GET", f"{A}/routers/{rid}/health")
            target = report["targets"][0]
            return target if target["summary"]["successes"] >= 2 else None

        target = await eventually(seen, timeout=15)
        worker = target["workers"][0]
        assert worker["successes"] >= 1 and worker["model"] == "echo" and worker["worker_id"]
        assert worker["ejected"] is False and worker["cooling_down"] is False and worker["consecutive_failures"] == 0
        assert worker["ewma_ttfb_ms"] is not None and worker["failures"] == 0
        assert target["summary"]["workers_ejected"] == 0
    finally:
        await admin.ok("DELETE", f"{A}/routers/{rid}")


# ---- the CLI -----------------------------------------------------------------------------------

async def test_routers_through_the_cli(gateway: Gateway, admin: Admin, ws: str, tmp_path: Path) -> None:
    def cli(*args: str) -> Any:
        return cli_json(gateway, *args)

    extra = tmp_path / "router.json"
    extra.write_text(json.dumps({"rules": [{"when": {"tools": True}, "targets": [{"model": "alt/echo"}]}],
                                 "retry": {"retries": 2}, "timeouts": {"first_byte_s": 4}}))
    created = await asyncio.to_thread(cli, "routers", "create", "-w", ws, "--name", "cli", "--strategy", "weighted",
                                      "--target", "mock/echo:3", "--target", "alt/*", "--json", str(extra))
    rid = created["id"]
    assert [(t["model"], t["weight"]) for t in created["targets"]] == [("mock/echo", 3), ("alt/*", 1)]
    assert created["strategy"] == "weighted" and created["retry"]["retries"] == 2
    assert created["rules"][0]["targets"][0]["model"] == "alt/echo" and created["timeouts"]["first_byte_s"] == 4

    inline = await asyncio.to_thread(cli, "routers", "create", "-w", ws, "--name", "inline", "--target", "mock/echo",
                                     "--json", '{"health": {"consecutive_failures": 2}}')
    assert inline["health"]["consecutive_failures"] == 2 and inline["strategy"] == "fallback"

    listed = await asyncio.to_thread(cli, "routers", "list", "-w", ws)
    assert [r["name"] for r in listed["data"]] == ["cli", "inline"]
    assert (await asyncio.to_thread(cli, "routers", "show", rid))["name"] == "cli"
    updated = await asyncio.to_thread(cli, "routers", "update", rid, "--name", "cli2", "--target", "alt/echo:1")
    assert updated["name"] == "cli2" and [t["model"] for t in updated["targets"]] == ["alt/echo"]
    assert updated["retry"]["retries"] == 2  # not given: kept
    health = await asyncio.to_thread(cli, "routers", "health", rid)
    assert health["router_id"] == rid and [t["model"] for t in health["targets"]] == ["alt/echo"]

    key = await asyncio.to_thread(cli, "keys", "create", "-w", ws, "--router", rid)
    assert key["router_id"] == rid
    agent = await asyncio.to_thread(cli, "agents", "create", "-w", ws, "bot", "--router", inline["id"])
    assert agent["router_id"] == inline["id"]
    refused = await asyncio.to_thread(run_cli, gateway, "routers", "delete", rid, check=False)
    assert refused.returncode != 0 and "still referenced" in refused.stderr and key["id"] in refused.stderr
    assert (await asyncio.to_thread(cli, "keys", "update", key["id"], "--router", "none"))["router_id"] is None
    moved = await asyncio.to_thread(cli, "agents", "update", agent["id"], "--router", rid, "--name", "bot2")
    assert (moved["router_id"], moved["name"]) == (rid, "bot2")
    assert (await asyncio.to_thread(cli, "agents", "update", agent["id"], "--router", "none"))["router_id"] is None
    assert (await asyncio.to_thread(cli, "routers", "delete", rid))["deleted"] is True

    bad = await asyncio.to_thread(run_cli, gateway, "routers", "create", "-w", ws, "--name", "x", "--target",
                                  "nope/echo", check=False)
    assert bad.returncode != 0 and "no provider named 'nope'" in bad.stderr
    bad = await asyncio.to_thread(run_cli, gateway, "routers", "create", "-w", ws, "--name", "x", "--target",
                                  "echo", check=False)
    assert bad.returncode == 2 and "provider/model[:weight]" in bad.stderr
    helped = await asyncio.to_thread(run_cli, gateway, "routers", "--help")
    for action in ("create", "list", "show", "update", "delete", "health"):
        assert action in helped.stdout
