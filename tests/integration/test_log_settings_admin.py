"""The log settings admin API and CLI on the real stack: a setting created, listed, read, patched and
deleted; one per (workspace, scope, scope id) (a second is 409 and writes nothing); a key-scoped
setting names a live key of its workspace; refused bodies name their field and write nothing; the
CLI round trip (`set` creates then changes, `get`/`delete` by --key). Then the body sweeper against
the stack's embedded S3: after `alephant bodies sweep`, only the objects past their workspace's
retention (or the 30-day default) are gone."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aioboto3
import pytest_asyncio
from botocore.exceptions import ClientError

from tests.conftest import AdminHttp as Admin
from tests.conftest import Gateway, cli_json, run_cli
from tests.integration.test_routers_admin import _refused

A = "/admin/v1"
_META = ("propagated", "revision", "snapshot_revision")


@dataclass(frozen=True)
class Ws:
    id: str
    key_id: str


async def _workspace(admin: Admin) -> Ws:
    ws_id = f"logs{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": ws_id, "name": "Logs"})
    key = await admin.ok("POST", f"{A}/virtual-keys", {"workspace_id": ws_id})
    return Ws(ws_id, key["id"])


@pytest_asyncio.fixture
async def ws(admin: Admin) -> Ws:
    return await _workspace(admin)


def _setting(ws: Ws, **extra: Any) -> dict[str, Any]:
    return {"workspace_id": ws.id, "scope": "workspace", "scope_id": ws.id} | extra


# ---- create, list, get, patch, delete -------------------------------------------------------------

async def test_log_settings_lifecycle(gateway: Gateway, admin: Admin, ws: Ws) -> None:
    created = await admin.ok("POST", f"{A}/log-settings", _setting(
        ws, bodies="both", redact_paths=["messages.*.content"], redact_patterns=[r"SSN-\d+"], retention_days=14))
    sid = created["id"]
    assert sid.startswith("logset_") and created["propagated"] is True and isinstance(created["revision"], int)
    assert {k: v for k, v in created.items() if k not in (*_META, "id")} == {
        "kind": "logsettings", "workspace_id": ws.id, "scope": "workspace", "scope_id": ws.id, "bodies": "both",
        "redact_paths": ["messages.*.content"], "redact_patterns": [r"SSN-\d+"], "retention_days": 14}
    shown = {k: v for k, v in created.items() if k not in _META}
    assert await admin.ok("GET", f"{A}/log-settings/{sid}") == shown
    assert (await admin.ok("GET", f"{A}/log-settings?workspace_id={ws.id}"))["data"] == [shown]

    # A second setting of the same scope: 409, and the first is untouched.
    error = await _refused(gateway, admin, "POST", f"{A}/log-settings", _setting(ws, bodies="request"), 409, None,
                           "already_exists", sid, "PATCH")
    assert ws.id in error["message"]

    patched = await admin.ok("PATCH", f"{A}/log-settings/{sid}", {"bodies": "request", "redact_patterns": [],
                                                                   "retention_days": 3})
    assert (patched["bodies"], patched["redact_paths"], patched["redact_patterns"], patched["retention_days"]) == (
        "request", ["messages.*.content"], [], 3)
    assert patched["revision"] > created["revision"]
    await _refused(gateway, admin, "PATCH", f"{A}/log-settings/{sid}", {"retention_days": 0}, 400, "retention_days",
                   "invalid_retention")
    await _refused(gateway, admin, "PATCH", f"{A}/log-settings/{sid}", {"scope": "key"}, 400, None, None, "`scope`")

    # The workspace is not deleted while its setting lives.
    await _refused(gateway, admin, "DELETE", f"{A}/workspaces/{ws.id}", None, 409, None, "still_referenced", sid)
    deleted = await admin.ok("DELETE", f"{A}/log-settings/{sid}")
    assert deleted["deleted"] is True and deleted["id"] == sid
    got, body, _ = await admin.call("GET", f"{A}/log-settings/{sid}")
    assert got == 404, body
    # Deleted, it may be created again (the same id).
    again = await admin.ok("POST", f"{A}/log-settings", _setting(ws))
    assert again["id"] == sid and again["bodies"] == "none" and again["retention_days"] == 30
    await admin.ok("DELETE", f"{A}/log-settings/{sid}")


async def test_key_scoped_settings_name_a_key_of_the_workspace(gateway: Gateway, admin: Admin, ws: Ws) -> None:
    key_setting = await admin.ok("POST", f"{A}/log-settings", _setting(ws, scope="key", scope_id=ws.key_id,
                                                                       bodies="request"))
    assert (key_setting["scope"], key_setting["scope_id"]) == ("key", ws.key_id)
    # The workspace's own setting is another one.
    ws_setting = await admin.ok("POST", f"{A}/log-settings", _setting(ws, bodies="both"))
    assert ws_setting["id"] != key_setting["id"]
    await _refused(gateway, admin, "POST", f"{A}/log-settings", _setting(ws, scope="key", scope_id=ws.key_id), 409,
                   None, "already_exists", ws.key_id)

    await _refused(gateway, admin, "POST", f"{A}/log-settings", _setting(ws, scope="key", scope_id="vk_nope"), 404,
                   "scope_id", "virtual_key_not_found", "vk_nope")
    other = await _workspace(admin)
    await _refused(gateway, admin, "POST", f"{A}/log-settings", _setting(ws, scope="key", scope_id=other.key_id),
                   400, "scope_id", "virtual_key_workspace_mismatch", ws.id)
    await _refused(gateway, admin, "POST", f"{A}/log-settings", {"workspace_id": "nows", "scope": "workspace",
                                                                  "scope_id": "nows"}, 404, "workspace_id",
                   "workspace_not_found")
    # A revoked key takes no new setting (its existing one stays, inert).
    await admin.ok("POST", f"{A}/virtual-keys/{other.key_id}/revoke", None, 200)
    await _refused(gateway, admin, "POST", f"{A}/log-settings", _setting(other, scope="key", scope_id=other.key_id),
                   404, "scope_id", "virtual_key_not_found")
    for sid in (key_setting["id"], ws_setting["id"]):
        await admin.ok("DELETE", f"{A}/log-settings/{sid}")


async def test_refused_bodies_write_nothing(gateway: Gateway, admin: Admin, ws: Ws) -> None:
    for extra, param, code in (
        ({"scope": "agent"}, "scope", "invalid_scope"),
        ({"scope_id": ws.key_id}, "scope_id", "scope_mismatch"),
        ({"bodies": "everything"}, "bodies", "invalid_bodies"),
        ({"redact_paths": ["a..b"]}, "redact_paths[0]", "invalid_redact_path"),
        ({"redact_paths": ["x"] * 33}, "redact_paths", "invalid_redact_path"),
        ({"redact_patterns": ["(unclosed"]}, "redact_patterns[0]", "invalid_redact_pattern"),
        ({"redact_patterns": ["x"] * 17}, "redact_patterns", "invalid_redact_pattern"),
        ({"retention_days": 3651}, "retention_days", "invalid_retention"),
    ):
        await _refused(gateway, admin, "POST", f"{A}/log-settings", _setting(ws, **extra), 400, param, code)
    assert (await admin.ok("GET", f"{A}/log-settings?workspace_id={ws.id}"))["data"] == []


async def test_cli_round_trip(gateway: Gateway, admin: Admin, ws: Ws) -> None:
    def cli(*args: str) -> Any:
        return cli_json(gateway, "log-settings", *args, "-w", ws.id)

    created = await asyncio.to_thread(cli, "set", "--bodies", "both", "--redact-path", "messages.*.content",
                                      "--redact-pattern", r"SSN-\d+", "--retention-days", "14")
    assert (created["bodies"], created["redact_paths"], created["redact_patterns"], created["retention_days"]) == (
        "both", ["messages.*.content"], [r"SSN-\d+"], 14)
    # `set` again changes only what it is given.
    changed = await asyncio.to_thread(cli, "set", "--retention-days", "7", "--no-redact-patterns")
    assert changed["id"] == created["id"]
    assert (changed["bodies"], changed["redact_paths"], changed["redact_patterns"], changed["retention_days"]) == (
        "both", ["messages.*.content"], [], 7)
    key_setting = await asyncio.to_thread(cli, "set", "--key", ws.key_id, "--bodies", "request")
    assert (key_setting["scope"], key_setting["scope_id"], key_setting["retention_days"]) == ("key", ws.key_id, 30)

    listed = await asyncio.to_thread(cli, "list")
    assert {s["id"] for s in listed["data"]} == {created["id"], key_setting["id"]}
    assert (await asyncio.to_thread(cli, "get", "--key", ws.key_id))["id"] == key_setting["id"]
    assert (await asyncio.to_thread(cli, "get"))["id"] == created["id"]
    assert (await asyncio.to_thread(cli_json, gateway, "log-settings", "get", created["id"]))["retention_days"] == 7

    refused = await asyncio.to_thread(run_cli, gateway, "log-settings", "set", "-w", ws.id, "--key", ws.key_id,
                                      "--redact-pattern", "(x", check=False)
    assert refused.returncode != 0 and "not a valid regular expression" in refused.stderr

    assert (await asyncio.to_thread(cli, "delete", "--key", ws.key_id))["deleted"] is True
    assert (await asyncio.to_thread(cli, "delete"))["deleted"] is True
    missing = await asyncio.to_thread(run_cli, gateway, "log-settings", "get", "-w", ws.id, check=False)
    assert missing.returncode != 0 and "no log setting" in missing.stderr


# ---- the sweeper against the embedded S3 ------------------------------------------------------------

@pytest_asyncio.fixture
async def s3(gateway: Gateway) -> AsyncIterator[tuple[Any, str]]:
    """An S3 client on the stack's embedded server and the bucket the stack archives to."""
    env = gateway.stack.child_env()
    session = aioboto3.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    bucket = env.get("ALEPHANT_S3_BUCKET", "alephant-events")
    async with session.client("s3", endpoint_url=env["ALEPHANT_S3_URL"]) as client:
        try:
            await client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        yield client, bucket


async def test_sweep_deletes_only_bodies_past_their_retention(gateway: Gateway, admin: Admin,
                                                              s3: tuple[Any, str]) -> None:
    client, bucket = s3
    short, default = await _workspace(admin), await _workspace(admin)
    await admin.ok("POST", f"{A}/log-settings", _setting(short, bodies="both", retention_days=3))
    # A key's retention does not apply: bodies are stored per workspace.
    await admin.ok("POST", f"{A}/log-settings", _setting(default, scope="key", scope_id=default.key_id,
                                                         retention_days=1))
    today = dt.datetime.now(dt.UTC).date()

    def key(ws: Ws, days: int, name: str) -> str:
        return f"bodies/{ws.id}/{today - dt.timedelta(days=days)}/{name}.json.gz"

    gone = [key(short, 4, "a"), key(short, 40, "b"), key(default, 31, "c"), key(default, 400, "d")]
    kept = [key(short, 0, "e"), key(short, 3, "f"), key(default, 2, "g"), key(default, 30, "h"),
            f"bodies/{short.id}/2001-01-01/deeper/i.json.gz", f"bodies/{short.id}/old/j.json.gz"]
    for k in gone + kept:
        await client.put_object(Bucket=bucket, Key=k, Body=b"{}", ContentType="application/gzip")

    result = await asyncio.to_thread(cli_json, gateway, "bodies", "sweep")
    assert result["deleted"] == len(gone) and result["failed"] == 0 and result["scanned"] >= len(gone + kept)
    listed: list[str] = []
    for ws in (short, default):
        resp = await client.list_objects_v2(Bucket=bucket, Prefix=f"bodies/{ws.id}/")
        listed += [o["Key"] for o in resp.get("Contents", [])]
    assert sorted(listed) == sorted(kept)
    # Idempotent: nothing more to delete.
    assert (await admin.ok("POST", f"{A}/bodies/sweep", None, 200))["deleted"] == 0
