"""The admin API of the organisation model and governance config (issue 8), on the real stack:
departments, members, bindings, budgets, limits, policies, PATCH/DELETE of every kind, key
rotation, escalations (folded by the projector from `policy.decision` events) and the policy dry
run. Every refusal names its field and writes nothing (no config row, no outbox row)."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

import aiohttp
import psycopg
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from controlplane.governance import budget_usage
from events.jetstream import connect
from events.publisher import EventPublisher
from schemas.entities import Budget
from schemas.events import PolicyDecision
from schemas.ids import uuid7
from tests.conftest import AdminHttp as Admin
from tests.conftest import Gateway, eventually

A = "/admin/v1"



@pytest_asyncio.fixture
async def ws(admin: Admin) -> str:
    """A fresh workspace per test, so tests never see each other's entities."""
    ws_id = f"gov{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": ws_id, "name": "Governance"})
    return ws_id


async def _counts(gateway: Gateway) -> tuple[int, int]:
    """(config_entity rows, config_outbox rows): a refused command must change neither."""
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT (SELECT count(*) FROM config_entity), (SELECT count(*) FROM config_outbox)")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def _refused(gateway: Gateway, admin: Admin, method: str, path: str, body: Any, status: int,
                   param: str | None, code: str | None = None) -> dict[str, Any]:
    before = await _counts(gateway)
    got, data, _ = await admin.call(method, path, body)
    assert got == status, (path, body, got, data)
    assert data["error"]["param"] == param, data
    if code is not None:
        assert data["error"]["code"] == code, data
    assert await _counts(gateway) == before
    error: dict[str, Any] = data["error"]
    return error


# ---- organisation model -------------------------------------------------------------------------

async def test_departments_members_agents_and_key_bindings(admin: Admin, ws: str) -> None:
    dept = await admin.ok("POST", f"{A}/departments", {"workspace_id": ws, "name": "Research"})
    assert dept["id"].startswith("dept_") and dept["propagated"] is True
    assert dept["revision"] == dept["snapshot_revision"] and isinstance(dept["revision"], int)
    member = await admin.ok("POST", f"{A}/members", {"workspace_id": ws, "name": "Ada", "id": f"{ws}-ada",
                                                     "department_id": dept["id"], "email": "ada@example.com"})
    assert (member["id"], member["department_id"]) == (f"{ws}-ada", dept["id"])
    agent = await admin.ok("POST", f"{A}/agents", {"workspace_id": ws, "name": "bot", "department_id": dept["id"],
                                                   "member_id": member["id"]})
    assert (agent["department_id"], agent["member_id"]) == (dept["id"], member["id"])
    key = await admin.ok("POST", f"{A}/virtual-keys", {
        "workspace_id": ws, "name": "bound", "agent_id": agent["id"], "department_id": dept["id"],
        "member_id": member["id"], "models_allow": ["mock/*"], "providers_allow": ["mock"], "ttl_s": 3600})
    assert key["key"] and "key_hash" not in key
    assert (key["models_allow"], key["providers_allow"]) == (["mock/*"], ["mock"])
    expires = dt.datetime.fromisoformat(key["expires_at"])
    assert dt.timedelta(minutes=55) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)
    assert key["expires_at_ms"] == int(expires.timestamp() * 1000)

    assert (await admin.ok("GET", f"{A}/departments/{dept['id']}"))["name"] == "Research"
    assert [m["id"] for m in (await admin.ok("GET", f"{A}/members?workspace_id={ws}"))["data"]] == [member["id"]]
    assert [d["id"] for d in (await admin.ok("GET", f"{A}/departments?workspace_id={ws}"))["data"]] == [dept["id"]]

    # PATCH: only the fields given change; null unbinds; references are re-checked.
    patched = await admin.ok("PATCH", f"{A}/agents/{agent['id']}", {"department_id": None, "name": "bot2"})
    assert (patched["name"], patched["department_id"], patched["member_id"]) == ("bot2", None, member["id"])
    assert patched["revision"] == patched["snapshot_revision"]
    renamed = await admin.ok("PATCH", f"{A}/members/{member['id']}", {"email": "ada@lovelace.org"})
    assert (renamed["email"], renamed["name"], renamed["department_id"]) == ("ada@lovelace.org", "Ada", dept["id"])
    unexpiring = await admin.ok("PATCH", f"{A}/virtual-keys/{key['id']}", {"expires_at": None,
                                                                          "models_allow": ["mock/echo"]})
    assert (unexpiring["expires_at"], unexpiring["models_allow"], unexpiring["agent_id"]) == \
        (None, ["mock/echo"], agent["id"])
    assert "key" not in unexpiring and "key_hash" not in unexpiring
    workspace = await admin.ok("PATCH", f"{A}/workspaces/{ws}", {"providers_allow": ["mock", "openai"]})
    assert workspace["providers_allow"] == ["mock", "openai"]


async def test_references_must_be_live_entities_of_the_same_workspace(
        gateway: Gateway, admin: Admin, ws: str) -> None:
    other = f"gov{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": other, "name": "Other"})
    theirs = await admin.ok("POST", f"{A}/departments", {"workspace_id": other, "name": "Theirs"})
    await _refused(gateway, admin, "POST", f"{A}/agents", {"workspace_id": ws, "name": "a", "department_id": "nope"},
                   404, "department_id", "department_not_found")
    await _refused(gateway, admin, "POST", f"{A}/members", {"workspace_id": ws, "name": "m",
                                                            "department_id": theirs["id"]},
                   400, "department_id", "department_workspace_mismatch")
    await _refused(gateway, admin, "POST", f"{A}/virtual-keys", {"workspace_id": ws, "member_id": "ghost"},
                   404, "member_id", "member_not_found")
    await _refused(gateway, admin, "POST", f"{A}/departments", {"workspace_id": f"nope{secrets.token_hex(3)}",
                                                                "name": "x"}, 404, "workspace_id",
                   "workspace_not_found")
    agent = await admin.ok("POST", f"{A}/agents", {"workspace_id": ws, "name": "a"})
    await _refused(gateway, admin, "PATCH", f"{A}/agents/{agent['id']}", {"department_id": theirs["id"]},
                   400, "department_id", "department_workspace_mismatch")
    # The workspace of an entity is fixed: not a PATCH field.
    await _refused(gateway, admin, "PATCH", f"{A}/agents/{agent['id']}", {"workspace_id": other}, 400, None)
    await _refused(gateway, admin, "PATCH", f"{A}/agents/{agent['id']}", {}, 400, None, "empty_patch")
    await _refused(gateway, admin, "PATCH", f"{A}/agents/agent_missing", {"name": "x"}, 404, None, "agent_not_found")


# ---- budgets ------------------------------------------------------------------------------------

BAD_BUDGETS: list[tuple[str, dict[str, Any], int, str | None, str | None]] = [
    ("float amount", {"limit_usd": 1.5}, 400, "limit_usd", None),
    ("negative amount", {"limit_usd": "-1"}, 400, "limit_usd", "invalid_amount"),
    ("not a number", {"limit_usd": "abc"}, 400, "limit_usd", "invalid_amount"),
    ("exponent", {"limit_usd": "1e3"}, 400, "limit_usd", "invalid_amount"),
    ("zero", {"limit_usd": "0"}, 400, "limit_usd", "invalid_amount"),
    ("ten decimals", {"limit_usd": "0.0000000001"}, 400, "limit_usd", "invalid_amount"),
    ("over a million", {"limit_usd": "1000000.01"}, 400, "limit_usd", "invalid_amount"),
    ("unknown scope", {"scope": "team"}, 400, "scope", None),
    ("unknown period", {"period": "year"}, 400, "period", None),
    ("bad timezone", {"timezone": "Mars/Olympus_Mons"}, 400, "timezone", "invalid_timezone"),
    ("alert at 0", {"alert_at": [0]}, 400, "alert_at[0]", None),
    ("unknown field", {"owner": "x"}, 400, None, None),
    ("unknown agent", {"scope": "agent", "scope_id": "agent_ghost"}, 404, "scope_id", "agent_not_found"),
    ("unknown key", {"scope": "key", "scope_id": "vk_ghost"}, 404, "scope_id", "virtual_key_not_found"),
    ("workspace scope naming another", {"scope_id": "demo"}, 400, "scope_id", "scope_mismatch"),
]


@pytest.mark.parametrize(("case", "change", "status", "param", "code"), BAD_BUDGETS, ids=[b[0] for b in BAD_BUDGETS])
async def test_bad_budgets_are_refused_naming_the_field_and_store_nothing(
        gateway: Gateway, admin: Admin, ws: str, case: str, change: dict[str, Any], status: int, param: str | None,
        code: str | None) -> None:
    body = {"workspace_id": ws, "scope": "workspace", "scope_id": ws, "period": "day", "limit_usd": "1.00"} | change
    error = await _refused(gateway, admin, "POST", f"{A}/budgets", body, status, param, code)
    print(f"{case}: {status} {error['code']} param={param}: {error['message']}")


async def test_budget_create_get_patch_list_delete(admin: Admin, ws: str) -> None:
    agent = await admin.ok("POST", f"{A}/agents", {"workspace_id": ws, "name": "spender"})
    budget = await admin.ok("POST", f"{A}/budgets", {
        "workspace_id": ws, "scope": "agent", "scope_id": agent["id"], "period": "month", "limit_usd": "2.50",
        "timezone": "Europe/Paris", "alert_at": [90, 50, 50]})
    assert (budget["limit_usd"], budget["limit_nanos"], budget["alert_at"]) == ("2.5", 2_500_000_000, [50, 90])
    assert budget["revision"] == budget["snapshot_revision"] and budget["propagated"] is True
    got = await admin.ok("GET", f"{A}/budgets/{budget['id']}")
    assert (got["spent_usd"], got["held_usd"], got["remaining_usd"], got["budget_store"]) == ("0", "0", "2.5", "ok")
    start = dt.datetime.fromisoformat(got["period_start"])
    assert start.utcoffset() in (dt.timedelta(hours=1), dt.timedelta(hours=2)) and start.day == 1

    patched = await admin.ok("PATCH", f"{A}/budgets/{budget['id']}", {"limit_usd": "0.000000001", "alert_at": []})
    assert (patched["limit_nanos"], patched["alert_at"], patched["timezone"]) == (1, [], "Europe/Paris")
    assert (await admin.ok("GET", f"{A}/budgets/{budget['id']}"))["remaining_usd"] == "0.000000001"
    status, data, _ = await admin.call("PATCH", f"{A}/budgets/{budget['id']}", {"scope": "workspace"})
    assert status == 400 and "scope" in data["error"]["message"]  # where a budget attaches is fixed
    status, data, _ = await admin.call("PATCH", f"{A}/budgets/{budget['id']}", {"limit_usd": "-5"})
    assert (status, data["error"]["param"]) == (400, "limit_usd")
    listed = await admin.ok("GET", f"{A}/budgets?workspace_id={ws}")
    assert [b["id"] for b in listed["data"]] == [budget["id"]] and listed["data"][0]["limit_usd"] == "0.000000001"

    # The agent has a budget: deleting it is refused until the budget goes.
    status, data, _ = await admin.call("DELETE", f"{A}/agents/{agent['id']}")
    assert (status, data["error"]["code"]) == (409, "still_referenced") and budget["id"] in data["error"]["message"]
    deleted = await admin.ok("DELETE", f"{A}/budgets/{budget['id']}")
    assert deleted["deleted"] is True and deleted["revision"] is not None
    assert (await admin.call("GET", f"{A}/budgets/{budget['id']}"))[0] == 404
    await admin.ok("DELETE", f"{A}/agents/{agent['id']}")


async def test_budget_reads_degrade_when_redis_is_unreachable() -> None:
    """A real client against a port nothing listens on: amounts null, `budget_store` unavailable."""
    redis = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5, socket_timeout=0.5)
    budget = Budget(id="b", workspace_id="w", scope="workspace", scope_id="w", period="day", limit_nanos=10)
    try:
        usage = await budget_usage(redis, budget, dt.datetime.now(dt.UTC))
    finally:
        await redis.aclose()
    assert usage == {"spent_usd": None, "held_usd": None, "remaining_usd": None, "budget_store": "unavailable"}


# ---- limits and policies ------------------------------------------------------------------------

async def test_limits(gateway: Gateway, admin: Admin, ws: str) -> None:
    base = {"workspace_id": ws, "scope": "workspace", "scope_id": ws}
    await _refused(gateway, admin, "POST", f"{A}/limits", base, 400, "rpm", "empty_limit")
    await _refused(gateway, admin, "POST", f"{A}/limits", base | {"rpm": 0}, 400, "rpm")
    await _refused(gateway, admin, "POST", f"{A}/limits", base | {"tpm": -3}, 400, "tpm")
    await _refused(gateway, admin, "POST", f"{A}/limits", base | {"scope": "workflow", "scope_id": "bad label!",
                                                                  "rpm": 1}, 400, "scope_id")
    limit = await admin.ok("POST", f"{A}/limits", base | {"rpm": 60, "concurrency": 4})
    assert (limit["rpm"], limit["concurrency"], limit["tpm"]) == (60, 4, None)
    flow = await admin.ok("POST", f"{A}/limits", base | {"scope": "workflow", "scope_id": "nightly-batch",
                                                         "rpd": 1000})
    assert flow["scope_id"] == "nightly-batch"
    patched = await admin.ok("PATCH", f"{A}/limits/{limit['id']}", {"rpm": None, "tpm": 100_000})
    assert (patched["rpm"], patched["tpm"], patched["concurrency"]) == (None, 100_000, 4)
    await _refused(gateway, admin, "PATCH", f"{A}/limits/{limit['id']}", {"tpm": None, "concurrency": None}, 400,
                   "rpm", "empty_limit")
    assert (await admin.ok("GET", f"{A}/limits/{limit['id']}"))["tpm"] == 100_000
    assert {x["id"] for x in (await admin.ok("GET", f"{A}/limits?workspace_id={ws}"))["data"]} == \
        {limit["id"], flow["id"]}


async def test_policies(gateway: Gateway, admin: Admin, ws: str) -> None:
    base = {"workspace_id": ws, "scope": "workspace", "scope_id": ws}
    await _refused(gateway, admin, "POST", f"{A}/policies", base | {"windows": [{"timezone": "Nowhere/Land"}]},
                   400, "windows[0].timezone", "invalid_timezone")
    await _refused(gateway, admin, "POST", f"{A}/policies",
                   base | {"windows": [{"start": "08:00"}, {"start": "9am"}]}, 400, "windows[1].start")
    await _refused(gateway, admin, "POST", f"{A}/policies", base | {"windows": [{"days": [7]}]}, 400,
                   "windows[0].days[0]")
    await _refused(gateway, admin, "POST", f"{A}/policies", base | {"max_cost_usd": "1e2"}, 400, "max_cost_usd",
                   "invalid_amount")
    await _refused(gateway, admin, "POST", f"{A}/policies", base | {"tool_action": "explode"}, 400, "tool_action")
    await _refused(gateway, admin, "POST", f"{A}/policies", base | {"scope": "member", "scope_id": "nobody"}, 404,
                   "scope_id", "member_not_found")
    policy = await admin.ok("POST", f"{A}/policies", base | {
        "models_deny": ["openai/o1*"], "tools_deny": ["shell"], "tool_action": "strip",
        "windows": [{"days": [0, 1, 2, 3, 4], "start": "08:00", "end": "20:00", "timezone": "America/New_York"}],
        "max_tokens_cap": 4096, "max_cost_usd": "0.50", "escalate_over_usd": "0.10"})
    assert (policy["max_cost_nanos"], policy["max_cost_usd"]) == (500_000_000, "0.5")
    assert (policy["escalate_over_nanos"], policy["escalate_over_usd"]) == (100_000_000, "0.1")
    assert policy["windows"] == [{"days": [0, 1, 2, 3, 4], "start": "08:00", "end": "20:00",
                                  "timezone": "America/New_York"}]
    patched = await admin.ok("PATCH", f"{A}/policies/{policy['id']}", {"max_cost_usd": None, "windows": []})
    assert (patched["max_cost_usd"], patched["windows"], patched["escalate_over_usd"]) == (None, [], "0.1")
    assert patched["models_deny"] == ["openai/o1*"]
    await _refused(gateway, admin, "PATCH", f"{A}/policies/{policy['id']}",
                   {"windows": [{"timezone": "Bad/Zone"}]}, 400, "windows[0].timezone", "invalid_timezone")
    assert (await admin.ok("GET", f"{A}/policies/{policy['id']}"))["windows"] == []
    assert [p["id"] for p in (await admin.ok("GET", f"{A}/policies?workspace_id={ws}"))["data"]] == [policy["id"]]


# ---- idempotency, delete rules, rotation ------------------------------------------------------

async def test_a_retried_create_patch_or_delete_returns_the_first_result(admin: Admin, ws: str) -> None:
    body = {"workspace_id": ws, "scope": "workspace", "scope_id": ws, "period": "total", "limit_usd": "10"}
    idem = f"idem-{secrets.token_hex(8)}"
    first = await admin.call("POST", f"{A}/budgets", body, key=idem)
    again = await admin.call("POST", f"{A}/budgets", body, key=idem)
    assert first[0] == again[0] == 201 and first[1] == again[1]
    assert again[2].get("Idempotent-Replayed") == "true"
    assert len((await admin.ok("GET", f"{A}/budgets?workspace_id={ws}"))["data"]) == 1
    budget_id = first[1]["id"]

    idem = f"idem-{secrets.token_hex(8)}"
    patch = [await admin.call("PATCH", f"{A}/budgets/{budget_id}", {"limit_usd": "20"}, key=idem) for _ in range(2)]
    assert patch[0][:2] == patch[1][:2] and patch[0][0] == 200 and patch[1][2].get("Idempotent-Replayed") == "true"
    status, data, _ = await admin.call("PATCH", f"{A}/budgets/{budget_id}", {"limit_usd": "30"}, key=idem)
    assert (status, data["error"]["code"]) == (422, "idempotency_key_mismatch")

    idem = f"idem-{secrets.token_hex(8)}"
    gone = [await admin.call("DELETE", f"{A}/budgets/{budget_id}", key=idem) for _ in range(2)]
    assert gone[0][:2] == gone[1][:2] and gone[0][0] == 200
    assert (await admin.call("DELETE", f"{A}/budgets/{budget_id}"))[0] == 404  # without the key: really gone


async def test_delete_refuses_what_is_still_referenced(gateway: Gateway, admin: Admin, ws: str) -> None:
    dept = await admin.ok("POST", f"{A}/departments", {"workspace_id": ws, "name": "Ops"})
    member = await admin.ok("POST", f"{A}/members", {"workspace_id": ws, "name": "Bo", "department_id": dept["id"]})
    await admin.ok("POST", f"{A}/providers", {"workspace_id": ws, "name": "mock", "type": "mock"})
    alias = await admin.ok("POST", f"{A}/model-aliases", {"workspace_id": ws, "alias": "fast", "target": "mock/echo"})
    for path in (f"departments/{dept['id']}", f"workspaces/{ws}", f"providers/{ws}.mock"):
        error = await _refused(gateway, admin, "DELETE", f"{A}/{path}", None, 409, None, "still_referenced")
        print(f"DELETE {path}: {error['message']}")
    await admin.ok("DELETE", f"{A}/members/{member['id']}")
    await admin.ok("DELETE", f"{A}/departments/{dept['id']}")
    await admin.ok("DELETE", f"{A}/model-aliases/{alias['id']}")
    await admin.ok("DELETE", f"{A}/providers/{ws}.mock")
    assert (await admin.call("DELETE", f"{A}/departments/{dept['id']}"))[0] == 404
    # A deleted id can be used again.
    again = await admin.ok("POST", f"{A}/departments", {"workspace_id": ws, "name": "Ops again", "id": dept["id"]})
    assert again["name"] == "Ops again"
    await admin.ok("DELETE", f"{A}/departments/{dept['id']}")
    await admin.ok("DELETE", f"{A}/workspaces/{ws}")
    assert (await admin.call("GET", f"{A}/workspaces/{ws}"))[0] == 404


async def _chat(gateway: Gateway, http: aiohttp.ClientSession, key: str) -> tuple[int, Any]:
    async with http.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        return resp.status, await resp.json()


async def _eventually_status(gateway: Gateway, http: aiohttp.ClientSession, key: str, status: int) -> Any:
    async def check() -> Any:
        got, body = await _chat(gateway, http, key)
        return body if got == status else None
    return await eventually(check, timeout=5)


async def test_rotation_mints_a_key_with_the_same_bindings_and_ends_the_old_one(
        gateway: Gateway, admin: Admin, http: aiohttp.ClientSession) -> None:
    old = await admin.ok("POST", f"{A}/virtual-keys", {"workspace_id": "demo", "name": "rotating",
                                                       "agent_id": "demo-agent", "models_allow": ["mock/*"]})
    assert (await _chat(gateway, http, old["key"]))[0] == 200
    status, data, _ = await admin.call("POST", f"{A}/virtual-keys/{old['id']}/rotate", {"overlap_s": 8 * 86400})
    assert (status, data["error"]["param"]) == (400, "overlap_s")
    new = await admin.ok("POST", f"{A}/virtual-keys/{old['id']}/rotate", {"overlap_s": 0})
    assert new["id"] != old["id"] and new["key"] != old["key"] and new["rotated_from"] == old["id"]
    assert (new["agent_id"], new["models_allow"], new["name"]) == ("demo-agent", ["mock/*"], "rotating")
    keys = {k["id"]: k for k in (await admin.ok("GET", f"{A}/virtual-keys?workspace_id=demo"))["data"]}
    assert keys[old["id"]]["expires_at"] == new["old_key_expires_at"]
    await _eventually_status(gateway, http, new["key"], 200)  # the worker applies the change just after
    body = await _eventually_status(gateway, http, old["key"], 401)
    assert body["error"]["code"] == "key_expired"
    status, data, _ = await admin.call("POST", f"{A}/virtual-keys/{old['id']}/rotate")
    assert (status, data["error"]["code"]) == (409, "key_expired")
    assert (await admin.call("POST", f"{A}/virtual-keys/vk_ghost/rotate"))[0] == 404
    await admin.ok("DELETE", f"{A}/virtual-keys/{new['id']}")
    await _eventually_status(gateway, http, new["key"], 401)


# ---- escalations ------------------------------------------------------------------------------

async def _publish_escalation(gateway: Gateway, ws: str, key_id: str | None) -> str:
    esc_id = f"esc_{secrets.token_hex(12)}"
    event = PolicyDecision(
        event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=ws, agent_id="a1", run_id="r1",
        key_id=key_id, outcome="escalate", code="escalation_required", rule="policy:p1.escalate_over_usd",
        scope="workspace", scope_id=ws, message="over the threshold", endpoint="/v1/chat/completions",
        model="mock/echo", escalation_id=esc_id)
    nc = await connect(gateway.nats_url, "alephant-tests")
    try:
        publisher = EventPublisher(nc.jetstream(), stream=gateway.stream, subject_prefix=gateway.subject_prefix)
        await publisher.publish(event)
        await publisher.publish(event)  # a duplicate publish folds once
    finally:
        await nc.close()
    return esc_id


async def test_escalation_approve_and_reject(gateway: Gateway, admin: Admin, ws: str) -> None:
    key = await admin.ok("POST", f"{A}/virtual-keys", {"workspace_id": ws, "name": "asker"})
    approve_id = await _publish_escalation(gateway, ws, key["id"])
    reject_id = await _publish_escalation(gateway, ws, key["id"])

    async def pending() -> list[dict[str, Any]] | None:
        listed = await admin.ok("GET", f"{A}/escalations?workspace_id={ws}&status=pending")
        return listed["data"] if len(listed["data"]) == 2 else None
    rows = await eventually(pending)
    assert {r["id"] for r in rows} == {approve_id, reject_id}
    row = next(r for r in rows if r["id"] == approve_id)
    assert (row["key_id"], row["rule"], row["model"], row["status"]) == \
        (key["id"], "policy:p1.escalate_over_usd", "mock/echo", "pending")

    approved = await admin.ok("POST", f"{A}/escalations/{approve_id}/approve", {"ttl_s": 600}, status=200)
    assert (approved["status"], approved["grant"]["key_id"], approved["propagated"]) == ("approved", key["id"], True)
    assert approved["revision"] == approved["snapshot_revision"] is not None
    left = dt.datetime.fromisoformat(approved["expires_at"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=9) < left <= dt.timedelta(minutes=10)
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT body FROM config_entity WHERE kind = 'escalation' AND id = %s", (approve_id,))
        grant = await cur.fetchone()
    assert grant is not None and grant[0]["key_id"] == key["id"] and grant[0]["rule"] == row["rule"]

    for path in (f"{approve_id}/approve", f"{approve_id}/reject"):
        status, data, _ = await admin.call("POST", f"{A}/escalations/{path}")
        assert (status, data["error"]["code"]) == (409, "escalation_not_pending")
    rejected = await admin.ok("POST", f"{A}/escalations/{reject_id}/reject", status=200)
    assert rejected["status"] == "rejected" and rejected["decided_by"] == "admin"
    assert (await admin.ok("GET", f"{A}/escalations/{reject_id}"))["status"] == "rejected"
    status, data, _ = await admin.call("POST", f"{A}/escalations/esc_ghost/approve")
    assert (status, data["error"]["code"]) == (404, "escalation_not_found")
    status, data, _ = await admin.call("POST", f"{A}/escalations/{reject_id}/approve", {"ttl_s": 0})
    assert (status, data["error"]["param"]) == (400, "ttl_s")
    assert (await admin.call("GET", f"{A}/escalations?status=bogus"))[0] == 400
    statuses = {r["id"]: r["status"] for r in (await admin.ok("GET", f"{A}/escalations?workspace_id={ws}"))["data"]}
    assert statuses == {approve_id: "approved", reject_id: "rejected"}


# ---- dry run ----------------------------------------------------------------------------------

async def test_dry_run_decides_over_the_policies_on_the_path(admin: Admin, ws: str) -> None:
    await admin.ok("POST", f"{A}/providers", {"workspace_id": ws, "name": "mock", "type": "mock"})
    dept = await admin.ok("POST", f"{A}/departments", {"workspace_id": ws, "name": "Lab"})
    member = await admin.ok("POST", f"{A}/members", {"workspace_id": ws, "name": "Cy", "department_id": dept["id"]})
    agent = await admin.ok("POST", f"{A}/agents", {"workspace_id": ws, "name": "bot", "member_id": member["id"]})
    key = await admin.ok("POST", f"{A}/virtual-keys", {"workspace_id": ws, "name": "k"})
    deny = await admin.ok("POST", f"{A}/policies", {"workspace_id": ws, "scope": "department", "scope_id": dept["id"],
                                                    "models_deny": ["mock/forbidden*"]})
    esc = await admin.ok("POST", f"{A}/policies", {"workspace_id": ws, "scope": "workspace", "scope_id": ws,
                                                   "escalate_over_usd": "0.10", "max_tokens_cap": 100})
    elsewhere = await admin.ok("POST", f"{A}/policies", {"workspace_id": ws, "scope": "agent", "scope_id": "other",
                                                         "models_deny": ["*"]}, status=404)
    assert elsewhere["error"]["param"] == "scope_id"

    def run(model: str, **extra: Any) -> dict[str, Any]:
        return {"key": key["key"], "headers": {"Alephant-Agent-Id": agent["id"]},
                "body": {"model": model, "messages": [{"role": "user", "content": "line\nbreak"}]}} | extra

    denied = await admin.ok("POST", f"{A}/decisions/dry-run", run("mock/forbidden-1"), status=200)
    assert (denied["decision"], denied["code"], denied["rule"]) == \
        ("deny", "policy_denied", f"policy:{deny['id']}.models_deny")
    assert (denied["scope"], denied["scope_id"]) == ("department", dept["id"])
    assert denied["policies"] == [esc["id"], deny["id"]]
    assert [p["scope"] for p in denied["path"]] == ["workspace", "department", "member", "agent", "key"]

    allowed = await admin.ok("POST", f"{A}/decisions/dry-run", run("mock/echo"), status=200)
    assert (allowed["decision"], allowed["code"], allowed["max_tokens"]) == ("allow", None, 100)
    escalate = await admin.ok("POST", f"{A}/decisions/dry-run", run("mock/echo", est_cost_usd="0.25"), status=200)
    assert (escalate["decision"], escalate["code"], escalate["rule"]) == \
        ("escalate", "escalation_required", f"policy:{esc['id']}.escalate_over_usd")
    # Without the agent header the department (reached through the agent's member) is off the path.
    by_id = await admin.ok("POST", f"{A}/decisions/dry-run", {"key_id": key["id"], "body": {"model": "mock/forbidden"}},
                           status=200)
    assert by_id["decision"] == "allow" and by_id["policies"] == [esc["id"]]

    status, data, _ = await admin.call("POST", f"{A}/decisions/dry-run", {"key": "sk-unknown", "body": {}})
    assert (status, data["error"]["code"]) == (404, "key_not_found")
    status, data, _ = await admin.call("POST", f"{A}/decisions/dry-run", {"body": {}})
    assert (status, data["error"]["param"]) == (400, "key")


async def test_openapi_lists_the_governance_routes(admin: Admin) -> None:
    doc = await admin.ok("GET", f"{A}/openapi.json")
    paths = doc["paths"]
    for path in ("/admin/v1/departments", "/admin/v1/members", "/admin/v1/budgets", "/admin/v1/limits",
                 "/admin/v1/policies", "/admin/v1/escalations", "/admin/v1/decisions/dry-run"):
        assert path in paths, path
    for kind in ("workspaces", "departments", "members", "agents", "providers", "virtual-keys", "model-aliases",
                 "prices", "budgets", "limits", "policies"):
        item = paths[f"/admin/v1/{kind}/{{id}}"]
        assert {"patch", "delete"} <= set(item), kind
        assert any(p["name"] == "Idempotency-Key" for p in item["patch"]["parameters"])
    assert "CreateBudget" in doc["components"]["schemas"]
    assert "Idempotency-Key" not in str(paths["/admin/v1/decisions/dry-run"]["post"].get("parameters", []))


async def test_an_escalated_call_is_approved_and_its_one_retry_goes_through(
        gateway: Gateway, admin: Admin, http: aiohttp.ClientSession, fake_provider: str) -> None:
    """End to end: the data plane refuses with `escalation_required`, the projector records the
    escalation, the admin approves it, one retry with `Alephant-Escalation-Id` passes."""
    key = await admin.ok("POST", f"{A}/virtual-keys", {"workspace_id": "demo", "name": "escalating"})
    await admin.ok("POST", f"{A}/policies", {"workspace_id": "demo", "scope": "key", "scope_id": key["id"],
                                             "escalate_over_usd": "0.000000001"})
    body = {"model": f"{fake_provider}/gpt-4o-mini", "messages": [{"role": "user", "content": "expensive"}]}

    async def call(extra: dict[str, str]) -> tuple[int, Any]:
        async with http.post(f"{gateway.base_url}/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key['key']}", **extra}) as resp:
            return resp.status, await resp.json()

    status, refused = await call({})
    assert (status, refused["error"]["code"]) == (403, "escalation_required"), refused

    async def recorded() -> dict[str, Any] | None:
        rows = (await admin.ok("GET", f"{A}/escalations?workspace_id=demo&status=pending"))["data"]
        return next((r for r in rows if r["key_id"] == key["id"]), None)
    escalation = await eventually(recorded)
    assert escalation["id"] in refused["error"]["message"]
    assert escalation["rule"].endswith(".escalate_over_usd") and escalation["used"] is None
    # The dry run agrees with the data plane: without the approved header the call escalates.
    dry = await admin.ok("POST", f"{A}/decisions/dry-run", {"key_id": key["id"], "body": body,
                                                            "est_cost_usd": "0.01"}, status=200)
    assert (dry["decision"], dry["rule"]) == ("escalate", escalation["rule"])

    approved = await admin.ok("POST", f"{A}/escalations/{escalation['id']}/approve", status=200)
    assert approved["propagated"] is True
    dry = await admin.ok("POST", f"{A}/decisions/dry-run", {
        "key_id": key["id"], "body": body, "est_cost_usd": "0.01",
        "headers": {"Alephant-Escalation-Id": escalation["id"]}}, status=200)
    assert (dry["decision"], dry["escalation_grant"]) == ("allow", escalation["id"])
    assert (await admin.ok("GET", f"{A}/escalations/{escalation['id']}"))["used"] is False

    async def retried() -> tuple[int, Any] | None:
        # The grant reaches the worker's snapshot within the propagation the approval waited for.
        got = await call({"Alephant-Escalation-Id": escalation["id"]})
        return got if got[0] == 200 else None
    await eventually(retried, timeout=5)
    status, again = await call({"Alephant-Escalation-Id": escalation["id"]})
    assert (status, again["error"]["code"]) == (403, "escalation_required")  # one retry only
    assert (await admin.ok("GET", f"{A}/escalations/{escalation['id']}"))["used"] is True


async def test_patch_providers_aliases_prices_and_delete_of_a_key_revokes_it(admin: Admin, ws: str) -> None:
    provider = await admin.ok("POST", f"{A}/providers", {
        "workspace_id": ws, "name": "up", "type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-1"})
    assert provider["has_api_key"] is True
    kept = await admin.ok("PATCH", f"{A}/providers/{provider['id']}", {"options": {"api_version": "1"}})
    assert (kept["has_api_key"], kept["options"], kept["base_url"]) == (True, {"api_version": "1"},
                                                                         "http://127.0.0.1:9/v1")
    status, data, _ = await admin.call("PATCH", f"{A}/providers/{provider['id']}", {"base_url": "http://10.0.0.1/v1"})
    assert (status, data["error"]["param"]) == (400, "base_url")  # the SSRF rule, as on create
    status, data, _ = await admin.call("PATCH", f"{A}/providers/{provider['id']}", {"name": "renamed"})
    assert status == 400  # the name is the provider's id: not a PATCH field
    cleared = await admin.ok("PATCH", f"{A}/providers/{provider['id']}", {"api_key": None})
    assert cleared["has_api_key"] is False

    alias = await admin.ok("POST", f"{A}/model-aliases", {"workspace_id": ws, "alias": "fast", "target": "up/a"})
    moved = await admin.ok("PATCH", f"{A}/model-aliases/{alias['id']}", {"target": "up/b"})
    assert (moved["id"], moved["alias"], moved["target"]) == (alias["id"], "fast", "up/b")
    status, data, _ = await admin.call("PATCH", f"{A}/model-aliases/{alias['id']}", {"target": "nobar"})
    assert (status, data["error"]["param"]) == (400, "target")

    model = f"m-{ws}"
    price = await admin.ok("POST", f"{A}/prices", {"provider": "up", "model": model, "input_per_mtok_nanos": 1,
                                                   "output_per_mtok_nanos": 2, "cache_read_per_mtok_nanos": 3})
    repriced = await admin.ok("PATCH", f"{A}/prices/{price['id']}", {"output_per_mtok_nanos": 5,
                                                                     "cache_read_per_mtok_nanos": None})
    assert (repriced["input_per_mtok_nanos"], repriced["output_per_mtok_nanos"],
            repriced["cache_read_per_mtok_nanos"]) == (1, 5, None)
    await admin.ok("DELETE", f"{A}/prices/{price['id']}")

    key = await admin.ok("POST", f"{A}/virtual-keys", {"workspace_id": ws})
    revoked = await admin.ok("DELETE", f"{A}/virtual-keys/{key['id']}")
    assert revoked["revoked"] is True and "key" not in revoked
    assert (await admin.call("DELETE", f"{A}/virtual-keys/{key['id']}"))[0] == 404
