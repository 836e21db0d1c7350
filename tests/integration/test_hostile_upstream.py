"""A hostile provider against the real stack (issue 7, "Why" 6 and 7; RELIABILITY.md rows 22 and 24).

The provider is `tests/fakes/hostile_upstream.py`, registered like any OpenAI- or Anthropic-type
provider. Asserted on the raw bytes the client receives (status line aside: every header and the
body): no redirect is followed, the provider key never comes back, refused addresses are refused
at connect time (a base URL rewritten in the config bucket, as someone with bucket access could),
passthrough abuse is refused and never forwarded, and the ledger keeps journalling afterwards.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest
import pytest_asyncio

from events.jetstream import role_inbox
from schemas.entities import Provider, entity_decoder, entity_encoder, kv_key
from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.hostile_upstream import Act, HostileUpstream, Trap

TAG = uuid.uuid4().hex[:6]
KEY = f"sk-hostile-operator-{TAG}-0123456789"
OAI, ANT = f"hostile-{TAG}", f"hostile-ant-{TAG}"


def origin(gateway: Gateway) -> str:
    return gateway.base_url.removesuffix("/v1")


def auth(gateway: Gateway, request_id: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {gateway.demo_key}", **extra}
    if request_id:
        headers["Alephant-Request-Id"] = request_id
    return headers


async def raw_exchange(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, bytes]:
    """Status and everything the client got, raw: header names and values as bytes, then the body."""
    async with http.request(method, url, allow_redirects=False, **kwargs) as resp:
        body = await resp.read()
        head = b"\r\n".join(k + b": " + v for k, v in resp.raw_headers)
        return resp.status, head + b"\r\n\r\n" + body


def error_code(raw: bytes) -> str:
    """The OpenAI-shaped error's `code`; Anthropic's shape has none, so `anthropic:<message>`."""
    error = json.loads(raw.partition(b"\r\n\r\n")[2])["error"]
    return str(error.get("code") or f"anthropic:{error.get('message', '')}")


@pytest_asyncio.fixture(scope="module")
async def hostile() -> AsyncIterator[HostileUpstream]:
    async with HostileUpstream() as fake:
        yield fake


@pytest_asyncio.fixture(scope="module")
async def trap() -> AsyncIterator[Trap]:
    async with Trap() as listener:
        yield listener


@pytest_asyncio.fixture(scope="module")
async def trap2() -> AsyncIterator[Trap]:
    """On 127.0.0.2: loopback but not in the stack's ALEPHANT_SSRF_ALLOW (127.0.0.1, ::1, localhost)."""
    async with Trap(host="127.0.0.2") as listener:
        yield listener


@pytest_asyncio.fixture(scope="module")
async def registered(gateway: Gateway, hostile: HostileUpstream) -> AsyncIterator[None]:
    for name, kind, base in ((OAI, "openai", hostile.base_url + "/v1"), (ANT, "anthropic", hostile.base_url)):
        gateway.admin.call("POST", "/admin/v1/providers", {"workspace_id": "demo", "name": name, "type": kind,
                                                           "base_url": base, "api_key": KEY})
    async with aiohttp.ClientSession() as http:
        async def known() -> bool | None:
            hostile.script = Act.OK
            async with http.get(f"{origin(gateway)}/{OAI}/v1/models", headers=auth(gateway)) as resp:
                return True if resp.headers.get("Alephant-Provider") == OAI else None
        await eventually(known)
    yield


@pytest.fixture
def fresh(hostile: HostileUpstream, trap: Trap, trap2: Trap, registered: None) -> HostileUpstream:
    hostile.clear()
    trap.requests.clear()
    trap2.requests.clear()
    hostile.script, hostile.octet_streamed = Act.OK, False
    return hostile


CHAT = {"model": f"{OAI}/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_redirects_are_never_followed(gateway: Gateway, http: aiohttp.ClientSession, fresh: HostileUpstream,
                                            trap: Trap) -> None:
    fresh.script, fresh.redirect_to = Act.REDIRECT, trap.base_url + "/stolen"
    base = origin(gateway)
    calls = [
        ("POST", f"{gateway.base_url}/chat/completions", CHAT),
        ("POST", f"{gateway.base_url}/chat/completions", {**CHAT, "stream": True}),
        ("POST", f"{gateway.base_url}/responses", {"model": f"{OAI}/gpt-4o-mini", "input": "hi"}),
        ("POST", f"{gateway.base_url}/messages", {"model": f"{ANT}/claude-x", "max_tokens": 5,
                                                  "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", f"{base}/{OAI}/v1/chat/completions", {"model": "gpt-4o-mini"}),
        ("GET", f"{base}/{OAI}/v1/models", None),
    ]
    for method, url, body in calls:
        status, raw = await raw_exchange(http, method, url, json=body, headers=auth(gateway))
        code = error_code(raw)
        assert status == 502 and (code == "upstream_redirect" or "redirect" in code), (url, raw[-300:])
        assert b"Location:" not in raw and trap.base_url.encode() not in raw and KEY.encode() not in raw
    assert len(fresh.requests) == len(calls)  # each call reached the provider once...
    assert trap.requests == [] and trap.keys_seen == []  # ... and nothing reached the redirect target
    # A redirect to the cloud metadata address is the same: a 502, nothing dialled.
    fresh.redirect_to = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    status, raw = await raw_exchange(http, "POST", f"{gateway.base_url}/chat/completions", json=CHAT,
                                     headers=auth(gateway))
    assert status == 502 and error_code(raw) == "upstream_redirect"


@pytest.mark.parametrize(("act", "streamed", "route"), [
    (Act.ECHO_HEADER, False, "passthrough"),
    (Act.ECHO_OCTET, False, "passthrough"),
    (Act.ECHO_OCTET, True, "passthrough"),
    (Act.ECHO_SSE_SPLIT, True, "passthrough"),
    (Act.ECHO_SSE_SPLIT, True, "chat"),
    (Act.ECHO_HEADER, False, "chat"),
])
async def test_the_key_never_reaches_the_client(gateway: Gateway, http: aiohttp.ClientSession,
                                                fresh: HostileUpstream, act: Act, streamed: bool, route: str) -> None:
    fresh.script, fresh.octet_streamed = act, streamed
    if route == "passthrough":
        url, body = f"{origin(gateway)}/{OAI}/v1/chat/completions", {"model": "gpt-4o-mini", "stream": streamed}
    else:
        url, body = f"{gateway.base_url}/chat/completions", {**CHAT, "stream": streamed}
    status, raw = await raw_exchange(http, "POST", url, json=body, headers=auth(gateway))
    assert status == 200, raw[-300:]
    assert fresh.keys_seen == [KEY]  # the provider had the key and echoed it...
    assert KEY.encode() not in raw  # ... and not one byte sequence of it came back
    assert KEY[: len(KEY) // 2].encode() not in raw or b"***" in raw


async def test_passthrough_abuse_is_refused_and_never_forwarded(gateway: Gateway, http: aiohttp.ClientSession,
                                                                fresh: HostileUpstream) -> None:
    base = f"{origin(gateway)}/{OAI}"
    for method, path in (("DELETE", "/v1/files/file-x"), ("GET", "/v1/organization/users"),
                         ("TRACE", "/v1/chat/completions"), ("PROPFIND", "/v1/models"),
                         ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/batches")):
        request_id = f"req-abuse-{uuid.uuid4().hex[:8]}"
        status, raw = await raw_exchange(http, method, base + path, headers=auth(gateway, request_id))
        assert status == 403 and error_code(raw) == "passthrough_not_allowed", (method, path, raw[-300:])
        assert method.encode() in raw
        event = await eventually(lambda rid=request_id: journal_event(gateway.database_url, rid))  # type: ignore[misc]
        assert (event["status"], event["error_code"], event["cost_nanos"]) == (403, "passthrough_not_allowed", 0)
    assert fresh.requests == []  # nothing at all reached the provider
    status, _ = await raw_exchange(http, "POST", base + "/v1/chat/completions", json={"model": "gpt-4o-mini"},
                                   headers={**auth(gateway), "OpenAI-Organization": "org-not-yours"})
    assert status == 200
    assert len(fresh.requests) == 1 and "openai-organization" not in fresh.requests[0].headers


async def _rewrite_base_url(gateway: Gateway, provider_id: str, base_url: str) -> None:
    """What someone with write access to the config bucket can do (the control plane's role here)."""
    nc = await nats.connect(gateway.stack.nats_url("controlplane"), inbox_prefix=role_inbox("controlplane"),
                            allow_reconnect=False)
    try:
        kv = await nc.jetstream(timeout=5).key_value(gateway.stack.child_env()["ALEPHANT_KV_BUCKET"])
        entity = entity_decoder.decode((await kv.get(f"provider.{provider_id}")).value or b"")
        assert isinstance(entity, Provider) and entity.id == provider_id
        forged = Provider(**{**{f: getattr(entity, f) for f in entity.__struct_fields__}, "base_url": base_url})
        await kv.put(kv_key(forged), entity_encoder.encode(forged))
    finally:
        await nc.close()


async def test_refused_addresses_are_refused_at_connect_time(gateway: Gateway, http: aiohttp.ClientSession,
                                                             fresh: HostileUpstream, trap2: Trap) -> None:
    name = f"hostile-rw-{TAG}"
    created = gateway.admin.call("POST", "/admin/v1/providers", {"workspace_id": "demo", "name": name,
                                                                 "type": "openai", "base_url": fresh.base_url + "/v1",
                                                                 "api_key": KEY})
    for target in (f"http://127.0.0.2:{trap2.port}/v1", f"http://[::ffff:127.0.0.2]:{trap2.port}/v1",
                   "http://169.254.169.254/v1", f"http://10.0.0.1:{trap2.port}/v1"):
        await _rewrite_base_url(gateway, created["id"], target)

        async def refused(t: str = target) -> bytes | None:
            status, raw = await raw_exchange(http, "POST", f"{gateway.base_url}/chat/completions",
                                             json={**CHAT, "model": f"{name}/gpt-4o-mini"}, headers=auth(gateway))
            return raw if status == 502 and error_code(raw) == "upstream_address_refused" else None

        raw = await eventually(refused)
        assert b"127.0.0.2" not in raw and b"10.0.0.1" not in raw  # the address is for the operator's log
        status, raw = await raw_exchange(http, "GET", f"{origin(gateway)}/{name}/v1/models", headers=auth(gateway))
        assert status == 502 and error_code(raw) == "upstream_address_refused"
    assert trap2.requests == [] and trap2.keys_seen == []


async def test_the_ledger_keeps_advancing(gateway: Gateway, http: aiohttp.ClientSession,
                                          fresh: HostileUpstream) -> None:
    absurd = f"req-absurd-{uuid.uuid4().hex[:8]}"
    fresh.script = Act.ABSURD_USAGE
    status, _ = await raw_exchange(http, "POST", f"{gateway.base_url}/chat/completions", json=CHAT,
                                   headers=auth(gateway, absurd))
    assert status in (200, 502)  # clamped and flagged, or refused: either way the books keep going
    fresh.script = Act.OK
    after = f"req-after-{uuid.uuid4().hex[:8]}"
    status, _ = await raw_exchange(http, "POST", f"{gateway.base_url}/chat/completions", json=CHAT,
                                   headers=auth(gateway, after))
    assert status == 200
    event = await eventually(lambda: journal_event(gateway.database_url, after), timeout=20)
    assert event["usage"]["input_tokens"] == 5 and event["status"] == 200
    absurd_event = await eventually(lambda: journal_event(gateway.database_url, absurd), timeout=20)
    assert absurd_event["usage"]["input_tokens"] < 2**63
    print(f"absurd usage journalled as {absurd_event['usage']} anomalies={absurd_event.get('anomalies')}")
