"""Provider keys and master-key resolution, end to end: which upstream credential a call uses
(the fake records the last 4 characters of the key it received) and what the event records."""

from __future__ import annotations

import secrets

import aiohttp

from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.upstream import FakeUpstream

A = "/admin/v1"


def _ws(gateway: Gateway, fake: FakeUpstream, with_inline_key: bool) -> tuple[str, str, str]:
    """A fresh workspace with an OpenAI-type provider `up` at the fake and a virtual key:
    (workspace, key plaintext, key id)."""
    ws = f"pk{secrets.token_hex(4)}"
    gateway.admin.call("POST", f"{A}/workspaces", {"id": ws, "name": "Provider keys"})
    provider = {"workspace_id": ws, "name": "up", "type": "openai", "base_url": fake.base_url}
    if with_inline_key:
        provider["api_key"] = "sk-inline-key-0001"
    gateway.admin.call("POST", f"{A}/providers", provider)
    created = gateway.admin.call("POST", f"{A}/virtual-keys", {"workspace_id": ws})
    return ws, created["key"], created["id"]


async def _call(http: aiohttp.ClientSession, gateway: Gateway, key: str) -> str:
    """The request id of one successful call."""
    rid = f"req-pk-{secrets.token_hex(6)}"
    async with http.post(f"{gateway.base_url}/chat/completions",
                         json={"model": "up/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                         headers={"Authorization": f"Bearer {key}", "Alephant-Request-Id": rid}) as resp:
        assert resp.status == 200, await resp.text()
    return rid


async def test_master_byo_and_key_level_choice(gateway: Gateway, http: aiohttp.ClientSession,
                                               fake_upstream: FakeUpstream) -> None:
    ws, key, vk_id = _ws(gateway, fake_upstream, with_inline_key=False)
    master = gateway.admin.call("POST", f"{A}/provider-keys", {"provider": "openai", "api_key": "sk-master-key-m001",
                                                                "name": "operator openai"})
    assert master["workspace_id"] == "_operator" and master["has_api_key"] and "api_key" not in master

    try:
        async def hint_of_next_call() -> tuple[str, dict[str, object]]:
            fake_upstream.requests.clear()
            rid = await _call(http, gateway, key)
            event = await eventually(lambda: journal_event(gateway.database_url, rid))
            return fake_upstream.requests[-1].api_key_hint, event

        # No key of its own: the operator's master key serves the workspace.
        async def served_by(hint: str) -> dict[str, object] | None:
            seen, event = await hint_of_next_call()
            return event if seen == hint else None

        event = await eventually(lambda: served_by("m001"))
        assert (event["provider_key_id"], event["provider_key_source"]) == (master["id"], "operator")
        # A BYO key of the workspace overrides it.
        byo = gateway.admin.call("POST", f"{A}/provider-keys", {"workspace_id": ws, "provider": "up",
                                                                 "api_key": "sk-workspace-key-b002"})
        event = await eventually(lambda: served_by("b002"))
        assert (event["provider_key_id"], event["provider_key_source"]) == (byo["id"], "workspace")
        # The virtual key's own choice overrides both (here: the master key again).
        gateway.admin.call("PATCH", f"{A}/virtual-keys/{vk_id}", {"provider_keys": {"up": master["id"]}})
        event = await eventually(lambda: served_by("m001"))
        assert (event["provider_key_id"], event["provider_key_source"]) == (master["id"], "key")
        # No secret anywhere in what was recorded.
        assert "sk-master" not in str(event) and "sk-workspace" not in str(event)
    finally:  # a master key serves every workspace: never leave it to other tests
        gateway.admin.call("DELETE", f"{A}/provider-keys/{master['id']}")


async def test_the_inline_key_serves_until_a_byo_key_exists(gateway: Gateway, http: aiohttp.ClientSession,
                                                             fake_upstream: FakeUpstream) -> None:
    ws, key, _ = _ws(gateway, fake_upstream, with_inline_key=True)
    fake_upstream.requests.clear()
    rid = await _call(http, gateway, key)
    assert fake_upstream.requests[-1].api_key_hint == "0001"
    event = await eventually(lambda: journal_event(gateway.database_url, rid))
    assert (event["provider_key_id"], event["provider_key_source"]) == (f"{ws}.up", "workspace")


async def test_provider_key_input_is_checked(gateway: Gateway) -> None:
    status, data = gateway.admin.request("POST", f"{A}/provider-keys", {"provider": "nosuchtype", "api_key": "k"})
    assert status == 400 and data["error"]["code"] == "unknown_provider_type"
    status, data = gateway.admin.request("POST", f"{A}/provider-keys", {"workspace_id": "demo", "provider": "nope",
                                                                        "api_key": "k"})
    assert status == 404 and data["error"]["param"] == "provider"
    status, data = gateway.admin.request("POST", f"{A}/virtual-keys",
                                         {"workspace_id": "demo", "provider_keys": {"mock": "pkey_missing"}})
    assert status == 404 and data["error"]["param"] == "provider_keys.mock"
