"""`alephant mcp-servers set|list|get|delete`: the upstream MCP servers a workspace's keys reach at
`/mcp/{name}` and `/mcp`, thin admin API calls (deploy/admin_cli.py).

`set NAME` creates the workspace's server of that name or, when it exists, changes the fields
given: `--tool`, `--deny-tool` and `--remove-tool` are merged over the server's current tools,
while `--header` (or `--header-env`) replaces every stored header. Header values are secrets: the
API stores them encrypted and shows only their names; prefer `--header-env NAME=VAR`, which reads
the value from an environment variable, to `--header 'Name: value'`, which leaves it in the
shell history and the process list. `get` and `delete` take a server's name (in `--workspace`)
or its id."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any
from urllib.parse import quote, urlencode

from deploy.admin_cli import Args, Commands, admin_call, admin_client, default_ws, drop_none
from deploy.stack import AdminError

BASE = "/admin/v1/mcp-servers"


def parse_header(text: str) -> tuple[str, str]:
    """`'Name: value'` -> (name, value)."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or not value.strip():
        # Not echoed: it may be a credential.
        raise argparse.ArgumentTypeError("expected 'Name: value', e.g. 'Authorization: Bearer ...'")
    return name.strip(), value.strip()


def parse_header_env(text: str) -> tuple[str, str]:
    """`NAME=VAR` -> (header name, environment variable)."""
    name, sep, var = text.partition("=")
    if not sep or not name.strip() or not var.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VAR (e.g. Authorization=SEARCH_MCP_AUTH)")
    return name.strip(), var.strip()


def parse_tool_price(text: str) -> tuple[str, str]:
    """`NAME=PRICE_USD` -> (tool, price as a decimal string; the API checks it)."""
    name, sep, price = text.rpartition("=")
    if not sep or not name or not price:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PRICE_USD (e.g. web_search=0.01)")
    return name, price


def headers_given(a: Args) -> dict[str, str] | None:
    """The headers the flags give (None: keep the stored ones; {}: remove them)."""
    if a.no_headers:
        if a.header or a.header_env:
            sys.exit("alephant: give --header/--header-env or --no-headers, not both")
        return {}
    if not a.header and not a.header_env:
        return None
    headers = dict(a.header or [])
    for name, var in a.header_env or []:
        value = os.environ.get(var)
        if not value:
            sys.exit(f"alephant: --header-env {name}={var}: the environment variable {var} is not set")
        headers[name] = value
    return headers


def merged_tools(current: dict[str, Any], a: Args) -> dict[str, dict[str, Any]] | None:
    """The server's tools (`current`, as the API shows them) with the flags applied; None when no
    tool flag was given (the stored tools are kept)."""
    if not (a.tool or a.deny_tool or a.remove_tool):
        return None
    tools = {name: {"price_usd": t["price_usd"], "allowed": t["allowed"]} for name, t in current.items()}
    for name, price in a.tool or []:
        tools[name] = {"price_usd": price, "allowed": True}
    for name in a.deny_tool or []:
        tools[name] = tools.get(name, {"price_usd": "0"}) | {"allowed": False}
    for name in a.remove_tool or []:
        tools.pop(name, None)
    return tools


def _find(a: Args, name: str) -> dict[str, Any] | None:
    """The workspace's server named `name`, or None."""
    try:
        items = admin_client(a).call("GET", f"{BASE}?{urlencode({'workspace_id': default_ws(a)})}")["data"]
    except AdminError as exc:
        sys.exit(f"alephant: {exc}")
    except OSError as exc:
        sys.exit(f"alephant: cannot reach the admin API: {exc}")
    return next((s for s in items if s["name"] == name), None)


def run_set(a: Args) -> None:
    existing = _find(a, a.name)
    headers = headers_given(a)
    tools = merged_tools(existing["tools"] if existing else {}, a)
    fields = drop_none({"url": a.url, "headers": headers, "tools": tools, "timeout_s": a.timeout,
                        "payments": a.payments})
    if existing is None:
        if a.url is None:
            sys.exit(f"alephant: workspace '{default_ws(a)}' has no MCP server named '{a.name}'; give --url to "
                     "create it")
        body = {"workspace_id": default_ws(a), "name": a.name} | fields
        admin_call("POST", lambda _: BASE, lambda _: body)(a)
    else:
        if not fields:
            sys.exit(f"alephant: MCP server '{a.name}' ({existing['id']}) exists; give the flags to change (see "
                     "--help)")
        admin_call("PATCH", lambda _: f"{BASE}/{quote(existing['id'], safe='')}", lambda _: fields)(a)


def _by_name_or_id(method: str) -> Any:
    """`get`/`delete`: the workspace's server of that name, else the id given."""
    def run(a: Args) -> None:
        found = _find(a, a.server)
        ident = found["id"] if found is not None else a.server
        admin_call(method, lambda _: f"{BASE}/{quote(ident, safe='')}")(a)

    return run


def add_mcp_server_commands(cmds: Commands) -> None:
    leaf = cmds.leaf
    g = cmds.group("mcp-servers", "Upstream MCP servers (Streamable HTTP) a workspace's keys reach through the "
                   "gateway at /mcp/<name> and /mcp, with per-tool prices and switches; their headers are stored "
                   "encrypted and never shown")
    p = leaf(g, "set", "Create the workspace's MCP server NAME or change the flags given, e.g. alephant mcp-servers "
             "set search --url https://mcp.example.com/mcp --header-env Authorization=SEARCH_MCP_AUTH --tool "
             "web_search=0.01 --deny-tool delete_index --timeout 20", "POST", lambda a: BASE)
    p.set_defaults(fn=run_set)
    p.add_argument("name", help="1-64 lower-case letters, digits, '-' or '_': the path segment of /mcp/<name> and "
                   "the prefix of its tools' names (<name>.<tool>) in the aggregate /mcp and in policies")
    p.add_argument("--url", help="the server's MCP endpoint, http(s) (required to create; internal addresses are "
                   "refused unless allow-listed by ALEPHANT_SSRF_ALLOW)")
    p.add_argument("--header", action="append", type=parse_header, metavar="'NAME: VALUE'",
                   help="a header sent on every upstream request, e.g. 'Authorization: Bearer ...' (repeatable, at "
                        "most 16; given, the headers replace every stored one). Prefer --header-env for secrets")
    p.add_argument("--header-env", action="append", type=parse_header_env, metavar="NAME=VAR",
                   help="a header whose value is read from the environment variable VAR (repeatable; with "
                        "--header, together they replace every stored header)")
    p.add_argument("--no-headers", action="store_true", help="remove every stored header")
    p.add_argument("--tool", action="append", type=parse_tool_price, metavar="NAME=PRICE_USD",
                   help="the price of one call of tool NAME in US dollars, a decimal string such as 0.01 (at most 9 "
                        "decimals); the tool is allowed (repeatable; merged over the current tools)")
    p.add_argument("--deny-tool", action="append", metavar="NAME",
                   help="hide tool NAME from tools/list and refuse its calls, for every key (repeatable)")
    p.add_argument("--remove-tool", action="append", metavar="NAME",
                   help="forget tool NAME's settings: it is allowed and free again (repeatable)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="the most one upstream request may take, 1..300 (default 30)")
    p.add_argument("--payments", choices=("pass", "pay"),
                   help="x402-paid tools: 'pass' the payment request to the client (default) or 'pay' it from the "
                        "workspace's wallet, under the agent's policies and budgets")
    leaf(g, "list", "List the workspace's MCP servers", "GET",
         lambda a: f"{BASE}?{urlencode({'workspace_id': default_ws(a)})}")
    p = leaf(g, "get", "Show an MCP server (by name in the workspace, or by id): its URL, header names (never "
             "values), tools and timeout", "GET", lambda a: BASE)
    p.set_defaults(fn=_by_name_or_id("GET"))
    p.add_argument("server", metavar="NAME|ID")
    p = leaf(g, "delete", "Delete an MCP server (by name in the workspace, or by id): its endpoint and tools are gone "
             "from the workers once they apply the change", "DELETE", lambda a: BASE)
    p.set_defaults(fn=_by_name_or_id("DELETE"))
    p.add_argument("server", metavar="NAME|ID")
