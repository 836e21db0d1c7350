"""The admin API on the real stack: hostile bodies are 400s that store nothing, and an
Idempotency-Key makes every POST safe to retry (issue 7, "Why" 11 and "What to build" 4)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psycopg
import pytest
import pytest_asyncio

from tests.conftest import Gateway


class Admin:
    """Async admin calls returning (status, body, headers), so requests can overlap."""

    def __init__(self, gateway: Gateway, http: aiohttp.ClientSession) -> None:
        self.base = gateway.stack.admin_url
        self.http = http
        self.auth = {"Authorization": f"Bearer {gateway.stack.demo['ALEPHANT_ADMIN_TOKEN']}"}

    async def post(self, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any, dict[str, str]]:
        headers = dict(self.auth)
        if key is not None:
            headers["Idempotency-Key"] = key
        async with self.http.post(self.base + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.base + path, headers=self.auth) as resp:
            return resp.status, await resp.json()


@pytest_asyncio.fixture
async def admin(gateway: Gateway, http: aiohttp.ClientSession) -> AsyncIterator[Admin]:
    yield Admin(gateway, http)


async def _entities(gateway: Gateway) -> int:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM config_entity")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest_asyncio.fixture(scope="module")
async def other_workspace_agent(gateway: Gateway) -> str:
    """An agent of a second workspace, for the cross-workspace binding check."""
    ws = f"other{secrets.token_hex(3)}"
    gateway.admin.call("POST", "/admin/v1/workspaces", {"id": ws, "name": "Other"})
    gateway.admin.call("POST", "/admin/v1/agents", {"workspace_id": ws, "id": f"{ws}-agent", "name": "theirs"})
    return f"{ws}-agent"


HOSTILE: list[tuple[str, str, dict[str, Any], str, str | None]] = [
    # (reproduction, path, body, param, code)
    ("NUL in a name", "/admin/v1/workspaces", {"name": "acme\x00corp"}, "name", "invalid_characters"),
    ("NUL in an agent name", "/admin/v1/agents", {"workspace_id": "demo", "name": "a\x00"}, "name",
     "invalid_characters"),
    ("CRLF in a provider key", "/admin/v1/providers",
     {"workspace_id": "demo", "name": "crlf", "type": "openai", "base_url": "http://127.0.0.1:9/v1",
      "api_key": "sk-live\r\nX-Injected: yes"}, "api_key", "invalid_characters"),
    ("200 KB key name", "/admin/v1/virtual-keys", {"workspace_id": "demo", "name": "k" * 200_000}, "name", None),
    ("provider named v1", "/admin/v1/providers", {"workspace_id": "demo", "name": "v1", "type": "mock"}, "name",
     "reserved_name"),
    ("provider named admin", "/admin/v1/providers", {"workspace_id": "demo", "name": "admin", "type": "mock"},
     "name", "reserved_name"),
    ("provider named healthz", "/admin/v1/providers", {"workspace_id": "demo", "name": "healthz", "type": "mock"},
     "name", "reserved_name"),
    ("price of 2**80", "/admin/v1/prices", {"provider": "mock", "model": "echo", "input_per_mtok_nanos": 2**80,
                                            "output_per_mtok_nanos": 0}, "input_per_mtok_nanos", None),
    ("NUL in an alias target", "/admin/v1/model-aliases",
     {"workspace_id": "demo", "alias": "nul", "target": "mock/echo\x00x"}, "target", "invalid_characters"),
]


@pytest.mark.parametrize(("case", "path", "body", "param", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_admin_bodies_are_400_and_store_nothing(
        gateway: Gateway, admin: Admin, case: str, path: str, body: dict[str, Any], param: str,
        code: str | None) -> None:
    before = await _entities(gateway)
    status, data, _ = await admin.post(path, body)
    assert status == 400, (case, data)
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["param"] == param
    if code is not None:
        assert data["error"]["code"] == code
    assert "Traceback" not in data["error"]["message"] and "sk-live" not in data["error"]["message"]
    assert await _entities(gateway) == before
    print(f"{case}: {status} {data['error']['code']} param={param}")


async def test_key_cannot_be_bound_to_another_workspaces_agent(
        gateway: Gateway, admin: Admin, other_workspace_agent: str) -> None:
    before = await _entities(gateway)
    status, data, _ = await admin.post("/admin/v1/virtual-keys", {"workspace_id": "demo",
                                                                   "agent_id": other_workspace_agent})
    assert status == 400
    assert (data["error"]["param"], data["error"]["code"]) == ("agent_id", "agent_workspace_mismatch")
    assert await _entities(gateway) == before
    # Its own workspace's agent is still fine.
    status, data, _ = await admin.post("/admin/v1/virtual-keys", {"workspace_id": "demo", "agent_id": "demo-agent"})
    assert status == 201 and data["agent_id"] == "demo-agent" and data["propagated"] is True


@pytest.mark.parametrize("path", ["/admin/v1/workspaces/a%00b", "/admin/v1/agents?workspace_id=demo%00",
                                  "/admin/v1/runs/r%0Ax"])
async def test_control_characters_in_ids_and_filters_are_400(admin: Admin, path: str) -> None:
    status, data = await admin.get(path)
    assert status == 400 and data["error"]["code"] == "invalid_characters"


async def test_revoke_with_a_nul_id_is_400(admin: Admin) -> None:
    status, data, _ = await admin.post("/admin/v1/virtual-keys/vk%00x/revoke")
    assert status == 400 and data["error"]["param"] == "id"


# ---- Idempotency-Key ---------------------------------------------------------------------------

async def _key_works(gateway: Gateway, http: aiohttp.ClientSession, key: str) -> int:
    async with http.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        return resp.status


async def test_same_key_same_body_returns_the_first_result_with_the_same_virtual_key(
        gateway: Gateway, admin: Admin, http: aiohttp.ClientSession) -> None:
    idem, name = f"idem-{secrets.token_hex(8)}", f"retry-{secrets.token_hex(4)}"
    body = {"workspace_id": "demo", "name": name}
    first = await admin.post("/admin/v1/virtual-keys", body, key=idem)
    second = await admin.post("/admin/v1/virtual-keys", {"name": name, "workspace_id": "demo"}, key=idem)
    assert first[0] == second[0] == 201
    assert second[1] == first[1]  # same id, same one-time plaintext key, same revision
    assert second[2].get("Idempotent-Replayed") == "true" and "Idempotent-Replayed" not in first[2]
    _, listed = await admin.get("/admin/v1/virtual-keys?workspace_id=demo")
    assert [k["id"] for k in listed["data"] if k["name"] == name] == [first[1]["id"]]  # created once
    assert await _key_works(gateway, http, first[1]["key"]) == 200
    # The stored response holds the plaintext key only encrypted, and no request body in clear.
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT row_to_json(i)::text FROM admin_idempotency i WHERE key = %s", (idem,))
        rows = [r[0] for r in await cur.fetchall()]
    assert len(rows) == 1
    assert first[1]["key"] not in rows[0] and name not in rows[0]


async def test_same_key_different_body_is_422_mismatch(admin: Admin) -> None:
    idem = f"idem-{secrets.token_hex(8)}"
    status, _, _ = await admin.post("/admin/v1/virtual-keys", {"workspace_id": "demo", "name": "one"}, key=idem)
    assert status == 201
    status, data, _ = await admin.post("/admin/v1/virtual-keys", {"workspace_id": "demo", "name": "two"}, key=idem)
    assert status == 422
    assert (data["error"]["code"], data["error"]["param"]) == ("idempotency_key_mismatch", "Idempotency-Key")
    # A key is scoped to its route: the same key on another route is a new request.
    status, _, _ = await admin.post("/admin/v1/model-aliases", {"workspace_id": "demo", "alias": f"a{idem}"[:60],
                                                                "target": "mock/echo"}, key=idem)
    assert status == 201


async def test_revoke_is_idempotent_and_the_key_is_bound_to_the_path(admin: Admin) -> None:
    _, created, _ = await admin.post("/admin/v1/virtual-keys", {"workspace_id": "demo", "name": "to-revoke"})
    idem = f"idem-{secrets.token_hex(8)}"
    first = await admin.post(f"/admin/v1/virtual-keys/{created['id']}/revoke", key=idem)
    again = await admin.post(f"/admin/v1/virtual-keys/{created['id']}/revoke", key=idem)
    assert first[0] == again[0] == 200 and first[1] == again[1] and first[1]["revoked"] is True
    # Without the key, a second revoke is a 404: the replay is what made the retry safe.
    status, _, _ = await admin.post(f"/admin/v1/virtual-keys/{created['id']}/revoke")
    assert status == 404
    status, data, _ = await admin.post("/admin/v1/virtual-keys/vk_other/revoke", key=idem)
    assert status == 422 and data["error"]["code"] == "idempotency_key_mismatch"


async def test_concurrent_duplicate_is_409_in_use_then_replays(gateway: Gateway, admin: Admin) -> None:
    """The first request is held inside its transaction by a row lock another session holds (the
    same agent id being inserted); the duplicate arrives while it is in flight."""
    idem, agent = f"idem-{secrets.token_hex(8)}", f"agent-{secrets.token_hex(6)}"
    body = {"workspace_id": "demo", "id": agent, "name": "held"}
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as blocker:
        await blocker.execute(
            "INSERT INTO config_entity (kind, id, workspace_id, kv_key, body) VALUES ('agent', %s, 'demo', %s, '{}')",
            (agent, f"agent.{agent}"))
        first = asyncio.create_task(admin.post("/admin/v1/agents", body, key=idem))

        async def claimed() -> bool:
            async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
                cur = await conn.execute("SELECT status IS NULL FROM admin_idempotency WHERE key = %s", (idem,))
                row = await cur.fetchone()
            return row is not None and bool(row[0])
        for _ in range(200):
            if await claimed():
                break
            await asyncio.sleep(0.05)
        status, data, _ = await admin.post("/admin/v1/agents", body, key=idem)
        assert status == 409
        assert (data["error"]["code"], data["error"]["param"]) == ("idempotency_key_in_use", "Idempotency-Key")
        assert not first.done()
        await blocker.rollback()  # release the lock: the first request now commits
    status, created, _ = await first
    assert status == 201 and created["id"] == agent
    status, replayed, headers = await admin.post("/admin/v1/agents", body, key=idem)
    assert (status, replayed, headers.get("Idempotent-Replayed")) == (201, created, "true")


async def test_a_failed_command_releases_its_key(admin: Admin) -> None:
    idem, ws = f"idem-{secrets.token_hex(8)}", f"late{secrets.token_hex(3)}"
    body = {"workspace_id": ws, "name": "early"}
    status, data, _ = await admin.post("/admin/v1/agents", body, key=idem)
    assert status == 404 and data["error"]["code"] == "workspace_not_found"
    status, _, _ = await admin.post("/admin/v1/workspaces", {"id": ws, "name": "Late"})
    assert status == 201
    status, data, _ = await admin.post("/admin/v1/agents", body, key=idem)
    assert status == 201 and data["workspace_id"] == ws


async def test_expired_key_is_a_new_request(gateway: Gateway, admin: Admin) -> None:
    idem = f"idem-{secrets.token_hex(8)}"
    status, first, _ = await admin.post("/admin/v1/virtual-keys", {"workspace_id": "demo", "name": "old"}, key=idem)
    assert status == 201
    async with await psycopg.AsyncConnection.connect(gateway.database_url, autocommit=True) as conn:
        await conn.execute("UPDATE admin_idempotency SET expires_at = now() - interval '1 second' WHERE key = %s",
                           (idem,))
    status, second, _ = await admin.post("/admin/v1/virtual-keys", {"workspace_id": "demo", "name": "new"}, key=idem)
    assert status == 201 and second["id"] != first["id"]


@pytest.mark.parametrize("bad", ["", "x" * 256, "k\u00e9y"])
async def test_malformed_idempotency_key_is_400(admin: Admin, bad: str) -> None:
    headers = {**admin.auth, "Idempotency-Key": bad}
    async with admin.http.post(admin.base + "/admin/v1/workspaces", json={"name": "w"}, headers=headers) as resp:
        data = await resp.json()
        assert resp.status == 400
    assert data["error"]["param"] == "Idempotency-Key"
