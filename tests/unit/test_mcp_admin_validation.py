"""MCP server admin inputs: every refusal a 400 naming the field and the problem (a header value
never quoted), `build` (headers encrypted, kept on PATCH unless the URL changes origin, prices in
nano-USD), the public view (header names only, no ciphertext), the snapshot index kept live by
KV updates, the OpenAPI entries and the CLI's pure helpers."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace
from typing import Any, cast

import pytest
from nats.js.kv import KV_DEL

from controlplane import commands as c
from controlplane.app import openapi_document
from controlplane.commands import ConfigCommands, Prior
from controlplane.inputs import given_fields
from controlplane.mcp_servers import MCP_SERVER, CreateMcpServer, PatchMcpServer, same_origin
from dataplane.snapshot import _apply
from deploy.mcp_servers_cli import merged_tools, parse_header, parse_header_env, parse_tool_price
from schemas.entities import ConfigEntity, McpServer, McpTool, entity_encoder, kv_key
from schemas.errors import InvalidRequest
from schemas.keys import KeyRing
from schemas.settings import Secret
from schemas.snapshot import Snapshot

SECRET = "Bearer mcp-canary-4f1d2b"
BASE: dict[str, Any] = {"workspace_id": "demo", "name": "search", "url": "http://127.0.0.1:9/mcp"}
KEYRING = KeyRing(Secret("0" * 43 + "="))


def _refused(raw: dict[str, Any], param: str | None, code: str | None, *words: str,
             schema: type[Any] = CreateMcpServer) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        c.parse_command(raw, schema)
    err = info.value
    assert err.status == 400
    assert (err.param, err.code) == (param, code), err.message
    for word in words:
        assert word in err.message, (word, err.message)
    assert SECRET not in err.message and "canary" not in err.message
    return err


def test_a_minimal_body_parses_with_defaults() -> None:
    cmd = c.parse_command(BASE, CreateMcpServer)
    assert (cmd.headers, cmd.tools, cmd.timeout_s) == (None, {}, 30.0)


def test_a_full_body_parses() -> None:
    raw = BASE | {"headers": {"Authorization": SECRET, "X-Api-Version": "2"}, "timeout_s": 5,
                  "tools": {"web_search": {"price_usd": "0.01"}, "delete_index": {"allowed": False},
                            "ns/tool.v2": {"price_usd": "0.000000001", "allowed": True}}}
    cmd = c.parse_command(raw, CreateMcpServer)
    assert cmd.timeout_s == 5 and cmd.headers == raw["headers"]
    assert cmd.tools["delete_index"].allowed is False and cmd.tools["web_search"].price_usd == "0.01"


@pytest.mark.parametrize("name", ["Search", "-search", "_x", "a b", "a.b", "a" * 65, "", "srv/1", "é"])
def test_bad_names_are_refused(name: str) -> None:
    _refused(BASE | {"name": name}, "name", "invalid_name", "/mcp/{name}")


@pytest.mark.parametrize("name", ["a", "0", "search", "my-server_2", "a" * 64])
def test_good_names_parse(name: str) -> None:
    assert c.parse_command(BASE | {"name": name}, CreateMcpServer).name == name


@pytest.mark.parametrize("url", ["ftp://example.com/mcp", "example.com/mcp", "http:///mcp", "", "file:///etc/passwd"])
def test_urls_that_are_not_http_are_refused(url: str) -> None:
    _refused(BASE | {"url": url}, "url", "invalid_url")


def test_header_rules() -> None:
    _refused(BASE | {"headers": {f"X-H{i}": "v" for i in range(17)}}, "headers", "too_many_headers", "16")
    _refused(BASE | {"headers": {"Bad Name": SECRET}}, "headers", "invalid_header_name", "HTTP token")
    _refused(BASE | {"headers": {"X:Y": SECRET}}, "headers", "invalid_header_name")
    _refused(BASE | {"headers": {"": SECRET}}, "headers", "invalid_header_name")
    for reserved in ("Host", "content-length", "Mcp-Session-Id", "Transfer-Encoding", "Accept"):
        _refused(BASE | {"headers": {reserved: "x"}}, "headers", "reserved_header", reserved)
    _refused(BASE | {"headers": {"Authorization": SECRET, "authorization": SECRET}}, "headers", "duplicate_header",
             "case-insensitive")
    _refused(BASE | {"headers": {"Authorization": ""}}, "headers.Authorization", "invalid_header_value")
    _refused(BASE | {"headers": {"Authorization": "x" * 4097}}, "headers.Authorization", "invalid_header_value",
             "4096")
    _refused(BASE | {"headers": {"Authorization": SECRET + "é"}}, "headers.Authorization", "invalid_header_value")
    # CR/LF (a second header smuggled in) and other control characters: the admin API's rule.
    _refused(BASE | {"headers": {"Authorization": SECRET + "\r\nX-Evil: 1"}}, "headers.Authorization",
             "invalid_characters")
    assert c.parse_command(BASE | {"headers": {"Authorization": "x" * 4096}}, CreateMcpServer).headers


def test_tool_rules() -> None:
    _refused(BASE | {"tools": {"t" * 129: {}}}, "tools", "invalid_tool_name", "128")
    _refused(BASE | {"tools": {"": {}}}, "tools", "invalid_tool_name")
    _refused(BASE | {"tools": {"web search": {}}}, "tools", "invalid_tool_name", "whitespace")
    _refused(BASE | {"tools": {f"t{i}": {} for i in range(257)}}, "tools", "too_many_tools", "256")
    for bad in ("-0.01", "0.0000000001", "1e-3", "abc", "0.01 ", "1000001", ".5", "01"):
        _refused(BASE | {"tools": {"web_search": {"price_usd": bad}}}, "tools.web_search.price_usd",
                 "invalid_amount", "decimal")
    # Shapes msgspec refuses (it names a map's values `[...]`).
    _refused(BASE | {"tools": {"web_search": {"price_nanos": 5}}}, "tools[...]", None, "price_nanos")
    _refused(BASE | {"tools": {"web_search": {"price_usd": 0.01}}}, "tools[...].price_usd", None, "str")
    assert c.parse_command(BASE | {"tools": {"t" * 128: {}}}, CreateMcpServer).tools


@pytest.mark.parametrize("timeout", [0, 0.5, 300.5, -1, 10_000])
def test_timeouts_outside_1_to_300_are_refused(timeout: float) -> None:
    _refused(BASE | {"timeout_s": timeout}, "timeout_s", "invalid_timeout", "between 1 and 300")


def test_unknown_fields_are_refused() -> None:
    _refused(BASE | {"command": "/bin/sh"}, None, None, "unknown field `command`")
    _refused({"workspace_id": "elsewhere"}, None, None, "unknown field `workspace_id`", schema=PatchMcpServer)


def test_same_origin() -> None:
    assert same_origin("https://a.example/mcp", "https://A.example:443/other")
    assert same_origin("http://127.0.0.1/mcp", "http://127.0.0.1:80/v2")
    assert not same_origin("https://a.example/mcp", "http://a.example/mcp")
    assert not same_origin("https://a.example/mcp", "https://b.example/mcp")
    assert not same_origin("https://a.example/mcp", "https://a.example:8443/mcp")


# ---- build and the public view -------------------------------------------------------------------

async def _build(cmd: CreateMcpServer, prior: Prior | None = None) -> McpServer:
    cc = cast(ConfigCommands, SimpleNamespace(keyring=KEYRING, ssrf_allow=("127.0.0.1",)))
    entity = await MCP_SERVER.build(cc, cmd, "mcp_1", prior)
    assert isinstance(entity, McpServer)
    return entity


async def test_build_encrypts_headers_and_prices_tools_in_nanos() -> None:
    raw = BASE | {"headers": {"Authorization": SECRET}, "timeout_s": 12,
                  "tools": {"web_search": {"price_usd": "0.01"}, "delete_index": {"allowed": False}, "free": {}}}
    server = await _build(c.parse_command(raw, CreateMcpServer))
    assert list(server.headers_enc) == ["Authorization"]
    assert SECRET not in server.headers_enc["Authorization"]
    assert KEYRING.decrypt(server.headers_enc["Authorization"]).reveal() == SECRET
    assert server.tools == {"web_search": McpTool(price_nanos=10_000_000), "delete_index": McpTool(allowed=False),
                            "free": McpTool()}
    assert server.timeout_s == 12.0 and isinstance(server.timeout_s, float)
    assert server.tool("web_search").price_nanos == 10_000_000 and server.tool("unnamed") == McpTool()


async def test_an_internal_url_is_refused_on_build_naming_url() -> None:
    for url in ("http://10.0.0.1/mcp", "http://169.254.169.254/latest", "http://localhost:9/mcp", "http://[::1]/x"):
        with pytest.raises(InvalidRequest) as info:
            await _build(c.parse_command(BASE | {"url": url}, CreateMcpServer))
        assert (info.value.param, info.value.code) == ("url", "base_url_not_allowed"), (url, info.value.message)


async def test_patch_keeps_headers_unless_given_or_the_origin_changes() -> None:
    stored = await _build(c.parse_command(BASE | {"headers": {"Authorization": SECRET}}, CreateMcpServer))

    async def patched(patch: dict[str, Any]) -> McpServer:
        given = given_fields(c.parse_command(patch, PatchMcpServer))
        merged = c.parse_command(MCP_SERVER.fields(stored) | given, CreateMcpServer)
        return await _build(merged, Prior(stored, frozenset(given)))

    kept = await patched({"timeout_s": 9, "url": "http://127.0.0.1:9/other-path"})
    assert kept.headers_enc == stored.headers_enc and kept.timeout_s == 9
    assert (await patched({"headers": None})).headers_enc == {}
    assert (await patched({"headers": {}})).headers_enc == {}
    replaced = await patched({"headers": {"X-Key": "k2"}})
    assert list(replaced.headers_enc) == ["X-Key"] and KEYRING.decrypt(replaced.headers_enc["X-Key"]).reveal() == "k2"
    with pytest.raises(InvalidRequest) as info:
        await patched({"url": "http://127.0.0.1:10/mcp"})
    assert (info.value.param, info.value.code) == ("headers", "headers_required")
    moved = await patched({"url": "http://127.0.0.1:10/mcp", "headers": {"Authorization": "new"}})
    assert moved.url == "http://127.0.0.1:10/mcp"
    # Tools survive a PATCH that does not name them (they round-trip through the create fields).
    priced = await patched({"tools": {"web_search": {"price_usd": "0.25", "allowed": False}}})
    stored = priced
    again = await patched({"timeout_s": 3})
    assert again.tools == {"web_search": McpTool(price_nanos=250_000_000, allowed=False)}


async def test_the_public_view_shows_header_names_only() -> None:
    raw = BASE | {"headers": {"X-Team": "t", "Authorization": SECRET},
                  "tools": {"web_search": {"price_usd": "0.01"}, "delete_index": {"allowed": False}}}
    server = await _build(c.parse_command(raw, CreateMcpServer))
    view = c.public_view(server)
    assert view == {"kind": "mcp", "id": "mcp_1", "workspace_id": "demo", "name": "search",
                    "url": "http://127.0.0.1:9/mcp", "headers": ["Authorization", "X-Team"],
                    "tools": {"delete_index": {"price_usd": "0", "price_nanos": 0, "allowed": False},
                              "web_search": {"price_usd": "0.01", "price_nanos": 10_000_000, "allowed": True}},
                    "timeout_s": 30.0, "payments": "pass"}
    text = json.dumps(view)
    assert SECRET not in text and server.headers_enc["Authorization"] not in text and "headers_enc" not in text


# ---- the snapshot --------------------------------------------------------------------------------

def test_the_snapshot_keeps_mcp_servers_live_by_workspace_and_name() -> None:
    first = McpServer(id="mcp_1", workspace_id="ws_1", name="search", url="https://a.example/mcp",
                      headers_enc={"Authorization": "gAAAA"}, tools={"t": McpTool(price_nanos=5)})
    other_ws = McpServer(id="mcp_2", workspace_id="ws_2", name="search", url="https://b.example/mcp")
    staging: dict[str, ConfigEntity] = {}
    for server in (first, other_ws):  # as the worker decodes KV entries
        _apply(staging, kv_key(server), None, entity_encoder.encode(server))
    assert kv_key(first) == "mcp.mcp_1"
    snap = Snapshot.build(staging, 1)
    assert snap.mcp_servers == {("ws_1", "search"): first, ("ws_2", "search"): other_ws}

    renamed = McpServer(id="mcp_1", workspace_id="ws_1", name="web", url="https://a.example/mcp", timeout_s=5)
    snap = snap.with_changes({kv_key(renamed): renamed}, 2)
    assert snap.mcp_servers == {("ws_1", "web"): renamed, ("ws_2", "search"): other_ws}
    _apply(staging, kv_key(renamed), KV_DEL, None)
    snap = snap.with_changes({kv_key(renamed): None}, 3)
    assert snap.mcp_servers == {("ws_2", "search"): other_ws}


def test_an_entity_round_trips_through_the_kv_encoding_with_defaults_omitted_from_tools() -> None:
    server = McpServer(id="mcp_1", workspace_id="ws_1", name="s", url="https://a.example/mcp",
                       tools={"free": McpTool(), "paid": McpTool(price_nanos=7)})
    encoded = json.loads(entity_encoder.encode(server))
    assert encoded["kind"] == "mcp" and encoded["tools"] == {"free": {}, "paid": {"price_nanos": 7}}
    staging: dict[str, ConfigEntity] = {}
    _apply(staging, "mcp.mcp_1", None, entity_encoder.encode(server)[:-1] + b', "added_later": 1}')
    assert staging == {"mcp.mcp_1": server}


# ---- OpenAPI and CLI -----------------------------------------------------------------------------

def test_openapi_lists_the_mcp_server_routes() -> None:
    doc = openapi_document()
    assert set(doc["paths"]["/admin/v1/mcp-servers"]) == {"post", "get"}
    assert set(doc["paths"]["/admin/v1/mcp-servers/{id}"]) == {"get", "patch", "delete"}
    create = doc["components"]["schemas"]["CreateMcpServer"]
    assert {"workspace_id", "name", "url", "headers", "tools", "timeout_s"} <= set(create["properties"])
    assert "ToolIn" in doc["components"]["schemas"]


def test_cli_parsers() -> None:
    assert parse_header("Authorization: Bearer a:b") == ("Authorization", "Bearer a:b")
    assert parse_header_env("Authorization=MY_VAR") == ("Authorization", "MY_VAR")
    assert parse_tool_price("web_search=0.01") == ("web_search", "0.01")
    for bad in ("no-colon-secret", ": value", "Name:"):
        with pytest.raises(argparse.ArgumentTypeError) as info:
            parse_header(bad)
        assert "secret" not in str(info.value)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_tool_price("web_search")


def test_cli_tool_flags_merge_over_the_current_tools() -> None:
    current = {"a": {"price_usd": "0.5", "price_nanos": 500_000_000, "allowed": True},
               "b": {"price_usd": "0", "price_nanos": 0, "allowed": True}}
    flags = argparse.Namespace(tool=[("c", "0.01"), ("b", "2")], deny_tool=["a", "d"], remove_tool=["b"])
    assert merged_tools(current, flags) == {"a": {"price_usd": "0.5", "allowed": False},
                                            "c": {"price_usd": "0.01", "allowed": True},
                                            "d": {"price_usd": "0", "allowed": False}}
    assert merged_tools(current, argparse.Namespace(tool=None, deny_tool=None, remove_tool=None)) is None
