"""SSRF policy for provider addresses (RELIABILITY.md, Security): pure, shared by both planes.

`check_base_url` is pure: it parses the URL, classifies the host and every address the given
`resolve` function returns for it, and raises `InvalidRequest(param="base_url")` when the URL
could reach something internal:

* a scheme other than http/https, credentials in the URL, a malformed host or port;
* an address that is private (RFC 1918, fc00::/7), loopback, link-local (169.254/16, holding
  the 169.254.169.254 metadata service; fe80::/10), unspecified (0.0.0.0, ::), multicast,
  shared (100.64/10), reserved or otherwise not globally routable, including the IPv4 hidden
  inside IPv4-mapped, IPv4-compatible, NAT64, 6to4 and Teredo IPv6 forms;
* legacy IPv4 spellings that resolvers accept (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`)
  are parsed the way `inet_aton` does, so they are judged by the address they mean;
* a metadata or local host name (`metadata.google.internal`, `metadata`, `localhost`, ...).

An allow-list entry (a host name, an IP address, or a CIDR) exempts what it names: a listed
host name skips every check on that host; a listed address or network admits those addresses.
The local dev stack and the tests allow `127.0.0.1`, where their fakes listen.

The same rules run twice: `check_base_url` when an operator registers a base URL (the control
plane's `controlplane.ssrf` adds the DNS lookup), and `AddressPolicy` at connect time in the data
plane (`dataplane.outbound`), on every address a connection is actually opened to, so a name that
resolves differently later (DNS rebinding) or a base URL rewritten in the config bucket is still
refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable
from urllib.parse import urlsplit

from schemas.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Iterable[str]]  # host name -> IP address strings

METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
    "metadata.azure.internal", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback",
})
# Not covered by the address classes: Azure's wire server (a public address that only answers VMs).
_BLOCKED_ADDRESSES = frozenset({ipaddress.ip_address("168.63.129.16")})

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _reject(message: str, code: str = "invalid_base_url") -> InvalidRequest:
    return InvalidRequest(message, param="base_url", code=code)


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """The address `inet_aton` would read from `host` (1 to 4 dot-separated parts, each decimal,
    octal with a leading 0, or hex with 0x; the last part fills the remaining bytes), or None."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        try:
            if part[:2].lower() == "0x":
                values.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                values.append(int(part, 8))
            else:
                values.append(int(part, 10) if part.isdigit() else -1)
        except ValueError:
            return None
    if any(v < 0 for v in values):
        return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for v in head:
        number = number << 8 | v
    return ipaddress.IPv4Address(number << 8 * (4 - len(head)) | last)


def parse_host_address(host: str) -> IPAddress | None:
    """`host` (already without brackets) as an IP address, including legacy IPv4 spellings."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if all(c in "0123456789abcdefxABCDEFX." for c in host) and host[:1].isdigit():
        return _inet_aton(host)
    return None


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64 or (addr in _IPV4_COMPATIBLE and int(addr) > 1):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def address_problem(addr: IPAddress) -> str | None:
    """Why `addr` must not be a provider address, or None when it is public."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None:
            problem = address_problem(inner)
            return f"embeds {inner}, which {problem}" if problem else None
    if addr in _BLOCKED_ADDRESSES:
        return "is a cloud metadata address"
    for test, what in (
        (addr.is_unspecified, "is unspecified"),
        (addr.is_loopback, "is a loopback address"),
        (addr.is_link_local, "is link-local (cloud metadata lives there)"),
        (addr.is_multicast, "is multicast"),
        (addr.is_private, "is a private address"),
        (not addr.is_global, "is not a globally routable address"),
    ):
        if test:
            return what
    return None


def _allowed(addr: IPAddress, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


def _split_allow(allow: Collection[str]) -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    hosts: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in allow:
        entry = entry.strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            hosts.add(entry)
    return hosts, networks


def parse_allow_list(text: str) -> tuple[str, ...]:
    """A comma-separated setting (`ALEPHANT_SSRF_ALLOW`) as allow-list entries."""
    return tuple(e.strip() for e in text.split(",") if e.strip())


def url_host(url: str) -> str:
    """The normalized host of an http(s) URL (lower case, no brackets, no trailing dot), or
    InvalidRequest for a URL the gateway will not call."""
    if any(c.isspace() or ord(c) < 0x20 or c == "\\" for c in url):
        raise _reject("base_url must not contain whitespace, control characters or backslashes.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _reject("base_url is not a valid URL (check the host and port).") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise _reject("base_url must be an http(s) URL.")
    if "@" in parts.netloc:
        raise _reject("base_url must not contain credentials; send the provider key as api_key.")
    host = (parts.hostname or "").rstrip(".")
    if not host or ("%" in host and ":" not in host) or port == 0:  # `%` only as an IPv6 zone id
        raise _reject("base_url must name a host (and a port from 1 to 65535, if any).")
    return host.lower()


class AddressPolicy:
    """The allow-list (`ALEPHANT_SSRF_ALLOW`), parsed once, and the verdict on a host or address.

    `host_allowed(host)`: the normalized host name is listed, so every check on it is skipped.
    `refusal(addr)`: why `addr` must not be called (`address_problem`), or None when it is public
    or inside a listed address/network. Pure and immutable after construction."""

    __slots__ = ("_hosts", "_networks")

    def __init__(self, allow: Collection[str] = ()) -> None:
        self._hosts, self._networks = _split_allow(allow)

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._hosts

    def refusal(self, addr: IPAddress) -> str | None:
        if _allowed(addr, self._networks):
            return None
        return address_problem(addr)


def is_local_name(host: str) -> bool:
    """A metadata or local host name (`localhost`, `metadata.google.internal`, `x.localhost`)."""
    host = host.lower().rstrip(".")
    return host in METADATA_HOSTS or host.endswith(".localhost")


def check_base_url(url: str, allow: Collection[str] = (), resolve: Resolver | None = None) -> None:
    """Raise InvalidRequest(param="base_url") unless `url` is an http(s) URL whose host, and
    every address `resolve(host)` returns for a host name, is public or allow-listed.

    Pure: all IO is in `resolve` (None checks the URL and literal addresses only). A resolver
    that returns no address for a host name fails the check, since nothing could be verified."""
    host = url_host(url)
    policy = AddressPolicy(allow)
    if policy.host_allowed(host):
        return
    literal = parse_host_address(host.partition("%")[0])  # an IPv6 zone id does not change the address
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        if is_local_name(host):
            raise _reject(f"base_url host '{host}' is a local or cloud metadata name.", "base_url_not_allowed")
        if resolve is None:
            return
        addresses = []
        for text in resolve(host):
            addr = parse_host_address(text.partition("%")[0])
            if addr is None:
                raise _reject(f"base_url host '{host}' resolved to an unreadable address.", "base_url_not_allowed")
            addresses.append(addr)
        if not addresses:
            raise _reject(f"base_url host '{host}' could not be resolved.", "base_url_unresolvable")
    for addr in addresses:
        problem = policy.refusal(addr)
        if problem is not None:
            shown = host if literal is not None else f"{host} ({addr})"
            raise _reject(f"base_url host {shown} {problem}; the gateway does not call internal addresses "
                          "unless they are allow-listed (ALEPHANT_SSRF_ALLOW).", "base_url_not_allowed")
