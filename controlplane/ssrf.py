"""The control plane's SSRF shell: the DNS lookup around the pure base-URL guard in `schemas.ssrf`.

The rules themselves (what counts as internal, the allow-list) live in `schemas.ssrf`, so the data
plane applies the very same policy again at connect time (`dataplane.outbound`) without importing
the control plane. The names re-exported here keep the control plane's callers unchanged.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Collection

from schemas.ssrf import (
    AddressPolicy,
    address_problem,
    check_base_url,
    parse_allow_list,
    parse_host_address,
    url_host,
)

__all__ = ["address_problem", "check_base_url", "check_base_url_resolving", "parse_allow_list",
           "parse_host_address", "resolve_addresses", "url_host"]


async def resolve_addresses(host: str) -> list[str]:
    """Every address the system resolver gives for `host` (empty when it does not resolve)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def check_base_url_resolving(url: str, allow: Collection[str] = ()) -> None:
    """`check_base_url` with the system resolver: the IO shell the admin command calls. The URL,
    literal addresses and names are judged first, so refused names are never looked up."""
    check_base_url(url, allow)
    host = url_host(url)
    if parse_host_address(host.partition("%")[0]) is not None or AddressPolicy(allow).host_allowed(host):
        return
    addresses = await resolve_addresses(host)
    check_base_url(url, allow, resolve=lambda _host: addresses)
