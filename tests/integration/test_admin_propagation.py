"""The config path during a NATS outage, on a DEDICATED stack (NATS is SIGSTOPped, so no other
suite may share it): a committed change answers 202 `propagated: false` instead of a 500, and it
is live on the worker a few seconds after NATS returns (issue 7, "Why" 5)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from deploy.stack import AdminClient, Stack
from tests.conftest import dedicated_stack, wait_until_true


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with dedicated_stack(tmp_path_factory.mktemp("nats-down"), {"ALEPHANT_ADMIN_PROPAGATION_WAIT_S": "1"}) as s:
        yield s


async def _call(http: aiohttp.ClientSession, stack: Stack, key: str) -> int:
    async with http.post(f"{stack.origin}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        await resp.read()
        return resp.status


def _timed(admin: AdminClient, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
    started = time.monotonic()
    status, data = admin.request(method, path, body)
    return status, data, time.monotonic() - started


async def test_create_and_revoke_during_a_nats_outage_answer_202_and_apply_after_it(
        stack: Stack, http: aiohttp.ClientSession) -> None:
    admin = stack.admin()
    status, old, _ = _timed(admin, "POST", "/admin/v1/virtual-keys", {"workspace_id": "demo", "name": "old"})
    assert status == 201 and old["propagated"] is True and old["snapshot_revision"] > 0
    await wait_until_true(lambda: _ok(http, stack, old["key"]), timeout=10)

    nats = stack.services["nats"]
    nats.pause()
    try:
        c_status, created, c_took = _timed(admin, "POST", "/admin/v1/virtual-keys",
                                           {"workspace_id": "demo", "name": f"during-{secrets.token_hex(3)}"})
        r_status, revoked, r_took = _timed(admin, "POST", f"/admin/v1/virtual-keys/{old['id']}/revoke")
        # Committed, so visible to the admin API at once, although no worker knows yet.
        listed = {k["id"] for k in admin.call("GET", "/admin/v1/virtual-keys?workspace_id=demo")["data"]}
        # Under the default `serve` policy a worker keeps its last snapshot: the revoked key still works.
        during_outage = await _call(http, stack, old["key"])
    finally:
        nats.resume()
    resumed = time.monotonic()
    print(f"NATS paused: create -> {c_status} in {c_took:.2f}s, revoke -> {r_status} in {r_took:.2f}s; "
          f"revoked key during the outage -> {during_outage}")
    assert (c_status, created["propagated"], created["snapshot_revision"]) == (202, False, None)
    assert created["key"].startswith("sk-alph-")
    assert (r_status, revoked["propagated"], revoked["revoked"]) == (202, False, True)
    assert c_took < 10 and r_took < 10  # bounded by the propagation wait, not by NATS
    assert created["id"] in listed and old["id"] not in listed

    await wait_until_true(lambda: _ok(http, stack, created["key"]), timeout=15)
    await wait_until_true(lambda: _refused(http, stack, old["key"]), timeout=15)
    print(f"after NATS resumed: both changes live on the worker in {time.monotonic() - resumed:.2f}s")
    # Nothing stays queued: the next change propagates at once again.
    status, again, _ = _timed(admin, "POST", "/admin/v1/virtual-keys", {"workspace_id": "demo", "name": "after"})
    assert status == 201 and again["propagated"] is True


async def _ok(http: aiohttp.ClientSession, stack: Stack, key: str) -> bool:
    return await _call(http, stack, key) == 200


async def _refused(http: aiohttp.ClientSession, stack: Stack, key: str) -> bool:
    return await _call(http, stack, key) == 401


async def test_idempotent_retry_of_a_202_create_returns_the_same_key(
        stack: Stack, http: aiohttp.ClientSession) -> None:
    """A client that retries a create made during the outage gets the first key back, not a second one."""
    admin = stack.admin()
    body = {"workspace_id": "demo", "name": f"retried-{secrets.token_hex(3)}"}
    headers = {"Authorization": f"Bearer {stack.demo['ALEPHANT_ADMIN_TOKEN']}",
               "Idempotency-Key": f"idem-{secrets.token_hex(8)}"}

    async def post() -> tuple[int, Any]:
        async with http.post(f"{stack.admin_url}/admin/v1/virtual-keys", json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    stack.services["nats"].pause()
    try:
        first = await post()
    finally:
        stack.services["nats"].resume()
    second = await post()
    assert first[0] == 202 and first[1]["propagated"] is False
    assert second == first  # the first outcome, one-time key included, although NATS is back
    keys = admin.call("GET", "/admin/v1/virtual-keys?workspace_id=demo")["data"]
    assert [k["id"] for k in keys if k["name"] == body["name"]] == [first[1]["id"]]
    await wait_until_true(lambda: _ok(http, stack, first[1]["key"]), timeout=15)
