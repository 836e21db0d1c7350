"""The worker's outbound HTTP session: every connection to a provider passes the SSRF policy.

Registration checks a base URL once (`controlplane.ssrf`); that does not stop a name that resolves
differently later (DNS rebinding) or a base URL rewritten in the config bucket. So the session's
connector applies `schemas.ssrf.AddressPolicy` again, at connect time, in two places:

* `GuardedResolver` wraps aiohttp's default resolver: a host name whose answer holds any refused
  address (or a local/metadata name) raises `AddressRefused`; nothing is connected. Its answers
  are cached by the connector (`ttl_dns_cache`), so the check runs per resolution, not per request.
* `guarded_socket` is the connector's `socket_factory`, called for every address a connection is
  opened to. aiohttp skips the resolver for literal IP hosts, so this is where `http://10.0.0.1`
  is refused; it also re-checks every resolved address. It runs per new connection (pooled
  connections are reused), never per request.

An allow-listed host NAME skips the checks (as at registration): the resolver vouches for the
addresses it returns, and the socket factory admits vouched addresses.

`AddressRefused` is an `OSError`, so aiohttp wraps it in a `ClientConnectorError` (DNS or
connect); `refused(exc)` finds it again for the 502 `upstream_address_refused`.

Redirects are never followed on this session (`allow_redirects=False` at every call site, see
`dataplane.providers.upstream.send`), so no 3xx can move a request, or the key, elsewhere.
"""

from __future__ import annotations

import errno
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from schemas.settings import Settings
from schemas.ssrf import AddressPolicy, IPAddress, is_local_name, parse_allow_list, parse_host_address

_MAX_VOUCHED = 4096  # addresses of allow-listed names; a bound, not a cache size that matters


class AddressRefused(OSError):
    """A connection to an address the SSRF policy refuses; no connection was made."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, reason)
        self.reason = reason


def refused(exc: BaseException) -> AddressRefused | None:
    """The `AddressRefused` behind an aiohttp client error (its `os_error` or cause chain), if any."""
    seen: BaseException | None = exc
    for _ in range(4):  # aiohttp wraps once; bounded so a cyclic chain cannot loop
        if seen is None:
            return None
        if isinstance(seen, AddressRefused):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__
    return None


class OutboundGuard:
    """The connect-time half of the SSRF policy: one per worker session. Not thread-safe (the
    event loop's thread only)."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._vouched: set[IPAddress] = set()

    def vouch(self, addr: IPAddress) -> None:
        if len(self._vouched) >= _MAX_VOUCHED:
            self._vouched.clear()
        self._vouched.add(addr)

    def check_address(self, addr: IPAddress, host: str, *, vouched_ok: bool = True) -> None:
        """Raise AddressRefused unless `addr` is allow-listed or public, or (with `vouched_ok`,
        for the socket factory, which does not know the host name) vouched for by an allow-listed
        name. The resolver passes `vouched_ok=False`: another name resolving to an allow-listed
        name's internal address is still refused."""
        if vouched_ok and addr in self._vouched:
            return
        problem = self.policy.refusal(addr)
        if problem is not None:
            shown = str(addr) if host == str(addr) else f"{host} ({addr})"
            raise AddressRefused(f"{shown} {problem}")

    def socket_factory(self, addr_info: aiohttp.AddrInfoType) -> socket.socket:
        """aiohttp's `socket_factory`: the connect-time check on the exact address dialled."""
        family, type_, proto, _, sockaddr = addr_info
        addr = parse_host_address(str(sockaddr[0]).partition("%")[0])
        if addr is None:
            raise AddressRefused(f"{sockaddr[0]} is not an IP address")
        self.check_address(addr, str(addr))
        return socket.socket(family=family, type=type_, proto=proto)


class GuardedResolver(AbstractResolver):
    """A resolver that refuses host names resolving to addresses the policy refuses.

    `inner` does the lookup (aiohttp's default resolver; tests inject a scripted one). Every
    address of the answer must pass, else AddressRefused for the whole name: a mixed answer is
    what a rebinding attack looks like."""

    def __init__(self, guard: OutboundGuard, inner: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        guard = self._guard
        if guard.policy.host_allowed(host):
            answers = await self._inner.resolve(host, port, family)
            for answer in answers:
                addr = parse_host_address(answer["host"].partition("%")[0])
                if addr is not None:
                    guard.vouch(addr)
            return answers
        name = host.lower().rstrip(".")
        if is_local_name(name):
            raise AddressRefused(f"{name} is a local or cloud metadata name")
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            addr = parse_host_address(answer["host"].partition("%")[0])
            if addr is None:
                raise AddressRefused(f"{name} resolved to an unreadable address")
            guard.check_address(addr, name, vouched_ok=False)
        return answers

    async def close(self) -> None:
        await self._inner.close()


def make_session(settings: Settings, resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """The worker's one upstream session, its connector guarded by `ALEPHANT_SSRF_ALLOW`.

    `resolver` replaces the system lookup under the guard (tests: DNS rebinding). No proxy from
    the environment (`trust_env=False`): a proxy would dial on our behalf, past the guard. The
    caller closes the session."""
    guard = OutboundGuard(AddressPolicy(parse_allow_list(settings.ssrf_allow)))
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300,
        resolver=GuardedResolver(guard, resolver), socket_factory=guard.socket_factory,
    )
    # Providers may compress answers; adapters parse and relay the decoded bytes.
    return aiohttp.ClientSession(connector=connector, trust_env=False)
