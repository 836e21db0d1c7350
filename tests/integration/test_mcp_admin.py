"""The MCP servers admin API and CLI on the real stack (issue 16, config side): create, list, get,
PATCH and DELETE; a header value never appears in an answer, a `config.changed` event (outbox or
journal), a log or a config row in plaintext, only its ciphertext in the entity (the Postgres body
and the KV entry workers read), which decrypts to it; an internal URL, a bad name, price, header or
timeout is refused naming its field and writes nothing; names unique per workspace; the workers'
snapshot follows the server (created, renamed, deleted); the CLI round trip."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import psycopg
import pytest
import pytest_asyncio

from dataplane.snapshot import SnapshotStore, SnapshotWatcher
from events.jetstream import connect
from schemas.entities import McpServer, McpTool
from schemas.keys import KeyRing
from schemas.settings import Secret
from tests.conftest import AdminHttp as Admin
from tests.conftest import Gateway, cli_json, eventually, run_cli
from tests.integration.test_routers_admin import _refused

A = "/admin/v1"
M = f"{A}/mcp-servers"
# A loopback address (the stack allows 127.0.0.1 for its fakes): the tests resolve no public names.
UPSTREAM = "http://127.0.0.1:9/mcp"
SECRET = f"Bearer mcp-canary-{secrets.token_hex(8)}"
TOOLS: dict[str, Any] = {"web_search": {"price_usd": "0.01"}, "delete_index": {"allowed": False}}
VIEW_TOOLS = {"delete_index": {"price_usd": "0", "price_nanos": 0, "allowed": False},
              "web_search": {"price_usd": "0.01", "price_nanos": 10_000_000, "allowed": True}}
ANSWER_ONLY = ("revision", "snapshot_revision", "propagated")


@pytest_asyncio.fixture
async def ws(admin: Admin) -> str:
    ws_id = f"mcp{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": ws_id, "name": "MCP"})
    return ws_id


def _name() -> str:
    return f"srv-{secrets.token_hex(4)}"


def _body(ws: str, **extra: Any) -> dict[str, Any]:
    return {"workspace_id": ws, "name": _name(), "url": UPSTREAM} | extra


def _keyring(gateway: Gateway) -> KeyRing:
    return KeyRing(Secret(gateway.stack.child_env()["ALEPHANT_SECRET_KEY"]))


def _stored(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k not in ANSWER_ONLY}


async def _kv_server(gateway: Gateway, server_id: str) -> McpServer:
    """The server as the workers read it: its entry in the snapshot KV bucket."""
    nc = await connect(gateway.nats_url, "alephant-tests")
    try:
        kv = await nc.jetstream().key_value(gateway.stack.child_env()["ALEPHANT_KV_BUCKET"])
        entry = await kv.get(f"mcp.{server_id}")
        assert entry.value is not None
        return msgspec.json.decode(entry.value, type=McpServer)
    finally:
        await nc.close()


async def _row_body(gateway: Gateway, server_id: str) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT body FROM config_entity WHERE kind = 'mcp' AND id = %s", (server_id,))
        row = await cur.fetchone()
    assert row is not None
    return dict(row[0])


async def _config_text(gateway: Gateway) -> tuple[str, str]:
    """(every config row and outbox KV value, every outbox and journalled `config.changed` event), as text."""
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT (SELECT string_agg(body::text, ' ') FROM config_entity) || ' ' || "
                                 "(SELECT string_agg(coalesce(encode(kv_value, 'escape'), ''), ' ') "
                                 "FROM config_outbox), "
                                 "(SELECT string_agg(encode(event, 'escape'), ' ') FROM config_outbox) || ' ' || "
                                 "(SELECT coalesce(string_agg(body::text, ' '), '') FROM event_journal "
                                 "WHERE type = 'config.changed')")
        row = await cur.fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


async def _journalled(gateway: Gateway, server_id: str, count: int) -> list[dict[str, Any]]:
    """The journalled `config.changed` events of the server, oldest first, once there are `count`."""
    async def check() -> list[dict[str, Any]] | None:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute("SELECT body FROM event_journal WHERE type = 'config.changed' "
                                     "AND body->>'entity_id' = %s ORDER BY stream_seq", (server_id,))
            rows = [dict(r[0]) for r in await cur.fetchall()]
        return rows if len(rows) >= count else None

    return await eventually(check)


def _no_secret(answer: Any, *texts: str) -> None:
    text = json.dumps(answer)
    assert "headers_enc" not in text and SECRET not in text and SECRET.split()[1] not in text, text
    for t in texts:
        assert t not in text


# ---- create, list, get, patch, delete ----------------------------------------------------------

async def test_lifecycle(gateway: Gateway, admin: Admin, ws: str) -> None:
    body = _body(ws, headers={"Authorization": SECRET, "X-Team": "research"}, tools=TOOLS, timeout_s=20)
    created = await admin.ok("POST", M, body)
    sid = created["id"]
    assert sid.startswith("mcp_") and created["propagated"] is True
    assert isinstance(created["revision"], int) and created["revision"] == created["snapshot_revision"]
    assert _stored(created) == {"kind": "mcp", "id": sid, "workspace_id": ws, "name": body["name"], "url": UPSTREAM,
                                "headers": ["Authorization", "X-Team"], "tools": VIEW_TOOLS, "timeout_s": 20.0,
                                "payments": "pass"}

    # The KV entry the workers read and the Postgres row hold ciphertext, which decrypts to the value.
    stored = await _kv_server(gateway, sid)
    keyring = _keyring(gateway)
    assert keyring.decrypt(stored.headers_enc["Authorization"]).reveal() == SECRET
    assert stored.tools == {"web_search": McpTool(price_nanos=10_000_000), "delete_index": McpTool(allowed=False)}
    row = await _row_body(gateway, sid)
    assert row["headers_enc"]["Authorization"] == stored.headers_enc["Authorization"]
    assert keyring.decrypt(row["headers_enc"]["Authorization"]).reveal() == SECRET
    assert SECRET not in json.dumps(row) and SECRET.split()[1] not in json.dumps(row)
    cipher = stored.headers_enc["Authorization"]
    _no_secret(created, cipher)

    got = await admin.ok("GET", f"{M}/{sid}")
    assert got == _stored(created)
    listed = await admin.ok("GET", f"{M}?workspace_id={ws}")
    assert [s["id"] for s in listed["data"]] == [sid] and listed["data"][0] == got
    assert (await admin.ok("GET", f"{M}?workspace_id=nobody-{ws}"))["data"] == []
    _no_secret([got, listed], cipher)

    # PATCH without headers keeps them; tools are replaced whole.
    patched = await admin.ok("PATCH", f"{M}/{sid}", {"tools": {"web_search": {"price_usd": "0.5"}}, "timeout_s": 5,
                                                     "url": UPSTREAM + "/v2"})
    assert patched["revision"] > created["revision"]
    assert (patched["headers"], patched["timeout_s"], patched["url"]) == (["Authorization", "X-Team"], 5.0,
                                                                          UPSTREAM + "/v2")
    assert patched["tools"] == {"web_search": {"price_usd": "0.5", "price_nanos": 500_000_000, "allowed": True}}
    assert (await _kv_server(gateway, sid)).headers_enc == stored.headers_enc
    # Moving to another origin needs the headers anew: the stored credentials never follow the URL.
    await _refused(gateway, admin, "PATCH", f"{M}/{sid}", {"url": "http://127.0.0.1:10/mcp"}, 400, "headers",
                   "headers_required", "origin")
    moved = await admin.ok("PATCH", f"{M}/{sid}", {"url": "http://127.0.0.1:10/mcp", "headers": {"X-Key": "k2"}})
    assert moved["headers"] == ["X-Key"]
    _no_secret([patched, moved], cipher)

    # The workspace cannot be deleted under its server.
    await _refused(gateway, admin, "DELETE", f"{A}/workspaces/{ws}", None, 409, None, "still_referenced",
                   f"mcp {sid}")

    # No header value in any config row, outbox KV value or event in plaintext; the events (the
    # public view) hold no ciphertext either, only the header names.
    events = await _journalled(gateway, sid, 3)
    assert [e["op"] for e in events] == ["created", "updated", "updated"]
    assert events[0]["data"]["headers"] == ["Authorization", "X-Team"] and events[0]["entity"] == "mcp"
    assert events[0]["data"]["tools"] == VIEW_TOOLS
    state, event_text = await _config_text(gateway)
    assert cipher in state and SECRET not in state and SECRET.split()[1] not in state
    assert SECRET.split()[1] not in event_text and cipher not in event_text and "headers_enc" not in event_text

    deleted = await admin.ok("DELETE", f"{M}/{sid}")
    assert deleted["deleted"] is True and deleted["id"] == sid
    _no_secret(deleted, cipher)
    status, _, _ = await admin.call("GET", f"{M}/{sid}")
    assert status == 404
    status, err, _ = await admin.call("PATCH", f"{M}/{sid}", {"timeout_s": 9})
    assert status == 404 and err["error"]["code"] == "mcp_server_not_found"
    assert (await admin.ok("GET", f"{M}?workspace_id={ws}"))["data"] == []
    logs = "".join(p.read_text(errors="replace") for p in (gateway.stack.state_dir / "logs").glob("*.log"))
    assert SECRET.split()[1] not in logs


# ---- the workers' snapshot -----------------------------------------------------------------------

@contextlib.asynccontextmanager
async def _watching(gateway: Gateway) -> AsyncIterator[SnapshotStore]:
    """A SnapshotStore kept by the workers' own watcher on the stack's config bucket."""
    nc = await connect(gateway.nats_url, "alephant-tests")
    store = SnapshotStore()
    kv = await nc.jetstream().key_value(gateway.stack.child_env()["ALEPHANT_KV_BUCKET"])
    task = asyncio.create_task(SnapshotWatcher(kv, store).run())
    try:
        await asyncio.wait_for(store.ready.wait(), 15)
        yield store
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await nc.close()


async def _fleet_applied(admin: Admin, revision: int) -> None:
    async def check() -> bool | None:
        workers = (await admin.ok("GET", f"{A}/fleet"))["workers"]
        return True if workers and all(w["applied_revision"] >= revision for w in workers) else None

    await eventually(check)


async def test_the_worker_snapshot_follows_the_server(gateway: Gateway, admin: Admin, ws: str) -> None:
    async with _watching(gateway) as store:
        created = await admin.ok("POST", M, _body(ws, headers={"Authorization": SECRET}, tools=TOOLS))
        sid, name = created["id"], created["name"]

        async def indexed(key: tuple[str, str], revision: int) -> McpServer | None:
            snap = store.current
            return snap.mcp_servers.get(key) if snap.revision >= revision else None

        server = await eventually(lambda: indexed((ws, name), created["revision"]))
        assert server.id == sid and server.url == UPSTREAM and server.tool("web_search").price_nanos == 10_000_000
        assert not server.tool("delete_index").allowed and server.tool("anything").allowed
        assert _keyring(gateway).decrypt(server.headers_enc["Authorization"]).reveal() == SECRET

        renamed = await admin.ok("PATCH", f"{M}/{sid}", {"name": name + "-b", "timeout_s": 7})
        server = await eventually(lambda: indexed((ws, name + "-b"), renamed["revision"]))
        assert server.timeout_s == 7.0 and (ws, name) not in store.current.mcp_servers

        deleted = await admin.ok("DELETE", f"{M}/{sid}")

        async def applied(revision: int) -> bool | None:
            return True if store.current.revision >= revision else None

        await eventually(lambda: applied(deleted["revision"]))
        assert all(s.id != sid for s in store.current.mcp_servers.values())
    # The stack's own workers applied every revision, and decoded the entries (a bad one is logged).
    await _fleet_applied(admin, deleted["revision"])
    logs = "".join(p.read_text(errors="replace") for p in (gateway.stack.state_dir / "logs").glob("dataplane-*.log"))
    assert f"mcp.{sid}" not in logs


# ---- every refusal names its field and writes nothing -------------------------------------------

BAD: list[tuple[str, dict[str, Any], str | None, str | None, tuple[str, ...]]] = [
    # (case, change to the good body, param, code, words in the message)
    ("private-network", {"url": "http://10.0.0.1/mcp"}, "url", "base_url_not_allowed", ("'url'", "10.0.0.1")),
    ("metadata", {"url": "http://169.254.169.254/"}, "url", "base_url_not_allowed", ("169.254.169.254",)),
    ("metadata-name", {"url": "http://metadata.google.internal/mcp"}, "url", "base_url_not_allowed", ("metadata",)),
    ("credentials-in-url", {"url": "http://user:pw@127.0.0.1:9/mcp"}, "url", "invalid_base_url", ("credentials",)),
    ("not-http", {"url": "ftp://example.com/mcp"}, "url", "invalid_url", ("http://",)),
    ("name", {"name": "Has Space"}, "name", "invalid_name", ("lower-case",)),
    ("price-negative", {"tools": {"t": {"price_usd": "-0.01"}}}, "tools.t.price_usd", "invalid_amount",
     ("decimal",)),
    ("price-decimals", {"tools": {"t": {"price_usd": "0.0000000001"}}}, "tools.t.price_usd", "invalid_amount",
     ("9", "decimals")),
    ("price-float", {"tools": {"t": {"price_usd": "1e-2"}}}, "tools.t.price_usd", "invalid_amount", ()),
    ("tool-name", {"tools": {"x" * 129: {}}}, "tools", "invalid_tool_name", ("128",)),
    ("headers-many", {"headers": {f"X-H{i}": "v" for i in range(17)}}, "headers", "too_many_headers", ("16",)),
    ("header-name", {"headers": {"Bad Header": SECRET}}, "headers", "invalid_header_name", ("HTTP token",)),
    ("header-reserved", {"headers": {"Host": "evil.example"}}, "headers", "reserved_header", ("Host",)),
    ("header-crlf", {"headers": {"Authorization": SECRET + "\r\nX-Evil: 1"}}, "headers.Authorization",
     "invalid_characters", ("control characters",)),
    ("header-long", {"headers": {"Authorization": "x" * 4097}}, "headers.Authorization", "invalid_header_value",
     ("4096",)),
    ("timeout-low", {"timeout_s": 0}, "timeout_s", "invalid_timeout", ("between 1 and 300",)),
    ("timeout-high", {"timeout_s": 301}, "timeout_s", "invalid_timeout", ()),
]


@pytest.mark.parametrize("change, param, code, words", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
async def test_bad_input_is_refused(gateway: Gateway, admin: Admin, ws: str, change: dict[str, Any],
                                    param: str | None, code: str | None, words: tuple[str, ...]) -> None:
    err = await _refused(gateway, admin, "POST", M, _body(ws) | change, 400, param, code, *words)
    assert SECRET.split()[1] not in json.dumps(err)
    # The same change as a PATCH of a good server: refused the same way, the server unchanged.
    good = await admin.ok("POST", M, _body(ws))
    await _refused(gateway, admin, "PATCH", f"{M}/{good['id']}", change, 400, param, code, *words)
    assert await admin.ok("GET", f"{M}/{good['id']}") == _stored(good)


async def test_missing_fields_unknown_ones_and_workspace(gateway: Gateway, admin: Admin, ws: str) -> None:
    await _refused(gateway, admin, "POST", M, {"workspace_id": ws, "name": _name()}, 400, "url", None, "url")
    await _refused(gateway, admin, "POST", M, _body(ws) | {"command": "/bin/sh"}, 400, None, None,
                   "unknown field `command`")
    await _refused(gateway, admin, "POST", M, _body("nope-" + ws), 404, "workspace_id", "workspace_not_found")
    good = await admin.ok("POST", M, _body(ws))
    await _refused(gateway, admin, "PATCH", f"{M}/{good['id']}", {"workspace_id": "other"}, 400, None, None,
                   "unknown field `workspace_id`")
    await _refused(gateway, admin, "PATCH", f"{M}/{good['id']}", {}, 400, None, "empty_patch", "Nothing to change")


async def test_names_are_unique_in_a_workspace(gateway: Gateway, admin: Admin, ws: str) -> None:
    first = await admin.ok("POST", M, _body(ws))
    await _refused(gateway, admin, "POST", M, _body(ws, name=first["name"]), 409, "name", "name_taken",
                   f"'{first['name']}'", "unique in a workspace")
    second = await admin.ok("POST", M, _body(ws))
    await _refused(gateway, admin, "PATCH", f"{M}/{second['id']}", {"name": first["name"]}, 409, "name",
                   "name_taken")
    # Another workspace may use the name; re-saving a server with its own name is no conflict; a
    # deleted server's name is free again.
    other_ws = f"mcp{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": other_ws, "name": "Other"})
    await admin.ok("POST", M, _body(other_ws, name=first["name"]))
    await admin.ok("PATCH", f"{M}/{first['id']}", {"name": first["name"], "timeout_s": 3})
    await admin.ok("DELETE", f"{M}/{first['id']}")
    await admin.ok("PATCH", f"{M}/{second['id']}", {"name": first["name"]})


async def test_openapi_lists_the_routes(admin: Admin) -> None:
    doc = await admin.ok("GET", f"{A}/openapi.json")
    assert set(doc["paths"][M]) == {"post", "get"} and set(doc["paths"][M + "/{id}"]) == {"get", "patch", "delete"}
    assert "CreateMcpServer" in doc["components"]["schemas"]


# ---- CLI -----------------------------------------------------------------------------------------

async def test_cli(gateway: Gateway, admin: Admin, ws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _name()
    help_text = run_cli(gateway, "mcp-servers", "set", "--help").stdout
    for word in ("--url", "--header", "--header-env", "--tool", "NAME=PRICE_USD", "--deny-tool", "--timeout",
                 "--workspace", "/mcp/<name>"):
        assert word in help_text, word
    monkeypatch.setenv("MCP_CLI_TEST_AUTH", SECRET)

    async def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_cli, gateway, *argv)

    async def as_json(*argv: str) -> Any:
        return await asyncio.to_thread(cli_json, gateway, *argv)

    done = await cli("mcp-servers", "set", name, "-w", ws, "--url", UPSTREAM, "--header-env",
                     "Authorization=MCP_CLI_TEST_AUTH", "--header", "X-Team: research", "--tool", "web_search=0.01",
                     "--deny-tool", "delete_index", "--timeout", "20")
    created = json.loads(done.stdout)
    assert SECRET.split()[1] not in done.stdout + done.stderr and "snapshot revision" in done.stderr
    assert _stored(created) == {"kind": "mcp", "id": created["id"], "workspace_id": ws, "name": name,
                                "url": UPSTREAM, "headers": ["Authorization", "X-Team"], "tools": VIEW_TOOLS,
                                "timeout_s": 20.0, "payments": "pass"}
    stored = await _kv_server(gateway, created["id"])
    assert _keyring(gateway).decrypt(stored.headers_enc["Authorization"]).reveal() == SECRET

    listed = await as_json("mcp-servers", "list", "-w", ws)
    assert [s["name"] for s in listed["data"]] == [name]
    assert await as_json("mcp-servers", "get", name, "-w", ws) == _stored(created)
    assert await as_json("mcp-servers", "get", created["id"], "-w", ws) == _stored(created)

    # `set` on an existing server changes the flags given: tools merged, headers kept.
    updated = await as_json("mcp-servers", "set", name, "-w", ws, "--tool", "summarize=0.25", "--remove-tool",
                            "delete_index", "--wait")
    assert updated["tools"] == {"web_search": VIEW_TOOLS["web_search"],
                                "summarize": {"price_usd": "0.25", "price_nanos": 250_000_000, "allowed": True}}
    assert updated["headers"] == ["Authorization", "X-Team"] and updated["id"] == created["id"]
    assert (await _kv_server(gateway, created["id"])).headers_enc == stored.headers_enc

    # Refusals exit non-zero naming the problem.
    bad = await asyncio.to_thread(run_cli, gateway, "mcp-servers", "set", name, "-w", ws, "--tool", "t=-1",
                                  check=False)
    assert bad.returncode != 0 and "price_usd" in bad.stderr
    private = await asyncio.to_thread(run_cli, gateway, "mcp-servers", "set", _name(), "-w", ws, "--url",
                                      "http://10.0.0.1/mcp", check=False)
    assert private.returncode != 0 and "10.0.0.1" in private.stderr
    missing = await asyncio.to_thread(run_cli, gateway, "mcp-servers", "set", _name(), "-w", ws, check=False)
    assert missing.returncode != 0 and "--url" in missing.stderr
    unset = await asyncio.to_thread(run_cli, gateway, "mcp-servers", "set", name, "-w", ws, "--header-env",
                                    "Authorization=MCP_CLI_UNSET_VAR", check=False)
    assert unset.returncode != 0 and "MCP_CLI_UNSET_VAR" in unset.stderr

    assert (await as_json("mcp-servers", "delete", name, "-w", ws))["deleted"] is True
    gone = await asyncio.to_thread(run_cli, gateway, "mcp-servers", "get", name, "-w", ws, check=False)
    assert gone.returncode != 0 and "404" in gone.stderr
