"""schemas/ssrf.py: the base-URL guard is pure; DNS answers are injected (controlplane/ssrf.py adds the lookup)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.ssrf import check_base_url_resolving
from schemas.errors import InvalidRequest
from schemas.ssrf import (
    address_problem,
    check_base_url,
    parse_allow_list,
    parse_host_address,
)


def dns(table: dict[str, list[str]]) -> object:
    def resolve(host: str) -> Iterable[str]:
        return table.get(host, [])
    return resolve


def rejected(url: str, allow: tuple[str, ...] = (), table: dict[str, list[str]] | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        check_base_url(url, allow, resolve=dns(table) if table is not None else None)  # type: ignore[arg-type]
    assert info.value.param == "base_url" and info.value.status == 400
    return info.value


# --- accepted -----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://api.openai.com/v1",
    "https://api.mistral.ai/v1/",
    "http://8.8.8.8:8080/v1",
    "https://[2606:4700:4700::1111]/v1",
    "https://[::ffff:8.8.8.8]/v1",  # mapped, but public
    "https://api.cohere.ai/compatibility/v1?x=1",
])
def test_public_urls_pass(url: str) -> None:
    check_base_url(url, (), resolve=lambda host: ["104.18.6.192", "2606:4700::6812:6c0"])


# --- scheme and shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "ftp://api.openai.com", "file:///etc/passwd", "gopher://x", "api.openai.com/v1", "//api.openai.com",
    "http://", "http:///v1", "http://a:0/", "http://a:99999/", "http://a:port/",
    "http://api.openai.com\\@127.0.0.1/", "http://api.openai.com /", "http://exa\tmple.com",
    "http://%31%32%37.0.0.1/",
])
def test_malformed_or_non_http_urls(url: str) -> None:
    assert rejected(url).code == "invalid_base_url"


@pytest.mark.parametrize("url", ["http://evil@127.0.0.1", "https://user:pass@api.openai.com/v1",
                                 "http://api.openai.com@169.254.169.254/"])
def test_userinfo_is_refused(url: str) -> None:
    assert "credentials" in rejected(url).message


# --- literal addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1:9999/v1", "loopback"),
    ("http://127.255.0.1/", "loopback"),
    ("http://localhost:8080/", "local"),
    ("http://LOCALHOST./", "local"),
    ("http://foo.localhost/", "local"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.10/", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.251/", "multicast"),
    ("http://100.100.100.200/", "not a globally routable"),  # Alibaba metadata, shared address space
    ("http://168.63.129.16/", "metadata"),
    ("http://[::1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://[fd00:ec2::254]/", "private"),  # AWS IMDS over IPv6, unique local
    ("http://[fc00::1]/", "private"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::ffff:127.0.0.1]/", "127.0.0.1"),
    ("http://[::ffff:7f00:1]/", "127.0.0.1"),
    ("http://[::ffff:10.0.0.1]/", "10.0.0.1"),
    ("http://[::ffff:169.254.169.254]/", "169.254.169.254"),
    ("http://[::127.0.0.1]/", "127.0.0.1"),  # IPv4-compatible
    ("http://[64:ff9b::a9fe:a9fe]/", "169.254.169.254"),  # NAT64
    ("http://[2002:c0a8:101::1]/", "192.168.1.1"),  # 6to4
])
def test_internal_literals_are_refused(url: str, why: str) -> None:
    assert why in rejected(url).message


@pytest.mark.parametrize(("url", "address"), [
    ("http://2130706433/", "127.0.0.1"),
    ("http://0x7f000001/", "127.0.0.1"),
    ("http://0x7f.1/", "127.0.0.1"),
    ("http://0177.0.0.1/", "127.0.0.1"),
    ("http://0177.1/", "127.0.0.1"),
    ("http://127.1/", "127.0.0.1"),
    ("http://127.0.1/", "127.0.0.1"),
    ("http://0/", "0.0.0.0"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254"),
    ("http://2852039166/", "169.254.169.254"),
    ("http://012.0.0.1/", "10.0.0.1"),
])
def test_legacy_ipv4_spellings_are_read_like_inet_aton(url: str, address: str) -> None:
    host = url.split("//")[1].split("/")[0]
    assert parse_host_address(host) == ipaddress.ip_address(address)
    assert rejected(url).code == "base_url_not_allowed"


@pytest.mark.parametrize("host", ["256.1.1.1", "1.2.3.4.5", "08.1.1.1", "1e100", "127..1", "0x1.0x100.1.1",
                                  "4294967296", "api.openai.com", "123abc", "1_0.0.0.1"])
def test_not_addresses(host: str) -> None:
    assert parse_host_address(host) is None


def test_bare_hex_prefix_is_read_as_zero_the_safe_way() -> None:
    assert parse_host_address("0x") == ipaddress.IPv4Address(0)


def test_metadata_names_are_refused_without_dns() -> None:
    for host in ("metadata", "metadata.google.internal", "METADATA.GOOGLE.INTERNAL.", "instance-data"):
        assert "metadata" in rejected(f"http://{host}/computeMetadata/v1").message


# --- resolution ---------------------------------------------------------------------------------


def test_names_are_judged_by_every_address_they_resolve_to() -> None:
    table = {"rebind.example": ["93.184.216.34", "10.0.0.5"], "ok.example": ["93.184.216.34"],
             "v6.example": ["::ffff:127.0.0.1"], "zone.example": ["fe80::1%2"]}
    check_base_url("https://ok.example/v1", (), resolve=dns(table))  # type: ignore[arg-type]
    assert "10.0.0.5" in rejected("https://rebind.example/v1", table=table).message
    assert "127.0.0.1" in rejected("https://v6.example/v1", table=table).message
    assert "link-local" in rejected("https://zone.example/v1", table=table).message
    assert rejected("https://nx.example/v1", table=table).code == "base_url_unresolvable"


def test_without_a_resolver_only_literals_are_judged() -> None:
    check_base_url("https://internal.example/v1")
    rejected("http://10.0.0.1/")


# --- allow-list ---------------------------------------------------------------------------------


def test_allow_list_by_host() -> None:
    table = {"llm.corp": ["10.2.3.4"]}
    check_base_url("http://llm.corp:8000/v1", ("llm.corp",), resolve=dns(table))  # type: ignore[arg-type]
    check_base_url("http://LLM.CORP./v1", (" llm.corp ",), resolve=dns(table))  # type: ignore[arg-type]
    check_base_url("http://localhost:9999/v1", ("localhost",))
    rejected("http://other.corp/v1", ("llm.corp",), table={"other.corp": ["10.2.3.5"]})


def test_allow_list_by_address_and_cidr() -> None:
    check_base_url("http://127.0.0.1:41234/v1", ("127.0.0.1",))
    check_base_url("http://10.9.8.7/v1", ("10.0.0.0/8",))
    check_base_url("http://[fd00::5]/v1", ("fd00::/8",))
    check_base_url("http://[::1]:8080/", ("[::1]",))
    check_base_url("http://svc.internal.example/", ("10.0.0.0/8",),
                   resolve=dns({"svc.internal.example": ["10.0.0.7"]}))  # type: ignore[arg-type]
    rejected("http://127.0.0.2/", ("127.0.0.1",))
    rejected("http://mixed.example/", ("10.0.0.0/8",), table={"mixed.example": ["10.0.0.1", "127.0.0.1"]})
    # An allow-listed address does not allow-list the names that resolve to it by accident of spelling.
    rejected("http://2130706433/", ("localhost",))


def test_allow_list_setting_parsing() -> None:
    assert parse_allow_list("") == ()
    assert parse_allow_list(" 127.0.0.1, ,10.0.0.0/8,llm.corp ") == ("127.0.0.1", "10.0.0.0/8", "llm.corp")


async def test_resolving_shell_uses_the_system_resolver() -> None:
    await check_base_url_resolving("http://127.0.0.1:1/v1", ("127.0.0.1",))
    with pytest.raises(InvalidRequest):
        await check_base_url_resolving("http://localhost:1/v1")  # refused by name, before any lookup


# --- properties ---------------------------------------------------------------------------------


@given(st.ip_addresses(v=4))
def test_every_ipv4_is_classified_consistently_with_its_mapped_form(addr: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{addr}")
    assert (address_problem(addr) is None) == (address_problem(mapped) is None)


@given(st.ip_addresses(v=4))
def test_decimal_spelling_equals_dotted(addr: ipaddress.IPv4Address) -> None:
    assert parse_host_address(str(int(addr))) == addr
    assert parse_host_address(hex(int(addr))) == addr
