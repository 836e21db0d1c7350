"""dataplane/outbound.py and upstream.send: connect-time SSRF checks (DNS rebinding, literal
addresses, local names) and no redirect followed by any adapter. Real sockets on loopback
(127.0.0.1 is allow-listed; 127.0.0.2 is not), a scripted resolver for DNS."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from dataplane.outbound import AddressRefused, OutboundGuard, make_session, refused
from dataplane.providers.base import CallStats, UpstreamCall
from dataplane.providers.registry import adapter_for
from dataplane.providers.upstream import send
from schemas.entities import Provider
from schemas.errors import UpstreamError
from schemas.settings import Secret, Settings
from schemas.ssrf import AddressPolicy, check_base_url
from tests.fakes.hostile_upstream import Act, HostileUpstream, RebindingResolver, Trap

KEY = "sk-operator-secret-0123456789"


@pytest.fixture
async def trap2() -> AsyncIterator[Trap]:
    """A listener on 127.0.0.2: loopback, NOT allow-listed. Whatever reaches it is a failure."""
    async with Trap(host="127.0.0.2") as trap:
        yield trap


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    async with Trap() as trap:
        yield trap


def guarded(resolver: RebindingResolver | None = None, allow: str = "127.0.0.1") -> aiohttp.ClientSession:
    return make_session(Settings(ssrf_allow=allow), resolver=resolver)


async def get(session: aiohttp.ClientSession, url: str) -> int:
    resp = await send(session, "p", "GET", url, None, {"authorization": f"Bearer {KEY}"}, 5)
    resp.release()
    return resp.status


async def refused_code(session: aiohttp.ClientSession, url: str) -> str:
    with pytest.raises(UpstreamError) as info:
        await get(session, url)
    assert info.value.status == 502
    assert "127.0.0.2" not in info.value.message and "10.0.0.1" not in info.value.message  # only in the log
    return info.value.code


# -- the guard itself ---------------------------------------------------------------------------


def test_guard_refuses_internal_addresses_unless_allowed_or_vouched() -> None:
    guard = OutboundGuard(AddressPolicy(("127.0.0.1", "10.1.0.0/16")))
    guard.check_address(ipaddress.ip_address("93.184.216.34"), "example.com")
    guard.check_address(ipaddress.ip_address("127.0.0.1"), "127.0.0.1")
    guard.check_address(ipaddress.ip_address("10.1.2.3"), "10.1.2.3")
    for bad in ("127.0.0.2", "10.0.0.1", "169.254.169.254", "::ffff:10.0.0.1", "fd00::1", "0.0.0.0"):
        with pytest.raises(AddressRefused):
            guard.check_address(ipaddress.ip_address(bad), bad)
    guard.vouch(ipaddress.ip_address("10.0.0.1"))
    guard.check_address(ipaddress.ip_address("10.0.0.1"), "10.0.0.1")


def test_refused_is_found_behind_aiohttp_wrappers() -> None:
    inner = AddressRefused("10.0.0.1 is a private address")
    key: Any = None
    assert refused(aiohttp.ClientConnectorError(key, inner)) is inner
    wrapped = aiohttp.ClientError("x")
    wrapped.__cause__ = inner
    assert refused(wrapped) is inner
    assert refused(aiohttp.ClientConnectorError(key, OSError(111, "refused"))) is None


# -- connect time, over real sockets ------------------------------------------------------------


async def test_dns_rebinding_is_refused_at_connect_time(trap2: Trap) -> None:
    dns = RebindingResolver({"api.provider.example": ["93.184.216.34"]})
    url = f"http://api.provider.example:{trap2.port}/v1/models"
    check_base_url(url, (), resolve=lambda h: dns.table[h])  # registration: a public address, accepted
    dns.table["api.provider.example"] = ["127.0.0.2"]  # ... and later the name points inside
    async with guarded(dns) as session:
        assert await refused_code(session, url) == "upstream_address_refused"
        dns.table["api.provider.example"] = ["93.184.216.34", "10.0.0.1"]  # a mixed answer: refused as a whole
        session.connector._cached_hosts.clear()  # type: ignore[union-attr]  # a new resolution, as after the TTL
        assert await refused_code(session, url) == "upstream_address_refused"
    assert trap2.requests == [] and dns.lookups["api.provider.example"] == 2


async def test_an_allow_listed_name_does_not_vouch_for_other_names(trap2: Trap) -> None:
    """`llm.internal` is allow-listed and resolves to 127.0.0.2; `other.example` rebinding to the
    same internal address is still refused, before and after the allowed name was used."""
    dns = RebindingResolver({"llm.internal": ["127.0.0.2"], "other.example": ["127.0.0.2"]})
    async with guarded(dns, allow="127.0.0.1,llm.internal") as session:
        async with session.get(f"http://llm.internal:{trap2.port}/v1/models", allow_redirects=False) as resp:
            assert resp.status < 500  # allowed: it reached the listener
        assert await refused_code(session, f"http://other.example:{trap2.port}/v1/models") \
            == "upstream_address_refused"
    assert len(trap2.requests) == 1


async def test_literal_and_legacy_addresses_are_refused_without_a_connection(trap2: Trap) -> None:
    async with guarded() as session:
        assert await refused_code(session, f"http://127.0.0.2:{trap2.port}/x") == "upstream_address_refused"
        # inet_aton spelling of 127.0.0.2: either refused by aiohttp itself or by the guard after lookup
        with pytest.raises(UpstreamError):
            await get(session, f"http://2130706434:{trap2.port}/x")
        assert await refused_code(session, f"http://[::ffff:127.0.0.2]:{trap2.port}/x") == "upstream_address_refused"
    assert trap2.requests == []


async def test_local_names_are_refused_unless_listed(trap: Trap) -> None:
    async with guarded(allow="") as session:
        assert await refused_code(session, f"http://localhost:{trap.port}/x") == "upstream_address_refused"
        assert await refused_code(session, f"http://127.0.0.1:{trap.port}/x") == "upstream_address_refused"
    assert trap.requests == []
    async with guarded(allow="localhost") as session:
        assert await get(session, f"http://localhost:{trap.port}/x") == 200
    assert len(trap.requests) == 1


async def test_allowed_addresses_and_names_connect(trap: Trap, trap2: Trap) -> None:
    dns = RebindingResolver({"fake.internal": ["127.0.0.1"], "ollama.lan": ["127.0.0.2"]})
    async with guarded(dns, allow="127.0.0.1,ollama.lan") as session:
        assert await get(session, f"http://fake.internal:{trap.port}/a") == 200  # allowed address
        assert await get(session, f"http://ollama.lan:{trap2.port}/b") == 200  # allowed name, any address
        assert await get(session, f"http://127.0.0.1:{trap.port}/c") == 200
    assert [r.path for r in trap.requests] == ["/a", "/c"] and [r.path for r in trap2.requests] == ["/b"]


# -- no adapter follows a redirect --------------------------------------------------------------


def _call(session: aiohttp.ClientSession, kind: str, base_url: str, **options: str) -> UpstreamCall:
    provider = Provider(id="p", workspace_id="w", name="p", type=kind, base_url=base_url,  # type: ignore[arg-type]
                        options=options)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    return UpstreamCall(provider=provider, model="m", body=body, api_key=Secret(KEY), session=session, timeout_s=5)


ADAPTERS: list[tuple[str, Callable[[str], str], dict[str, str]]] = [
    ("openai", lambda u: u + "/v1", {}),
    ("groq", lambda u: u + "/openai/v1", {}),
    ("azure", lambda u: u, {}),
    ("azure", lambda u: u, {"api": "v1"}),
    ("anthropic", lambda u: u, {}),
    ("gemini", lambda u: u, {}),
    ("ollama", lambda u: u, {}),
    ("bedrock", lambda u: u, {"auth": "bearer"}),
]


@pytest.mark.parametrize(("kind", "base", "options"), ADAPTERS, ids=[f"{k}{o}" for k, _, o in ADAPTERS])
@pytest.mark.parametrize("stream", [False, True])
async def test_no_adapter_follows_a_redirect(kind: str, base: Callable[[str], str], options: dict[str, str],
                                             stream: bool, trap: Trap) -> None:
    async with HostileUpstream(script=Act.REDIRECT, redirect_to=trap.base_url + "/stolen") as hostile, \
            guarded() as session:
        adapter = adapter_for(kind)
        call = _call(session, kind, base(hostile.base_url), **options)
        with pytest.raises(UpstreamError) as info:
            if stream:
                async for _ in adapter.stream(call, CallStats()):
                    pass
            else:
                await adapter.complete(call)
        assert info.value.code == "upstream_redirect" and info.value.status == 502
        assert trap.base_url not in info.value.message
        assert len(hostile.requests) == 1
    assert trap.requests == [] and trap.keys_seen == []
